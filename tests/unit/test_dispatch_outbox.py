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
        for _ in range(3):  # the budget's settle_many is a task of its own (send does not wait)
            await asyncio.sleep(0)
        try:
            assert not budget.book.claims and res.status == "ok"
            assert sum(budget.book.spend.values()) == pytest.approx(res.cost_usd)
        finally:
            cache.gate.set()
            await asyncio.sleep(0.02)
    asyncio.run(go())
