"""Transient faults on a batch's own calls, against the HTTP emulator: the cancel at the hedge and the follow-up
of a late cancel (the results read is in test_http_providers' round trip). Each is tried again: the fallback of a
batch call that failed is to send its members sync, and a member the batch finished (billed) is then paid twice."""

from __future__ import annotations

import asyncio

import pytest

from engine.emulator import Emulator
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    CAT,
    EMU_CANCEL_S,
    PROVIDERS,
    ROUTE,
    SPEED,
    VALIDATING_S,
    Rig,
    T,
    assert_batch_member,
    assert_split_by_the_bill,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
)

CANCEL_ROUTE = {"openai": "batches.cancel", "anthropic": "messages.batches.cancel"}
SLOW_CANCEL_S = 50 * EMU_CANCEL_S  # 1 s real: a loaded machine's polls never see a late cancel end in time


@pytest.fixture
def slow_cancel_emu():
    """An emulator whose cancels outlast the dispatcher's allowance by far: with the shared one's 20 ms (real), a
    poll slowed by a loaded machine saw the cancel end within the allowance, and nothing was paid twice."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=SLOW_CANCEL_S, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


async def _settled(rig: Rig, timeout_s: float = 10.0) -> None:
    """Every task of the dispatcher has ended (a batch's follow-up included), new ones too."""
    async with asyncio.timeout(timeout_s):
        while rig.d._tasks:
            await asyncio.wait(list(rig.d._tasks))


@PROVIDERS
def test_a_cancel_that_failed_once_is_made_again_and_nothing_is_paid_twice(emu, provider):  # noqa: F811
    jobs = jobs_of(provider, claims=True)
    emu.faults.script(provider, CANCEL_ROUTE[provider], [{"status": 500}])

    async def go():
        rig = Rig(emu, provider, cancel_s=10 * EMU_CANCEL_S)
        try:
            await rig.reserve(jobs)
            hedge_at = rig.clock.now() + VALIDATING_S[provider] + 0.3 * T
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs)
            await _settled(rig)  # a batch left running is followed to its end, and what it finished counted
            assert emu.count(CANCEL_ROUTE[provider]) >= 2  # the failed cancel, then the one taken
            assert rig.d.paid_twice == 0, f"{rig.d.paid_twice} member(s) paid twice"
            assert_split_by_the_bill(rig, emu, jobs, provider)
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_late_cancelled_batch_is_followed_to_its_end_through_a_failed_poll(slow_cancel_emu, provider):
    emu = slow_cancel_emu  # noqa: F811
    # The cancel outlasts its allowance, so the members go back to be sent sync; the dispatcher then follows
    # the batch to its end to count what it still finished (paid twice). A poll failing there ended the count.
    jobs = jobs_of(provider, claims=True)

    async def go():
        rig = Rig(emu, provider, cancel_s=EMU_CANCEL_S / 10)
        inner, failed = rig.d.provider.poll, []

        async def poll(handle):
            task = asyncio.current_task()
            if not failed and task is not None and task.get_coro().__qualname__.endswith("_watch_late_cancel"):
                failed.append(handle)
                raise RuntimeError("the provider answered 503")
            return await inner(handle)

        rig.d.provider.poll = poll
        try:
            await rig.reserve(jobs)
            hedge_at = rig.clock.now() + VALIDATING_S[provider] + 0.6 * T  # member 0 finishes before it
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs)
            await _settled(rig)
            assert failed, "the follow-up never polled"
            assert rig.d.paid_twice >= 1, "what the batch finished was not counted"
            await asyncio.gather(*rig.d.budget._tasks)  # the dispatcher's message to the ledger
            # What the late batch finished is on the bill, so it is on the budget ledger too: the members went
            # back unbilled otherwise (a recording grouper sends nothing), so the ledger holds the whole bill.
            billed = sum(i.cost_usd for i in emu.bill().items)
            assert billed > 0 and sum(rig.budget.book.spend.values()) == pytest.approx(billed, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_late_batches_of_the_same_request_ids_are_each_charged(slow_cancel_emu, provider):
    emu = slow_cancel_emu  # noqa: F811
    # Two engines on one ledger (or one engine taking the same ids again, e.g. a batch file run a second time):
    # each late-cancelled batch is billed again, so each is charged. The charge id was the member's custom_id
    # alone (tenant, id, model, attempt), so the second batch's charges were taken for replays and dropped.
    from actors._peer import as_peer

    async def go():
        rigs = [Rig(emu, provider, cancel_s=EMU_CANCEL_S / 10) for _ in range(2)]
        rigs[1].budget = rigs[0].budget  # one ledger, as two engines on one Redis
        rigs[1].d.budget = as_peer(rigs[0].budget)
        try:
            for k, rig in enumerate(rigs):
                jobs = [j._replace(claim=f"{j.claim}-{k}") for j in jobs_of(provider, claims=True)]
                await rig.reserve(jobs)
                await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S[provider] + 0.6 * T)
                await rig.resolved(jobs)
                await _settled(rig)
                await asyncio.gather(*rig.d.budget._tasks)
            assert all(r.d.paid_twice >= 1 for r in rigs)
            billed = sum(i.cost_usd for i in emu.bill().items)
            assert sum(rigs[0].budget.book.spend.values()) == pytest.approx(billed, abs=1e-12)
        finally:
            for rig in rigs:
                await rig.close()
    asyncio.run(go())


RESULTS_ROUTE = {"openai": "files.content", "anthropic": "messages.batches.results"}


@PROVIDERS
def test_a_batch_whose_results_cannot_be_read_is_read_later_and_what_it_paid_is_counted(emu, provider,  # noqa: F811
                                                                                        monkeypatch):
    # The batch completes (every member billed), then every read of its results fails (a files endpoint down
    # for the reads' backoff): the members go back to be sent again for their deadlines. The batch is read again
    # later, so what it billed is counted as paid twice and charged to the budget ledger; before, the report
    # said 0 and the ledger missed the whole batch.
    import actors._batch_api as batch_api
    from actors._batch_api import FETCH_TRIES

    monkeypatch.setattr(batch_api, "RETRY_BASE_S", 0.02)  # the same reads, a tenth of the waits between them
    jobs = jobs_of(provider, claims=True)
    emu.faults.script(provider, RESULTS_ROUTE[provider], [{"status": 500}] * FETCH_TRIES)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert sorted(j.req.id for j in rig.grouper.readmitted()) == sorted(j.req.id for j in jobs)
            await _settled(rig)
            await asyncio.gather(*rig.d.budget._tasks)  # the dispatcher's message to the ledger
            billed = sum(i.cost_usd for i in emu.bill().items)
            assert len(emu.bill().items) == len(jobs) and billed > 0
            assert rig.d.paid_twice == len(jobs), f"{rig.d.paid_twice} of {len(jobs)} billed members counted"
            assert rig.d.paid_twice_usd == pytest.approx(billed, abs=1e-12)
            # Nothing else settled a cost (the members went back), so the ledger holds exactly the batch's bill.
            assert sum(rig.budget.book.spend.values()) == pytest.approx(billed, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())
