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
    # A turn whose whole prefix t1 holds, due too soon for a batch, is called now: t1's fallback reads its write.
    now = _try(table, _turn(2, 60.0, PREFIX, 30.0))
    assert now.mode == "sync" and now.cache_write and "prefix marked for caching" in now.reason
    assert tried.prefix == ((("anthropic", SONNET, tuple(PREFIX[:2]))),)  # one key per member, for the runtime
    # Off, or a conversation with nothing in such a batch: not marked, as before.
    off = GroupTable(Smart(CAT, SmartParams(fallback_marks=False)), CAT)
    assert _try(off, _turn(1, 0.0, PREFIX + [7], 300.0)).prefix is None
    assert not _try(off, _turn(2, 60.0, PREFIX, 30.0)).cache_write
    other = _try(table, _turn(3, 60.0, list(range(300, 321)), 30.0))
    assert other.mode == "sync" and not other.cache_write


def test_a_later_turn_whose_prefix_the_batched_turn_does_not_hold_writes_nothing_for_its_fallback():
    """An explicit cache's entry ends where its write did (Anthropic's, the emulator's): the conversation's later
    turn writes past the end of the batched turn's prompt, which reads none of it. A review found every mark the
    rule added on Mooncake seed 0 (17) of this kind: each paid 1.25x at Anthropic for nothing, read only in the
    simulator, which keeps warmth per block. Marked before (fails on the code before). Since stop 86 such a turn
    writes only the part t1 holds whole, as depths (``test_call_parts.py``), never its whole prefix."""
    table = GroupTable(Smart(CAT), CAT)
    assert _try(table, _turn(1, 0.0, PREFIX + [7], 300.0)).mode == "batch_api"
    assert _try(table, _turn(2, 60.0, PREFIX + [7, 8], 30.0)).cache_write == (21,)  # longer: t1 reads only 21
    table = GroupTable(Smart(CAT), CAT)
    assert _try(table, _turn(1, 0.0, PREFIX + [7], 300.0)).mode == "batch_api"
    assert _try(table, _turn(3, 60.0, PREFIX[:-1] + [9], 30.0)).cache_write == (19,)  # parts from t1 inside


def test_a_turn_withdrawn_from_its_batch_is_no_longer_called_for():
    """Its driver withdrew it (``Engine.cancel_requests``): its batch's lateness brings no call, so a call marked
    for it paid 1.25x for no reader (fails on the code before: "where True = Decision(... cache_write=True ...)")."""
    table = GroupTable(Smart(CAT), CAT)
    assert _try(table, t1 := _turn(1, 0.0, PREFIX + [7], 300.0)).mode == "batch_api"
    table.withdraw({t1.uid})
    assert not _try(table, _turn(2, 60.0, PREFIX, 30.0)).cache_write


def test_at_the_emulators_explicit_cache_a_write_is_read_only_by_a_prompt_that_holds_it_whole():
    """The premise of the test above, at the cache the live engine's Anthropic adapter is tested against."""
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import Prompt

    prov = CAT.providers["anthropic"]
    block = 512 * 4  # characters of a 512-token block

    def prompt(blocks: list[int], tail: str) -> Prompt:
        text = "".join(f"{b:0{block}d}" for b in blocks)
        bounds = tuple(block * (i + 1) for i in range(len(blocks)))
        return Prompt(text + tail * 300, (bounds[-1],), tail, bounds)

    def read_by_t1(writer: list[int]) -> int:
        caches = PromptCaches()
        wrote = caches.use(prov, prov.models[SONNET], SONNET, prompt(writer, "b"), 60.0)
        assert wrote.write == 512 * len(writer)
        return caches.use(prov, prov.models[SONNET], SONNET, prompt(PREFIX + [7], "a"), 200.0).read

    assert read_by_t1(PREFIX + [7, 8]) == 0  # the later, longer turn's write
    assert read_by_t1(PREFIX) == 512 * 20  # a write t1 holds whole: read (the look-back finds its end)


def test_a_turn_back_from_its_own_try_is_not_marked_for_its_own_expectation():
    table = GroupTable(Smart(CAT), CAT)
    t1 = _turn(1, 0.0, PREFIX + [7], 300.0)
    tried = _try(table, t1)
    back, _ = table.add(t1, ("c",), tried.hedge_at, returned=True)
    assert back[0].decision.mode == "sync" and not back[0].decision.cache_write


def test_the_expectations_are_the_runtimes_bounded_and_forget_what_is_past():
    s = PrefixSightings(capacity=2)
    s.expect("a", 100.0, [("u1", (1, 2, 3))], now=0.0)
    assert s.expected("a", 50.0, 150.0, but="u2") and not s.expected("a", 50.0, 150.0, but="u1")
    assert s.expected("a", 50.0, 150.0, but="u2", writes=[1, 2]) and not s.expected("a", 50.0, 150.0, but="u2",
                                                                                     writes=[1, 2, 3, 4])
    assert not s.expected("a", 101.0, 400.0, but="u2") and not s.expected("b", 0.0, 400.0, but="u2")
    s.expect("k", 100.0, [("v1", (1, 2, 0)), ("v2", (1, 2, 5, 6)), ("v3", (1, 2, 9))], now=0.0)
    assert [s.expected("k", 0.0, 200.0, but="x", writes=w) for w in ((1, 2), (1, 2, 5), (1, 2, 6), (1, 3))] == [
        True, True, False, False]
    assert not s.expected("k", 0.0, 200.0, but="v2", writes=(1, 2, 5))  # its own fallback reads nothing of it
    s.expect("a", 300.0, [("u3", ())], now=200.0)  # u1's hedge has passed: sent or back, no longer expected
    assert s.expected("a", 250.0, 350.0, but="u1") and not s.expected("a", 50.0, 150.0, but="u3")
    s.expect("b", 900.0, [("u4", ())], now=0.0)
    s.expect("c", 900.0, [("u5", ())], now=0.0)
    assert not s.expected("a", 250.0, 350.0, but="u1")  # the least recent prefix forgotten first


def test_a_long_running_engine_keeps_only_the_expectations_of_batches_still_out():
    """Before, a prefix's expectations stayed until it was expected again or 65,536 others were: a long-running
    engine kept every batch's members (fails on the code before: 1,000 prefixes kept)."""
    s = PrefixSightings()
    for i in range(1000):
        s.expect(("p", i), i + 50.0, [(f"u{i}", ())], now=float(i))
    assert len(s._due) <= 51  # those whose hedge (50 s on) has not passed


def test_a_batch_of_one_prefix_rebuilds_its_expectations_once_not_once_per_member(monkeypatch):
    """A batch of n members of one system prompt rebuilt the key's table n times: O(n^2) in the grouper's
    decision (16,000 members: 6.6 CPU s, a scratch run). Fails on the code before (300 calls)."""
    calls = []
    real = PrefixSightings.expect
    monkeypatch.setattr(PrefixSightings, "expect", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    table = GroupTable(Smart(CAT), CAT)
    for i in range(300):
        table.join(_turn(i, 0.0, PREFIX + [1000 + i], 300.0), ("c",), 0.0)
    (g,) = table.groups.values()
    out, wake = table.decide(g, 0.0)
    while not out and wake is not None:
        out, wake = table.wake(wake, wake.at)
    d = out[0].decision
    assert d.mode == "batch_api" and len(d.prefix) == 300
    assert len(calls) == 1 and len(calls[0][2]) == 300


def test_in_the_simulator_the_fallback_reads_the_calls_write_and_the_two_cost_less():
    reqs = [_turn(1, 0.0, PREFIX + [7], 300.0), _turn(2, 60.0, PREFIX, 30.0)]
    slow = Settings.model_validate({"sim": {"turnaround_scale": 50.0}})  # every batch late: t1 falls back
    on = simulate(reqs, Smart(CAT), catalog=CAT, settings=slow, seed=1)
    off = simulate(reqs, Smart(CAT, SmartParams(fallback_marks=False)), catalog=CAT, settings=slow, seed=1)
    for res in (on, off):
        assert [MODES[m] for m in res.mode] == ["sync", "sync"]
        assert all(res.done_at[i] <= r.deadline_at for i, r in enumerate(reqs))
    # t2 writes its 20 blocks for 1.25x; t1, back at its hedge, reads them and writes its 21st (marked: t2 sent it).
    assert on.cost[1] == pytest.approx(price_alone(reqs[1], CAT, "sync", write=True).total)
    assert on.cost[0] == pytest.approx(price_alone(reqs[0], CAT, "sync", warm_blocks=20, write=True).total)
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
