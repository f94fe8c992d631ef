"""The asyncio API of the live engine: ``asubmit``, ``asubmit_many``, ``as_completed``.

At speed-up 100 an urgent request with a 20 s deadline is sent at once (~0.1 s real); a normal one with a
300 s deadline waits for batch company and is sent sync shortly before its deadline (~2.8 s real), because the
engine here puts no value on waiting (``min_batch_saving_usd`` 0: by default a lone request would go at once).
So "fast" and "slow" below differ by seconds, not by milliseconds of noise.
"""

import asyncio
import time

import pytest

from engine import Engine
from engine.core.errors import EngineStopped, Overloaded, RequestError
from tests.integration._catalogs import OPENAI_ONLY


def fast(rid, **kw):
    return {"id": rid, "model": "gpt-4o-mini", "prompt": f"fast {rid}", "priority": "urgent", "deadline_s": 20, **kw}


def slow(rid, deadline_s=300, **kw):
    return {"id": rid, "model": "gpt-4o-mini", "prompt": f"slow {rid}", "deadline_s": deadline_s, **kw}


# A loop blocked by a wait would show a gap as long as the wait (about 3 s); 1.5 s leaves a slow phase of a
# 2-core machine room to delay a tick (0.5 s did not, by a helper's reading, stop 39).
MAX_GAP_S = 1.5


class Ticker:
    """A task that ticks every 10 ms: the longest gap between ticks shows whether the loop was ever blocked."""

    def __init__(self):
        self.ticks, self.max_gap = 0, 0.0

    async def run(self):
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.ticks, self.max_gap = self.ticks + 1, max(self.max_gap, now - last)
            last = now


async def with_ticker(coro):
    ticker = Ticker()
    task = asyncio.create_task(ticker.run())
    try:
        return await coro, ticker
    finally:
        task.cancel()


@pytest.fixture(scope="module")
def eng(ray_session):
    with Engine.start(catalog=OPENAI_ONLY, speedup=100, policy_params={"min_batch_saving_usd": 0.0}) as e:
        yield e


def test_asubmit_returns_the_result(eng):
    async def main():
        one = await eng.asubmit(fast("a1"))
        many = await eng.asubmit_many([fast("a2"), fast("a3", tenant="t2"), fast("a2")])
        return one, many

    one, many = asyncio.run(main())
    assert one.id == "a1" and one.status == "ok" and one.mode == "sync"
    assert [(r.id, r.tenant) for r in many] == [("a2", "default"), ("a3", "t2"), ("a2", "default")]
    assert {r.status for r in many} == {"ok"} and many[0] == many[2]  # one request, one result
    assert eng.submit(fast("a1")).result(timeout=1) == one  # the same (tenant, id): the same future


@pytest.mark.solo  # a loop gap under MAX_GAP_S of real time
def test_as_completed_yields_in_completion_order_and_asubmit_leaves_the_loop_free_while_it_waits(eng):
    """``as_completed`` and an ``asubmit`` of a slow request, side by side on one loop: each waits about 3 s
    (one wait instead of two in the solo pass), and one ticker would show either blocking the loop."""
    async def yielded():
        futs = eng.submit_many([slow("c-slow"), fast("c-fast")])
        seen = []
        async for res in eng.as_completed([*futs, futs[0]], timeout=60):  # futs[0] twice: yielded once
            seen.append((res.id, futs[0].done()))  # was the slow one done when this was yielded?
        return seen

    async def main():
        return await asyncio.gather(yielded(), eng.asubmit(slow("r1")))

    (seen, res), ticker = asyncio.run(with_ticker(main()))
    # Yielded as each finished, not all at the end: the fast one while the slow one was still running (an
    # event, where a gap of over 1 s between the two yields was a figure of the machine's speed).
    assert seen == [("c-fast", False), ("c-slow", True)]
    assert res.status == "ok"  # asubmit waited for the slow request's result
    assert ticker.ticks > 100 and ticker.max_gap < MAX_GAP_S  # the loop ran other tasks throughout (~3 s)


def test_as_completed_takes_awaitables_and_propagates_their_errors(eng):
    async def boom():
        await asyncio.sleep(0.05)
        raise ValueError("boom")

    async def main():
        got = [r.id async for r in eng.as_completed([eng.asubmit(fast("w1")), eng.submit(fast("w2"))])]
        with pytest.raises(ValueError, match="boom"):
            async for _ in eng.as_completed([boom()]):
                pass
        return got

    assert sorted(asyncio.run(main())) == ["w1", "w2"]


def test_timeouts_and_cancellation_leave_the_requests_running(eng):
    async def main():
        futs = [eng.submit(fast("t-fast")), eng.submit(slow("t-slow"))]
        futs[0].result(timeout=30)  # the fast one is in before the 0.6 s window opens, however slow the machine
        got = []
        with pytest.raises(asyncio.TimeoutError, match="1 of 2 results were not ready"):
            async for res in eng.as_completed(futs, timeout=0.6):
                got.append(res.id)
        with pytest.raises(asyncio.TimeoutError):  # cancels the task awaiting asubmit
            await asyncio.wait_for(eng.asubmit(slow("t-slow")), 0.2)
        return futs, got

    futs, got = asyncio.run(main())
    assert got == ["t-fast"]
    assert eng.submit(slow("t-slow")) is futs[1]  # the same request, never sent twice
    assert not futs[1].cancelled() and futs[1].result(timeout=30).status == "ok"  # ran to the end


def test_errors_propagate_from_asubmit(eng):
    async def main():
        with pytest.raises(RequestError, match="field 'input_tokens'"):
            await eng.asubmit({"id": "e1", "model": "gpt-5", "input_tokens": -1})
        with pytest.raises(RequestError, match="field 'model'"):  # a bad one: none of them is queued
            await eng.asubmit_many([fast("e2"), {"id": "e3", "model": "no-such-model", "prompt": "x"}])
        with pytest.raises(RequestError, match="other content"):
            await eng.asubmit(fast("a1", prompt="something else"))  # a1 was sent by the first test

    asyncio.run(main())
    # e2 was not queued, so its id is still free for other content
    assert eng.submit(fast("e2", prompt="other")).result(timeout=30).status == "ok"


@pytest.mark.solo  # a loop gap under MAX_GAP_S of real time
def test_backpressure_waits_off_the_loop_and_overload_raise_refuses(eng):
    async def main(e):
        first = asyncio.create_task(e.asubmit(slow("b1")))
        t_end = time.monotonic() + 30
        while e._pending < 1:  # until b1 holds the one slot (admitted in a worker thread): b2 then waits for room
            assert time.monotonic() < t_end, "b1 was never admitted"
            await asyncio.sleep(0.001)
        second = await e.asubmit(fast("b2"))
        return await first, second, time.monotonic()

    # The module's engine with room for one request (saves an engine start: stop 62), put back after.
    assert eng.drain(timeout_s=60) == 0  # nothing of an earlier test holds the slot
    assert eng._pending == 0  # a done future has freed its place (``_resolve`` frees it first)
    was = eng._max_pending, eng._overload
    eng._max_pending = 1
    try:
        (first, second, _), ticker = asyncio.run(with_ticker(main(eng)))
        assert first.status == second.status == "ok"
        assert second.done_s > first.done_s  # b2 was admitted only when b1 finished
        assert ticker.ticks > 50 and ticker.max_gap < MAX_GAP_S
        eng._overload = "raise"
        eng.submit(slow("b3"))
        with pytest.raises(Overloaded, match="max_pending=1"):
            asyncio.run(eng.asubmit(fast("b4")))
    finally:
        eng._max_pending, eng._overload = was
    # A stopped engine's asubmit and asubmit_many raise: test_reliability.py's stopped engine.


def test_cancel_requests_withdraws_what_is_not_sent_and_leaves_the_rest_running(eng):
    """Two of three requests that gather for a batch are withdrawn: they end cancelled, billed nothing, while
    the third is still gathering, and it still gets its answer."""
    from engine.core.errors import ConfigError
    from engine.core.result import CANCELLED

    futs = eng.submit_many([slow("c1"), slow("c2"), slow("c3")])  # c3: sent about 3 s (real) from now
    assert eng.cancel_requests(futs[:2] + futs[:2]) == 2  # each once
    gone = [f.result(timeout=30) for f in futs[:2]]
    assert not futs[2].done()  # still gathering when the withdrawn two were answered
    assert all(r.status == "failed" and r.error.startswith(f"{CANCELLED}: withdrawn") and r.cost_usd == 0.0
               for r in gone)
    assert futs[2].result(timeout=30).status == "ok"
    assert eng.cancel_requests(futs) == 0  # all done: nothing left to withdraw
    with pytest.raises(ConfigError, match="futures"):
        eng.cancel_requests(["c3"])


@pytest.mark.parametrize("kind", ["ingest", "grouper-0"])
def test_a_cancel_made_while_an_actor_restarts_still_withdraws_the_requests(eng, kind):
    """The driver asks ingest which other drivers hold the requests before it withdraws them. While Ray restarted
    ingest that ask failed, the withdrawal was dropped whole and the caller got a Ray error: every line of a
    cancelled endpoint batch ran on, billed (a helper's hunt). Now the ask waits out the restart. A grouper that
    restarts is told by its rewire; the caller got a Ray error for it though the withdrawal held. On the module's
    engine (it recovers from each kill; an engine each cost two starts, stop 62)."""
    import ray

    from engine.core.result import CANCELLED

    futs = eng.submit_many([slow(f"k-{kind}-{i}", deadline_s=86_400) for i in range(3)])  # gather for hours
    assert not any(f.done() for f in futs)
    ray.kill(eng._h["named"][kind], no_restart=False)
    assert eng.cancel_requests(futs) == 3
    gone = [f.result(timeout=60) for f in futs]
    assert all(r.status == "failed" and r.error.startswith(f"{CANCELLED}: withdrawn") and r.cost_usd == 0.0
               for r in gone)


def test_report_waits_out_a_restart_and_names_an_actor_dead_for_good(eng):
    """``report()`` raised Ray's own error while an actor restarted, and after one died for good (a helper's
    hunt): it waits out a restart, and says what happened and what to do when an actor is gone. The module's
    engine, last: its dispatcher dies for good here (its stop at the module's end copes, as every stop must)."""
    import ray

    ray.kill(eng._h["named"]["dispatcher-openai"], no_restart=False)
    assert "openai" in eng.report()["providers"]
    ray.kill(eng._h["named"]["dispatcher-openai"], no_restart=True)
    with pytest.raises(EngineStopped, match="died for good"):
        eng.report()
