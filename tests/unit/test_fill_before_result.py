"""A result's cache fill leaves the dispatcher before the result does.

The case (a helper's hunt for results seen before the engine's own bookkeeping): the dispatcher pushed a result to
the hub, wrote its journal tally, and only then handed the cache its fill. A driver that had the result and at once
submitted the same prompt under a new id with a nearer deadline reached a cache that still had the first request
in flight, due later than the new one: a request with a batch-API lever follows only a leader due no later than
itself (``release_lead``), so the new one was generated and paid again, although its answer existed (the simulator
stores a result when it is made: an exact hit there). Now the fill leaves first, as a settlement does. The test holds
the hub's reply to the push (a busy machine), which the dispatcher awaited before it sent the fill.
"""

import asyncio

from actors import Dispatcher, ResultCache, ResultHub
from actors._types import BatchJob, Job
from engine.core.clock import ManualClock
from engine.core.grouping import ReuseSettings
from engine.core.settings import Settings
from tests.unit.test_actors import CAT, req


def test_a_prompt_sent_again_as_soon_as_its_result_is_in_is_an_exact_hit_not_a_second_call():
    async def go():
        hub, clock, steps = ResultHub(), ManualClock(0.0), []
        cache = ResultCache(ReuseSettings(exact=True, in_flight=True), hub, clock)
        complete, push = cache.complete, hub.push

        async def seen_complete(done):
            steps.append("fill at the cache")
            await complete(done)

        replied = asyncio.Event()

        async def seen_push(results, prices=None):  # the hub has the result; its reply to the dispatcher is slow
            first = any(r.id == "first" for r in results)
            steps.append("result at the hub" if first else "hit at the hub")
            await push(results, prices)
            if first:
                await replied.wait()

        cache.complete, hub.push = seen_complete, seen_push
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [], hub, cache, None)
        first = req(1, id="first", deadline_s=86_400.0)
        assert await cache.lookup([Job(0, first, "fp")]) == [0]  # a miss: it leads its fingerprint
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", [Job(0, first, "fp")])])
        clock.advance(100.0)  # past the call's end: its timer fires at once on a ManualClock
        (res,) = await asyncio.wait_for(hub.pull(1.0), 5.0)  # the driver has the result
        assert res.status == "ok" and res.cost_usd > 0

        # The same prompt again at once, due sooner than the first (which a batch could have carried for a day).
        again = req(1, id="again", arrival_s=100.0, deadline_s=600.0)
        assert await cache.lookup([Job(1, again, "fp")]) == [], "generated again: paid twice for one answer"
        (hit,) = await asyncio.wait_for(hub.pull(1.0), 5.0)
        assert hit.id == "again" and hit.status == "reused" and hit.hit == "exact" and hit.cost_usd == 0
        assert steps[:2] == ["fill at the cache", "result at the hub"], steps
        replied.set()
    asyncio.run(go())
