"""Fallback marks (``fallback_marks``, policies/_conversation.py): at an explicit prompt cache, a call marks its
prefix for a write when another turn of its conversation waits in a batch more likely late than not whose fallback
call comes within the cache's TTL (an urgent turn's try), so that fallback reads the write. Before, only a prefix
sent by a call within the TTL was marked, and a turn in such a batch counted for nothing: the first call of the two
wrote nothing and the fallback paid its whole prompt cold (docs/benchmarks.md, "Stop 84")."""

from __future__ import annotations

import pytest

from engine.core.cost import price_alone
from engine.core.errors import PolicyError
from engine.core.grouping import PrefixSightings
from engine.core.request import Request
from engine.core.settings import Settings
from engine.runtime.scheduler import GroupTable
from engine.sim.simulator import MODES, simulate
from policies import Smart, SmartParams
from tests.unit.test_warm_followups import PREFIX, _cat

CAT = _cat()
SONNET = "claude-sonnet-4-5"


def _turn(i: int, at: float, blocks: list[int], deadline_s: float) -> Request:
    return Request.model_validate({"id": f"t{i}", "arrival_s": at, "model": SONNET, "prompt": f"turn {i}",
                                   "priority": "urgent", "input_tokens": len(blocks) * 512 + 300,
                                   "output_tokens": 200, "prefix_blocks": blocks, "deadline_s": deadline_s})


def _try(table: GroupTable, r: Request):
    """``r`` added and its group decided until it is dispatched (an urgent group gathers for seconds)."""
    out, wake = table.add(r, ("c",), r.arrival_s)
    while not out and wake is not None:
        out, wake = table.wake(wake, wake.at)
    return out[0].decision


def test_a_call_marks_its_prefix_when_a_turn_of_its_conversation_will_fall_back_within_the_ttl():
    table = GroupTable(Smart(CAT), CAT)
    tried = _try(table, _turn(1, 0.0, PREFIX + [7], 300.0))
    assert tried.mode == "batch_api" and tried.hedge_at - 0.0 <= 300.0  # the urgent turn's try, likely late
    # A turn of it due too soon for a batch is called now: its write is read by t1's fallback at the hedge.
    now = _try(table, _turn(2, 60.0, PREFIX + [7, 8], 30.0))
    assert now.mode == "sync" and now.cache_write and "prefix marked for caching" in now.reason
    assert tried.prefix == ((("anthropic", SONNET, tuple(PREFIX[:2]))),)  # one key per member, for the runtime
    # Off, or a conversation with nothing in such a batch: not marked, as before.
    off = GroupTable(Smart(CAT, SmartParams(fallback_marks=False)), CAT)
    assert _try(off, _turn(1, 0.0, PREFIX + [7], 300.0)).prefix is None
    assert not _try(off, _turn(2, 60.0, PREFIX + [7, 8], 30.0)).cache_write
    other = _try(table, _turn(3, 60.0, list(range(300, 321)), 30.0))
    assert other.mode == "sync" and not other.cache_write


def test_a_turn_back_from_its_own_try_is_not_marked_for_its_own_expectation():
    table = GroupTable(Smart(CAT), CAT)
    t1 = _turn(1, 0.0, PREFIX + [7], 300.0)
    tried = _try(table, t1)
    back, _ = table.add(t1, ("c",), tried.hedge_at, returned=True)
    assert back[0].decision.mode == "sync" and not back[0].decision.cache_write


def test_the_expectations_are_the_runtimes_bounded_and_forget_what_is_past():
    s = PrefixSightings(capacity=2)
    s.expect("a", 100.0, ["u1"], now=0.0)
    assert s.expected("a", 50.0, 150.0, but="u2") and not s.expected("a", 50.0, 150.0, but="u1")
    assert not s.expected("a", 101.0, 400.0, but="u2") and not s.expected("b", 0.0, 400.0, but="u2")
    s.expect("a", 300.0, ["u3"], now=200.0)  # u1's hedge has passed: sent or back, no longer expected
    assert s.expected("a", 250.0, 350.0, but="u1") and not s.expected("a", 50.0, 150.0, but="u3")
    s.expect("b", 10.0, ["u4"], now=0.0)
    s.expect("c", 10.0, ["u5"], now=0.0)
    assert not s.expected("a", 250.0, 350.0, but="u1")  # the least recent prefix forgotten first


def test_in_the_simulator_the_fallback_reads_the_calls_write_and_the_two_cost_less():
    reqs = [_turn(1, 0.0, PREFIX + [7], 300.0), _turn(2, 60.0, PREFIX + [7, 8], 30.0)]
    slow = Settings.model_validate({"sim": {"turnaround_scale": 50.0}})  # every batch late: t1 falls back
    on = simulate(reqs, Smart(CAT), catalog=CAT, settings=slow, seed=1)
    off = simulate(reqs, Smart(CAT, SmartParams(fallback_marks=False)), catalog=CAT, settings=slow, seed=1)
    for res in (on, off):
        assert [MODES[m] for m in res.mode] == ["sync", "sync"]
        assert all(res.done_at[i] <= r.deadline_at for i, r in enumerate(reqs))
    # t2 writes its 22 blocks for 1.25x; t1, back at its hedge, reads the 21 it starts with.
    assert on.cost[1] == pytest.approx(price_alone(reqs[1], CAT, "sync", write=True).total)
    assert on.cost[0] == pytest.approx(price_alone(reqs[0], CAT, "sync", warm_blocks=21).total)
    # Before: t2 sent its prompt cold and wrote nothing, and t1's fallback, marked for t2's call within the TTL,
    # wrote its prefix for no one.
    assert off.cost[1] == pytest.approx(price_alone(reqs[1], CAT, "sync").total)
    assert off.cost[0] == pytest.approx(price_alone(reqs[0], CAT, "sync", write=True).total)
    assert on.total_cost < off.total_cost


def test_a_batch_dispatch_naming_one_key_for_all_its_members_is_a_policy_error_that_says_the_shape():
    class OneKey(Smart):
        def _decide_batch(self, group, now):
            d = super()._decide_batch(group, now)
            return d._replace(prefix=("anthropic", SONNET, tuple(PREFIX[:2]))) if d.mode == "batch_api" else d

    table = GroupTable(OneKey(CAT), CAT)
    with pytest.raises(PolicyError, match=r"a tuple of one key \(or None\) per member taken \(1\)"):
        _try(table, _turn(1, 0.0, PREFIX + [7], 300.0))
