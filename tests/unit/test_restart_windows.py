"""A dispatcher restarted inside the short windows between a piece of work ending and its journal record going
(a helper's fault hunt): nothing it already paid for is sent again, and a batch whose members went again is
still cancelled and counted. A restart is the old dispatcher's tasks cancelled and a new one on its journal,
as Ray gives it."""

from __future__ import annotations

import asyncio

import pytest

from actors import BudgetController, Dispatcher, Grouper, ResultHub
from actors._types import BatchJob, Job
from engine.core.budgets import BudgetSettings
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.provider_api import Secret
from engine.core.request import Request
from engine.core.settings import Settings
from policies import load_policy

from .helpers import Recorder
from .test_batch_faults import CANCEL_ROUTE, _settled
from .test_http_providers import (  # noqa: F401
    EMU_CANCEL_S,
    KEY,
    PROVIDERS,
    ROUTE,
    SPEED,
    VALIDATING_S,
    Rig,
    T,
    emu,
    jobs_of,
    journal_delete_fails_once,
    quarter,
)

CAT = default_catalog()


async def _done(d: Dispatcher, timeout_s: float = 30.0) -> None:
    """Every task of ``d`` has ended (new ones too), and its outbox is flushed, its own flusher's round too: a
    round under way holds what it took (a record's delete comes after its hub push), and the flush below found
    nothing to do (a loaded CI machine saw the result at the hub before that round's delete was queued)."""
    async with asyncio.timeout(timeout_s):
        while d._tasks or (d._flusher is not None and not d._flusher.done()):
            await asyncio.wait([*d._tasks, *([d._flusher] if d._flusher is not None else [])])
        await d.flush()


def _restart(rig: Rig, provider: str) -> Dispatcher:
    for t in list(rig.d._tasks) + list(rig.d._journal_retries) + list(rig.d._sync_journal.retries):
        t.cancel()
    return Dispatcher(provider, rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None, rig.budget,
                      key=Secret(KEY))


@pytest.mark.parametrize("record", ["gone", "outlived"])
@PROVIDERS
def test_a_batch_whose_members_went_sync_is_still_cancelled_and_counted_after_a_restart(quarter, provider,  # noqa: F811
                                                                                          record):
    """Its cancel not taken within the allowance, the members went sync and the batch's record went with them:
    only a task in memory kept cancelling it. After a restart nothing named it, and it finished every member,
    each paid twice, counted nowhere and missing from the ledger. ``outlived``: the batch's own record failed
    to go before the restart; it is not followed beside its watch (what it finished was settled as its
    results and charged as paid twice: the ledger above the bill)."""
    e, jobs = quarter, jobs_of(provider, claims=True)
    e.faults.script(provider, CANCEL_ROUTE[provider], [{"status": 503}] * 6)

    async def go():
        rig = Rig(e, provider, cancel_s=50.0, speed=SPEED / 4)
        if record == "outlived":
            inner = rig.d.journal.delete

            async def keeps_batch_records(space, keys):
                if space != rig.d._space:
                    return await inner(space, keys)
                raise ConnectionError("the journal's Redis timed out")
            rig.d.journal.delete = keeps_batch_records
        d2 = None
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S[provider] + 0.1 * T)
            await rig.until(lambda: len(rig.grouper.readmitted()) == len(jobs), "the members went back", 20)
            assert rig.d._open == {} and rig.d._watching  # followed now by its watch alone
            await rig.d.flush()
            assert bool(await rig.d.journal.items(rig.d._space)) == (record == "outlived")
            taken_before = e.count(CANCEL_ROUTE[provider], status=200)
            d2 = _restart(rig, provider)
            assert await d2.recover() == 0 and list(d2._watching) == list(rig.d._watching) and not d2._open
            await d2.run_many([BatchJob("fallback", "sync", None, False, "t", "t", rig.grouper.readmitted())])
            await rig.until(lambda: len(rig.results) == len(jobs), "the sync results", 20)
            await _done(d2)
            assert e.count(CANCEL_ROUTE[provider], status=200) > taken_before  # the restarted one cancelled it
            items = e.bill().items
            in_batch = [i for i in items if i.custom_id]
            assert len(in_batch) == d2.paid_twice + rig.d.paid_twice  # whatever it still finished is counted
            assert sum(rig.budget.book.spend.values()) == pytest.approx(sum(i.cost_usd for i in items), abs=1e-12)
            assert d2._watching == {} and await d2.journal.items(d2._watch_space) == {}  # its record went
        finally:
            if d2 is not None:
                await d2.provider.close()
            await rig.close()
    asyncio.run(go())


def test_a_restart_before_an_ended_batchs_record_is_deleted_sends_none_of_its_members_again(quarter):  # noqa: F811
    """Cancelled at its hedge, its unfinished members served sync, the batch's record failed to go once and the
    restart came before the retry: the new dispatcher re-attached to the ended batch and handed those members
    back, to be sent sync and paid again."""
    e, jobs = quarter, jobs_of("openai", claims=True)

    async def go():
        rig = Rig(e, "openai", cancel_s=10 * EMU_CANCEL_S, speed=SPEED / 4)
        failed = journal_delete_fails_once(rig, rig.d._space, hold_retry=True)
        d2 = None
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 0.6 * T)
            await rig.resolved(jobs)
            back = rig.grouper.readmitted()
            assert 0 < len(back) < len(jobs)
            await _settled(rig)
            await rig.run("sync", back, bid="fallback")
            await rig.until(lambda: len(rig.results) == len(jobs), "every member served")
            await _done(rig.d)
            if rig.d._sync_journal._task is not None:
                await rig.d._sync_journal._task
            assert failed and list(await rig.d.journal.items(rig.d._space))  # the batch's record outlived it
            calls = e.count(ROUTE["openai"])
            d2 = _restart(rig, "openai")
            assert await d2.recover() == 0
            await _done(d2)
            assert rig.grouper.readmitted() == back  # none handed back a second time
            assert e.count(ROUTE["openai"]) == calls
            assert await d2.journal.items(d2._space) == {}  # the stale record is gone now
        finally:
            if d2 is not None:
                await d2.provider.close()
            await rig.close()
    asyncio.run(go())


def test_a_restart_before_an_answered_sync_calls_record_is_deleted_does_not_make_the_call_again(emu):  # noqa: F811
    emu.honour_keys = False  # as OpenAI and Anthropic by default: a call made again is billed again

    async def go():
        rig = Rig(emu, "openai")
        space = rig.d._sync_journal.space
        failed = journal_delete_fails_once(rig, space, hold_retry=True)
        again = None
        try:
            j = Job(0, Request.model_validate({"id": "s-0", "arrival_s": 0.0, "model": "gpt-5-mini",
                                               "input_tokens": 300, "output_tokens": 20, "prompt": "task"}), "fp")
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get("s-0"), "the result")
            assert r.status == "ok" and len(emu.bill().items) == 1
            await _done(rig.d)
            if rig.d._sync_journal._task is not None:
                await rig.d._sync_journal._task
            assert failed and list(await rig.d.journal.items(space))  # the body's record outlived its call
            again = _restart(rig, "openai")
            await again.recover()
            await _done(again)
            if again._sync_journal._task is not None:
                await again._sync_journal._task
            assert again.resumed_calls == 0 and len(emu.bill().items) == 1
            assert await again.journal.items(space) == {}
        finally:
            if again is not None:
                await again.provider.close()
            await rig.close()
    asyncio.run(go())


def _job(i: int) -> Job:
    return Job(i, Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-5-mini",
                                          "input_tokens": 100 + i, "output_tokens": 10}), f"fp{i}")


def test_a_restarted_dispatchers_turnarounds_reach_the_groupers():
    """A grouper skips a dispatcher's message numbered at or below the last it took; a restarted dispatcher
    numbered from 1 again, so every grouper dropped what it said (a late batch's censored end included) until
    its count passed the old one's."""
    async def go():
        clock = ManualClock(0.0)
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        g = Grouper(load_policy("smart", CAT), CAT, clock, {"openai": Recorder()}, budget, ResultHub())
        taken = []
        heard = asyncio.Event()
        inner = g.table.observe
        g.table.observe = lambda obs: (taken.extend(obs), heard.set(), inner(obs))

        async def ends_taken(n: int) -> int:
            """Wait until the grouper took ``n`` batch ends (its messages arrive on their own tasks)."""
            async with asyncio.timeout(30):
                while sum(o.end is not None for o in taken) < n:
                    heard.clear()
                    await heard.wait()
            return sum(o.end is not None for o in taken)

        def dispatcher() -> Dispatcher:
            return Dispatcher("openai", CAT, Settings(), 0, clock, [g], ResultHub(), None, Recorder(), learners=True)

        async def one_batch(d: Dispatcher, k: int, hedge_in: float | None = None) -> None:
            hedge = None if hedge_in is None else clock.now() + hedge_in
            await d.run_many([BatchJob(f"b{k}", "batch_api", hedge, False, "x", "y", [_job(k)])])
            async with asyncio.timeout(30):
                while d._tasks:  # the simulated batch ends as the clock moves
                    clock.advance(10_000.0)
                    await asyncio.wait(list(d._tasks), timeout=0.01)
            await d.flush()

        d1 = dispatcher()
        for k in range(4):
            await one_batch(d1, k)
        ended = await ends_taken(4)
        assert ended == 4
        d2 = dispatcher()  # Ray restarts it: the same arguments, a fresh memory
        await one_batch(d2, 10, hedge_in=30.0)  # cancelled late at its hedge: told censored
        await one_batch(d2, 11)
        told = [o for _, obs in d2._told for o in obs]
        assert any(o.censored for o in told)
        assert await ends_taken(ended + 2) == ended + 2  # heard, not dropped for an old incarnation's count
    asyncio.run(go())


def test_a_dispatcher_restarted_past_the_hedge_of_a_batch_that_completed_reads_it(emu):  # noqa: F811
    """Restarted after the hedge of a batch that completed meanwhile, the dispatcher cancels first: OpenAI refuses
    ("status 'completed'"), and its journaled handle had never been polled. Read as it was, the batch had no
    output, and every member went again, paid twice and not counted (a review of stop 54's first fix)."""
    jobs = jobs_of("openai", claims=True)

    async def go():
        rig = Rig(emu, "openai")
        d2 = None
        try:
            await rig.reserve(jobs)
            # The batch completes before its hedge whatever its upload and create take (up to 0.5 s of real time
            # here: with 100 engine s, 0.1 s, round trips slowed by a helper's delay injection left member 3
            # unfinished at the hedge, and it went back).
            hedge_at = rig.clock.now() + VALIDATING_S["openai"] + T + 500
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.until(lambda: rig.d._open and all(r[4] is not None for r in rig.d._open.values()),
                            "the batch journaled with its handle")
            d2 = _restart(rig, "openai")  # the dispatcher dies; Ray restarts it after the hedge
            await rig.until(lambda: rig.clock.now() >= hedge_at + 10, "the hedge passed")
            await d2.recover()
            await _done(d2)
            await rig.resolved(jobs)
            assert not rig.grouper.readmitted() and d2.paid_twice == 0
            assert [i.mode for i in emu.bill().items] == ["batch_api"] * len(jobs)
        finally:
            if d2 is not None:
                await d2.provider.close()
            await rig.close()
    asyncio.run(go())
