"""Warm pulls (``Policy.warm_pull``, ``GroupTable.warm``): a call that leaves a conversation's prompt prefix warm
(an urgent turn sent sync, a hedge's fallback) sends at once the turns of that conversation waiting for a batch
that read it for less than the batch is expected to cost them. Before, only a turn arriving while the prefix was
warm went sync; one already waiting wrote the prefix again in its batch, long after the warmth was gone."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors import Grouper, ResultHub
from actors._types import Job
from engine.core.clock import ScaledClock
from engine.core.cost import price_alone
from engine.core.errors import PolicyError
from engine.core.grouping import Decision, WarmNote
from engine.core.request import Request
from engine.runtime.scheduler import GroupTable
from engine.sim.simulator import MODES, simulate
from policies import Smart, SmartParams
from tests.unit.helpers import Recorder
from tests.unit.test_actors import ledger
from tests.unit.test_warm_followups import PREFIX, _cat, _turn

CAT = _cat()


def _conversation() -> list[Request]:
    """t1 waits in its conversation's batch group (due in an hour); t2, urgent, goes sync at 30 s and leaves the
    prefix warm; t3 (due in an hour, of the same conversation by its first blocks, but mostly new text) stays
    in the group: reading two warm blocks does not beat the batch's 50 % off the rest."""
    return [_turn(1, 0.0, PREFIX + [7], 3600.0), _turn(3, 10.0, PREFIX[:2] + list(range(500, 520)), 3600.0),
            _turn(2, 30.0, PREFIX + [7, 8], 120.0)]


def test_in_the_simulator_a_waiting_turn_reads_what_an_urgent_turn_left_warm_and_the_rest_still_batch():
    reqs = _conversation()
    on = simulate(reqs, Smart(CAT), catalog=CAT, seed=3)
    off = simulate(reqs, Smart(CAT, SmartParams(pull_warm=False)), catalog=CAT, seed=3)
    assert [MODES[m] for m in off.mode] == ["batch_api", "batch_api", "sync"]
    assert [MODES[m] for m in on.mode] == ["sync", "batch_api", "sync"]
    assert [(b.mode, b.size) for b in on.batches if "warm at the provider" in b.reason] == [("sync", 1)]
    assert not any("warm at the provider" in b.reason for b in off.batches)
    # t1 read the 21 blocks t2 left warm, sent after t2's call ended: cheaper than its batch, and in seconds.
    assert on.cost[0] == pytest.approx(price_alone(reqs[0], CAT, "sync", warm_blocks=21, write=True).total)
    assert on.cost[0] < off.cost[0]
    assert on.done_at[0] < 60.0 < off.done_at[0]
    # t3's group was decided again once t1 left it (its wake-up was stale): it is still sent in a batch, on time,
    # alone now, so it pays its two shared blocks plain where it read them from t1 in their batch before.
    assert on.done_at[1] <= reqs[1].deadline_at
    assert on.cost[1] == pytest.approx(price_alone(reqs[1], CAT, "batch_api").total)
    assert on.cost[1] > off.cost[1]
    assert on.total_cost < off.total_cost
    for res in (on, off):
        assert all(res.done_at[i] <= r.deadline_at for i, r in enumerate(res.requests))


def test_the_table_pulls_only_from_the_warm_conversations_group_and_decides_it_again():
    table = GroupTable(Smart(CAT), CAT)
    t1, t3, _ = _conversation()
    other = _turn(4, 0.0, list(range(900, 921)), 3600.0)  # another conversation, equally long, not warm
    for r in (t1, t3, other):
        ds, wake = table.add(r, ("c",), r.arrival_s)
        assert ds == [] and wake is not None  # gathering
    g = next(g for g in table.groups.values() if t1 in g.members)
    version = g.version
    pulled = table.warm([WarmNote("openai", "gpt-5", tuple(PREFIX + [7, 8]), 330.0)], 35.0)
    assert [[r.id for r in d.members] for d in pulled.dispatches] == [["t1"]]
    d = pulled.dispatches[0].decision
    assert d.mode == "sync" and d.cache_write and pulled.failed == []
    assert [r.id for r in g.members] == ["t3"] and g.version > version
    assert len(pulled.wakes) == 1 and pulled.wakes[0].group is g and pulled.wakes[0].version == g.version
    assert len(table) == 2  # t3 and the other conversation still wait
    # Off: the note only updates the belief.
    off = GroupTable(Smart(CAT, SmartParams(pull_warm=False)), CAT)
    off.add(t1, ("c",), 0.0)
    assert off.warm([WarmNote("openai", "gpt-5", tuple(PREFIX + [7, 8]), 330.0)], 35.0).dispatches == []
    assert len(off) == 1


class _BadPull(Smart):
    name = "smart"  # not registered: built directly

    def warm_pull(self, group, now, warmth):
        return Decision("dispatch", mode="batch_api", take=1), {group.members[0].uid}


def test_a_pull_that_is_not_a_sync_dispatch_is_a_policy_error_which_a_grouper_survives():
    t1 = _conversation()[0]
    note = [WarmNote("openai", "gpt-5", tuple(PREFIX + [7, 8]), 330.0)]
    table = GroupTable(_BadPull(CAT), CAT)
    table.add(t1, ("c",), 0.0)
    with pytest.raises(PolicyError, match="warm_pull must return a sync dispatch"):
        table.warm(note, 35.0)
    assert len(table) == 0  # the group is gone, as after a failed decision
    going = GroupTable(_BadPull(CAT), CAT, keep_going=True)
    going.add(t1, ("c",), 0.0)
    pulled = going.warm(note, 35.0)
    assert pulled.dispatches == [] and [r.id for gf in pulled.failed for r in gf.members] == ["t1"]


def _grouper(policy):
    disp, hub = Recorder(), ResultHub()
    g = Grouper(policy, CAT, ScaledClock(time.time(), 1.0), {"openai": disp}, ledger(100.0), hub)
    return g, disp, hub


def test_a_live_grouper_sends_the_pulled_turn_sync_and_fails_the_members_of_a_failed_pull():
    async def go(policy):
        g, disp, hub = _grouper(policy)
        t1 = _conversation()[0]
        await g.add([Job(0, t1, "a")])
        await g.observe_warmth([WarmNote("openai", "gpt-5", tuple(PREFIX + [7, 8]), 330.0)])
        await asyncio.gather(*g.dispatchers["openai"]._tasks)
        sent = [(b.mode, b.cache_write, [j.req.id for j in b.jobs])
                for name, args in disp.calls if name == "run_many" for b in args[0]]
        return sent, [r.id for r in await hub.pull(0.01)], g

    sent, ended, g = asyncio.run(go(Smart(CAT)))
    assert sent == [("sync", True, ["t1"])] and ended == [] and g.pending == {}
    sent, ended, g = asyncio.run(go(Smart(CAT, SmartParams(pull_warm=False))))
    assert sent == [] and list(g.pending) == [_conversation()[0].uid]
    sent, ended, g = asyncio.run(go(_BadPull(CAT)))
    assert sent == [] and ended == ["t1"] and g.pending == {}


def test_a_turn_whose_batch_mate_writes_its_prefix_is_not_pulled_for_it():
    """Two waiting requests of one conversation share their long prefix: in their batch one writes it and the
    other reads it at the batch's price, which beats the warm read of a sync call for both. Alone, the same turn
    is pulled (priced against a batch with nobody writing its prefix, it was pulled in either case before)."""
    a, b = _turn(1, 0.0, PREFIX + [7], 3600.0), _turn(2, 5.0, PREFIX + [8], 3600.0)
    note = [WarmNote("openai", "gpt-5", tuple(PREFIX + [9]), 330.0)]
    pair = GroupTable(Smart(CAT), CAT)
    for r in (a, b):
        pair.add(r, ("c",), r.arrival_s)
    assert pair.warm(note, 35.0).dispatches == [] and len(pair) == 2
    alone = GroupTable(Smart(CAT), CAT)
    alone.add(a, ("c",), 0.0)
    assert [r.id for d in alone.warm(note, 35.0).dispatches for r in d.members] == ["t1"]
