"""Transient faults on a batch's own calls, against the HTTP emulator: the cancel at the hedge and the follow-up
of a late cancel (the results read is in test_http_providers' round trip). Each is tried again: the fallback of a
batch call that failed is to send its members sync, and a member the batch finished (billed) is then paid twice."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from actors import Dispatcher
from actors._batch_api import SUBMIT_TRIES
from actors._types import BatchJob
from engine.core.provider_api import Secret
from engine.emulator import Emulator
from tests.unit.helpers import sdk_request
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    CAT,
    EMU_CANCEL_S,
    KEY,
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
    journal_delete_fails_once,
    quarter,
)

CANCEL_ROUTE = {"openai": "batches.cancel", "anthropic": "messages.batches.cancel"}
SLOW_CANCEL_S = 50 * EMU_CANCEL_S  # 2 s real (below): a loaded machine's polls never see a late cancel end in time


@pytest.fixture
def slow_cancel_emu():
    """An emulator whose cancels outlast the dispatcher's allowance by far: with the shared one's 20 ms (real), a
    poll slowed by a loaded machine saw the cancel end within the allowance, and nothing was paid twice. At half
    the engine's speed: a batch whose cancel is slow still ends when its last member does (T after its create),
    and at ``SPEED`` that was 0.4 s of real time after a hedge at 0.6 T, for the cancel and the polls after the
    allowance; round trips slowed by a helper's delay injection took longer, the batch was read as ended, and
    nothing was paid twice. Here it is 1.4 s."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED / 2, cancel_s=SLOW_CANCEL_S,
                  validating_s=VALIDATING_S["openai"], finalizing_s=1.0) as e:
        yield e


async def _settled(rig: Rig, timeout_s: float = 10.0) -> None:
    """Every task of the dispatcher has ended (a batch's follow-up included), new ones too."""
    async with asyncio.timeout(timeout_s):
        while rig.d._tasks:
            await asyncio.wait(list(rig.d._tasks))


@PROVIDERS
def test_a_cancel_that_failed_once_is_made_again_and_nothing_is_paid_twice(quarter, provider):  # noqa: F811
    # At a quarter speed, the engine's too: the cancel made again must come before the batch ends on its own, 0.7 T
    # after the hedge, which at SPEED was 0.7 s of real time, and a loaded machine (the unit suite beside three
    # busy processes on two cores) took longer: one cancel only, the batch read as ended. Here 2.8 s.
    e, jobs = quarter, jobs_of(provider, claims=True)
    e.faults.script(provider, CANCEL_ROUTE[provider], [{"status": 500}])

    async def go():
        rig = Rig(e, provider, cancel_s=10 * EMU_CANCEL_S, speed=SPEED / 4)
        try:
            await rig.reserve(jobs)
            hedge_at = rig.clock.now() + VALIDATING_S[provider] + 0.3 * T
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs)
            await _settled(rig)  # a batch left running is followed to its end, and what it finished counted
            assert e.count(CANCEL_ROUTE[provider]) >= 2  # the failed cancel, then the one taken
            assert rig.d.paid_twice == 0, f"{rig.d.paid_twice} member(s) paid twice"
            assert_split_by_the_bill(rig, e, jobs, provider)
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_the_allowance_counts_from_the_cancel_the_provider_took_not_from_a_first_try_that_failed(provider):
    """The provider cancels in exactly the allowance (300 s) from when it takes the cancel; the first two tries
    fail (5xx), the third is taken. Counted from the first try, the allowance ended while the provider was still
    cancelling, and the members it had finished went back with the rest: paid twice."""
    cancel_s = 300.0
    speed = SPEED / 4  # member 0 finishes 0.05 T before the hedge: 50 ms of real time at SPEED, 200 here
    with Emulator(CAT, latency_scale=0.0, speedup=speed, cancel_s=cancel_s, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        jobs = jobs_of(provider, claims=True)
        e.faults.script(provider, CANCEL_ROUTE[provider], [{"status": 500}] * 2)

        async def go():
            rig = Rig(e, provider, speed=speed)
            assert rig.catalog.provider(provider).batch_api.cancel_s == cancel_s
            try:
                await rig.reserve(jobs)
                await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S[provider] + 0.3 * T)
                await rig.resolved(jobs, timeout_s=20)
                await _settled(rig, 20)
                assert e.count(CANCEL_ROUTE[provider]) == 3
                assert rig.d.paid_twice == 0, f"{rig.d.paid_twice} member(s) paid twice"
                assert assert_split_by_the_bill(rig, e, jobs, provider)  # member 0 finished, and came back once
            finally:
                await rig.close()
        asyncio.run(go())


@pytest.fixture
def eighth() -> Iterator[Emulator]:
    """The emulator at an eighth of ``SPEED`` (the engine's clock stays at ``SPEED``): member 0 of a batch
    finishes about 2 s of real time after its create."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED / 8, cancel_s=EMU_CANCEL_S,
                  validating_s=VALIDATING_S["openai"], finalizing_s=1.0) as e:
        yield e


@PROVIDERS
def test_a_cancel_the_provider_never_took_in_the_allowance_is_made_again_after_the_members_went(eighth,  # noqa: F811
                                                                                               provider):
    """The cancel endpoint fails for longer than the allowance (50 s), so the members go back to be sent sync.
    The batch is cancelled as soon as the provider takes it: left running, it finished every member, each paid
    twice (the follow-up only polled). At an eighth of the engine's speed: the seven cancels, each with a poll
    after it (some fifteen round trips), must be taken before member 0 finishes. At 1,000x that was 150 ms of real
    time, and a loaded machine's unit suite once took longer; at a quarter (about 0.9 s), round trips slowed by
    up to 0.1 s each (a helper's delay injection in the emulator) made member 0 finish first, paid twice and
    counted so; at an eighth, about 2 s."""
    _cancel_never_taken(eighth, provider)


def _cancel_never_taken(emu: Emulator, provider: str) -> None:  # noqa: F811
    jobs = jobs_of(provider, claims=True)
    emu.faults.script(provider, CANCEL_ROUTE[provider], [{"status": 503}] * 6)

    async def go():
        rig = Rig(emu, provider, cancel_s=50.0)
        try:
            await rig.reserve(jobs)
            # The hedge is 0.1 s of real time after this, member 0 finishes 2 s after the create (``eighth``): the
            # outage and the cancel both end before it.
            await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S[provider] + 0.1 * T)
            await rig.resolved(jobs, timeout_s=20)
            await _settled(rig, 20)
            assert len(rig.grouper.readmitted()) == len(jobs)
            # Six failed, then one taken. The hedge's retries and the follow-up of the members gone sync both make
            # the cancel until the provider takes it, so the two can race to one more (a unit-suite flake counted
            # 8): a cancel of a cancelling batch is harmless; the bill below is what matters.
            assert emu.count(CANCEL_ROUTE[provider]) >= 7 and emu.count(CANCEL_ROUTE[provider], status=200) >= 1
            assert rig.d.paid_twice == 0 and not billed_by_custom_id(emu)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_hedge_while_openai_finalizes_the_batch_waits_for_its_results():
    """The hedge comes while the batch is "finalizing": every member ran and is billed, the output file is being
    written, and the cancel is refused. The dispatcher waits for the results rather than send the members again:
    they went back at the end of the allowance, and each was paid twice."""
    # At half speed: the hedge is set before the upload and the create, whose real time (0.24 s seen under load)
    # moves the members' end toward it; 0.5 T is 0.5 s of real time at SPEED (failed 5 of 6 fresh runs on a
    # loaded machine, a helper's hunt), 1 s here.
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED / 2, cancel_s=EMU_CANCEL_S,
                  validating_s=VALIDATING_S["openai"], finalizing_s=3 * T) as e:
        jobs = jobs_of("openai", claims=True)

        async def go():
            rig = Rig(e, "openai", cancel_s=200.0, speed=SPEED / 2)
            try:
                await rig.reserve(jobs)
                # The members finish by T, the output is written until 4 T: the hedge at 1.5 T falls between.
                await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 1.5 * T)
                await rig.resolved(jobs, timeout_s=20)
                await _settled(rig, 20)
                assert rig.grouper.readmitted() == [] and rig.d.paid_twice == 0
                assert assert_split_by_the_bill(rig, e, jobs, "openai") == {j.req.id for j in jobs}
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


async def _journal_quiet(rig: Rig) -> None:
    """The dispatcher's outbox has flushed, and the deletes it tried again have ended."""
    if rig.d._flusher is not None:
        await rig.d._flusher
    await asyncio.gather(*rig.d._journal_retries)


def _restarted(rig: Rig):
    """The dispatcher as Ray restarts it: a new one on the same journal (the hub's), peers and clock."""
    from actors import Dispatcher
    from engine.core.provider_api import Secret
    from tests.unit.test_http_providers import KEY

    return Dispatcher(rig.name, rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None, rig.budget,
                      key=Secret(KEY))


def test_a_batch_record_whose_delete_failed_is_deleted_again_and_a_later_restart_sends_nothing(quarter):  # noqa: F811
    """The batch ends (cancelled at its hedge: the members it finished from its output, the rest back to be sent
    sync), and the journal fails to delete its record once (a Redis blip). The delete is made again: left in the
    journal, the record made any later restart of the dispatcher re-attach to the ended batch and hand its
    cancelled members back, to be sent and paid again. At a quarter speed: member 0 must finish before the
    hedge, 0.35 T after the submission's round trips, which at SPEED was 0.35 s of real time (a CI rehearsal's
    unit suite once took longer, stop 39)."""
    e, jobs = quarter, jobs_of("openai", claims=True)

    async def go():
        rig = Rig(e, "openai", cancel_s=10 * EMU_CANCEL_S, speed=SPEED / 4)
        failed = journal_delete_fails_once(rig, rig.d._space)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 0.6 * T)
            await rig.resolved(jobs)
            back = rig.grouper.readmitted()
            assert 0 < len(back) < len(jobs)  # member 0 finished before the hedge
            await _settled(rig)
            await _journal_quiet(rig)
            assert failed and await rig.d.journal.items(rig.d._space) == {}
            later = _restarted(rig)
            assert await later.recover() == 0 and rig.grouper.readmitted() == back
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_records_of_results_the_hub_did_not_take_go_once_a_push_goes_through(emu):  # noqa: F811
    """The hub fails to take a batch's results (it died). The batch's record stays while the dispatcher might
    restart before the results reach a hub, and goes once they do: the driver re-admits the requests after the
    hub's restart, and ``recall`` sends their results again. Before, the record stayed for good."""
    jobs = jobs_of("openai", claims=True)

    async def go():
        rig = Rig(emu, "openai")
        inner, failed = rig.d.hubs.call, []

        async def push_fails_once(method, *args, **kw):
            if method == "push" and not failed:
                failed.append(method)
                raise ConnectionError("the hub died")
            return await inner(method, *args, **kw)

        rig.d.hubs.call = push_fails_once
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await _settled(rig)
            await _journal_quiet(rig)
            assert failed and rig.results == {}
            assert len(await rig.d.journal.items(rig.d._space)) == 1  # kept while no hub has the results
            assert sorted(await rig.d.recall([j.req.uid for j in jobs])) == sorted(j.req.uid for j in jobs)
            await rig.resolved(jobs)
            await _journal_quiet(rig)
            assert set(rig.results) == {j.req.id for j in jobs}
            assert await rig.d.journal.items(rig.d._space) == {}
            assert await _restarted(rig).recover() == 0
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_batch_whose_create_got_no_answer_is_found_and_followed_not_sent_again(emu, provider):  # noqa: F811
    """The create reaches the provider and makes the batch, and its answer is lost (a client timeout). Taken for
    a refusal, its members went back to be sent sync while the batch ran them too, unfollowed: each paid twice,
    and counted nowhere. The dispatcher asks the provider for it (OpenAI: by its metadata; Anthropic: among its
    newest batches, as Idempotency-Key is not documented there, and the emulator here ignores it) and follows
    it: every member billed once, at the batch price."""
    jobs = jobs_of(provider, claims=True)
    emu.honour_keys = False

    async def go():
        rig = Rig(emu, provider)
        client = rig.d.provider.client
        batches = client.batches if provider == "openai" else client.messages.batches
        inner, lost = batches.create, []
        sdk = rig.d.provider._sdk

        async def answer_lost_once(*a, **kw):
            made = await inner(*a, **kw)
            if not lost:
                lost.append(made.id)
                raise sdk.APITimeoutError(request=sdk_request())  # the SDK's own timeout, after the provider made it
            return made

        batches.create = answer_lost_once
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20)
            await _settled(rig, 20)
            assert lost and rig.grouper.readmitted() == []
            assert len(rig.results) == len(jobs)
            assert all(r.mode == "batch_api" for r in rig.results.values())
            billed = billed_by_custom_id(emu)  # (asserts no custom_id is billed twice)
            assert set(billed) == {batch_key(j) for j in jobs} and {i.mode for i in billed.values()} == {"batch_api"}
            assert len(emu.bill().items) == len(jobs) and rig.d.paid_twice == 0
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_lost_anthropic_create_is_not_taken_for_an_older_look_alike(emu):  # noqa: F811
    """Another client's batch of as many requests, running, made before this dispatcher's last batch: the lookup
    for a create that got no answer stops at that last batch (none older can be the lost one's). Looked at too,
    the look-alike made two candidates, neither adopted, and the create was made again: its members billed in
    both batches."""
    emu.honour_keys = False
    first, jobs = jobs_of("anthropic", claims=True), [j._replace(req=j.req.model_copy(update={"id": f"late-{k}"}))
                                                      for k, j in enumerate(jobs_of("anthropic", claims=True))]

    async def go():
        rig = Rig(emu, "anthropic")
        client = rig.d.provider.client
        params = {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        await client.messages.batches.create(requests=[{"custom_id": f"other-{i}", "params": params}
                                                       for i in range(len(jobs))])
        try:
            await rig.reserve(first)
            await rig.run("batch_api", first, bid="b1")  # this dispatcher's last batch; the other still runs
            await rig.until(lambda: emu.count("messages.batches.create", status=200) == 2, "b1 made")
            inner, lost = client.messages.batches.create, []

            async def answer_lost_once(*a, **kw):
                made = await inner(*a, **kw)
                if not lost:
                    lost.append(made.id)
                    raise rig.d.provider._sdk.APITimeoutError(request=sdk_request())
                return made

            client.messages.batches.create = answer_lost_once
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, bid="b2")
            await rig.resolved(first + jobs, timeout_s=20)
            await _settled(rig, 20)
            assert lost and rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)  # (asserts no custom_id is billed twice)
            assert {batch_key(j) for j in jobs} <= set(billed)
            assert emu.count("messages.batches.create", status=200) == 3  # the other, b1, b2: b2 not made again
        finally:
            await rig.close()
    asyncio.run(go())


def _twin(jobs: list) -> list:
    """Jobs of as many requests under other ids: a batch that looks like theirs to a lookup by size."""
    return [j._replace(req=j.req.model_copy(update={"id": f"twin-{k}"}), claim=f"t{k}") for k, j in enumerate(jobs)]


def test_a_lost_anthropic_create_is_found_while_a_create_of_its_size_waits(emu):  # noqa: F811
    """Two batches of as many requests leave together; the first create's answer is lost after Anthropic made
    it. The second waits until the first is found: unanswered beside it, its batch looked alike, the lookup gave
    up after five tries and the first was created again, its members billed in both batches."""
    emu.honour_keys = False
    first, second = jobs_of("anthropic", claims=True), _twin(jobs_of("anthropic", claims=True))

    async def go():
        rig = Rig(emu, "anthropic")
        batches, p = rig.d.provider.client.messages.batches, rig.d.provider
        inner_create, inner_find, creates, settled = batches.create, p.find_batch, [], asyncio.Event()

        async def create(*a, **kw):
            creates.append(kw["requests"][0]["custom_id"])
            if len(creates) == 1:
                await inner_create(*a, **kw)
                raise p._sdk.APITimeoutError(request=sdk_request())  # made, and its answer lost
            if len(creates) == 3:  # the first made again: let the second go on, for the bill to tell
                settled.set()
            await settled.wait()  # a slow upload: unanswered until the first batch's fate is known
            return await inner_create(*a, **kw)

        async def find(*a, **kw):
            found = await inner_find(*a, **kw)
            if found is not None:
                settled.set()
            return found

        batches.create, p.find_batch = create, find
        try:
            await rig.reserve(first + second)
            await rig.d.run_many([BatchJob("b1", "batch_api", None, False, "t", "t", first),
                                  BatchJob("b2", "batch_api", None, False, "t", "t", second)])
            await rig.resolved(first + second, timeout_s=30)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)  # (asserts no custom_id is billed twice)
            assert set(billed) == {batch_key(j) for j in first + second}
            assert emu.count("messages.batches.create", status=200) == 2
            for j in first + second:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "anthropic")
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_restart_finds_the_cut_anthropic_create_and_its_twin_is_created_once(emu):  # noqa: F811
    """The dispatcher dies while the create of one batch is unanswered and a second of as many requests waits
    for it. After the restart the cut create is found (no look-alike of its own hides it) and the second,
    admitted again, is created once. Both cut, each lookup saw the other's batch beside its own, adopted
    neither, and both were created again: every member billed twice."""
    emu.honour_keys = False
    first, second = jobs_of("anthropic", claims=True), _twin(jobs_of("anthropic", claims=True))

    async def go():
        rig = Rig(emu, "anthropic")
        inner = rig.d.provider.submit_batch

        async def create_then_die(*args):
            await inner(*args)
            await asyncio.Event().wait()  # the answer never comes back: the process died here

        rig.d.provider.submit_batch = create_then_die
        try:
            await rig.reserve(first + second)
            await rig.d.run_many([BatchJob("b1", "batch_api", None, False, "t", "t", first),
                                  BatchJob("b2", "batch_api", None, False, "t", "t", second)])
            await rig.until(lambda: emu.count("messages.batches.create", status=200) == 1
                            and rig.d.provider._slots[len(first)][1] == 2, "one create made, the other waiting")
            for t in list(rig.d._tasks):
                t.cancel()
            d2 = Dispatcher("anthropic", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            assert await d2.recover() == 1  # the second was never journaled: its members are admitted again
            await d2.run_many([BatchJob("b2", "batch_api", None, False, "t", "t", second)])
            await rig.resolved(first + second, timeout_s=30)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in first + second}
            assert emu.count("messages.batches.create", status=200) == 2
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_batch_whose_hedge_passed_while_a_create_of_its_size_was_out_is_never_created(emu):  # noqa: F811
    """A slow Anthropic create holds the next batch of its size, and that batch's hedge passes meanwhile: its
    members go back to the policy, as at a hedge, and it is never created (it would be cancelled at once)."""
    first, second = jobs_of("anthropic", claims=True), _twin(jobs_of("anthropic", claims=True))

    async def go():
        rig = Rig(emu, "anthropic")
        batches = rig.d.provider.client.messages.batches
        inner, go_on = batches.create, asyncio.Event()

        async def slow_create(*a, **kw):
            await go_on.wait()  # a large upload, say
            return await inner(*a, **kw)

        batches.create = slow_create
        try:
            await rig.reserve(first + second)
            hedge_at = rig.clock.now() + 100.0
            await rig.d.run_many([BatchJob("b1", "batch_api", None, False, "t", "t", first),
                                  BatchJob("b2", "batch_api", hedge_at, False, "t", "t", second)])
            await rig.until(lambda: rig.clock.now() > hedge_at, "the second batch's hedge")
            go_on.set()
            await rig.resolved(first + second, timeout_s=20)
            back = {j.req.id: j for j in rig.grouper.readmitted()}
            assert set(back) == {j.req.id for j in second} and all(j.hedges == 1 for j in back.values())
            assert emu.count("messages.batches.create", status=200) == 1
            assert set(billed_by_custom_id(emu)) == {batch_key(j) for j in first}
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_batch_whose_last_create_try_got_no_answer_is_looked_up_not_taken_for_a_refusal(emu):  # noqa: F811
    """Every try of a create but the last was followed by a lookup: the last one's lost answer was taken for a
    refusal, so the batch the provider made ran unfollowed while its members were sent again, each paid twice
    and counted nowhere (a helper's fault hunt)."""
    jobs = jobs_of("openai", claims=True)

    async def go():
        rig = Rig(emu, "openai")
        client, sdk = rig.d.provider.client, rig.d.provider._sdk
        inner, tries = client.batches.create, []

        async def answer_lost_at_last(*a, **kw):
            tries.append(1)
            if len(tries) == SUBMIT_TRIES:
                await inner(*a, **kw)  # made by the provider, its answer lost
            raise sdk.APITimeoutError(request=sdk_request())  # the others: no answer, nothing made

        client.batches.create = answer_lost_at_last
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20)
            await _settled(rig, 20)
            assert len(tries) == SUBMIT_TRIES and rig.grouper.readmitted() == []
            billed = [i for i in emu.bill().items if i.custom_id is not None]
            assert len(billed) == len(jobs) and all(rig.results[j.req.id].mode == "batch_api" for j in jobs)
            assert sum(rig.budget.book.spend.values()) == pytest.approx(sum(i.cost_usd for i in billed), abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


RETRIEVE_ROUTE = {"openai": "batches.retrieve", "anthropic": "messages.batches.retrieve"}


@PROVIDERS
def test_a_batch_its_cancel_says_ended_is_read_though_its_polls_fail_past_the_allowance(emu, provider):  # noqa: F811
    """The batch ends 100 s before its hedge while its polls fail (503s from 600 s before the hedge to 300 s
    after, the allowance 20 s; from 150 s before, 50 ms of real time ahead of the batch's end, a loaded CI
    rehearsal began the outage after a poll had read the batch): the hedge's cancel says it ended (OpenAI
    refuses it, "status 'completed'"; Anthropic answers it "ended"). Before, the failed polls ran past the allowance and every member was sent
    again, each paid twice (a helper's hunt); now the batch is read, and nothing goes again."""
    jobs = jobs_of(provider, claims=True)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            hedge_at = rig.clock.now() + VALIDATING_S[provider] + T + 100

            async def outage() -> None:  # on the engine's clock, which the emulator shares
                while rig.clock.now() < hedge_at - 600:
                    await asyncio.sleep(0.005)
                emu.faults.script(provider, RETRIEVE_ROUTE[provider], [{"status": 503}] * 10_000)
                while rig.clock.now() < hedge_at + 300:
                    await asyncio.sleep(0.005)
                emu.faults.clear()

            down = asyncio.create_task(outage())
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs, timeout_s=30)
            await down
            assert not rig.grouper.readmitted() and rig.d.paid_twice == 0
            assert sorted(r.mode for r in rig.results.values()) == ["batch_api"] * len(jobs)
            assert [i.mode for i in emu.bill().items] == ["batch_api"] * len(jobs)
            assert emu.count(CANCEL_ROUTE[provider]) == 1  # a cancel refused as ended is not made again
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())
