"""An engine-wide cancel (``Engine.cancel``; ``actors/_cancel.py``), as a provider cancels a batch: nothing more
is sent, provider batches under way are cancelled and what they finished is kept, what waits ends at no cost.
Before it, an interrupted ``smartbatch batch`` left its provider batches running to their end: every member billed,
its answer read by nobody, and ``--resume`` sent those lines again (a helper's tour, stop 45). The grouper and the
dispatcher are plain classes here; the dispatcher calls the provider emulator over HTTP."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

import pytest

from actors import Grouper, ResultHub
from actors._types import Job
from engine.core.clock import Clock, ManualClock
from policies import load_policy
from tests.unit.helpers import Recorder
from tests.unit.test_actors import ledger
from tests.unit.test_actors import req as plain_req
from tests.unit.test_http_providers import (
    CAT,
    EMU_CANCEL_S,
    ROUTE,
    SPEED,
    N,
    Rig,
    T,
    assert_split_by_the_bill,
    billed_by_custom_id,
    emu,  # noqa: F401  (a fixture)
    jobs_of,
    quarter,  # noqa: F401  (a fixture)
    req,
)


def test_a_cancel_cancels_the_batch_under_way_keeps_what_it_finished_and_sends_nothing_more(quarter):  # noqa: F811
    emu, jobs = quarter, jobs_of("openai", claims=True)  # noqa: F811

    async def go():
        rig = Rig(emu, "openai", speed=SPEED / 4)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)  # no hedge: it would run to its end
            await rig.until(lambda: emu.count("batches.create", status=200) == 1, "the batch's create")
            assert await rig.d.cancel() == 1
            assert emu.count("batches.cancel", status=200) == 1  # sent before the cancel returned
            await rig.resolved(jobs, timeout_s=30.0)
            # Each member was answered from the batch (it finished, billed once) or went back unbilled.
            finished = assert_split_by_the_bill(rig, emu, jobs, "openai")
            assert len(finished) < N and rig.d.paid_twice == 0
            # Work that comes after the cancel is sent nowhere: a call ends cancelled, a batch is never made.
            late = [Job(10, req(10), "fp-late-sync", claim="c10"), Job(11, req(11), "fp-late-batch", claim="c11")]
            await rig.reserve(late)
            await rig.run("sync", late[:1], bid="late-sync")
            await rig.run("batch_api", late[1:], bid="late-batch")
            await rig.until(lambda: "openai-10" in rig.results and late[1].req.id in
                            {j.req.id for j in rig.grouper.readmitted()}, "the late work to end")
            assert rig.results["openai-10"].status == "failed" and "cancelled" in rig.results["openai-10"].error
            assert emu.count(ROUTE["openai"]) == 0 and emu.count("batches.create") == 1 and not rig.calls
            await rig.until(lambda: not rig.budget.book.claims.keys() - {j.claim for j in jobs if j.req.id
                                                                       not in finished} - {"c11"},
                            "the claims of what ended settled")
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_cancelled_grouper_ends_what_it_holds_and_everything_after_at_no_cost():
    async def go():
        disp, hub = Recorder(), ResultHub()
        g = Grouper(load_policy("fixed", CAT, {"max_batch_size": 10, "batch_wait_timeout_s": 1000}), CAT,
                    ManualClock(0.0), {"openai": disp}, ledger(100.0), hub)
        await g.add([Job(0, plain_req(0), "a"), Job(1, plain_req(1), "b")])  # gathering for a batch
        assert (await g.stats())["pending"] == 2
        assert await g.cancel() == 2
        await g.add([Job(2, plain_req(2), "c")])  # arrives after it (or comes back from a cancelled batch)
        got = {r.id: r for r in await hub.pull(0.01)}
        assert sorted(got) == ["r0", "r1", "r2"]
        assert all(r.status == "failed" and r.error.startswith("cancelled: ") and r.cost_usd == 0.0 for r in got.values())
        assert [name for name, _ in disp.calls if name == "run_many"] == []  # nothing was sent
        assert (await g.stats())["pending"] == 0 and not g._timers  # its gather's timer went with them
    asyncio.run(go())


def test_a_dispatch_whose_reservation_is_out_when_the_cancel_comes_is_sent_nowhere():
    """The grouper waits on the ledger for r0 and r1 when the cancel comes (a review): r0 was then sent to its
    dispatcher and r1 parked, reserved again later and sent too, neither answered. Both end cancelled now, and
    nothing is parked or reserved again."""
    from engine.core.budgets import Verdict

    class SlowLedger:
        def __init__(self) -> None:
            self.answer, self.calls, self.settled = asyncio.Event(), 0, []

        async def reserve_many(self, claims, release):
            self.calls += 1
            await self.answer.wait()
            return [Verdict(True), Verdict(False, "wait", budget="global")][:len(claims)]

        async def settle_many(self, settled):
            self.settled += settled

    async def go():
        disp, hub, ledger_ = Recorder(), ResultHub(), SlowLedger()
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": disp}, ledger_, hub)
        adding = asyncio.create_task(g.add([Job(0, plain_req(0), "a"), Job(1, plain_req(1), "b")]))
        while not g._reserving:  # the reservation call is out
            await asyncio.sleep(0)
        assert await g.cancel() == 0  # nothing pending nor parked: both are being reserved
        ledger_.answer.set()
        await adding
        got = {r.id: r for r in await hub.pull(0.01)}
        assert sorted(got) == ["r0", "r1"] and all(r.error.startswith("cancelled: ") for r in got.values())
        assert not [c for c in disp.calls if c[0] == "run_many"] and len(g.waits) == 0 and g._park_timer is None
        assert ledger_.calls == 1 and len(ledger_.settled) == 1  # r0's claim went back at 0
    asyncio.run(go())


def test_a_call_waiting_for_its_next_try_ends_at_the_cancel_and_leaves_nothing_under_way(emu):  # noqa: F811
    """A sync call answered 429 with an hour's Retry-After waits for its next try. The cancel ends it at once
    (billed nothing, never sent again), so a ``serve`` stop's drain (``Dispatcher.settled``) finds nothing under
    way: left to its timer, it held the drain for the whole Retry-After (a review)."""
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": 3600.0 * SPEED}])

    async def go():
        rig = Rig(emu)
        try:
            # A deadline with room for that wait: else the 429 fails it at once (test_rate_limits.py).
            (j,) = jobs_of("openai", 1, deadline_s=2 * 3600.0 * SPEED)
            await rig.run("sync", [j])
            await rig.until(lambda: rig.calls, "the first try")
            assert await rig.d.settled() == 1  # waiting for its next try: under way
            await rig.d.cancel()
            r = await rig.until(lambda: rig.results.get(j.req.id), "its end")
            assert r.status == "failed" and r.error.startswith("cancelled: the engine was cancelled") and r.cost_usd == 0
            assert await rig.d.settled() == 0
            assert len(rig.calls) == 1 and emu.count("chat.completions") == 1 and not emu.bill().items
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_call_waiting_out_a_429_ends_at_its_withdrawal_its_reservation_settled_once_at_0(emu):  # noqa: F811
    """``Engine.cancel_requests`` of a request that waits out a rate limit's 429 (an hour's Retry-After) ends it
    at once, billed nothing, its claim settled once at 0, and the other request waiting runs on. Left to its timer,
    it ended only when the wait was over: an endpoint batch's cancel stayed ``cancelling`` all that time, and a
    drain waited for it (a fault hunt)."""
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": 3600.0 * SPEED}] * 2)

    async def go():
        rig = Rig(emu)
        settled, settle = [], rig.budget.settle_many

        async def spy(items):
            settled.extend(items)
            await settle(items)
        rig.budget.settle_many = spy
        try:
            gone, kept = jobs_of("openai", 2, claims=True, deadline_s=2 * 3600.0 * SPEED)
            await rig.run("sync", [gone, kept])
            await rig.until(lambda: len(rig.calls) == 2, "the first tries")
            await rig.d.withdraw([gone.req.uid])
            r = await rig.until(lambda: rig.results.get(gone.req.id), "its end", timeout_s=3.0)
            assert r.status == "failed" and r.error.startswith("cancelled: withdrawn") and r.cost_usd == 0, r
            assert "may have been billed" not in r.error  # a 429 billed nothing
            await rig.until(lambda: settled, "its settlement")
            assert [s for s in settled if s[0] == gone.claim] == [(gone.claim, 0.0)]
            assert kept.req.id not in rig.results and await rig.d.settled() == 1  # still waiting its turn
            assert len(rig.calls) == 2 and not emu.bill().items
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("fault", ["batches.cancel", "files.content"])
def test_once_the_engine_is_cancelled_a_batch_is_read_to_its_end_whatever_its_cancel_and_read_meet(quarter, fault):  # noqa: F811
    """A stop's drain waits for the provider batches the engine's cancel cancelled, and reads what they finished.
    A cancel the provider kept refusing past its allowance, or an output read that kept failing, made the
    dispatcher give the batch up, as at a hedge: its members ended unanswered (the engine takes no work), what it
    finished was billed unread, and the restarted endpoint asked those lines again (a fault hunt: 16 and 5 of
    24 lines paid twice). Now it is followed to its end: every member it finished is answered, once."""
    e, jobs = quarter, jobs_of("openai", claims=True)
    e.faults.script("openai", fault, [{"status": 500}] * (200 if fault == "batches.cancel" else 8))

    async def go():
        rig = Rig(e, "openai", speed=SPEED / 4)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.until(lambda: billed_by_custom_id(e), "a first member to finish")
            await rig.d.cancel()
            await rig.resolved(jobs, timeout_s=30.0)
            answered = {j.req.id for j in jobs if j.req.id in rig.results and rig.results[j.req.id].status == "ok"}
            billed = billed_by_custom_id(e)
            assert answered and len(billed) == len(answered), (answered, billed)  # each billed member answered
            if fault == "batches.cancel":  # never taken: the batch ran to its end
                assert len(answered) == len(jobs)
            assert rig.d.paid_twice == 0 and await rig.d.settled() == 0
        finally:
            await rig.close()
    asyncio.run(go())


class HeldClock(Clock):
    """Engine time at ``speed`` times the wall clock, never past ``limit()`` (read anew on the test's thread at
    every ``now``): a test holds the time still while a step takes what real time it takes, and lets it run on
    once the step is done. The emulator's thread reads it too (under its own locks, so it never calls ``limit``)."""

    def __init__(self, t: float, speed: float, limit: Callable[[], float]):
        self.t, self.speed, self._limit, self._cap = t, speed, limit, t
        self._wall, self._lock, self._owner = time.monotonic(), threading.Lock(), threading.get_ident()

    def now(self) -> float:
        cap = self._limit() if threading.get_ident() == self._owner else None
        with self._lock:
            self._cap = self._cap if cap is None else cap
            wall = time.monotonic()
            self.t = max(min(self.t + (wall - self._wall) * self.speed, self._cap), self.t)
            self._wall = wall
            return self.t

    def real_delay(self, virtual_s: float) -> float:
        return max(virtual_s, 0.0) / self.speed


def test_a_batch_whose_hedge_passes_while_it_finalizes_is_polled_at_its_pace_not_in_a_spin():
    """A batch that reached "finalizing" (every member ran and is billed) before its hedge is waited for, not
    cancelled. Once the hedge had passed, the wait until it was the hedge itself, in the past: the follow-up
    polled as fast as the provider answered (a review: 323 polls in 260 engine seconds)."""
    from engine.emulator import Emulator

    # The time stands still through the upload and the create, and again between the members' end and the hedge
    # until two polls saw the batch there: on real time alone, the upload's and the create's real time moved the
    # members' end toward the hedge set before them, and a poll had 0.8 s of real time to fall between the two
    # (failed 6 of 8 fresh runs on a loaded machine at 0.15 s, and once in stop 82 at 0.8 s).
    start, ended = 1000.0, 1000.0 + 1.0 + T  # created at start, validated 1 s, every member ends T later

    def limit() -> float:
        if not slow_end.count("batches.create", status=200):
            return start
        seen = [c for c in slow_end.calls if c.route == "batches.retrieve" and c.at >= ended + 100.0]
        return ended + 100.0 if len(seen) < 2 else math.inf  # the second poll there was sent after it stood

    clock = HeldClock(start, SPEED / 4, limit)
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED / 4, cancel_s=EMU_CANCEL_S, validating_s=1.0,
                  finalizing_s=400.0) as slow_end:
        slow_end.follow(clock)  # one time for both: every member ends with the batch, T after its validation
        jobs = jobs_of("openai")

        async def go():
            rig = Rig(slow_end, "openai", clock=clock)
            try:
                await rig.run("batch_api", jobs, hedge_at=ended + 200.0)  # the batch completes 400 after `ended`
                await rig.resolved(jobs)
                assert all(rig.results[j.req.id].status == "ok" for j in jobs)  # waited for, never cancelled
                assert slow_end.count("batches.cancel") == 0
                assert slow_end.count("batches.retrieve") < 40, slow_end.count("batches.retrieve")
            finally:
                await rig.close()
        asyncio.run(go())
