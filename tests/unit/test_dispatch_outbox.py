"""A dispatcher's outbox (``actors._dispatch_outbox``) with a peer that does not answer."""

import asyncio

import pytest

from actors import Dispatcher
from actors._types import BatchJob, Job
from engine.core.budgets import Claim
from engine.core.clock import ManualClock
from engine.core.settings import Settings
from tests.unit.test_actors import CAT, ledger, req


class SilentCache:
    """A cache that takes a fill and answers nothing (dead and restarting, or hung until the driver kills it)."""

    def __init__(self):
        self.called = asyncio.Event()
        self.gate = asyncio.Event()

    async def complete(self, done):
        self.called.set()
        await self.gate.wait()


def test_a_settlement_does_not_wait_for_a_cache_that_does_not_answer():
    # It waited behind the cache fill, so the ledger's spend lagged results already delivered: a live cache kill
    # read $1.134 of a $1.428 bill right after the last result (tests/integration/test_release_faults.py).
    async def go():
        from actors import ResultHub

        hub, budget, cache = ResultHub(), ledger(100.0), SilentCache()
        clock = ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [], hub, cache, budget)
        await budget.reserve_many([Claim("c0", "default", "openai", "gpt-5-mini", "urgent", 1.0)])
        job = Job(0, req(0, priority="urgent"), "fp0", claim="c0")
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", [job])])
        clock.advance(10_000.0)  # past the call's end: its timer fires at once on a ManualClock
        await asyncio.wait_for(cache.called.wait(), 5.0)
        (res,) = await hub.pull(1.0)
        assert await d.spend_told(5.0)  # the budget's settle_many is a task of its own (send does not wait)
        try:
            assert not budget.book.claims and res.status == "ok"
            assert sum(budget.book.spend.values()) == pytest.approx(res.cost_usd)
        finally:
            cache.gate.set()
            await asyncio.sleep(0.02)
    asyncio.run(go())


def test_results_do_not_wait_for_a_cache_that_does_not_answer():
    # The outbox awaited the cache fill inside its flush, so every result that ended after a fill went out
    # waited behind it: a hung cache held them until the driver killed it.
    async def go():
        from actors import ResultHub

        hub, budget, cache = ResultHub(), ledger(100.0), SilentCache()
        clock = ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [], hub, cache, budget)
        await budget.reserve_many([Claim(f"c{i}", "default", "openai", "gpt-5-mini", "urgent", 1.0)
                                   for i in range(2)])
        first, second = (Job(i, req(i, priority="urgent"), f"fp{i}", claim=f"c{i}") for i in range(2))
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", [first])])
        clock.advance(10_000.0)
        await asyncio.wait_for(cache.called.wait(), 5.0)  # the first result's fill: it never answers
        (res0,) = await hub.pull(1.0)
        await d.run_many([BatchJob("b1", "sync", None, False, "process_individually", "now", [second])])
        clock.advance(10_000.0)
        try:
            got = await asyncio.wait_for(hub.pull(1.0), 5.0)
            assert [r.id for r in got] == [second.req.id] and got[0].status == "ok"
            assert res0.id == first.req.id
        finally:
            cache.gate.set()
            await asyncio.sleep(0.02)
    asyncio.run(go())


class WarmthReader:
    """A grouper that only records the warmth notes it is sent."""

    def __init__(self):
        self.notes = []

    async def observe_warmth(self, notes):
        self.notes.extend(notes)


@pytest.mark.parametrize("readers", [True, False])
def test_warmth_notes_go_to_the_groupers_only_when_their_policy_reads_them(readers):
    async def go():
        from actors import ResultHub

        hub, grouper, clock = ResultHub(), WarmthReader(), ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, ledger(), warm_readers=readers)
        prefix = {"prefix_blocks": [11, 12, 13, 14], "input_tokens": 2400}  # past OpenAI's 1,024-token minimum
        job = Job(0, req(0, priority="urgent", **prefix), "fp0")
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", [job])])
        clock.advance(10_000.0)
        (res,) = await asyncio.wait_for(hub.pull(1.0), 5.0)  # the notes leave in the flush before the results
        for _ in range(3):  # send to a plain object is a task of its own
            await asyncio.sleep(0)
        assert res.status == "ok" and res.usage
        if readers:
            (note,) = grouper.notes
            assert note.blocks == (11, 12, 13, 14)[:len(note.blocks)] and len(note.blocks) >= 2
        else:
            assert grouper.notes == []
    asyncio.run(go())


class RecordingCache:
    def __init__(self):
        self.filled = asyncio.Event()
        self.done = []

    async def complete(self, done):
        self.done.extend(done)
        self.filled.set()


def test_one_cache_shard_that_does_not_answer_holds_no_other_shards_fills():
    # One lane for every shard waited for all of them together: a hung shard held the others' fills (and so
    # the followers waiting on them there) as the single awaited fill held everything before (a review).
    async def go():
        from actors import ResultHub

        hub, silent, live, clock = ResultHub(), SilentCache(), RecordingCache(), ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [], hub, [live, silent], ledger())
        first = Job(0, req(0, priority="urgent"), "fp0", cache_shard=1)
        second = Job(1, req(1, priority="urgent"), "fp1", cache_shard=0)
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", [first])])
        clock.advance(10_000.0)
        await asyncio.wait_for(silent.called.wait(), 5.0)  # shard 1 took the first fill and never answers
        await d.run_many([BatchJob("b1", "sync", None, False, "process_individually", "now", [second])])
        clock.advance(10_000.0)
        try:
            await asyncio.wait_for(live.filled.wait(), 5.0)
            assert [fp for fp, _ in live.done] == ["fp1"] and live.done[0][1].id == second.req.id
        finally:
            silent.gate.set()
            await asyncio.sleep(0.02)
    asyncio.run(go())
