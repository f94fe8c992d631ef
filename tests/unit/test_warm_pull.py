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
from policies import Smart
from tests.unit.helpers import Recorder
from tests.unit.test_actors import ledger
from tests.unit.test_warm_followups import PREFIX, _cat, _smart, _turn

CAT = _cat()


def _conversation() -> list[Request]:
    """t1 waits in its conversation's batch group (due in an hour); t2, urgent, goes sync at 30 s and leaves the
    prefix warm; t3 (due in an hour, of the same conversation by its first blocks, but mostly new text) stays
    in the group: reading two warm blocks does not beat the batch's 50 % off the rest."""
    return [_turn(1, 0.0, PREFIX + [7], 3600.0), _turn(3, 10.0, PREFIX[:2] + list(range(500, 520)), 3600.0),
            _turn(2, 30.0, PREFIX + [7, 8], 120.0)]


def test_in_the_simulator_a_waiting_turn_reads_what_an_urgent_turn_left_warm_and_the_rest_still_batch():
    reqs = _conversation()
    on = simulate(reqs, _smart(CAT), catalog=CAT, seed=3)
    off = simulate(reqs, _smart(CAT, pull_warm=False), catalog=CAT, seed=3)
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
    # With every request of gpt-5 sent flex at arrival, none waits for a batch: nothing is left to pull.
    flex = simulate(reqs, Smart(CAT, {"flex_now_s": 1e9}), catalog=CAT, seed=3)
    assert [MODES[m] for m in flex.mode] == ["flex"] * 3 and not any("warm at" in b.reason for b in flex.batches)


def test_the_table_pulls_only_from_the_warm_conversations_group_and_decides_it_again():
    table = GroupTable(_smart(CAT), CAT)
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
    off = GroupTable(_smart(CAT, pull_warm=False), CAT)
    off.add(t1, ("c",), 0.0)
    assert off.warm([WarmNote("openai", "gpt-5", tuple(PREFIX + [7, 8]), 330.0)], 35.0).dispatches == []
    assert len(off) == 1


class _BadPull(Smart):
    name = "smart"  # not registered: built directly
    pulls = "batch"

    def warm_pull(self, group, now, warmth):
        if self.pulls == "batch":
            return Decision("dispatch", mode="batch_api", take=1), {group.members[0].uid}
        if self.pulls == "stranger":
            return Decision("dispatch", mode="sync"), {group.members[0].uid, "not-a-member"}
        return Decision("dispatch", mode="sync"), set()  # "none"


NOTE = [WarmNote("openai", "gpt-5", tuple(PREFIX + [7, 8]), 330.0)]


@pytest.mark.parametrize("pulls", ["batch", "stranger", "none"])
def test_a_pull_that_breaks_the_contract_or_names_nobody_changes_nothing(pulls):
    """A pull that is not a sync dispatch of members is a policy error: the simulator stops at it, a grouper
    (``keep_going``) logs it and the group waits on for its wake-up, untouched (the warmth is a hint). A pull of
    nobody changes nothing either: no second decision, so no second wake-up chain beside the valid one."""
    t1 = _conversation()[0]
    policy = _smart(CAT, _BadPull)
    policy.pulls = pulls
    if pulls != "none":
        table = GroupTable(policy, CAT)
        table.add(t1, ("c",), 0.0)
        with pytest.raises(PolicyError, match="warm_pull"):
            table.warm(NOTE, 35.0)
    going = GroupTable(policy, CAT, keep_going=True)
    _, wake = going.add(t1, ("c",), 0.0)
    assert going.warm(NOTE, 35.0) == ([], [], []) and len(going) == 1
    assert going.groups[wake.group.key] is wake.group and wake.group.version == wake.version  # still valid


def _grouper(policy):
    disp, hub = Recorder(), ResultHub()
    g = Grouper(policy, CAT, ScaledClock(time.time(), 1.0), {"openai": disp}, ledger(100.0), hub)
    return g, disp, hub


def test_a_live_grouper_sends_the_pulled_turn_sync_and_a_failed_pull_leaves_it_waiting():
    async def go(policy):
        g, disp, hub = _grouper(policy)
        await g.add([Job(0, _conversation()[0], "a")])
        await g.observe_warmth(NOTE)
        await asyncio.gather(*g.dispatchers["openai"]._tasks, *g._runs.get("openai", ()))
        sent = [(b.mode, b.cache_write, [j.req.id for j in b.jobs])
                for name, args in disp.calls if name == "run_many" for b in args[0]]
        timers = len(g._timers)
        for h in g._timers:
            h.cancel()
        return sent, [r.id for r in await hub.pull(0.01)], g, timers

    sent, ended, g, _ = asyncio.run(go(_smart(CAT)))
    assert sent == [("sync", True, ["t1"])] and ended == [] and g.pending == {}
    for policy in (_smart(CAT, pull_warm=False), _smart(CAT, _BadPull)):
        sent, ended, g, timers = asyncio.run(go(policy))
        assert sent == [] and ended == [] and list(g.pending) == [_conversation()[0].uid]
        assert timers == 1  # its gather's wake-up, still set


def test_a_turn_reads_in_its_batch_what_an_earlier_member_that_stays_writes_so_it_is_not_pulled_for_that():
    """Members of a batch run in order and read what an earlier one writes (``price_batch``). ``a``, a long
    answer, stays in the batch (half price on its output beats the warm read); ``b``, after it with the same
    prefix, reads that prefix in the batch at half the sync read price, so it stays too. Ahead of ``a``, ``b``
    would write the prefix itself in the batch: the warm read pays, and it is pulled. Two members that both
    pull out leave nobody to write: each is priced as the writer it would be, and both go."""
    a = _turn(1, 0.0, PREFIX + [7], 3600.0).model_copy(update={"output_tokens": 20_000})
    b = _turn(2, 5.0, PREFIX + [8], 3600.0)
    note = [WarmNote("openai", "gpt-5", tuple(PREFIX + [9]), 330.0)]

    def pulled(*reqs):
        table = GroupTable(_smart(CAT), CAT)
        for r in reqs:
            table.add(r, ("c",), r.arrival_s)
        return [r.id for d in table.warm(note, 35.0).dispatches for r in d.members]

    assert pulled(a, b) == []
    assert pulled(b.model_copy(update={"arrival_s": 0.0}), a.model_copy(update={"arrival_s": 5.0})) == ["t2"]
    assert pulled(b) == ["t2"]
    assert pulled(b, _turn(3, 6.0, PREFIX + [6], 3600.0)) == ["t2", "t3"]
    # Reading in the batch counts only as often as the batch is on time: due in 2,100 s, ``b``'s batch is late
    # about a quarter of the time, and then ``b`` pays a cold sync call; the warm read now pays even behind ``a``
    # (a review: a shortcut that took the batch as certain refused it).
    soon = [r.model_copy(update={"deadline_s": 2100.0}) for r in (a, b)]
    assert pulled(*soon) == ["t2"]


def test_pulls_at_an_explicit_cache_read_only_whole_entries_and_the_index_empties_with_the_table():
    """At Anthropic a cache entry ends at a breakpoint: a waiting turn that extends the written entry is pulled;
    one that shares only part of it (it branched off earlier) reads nothing there, and waits. Once every group
    has gone, the index of runs is empty (no group kept alive by it)."""
    sonnet = "claude-sonnet-4-5"
    longer = _turn(1, 0.0, PREFIX + [7], 3600.0, model=sonnet)
    branch = _turn(2, 1.0, PREFIX[:12] + [50, 51], 3600.0, model=sonnet)
    table = GroupTable(Smart(CAT), CAT)
    for r in (longer, branch):
        table.add(r, ("c",), r.arrival_s)
    pulled = table.warm([WarmNote("anthropic", sonnet, tuple(PREFIX), 330.0)], 35.0)
    assert [r.id for d in pulled.dispatches for r in d.members] == ["t1"] and len(table) == 1
    (wake,) = pulled.wakes
    ds, _ = table.wake(wake, 10_000.0)  # past its gather: sent
    assert [r.id for d in ds for r in d.members] == ["t2"]
    assert table.groups == {} and table._runs == {} and table._run_lengths == {}


class _FailsAfterPull(Smart):
    name = "smart"  # not registered: built directly

    def decide(self, group, now):
        if any(r.id == "t3" for r in group.members) and len(group) == 1:
            raise RuntimeError("decide broke")
        return super().decide(group, now)


def test_a_group_whose_decision_fails_after_a_pull_still_sends_the_pulled_turn():
    """The pull is carried out; the group's failed decision fails only the members left in it (a grouper's
    ``GroupFailed``), as a failed decision on arrival does."""
    t1, t3, _ = _conversation()
    table = GroupTable(_smart(CAT, _FailsAfterPull), CAT, keep_going=True)
    for r in (t1, t3):
        table.add(r, ("c",), r.arrival_s)
    pulled = table.warm(NOTE, 35.0)
    assert [r.id for d in pulled.dispatches for r in d.members] == ["t1"]
    assert [[r.id for r in gf.members] for gf in pulled.failed] == [["t3"]] and len(table) == 0
