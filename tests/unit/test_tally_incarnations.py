"""A dispatcher's journaled tally (``actors._dispatch_recovery``): what its report counts and the settlements the
budget controller had not taken, which a restart adds back and sends again; and its list of ended videos
(``actors._dispatch_jobs``). Driven without Ray: the hub's journal holds a dead dispatcher's last write until the
test lets it land, after its successor's."""

from __future__ import annotations

import asyncio

from actors import Dispatcher
from engine.core.clock import ManualClock
from engine.core.settings import JournalSettings, Settings
from tests.unit.helpers import HeldHub, Recorder
from tests.unit.test_actors import CAT


def _dispatcher(hub: HeldHub, budget: Recorder, restarted: bool = True) -> Dispatcher:
    d = Dispatcher("openai", CAT, Settings(), 0, ManualClock(0.0), [], hub, None, budget)
    if restarted:
        d.reconstructed()
    return d


def test_a_dead_dispatcher_s_tally_landing_after_its_successor_s_does_not_replace_the_newer_one():
    """The dispatcher dies with its tally's write on its way to the hub; its successor adds the last tally that
    landed to its own, counts a member paid twice and holds a settlement for a restarting budget controller, and
    journals that; then the dead one's write lands. Before, both wrote one key: a third incarnation took back the
    dead one's tally, its report's count went back and the settlement was never sent (its claim held until
    ``reservation_ttl_s``, its spend never counted)."""
    async def go():
        hub, budget = HeldHub(), Recorder()
        d = _dispatcher(hub, budget, restarted=False)
        d.paid_twice = 1
        await d._journal_tally()
        hub.held = True
        d.paid_twice = 2
        cut = asyncio.ensure_future(d._journal_tally())  # on its way when d dies (its task lives on, as Ray's call)
        await asyncio.wait_for(hub.started.wait(), 10)
        hub.held = False
        again = _dispatcher(hub, budget)
        await again.recover()
        assert again.paid_twice == 1  # the last tally that landed
        again.paid_twice += 3
        again._undelivered[("settle_many", "c9")] = ("c9", 0.25)  # the budget controller restarting: not taken
        await again._journal_tally()
        for gate in hub.gates:  # the dead incarnation's write lands now, after its successor's
            gate.set()
        await asyncio.wait_for(cut, 10)
        budget.calls.clear()
        third = _dispatcher(hub, budget)
        await third.recover()
        assert await third.spend_told(10)
        assert third.paid_twice == 4  # before: 2, the dead one's
        assert ("settle_many", ([("c9", 0.25)],)) in budget.calls  # before: never sent, nor counted
    asyncio.run(go())


async def _jobs_written(d: Dispatcher) -> None:
    if d._jobs_journal._task is not None:
        await asyncio.wait_for(asyncio.shield(d._jobs_journal._task), 10)


def test_a_dead_dispatcher_s_list_of_ended_videos_landing_after_its_successor_s_loses_none_of_them():
    """The list of ended calls' jobs (``actors._dispatch_jobs``, key ``ended``): a restart hands it to the provider,
    whose look-up for a cut create's video never takes one of them (another request was answered with it). The
    dead dispatcher's write of v1-v2 lands after its successor's v1, v3: before, one key, and a third incarnation
    no longer knew v3 had ended."""
    async def go():
        hub, budget = HeldHub(), Recorder()
        d = _dispatcher(hub, budget, restarted=False)
        d._end_job({"api": "videos", "job": "v1"})
        await _jobs_written(d)
        hub.held = True
        d._end_job({"api": "videos", "job": "v2"})  # on its way when d dies
        await asyncio.wait_for(hub.started.wait(), 10)
        hub.held = False
        again = _dispatcher(hub, budget)
        await again.recover()
        assert set(again._ended) == {"v1"}  # the last list that landed
        again._end_job({"api": "videos", "job": "v3"})
        await _jobs_written(again)
        for gate in hub.gates:  # the dead incarnation's write lands now, after its successor's
            gate.set()
        await _jobs_written(d)
        third = _dispatcher(hub, budget)
        await third.recover()
        assert set(third._ended) == {"v1", "v2", "v3"}  # before: v1 and v2, v3 forgotten
        await asyncio.wait_for(third._ended_merge, 10)
        await _jobs_written(third)
        assert set(await hub.journal_items(third._jobs_journal.space)) == {third._ended_key}  # the older went
    asyncio.run(go())


def test_a_tally_journaled_before_the_journal_counts_reads_them_as_none():
    """A tally written before ``journal_lost`` and ``journal_unread`` joined it (stop 77) is added back with both at
    0, its other counts kept; one written since brings both back."""
    d = _dispatcher(HeldHub(), Recorder())
    d.paid_twice, d.journal_lost, d.journal_unread = 2, 1, 3
    full = d._tally()
    again = _dispatcher(HeldHub(), Recorder())
    again._add_tally(full[:-2])
    assert (again.paid_twice, again.journal_lost, again.journal_unread) == (2, 0, 0)
    again._add_tally(full)
    assert (again.paid_twice, again.journal_lost, again.journal_unread) == (4, 1, 3)


def test_a_restart_that_could_not_read_its_journal_does_not_journal_a_tally_that_outranks_its_predecessors():
    """A restart whose journal stayed unreadable (``recover`` gave up, ``journal_unread``) journals its tally when
    the journal answers again (a rewrite of the watch, a flush), before the driver's rewire reads it. Written
    without its predecessor's, it outranked it (same epoch, a later start), and the next restart lost the
    predecessor's counts and the settlement it held for the budget controller (a review of stop 77: paid_twice 0
    of 2, the $0.25 settlement never sent, its claim held until it expired)."""
    async def go():
        hub, budget = HeldHub(), Recorder()
        d = _dispatcher(hub, budget, restarted=False)
        d.paid_twice = 2
        d._undelivered[("settle_many", "c9")] = ("c9", 0.25)
        await d._journal_tally()
        again = _dispatcher(hub, budget)
        again.settings = again.settings.model_copy(update={"journal": JournalSettings(recover_wait_s=0.05)})
        readable = again.journal.items

        async def unreadable(*_a, **_k):
            raise ConnectionError("the journal's Redis away")
        again.journal.items = unreadable
        assert await again.recover() == -1 and again.journal_unread == 1
        again.journal.items = readable  # back: the next write of the tally comes before the rewire's read
        await again._journal_tally()
        budget.calls.clear()
        third = _dispatcher(hub, budget)
        await third.recover()
        assert await third.spend_told(10)
        assert (third.paid_twice, third.journal_unread) == (2, 1)  # before: (0, 1)
        assert ("settle_many", ([("c9", 0.25)],)) in budget.calls  # before: never sent
        assert await again.recover() == 0 and again.paid_twice == 2  # the rewire's read adds nothing twice
    asyncio.run(go())
