"""Idempotency-Key and body: a key names one body, so no call of the engine is ever refused with 409
(``idempotency_key_reused``) and paid without a result; a 409 that comes anyway fails at once, saying why; a
sync call's body record leaves with its request, so a restarted dispatcher never makes a call that already
moved on. Driven through a ``Dispatcher`` as a plain asyncio class (no Ray) at the loopback emulator; every
wait is a bounded poll (``Rig.until``), none a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from actors import Dispatcher
from actors._types import BatchJob, Job
from engine.core.request import Request
from engine.core.settings import Resilience
from tests.unit.test_http_providers import KEY, Rig, emu, journal_delete_fails_once  # noqa: F401  (emu: the fixture)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


def prefixed(rid: str = "idem-0") -> Request:
    """An Anthropic request with two shared prefix blocks: its body's cache breakpoints depend on the
    dispatch (a cache write asked or not) and on which prefixes the provider holds warm."""
    return Request.model_validate({"id": rid, "arrival_s": 0.0, "provider": "anthropic", "model": "claude-sonnet-4-5",
                                   "input_tokens": 1500, "output_tokens": 20, "prefix_blocks": [11, 12],
                                   "prompt": "p"})


async def sync_result(rig: Rig, job: Job, cache_write: bool = False):
    await rig.d.run_many([BatchJob("b", "sync", None, cache_write, "test", "test", [job])])
    return await rig.until(lambda: rig.results.get(job.req.id), "the result")


def test_a_request_sent_again_with_another_body_is_a_new_call_not_a_409(emu):  # noqa: F811
    """The replay that failed 4 Anthropic requests with HTTP 409 (a second run of the synthetic trace
    against the same emulator): the key was ``call_key(tenant, id, model)`` alone, and the same request's body
    differs from one dispatch to another (cache breakpoints). The provider kept the first call billed under
    the key and refused the second: paid, and failed. The same happens to an id used again after its
    retention, or to a body record a crash lost."""
    async def go():
        first, second = Rig(emu, "anthropic"), Rig(emu, "anthropic")  # two engines (or runs)
        try:
            a = await sync_result(first, Job(0, prefixed(), "fp"), cache_write=True)  # breakpoint: a write
            b = await sync_result(second, Job(0, prefixed(), "fp"))  # nothing warm, no write: no breakpoint
            (ja, _, _), (jb, _, _) = first.calls[0], second.calls[0]
            assert ja.key == jb.key and ja.body != jb.body  # one request, two bodies
            assert a.status == "ok" and b.status == "ok", (a.error, b.error)
            assert emu.count("messages", status=409) == 0
            keys = [i.idempotency_key for i in emu.bill().items]
            assert len(keys) == 2 and len(set(keys)) == 2  # two calls, two keys: each body billed once
            assert a.cost_usd + b.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await first.close()
            await second.close()
    asyncio.run(go())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_an_answer_the_provider_replays_under_its_key_costs_nothing_again(emu, provider):  # noqa: F811
    """The same request with the same body, sent again by another run (``--resume``, a re-run against the same
    account): a provider that honours the key answers with the first call's answer and bills nothing
    (``Idempotent-Replayed: true``). It was counted at its full price, money no bill held (a helper's tour)."""
    r = Request.model_validate({"id": "again", "arrival_s": 0.0, "provider": provider, "input_tokens": 50,
                                "model": "gpt-5-mini" if provider == "openai" else "claude-haiku-4-5",
                                "output_tokens": 5, "prompt": "Say hi."})

    async def go():
        first, second = Rig(emu, provider), Rig(emu, provider)  # two runs of the same request
        try:
            a = await sync_result(first, Job(0, r, "fp"))
            b = await sync_result(second, Job(0, r, "fp"))
            assert a.status == b.status == "ok" and b.output == a.output and a.cost_usd > 0
            assert len(emu.bill().items) == 1 and b.cost_usd == 0.0
            assert a.cost_usd + b.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await first.close()
            await second.close()
    asyncio.run(go())


def test_a_replayed_answer_is_counted_per_provider_with_what_the_earlier_run_paid(emu):  # noqa: F811
    """A second `smartbatch run` of the README's trace against the same emulator cost $24.73 against a bound of
    $28.12, every deadline met, and the table put it down to "missing deadlines": nothing said its sync answers
    were the first run's, replayed and counted 0 (a helper's README tour)."""
    r = Request.model_validate({"id": "again", "arrival_s": 0.0, "model": "gpt-5.4-mini", "input_tokens": 50,
                                "output_tokens": 5, "prompt": "Say hi."})

    async def go():
        first, second = Rig(emu, "openai"), Rig(emu, "openai")
        try:
            a = await sync_result(first, Job(0, r, "fp"))
            b = await sync_result(second, Job(0, r, "fp"))
            assert a.cost_usd > 0 and b.cost_usd == 0.0
            one, two = await first.d.stats(), await second.d.stats()
            assert (one["replayed"], one["replayed_usd"]) == (0, 0.0)
            assert (two["replayed"], two["replayed_usd"]) == (1, pytest.approx(a.cost_usd, abs=1e-6))
        finally:
            await first.close()
            await second.close()
    asyncio.run(go())


def test_a_409_for_a_reused_key_fails_at_once_and_says_the_provider_billed_it(emu):  # noqa: F811
    """Another client used the engine's key with another body first (the provider billed that call). The
    engine's call is refused with 409: sent again under that key it can only be refused again, and under a
    new key it would be paid twice, so it fails at once with an error that says so, and is counted. The sync call
    streams since stop 80: the spy is on ``stream`` (a review: on ``create`` it no longer saw the call, and the
    test failed). Refused streamed, it is asked once whole (a key first used by a whole call is replayed so),
    refused again, unbilled."""
    async def go():
        rig = Rig(emu, "anthropic")
        messages = rig.d.provider.client.messages
        create, stream, sent = messages.create, messages.stream, []

        @contextlib.asynccontextmanager
        async def first_someone_else(**kw: Any) -> Any:
            if not sent:  # the same Idempotency-Key, another body: answered and billed
                await create(**{**kw, "max_tokens": kw["max_tokens"] - 1})
            sent.append(kw["extra_headers"]["Idempotency-Key"])
            async with stream(**kw) as s:
                yield s

        messages.stream = first_someone_else
        try:
            r = await sync_result(rig, Job(0, prefixed(), "fp"))
            assert r.status == "failed" and r.cost_usd == 0.0 and r.real, r
            assert "409" in r.error and "billed an earlier call" in r.error and sent[0] in r.error, r.error
            assert len(sent) == 1 and emu.count("messages", status=409) == 2  # asked whole once, not retried
            assert (await rig.d.stats())["key_conflicts"] == 1
            assert len(emu.bill().items) == 1  # the other client's call: the engine paid nothing
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_rerouted_requests_sync_body_is_forgotten_so_a_restart_never_calls_it_again(emu):  # noqa: F811
    """The circuit opens on a call's retry and the request goes to its fallback model. Its body record (kept
    for that retry) must go with it: left in the dispatcher and its journal, a restarted dispatcher made the
    call again, paying for a request its fallback also served."""
    emu.faults.script("openai", "chat.completions", [{"status": 500}] * 2)
    res = Resilience(allowed_fails=2, window_s=3600.0, cooldown_time=3600.0,
                     fallbacks={"openai/gpt-5-mini": "openai/gpt-5"})

    async def go():
        rig = Rig(emu, "openai", resilience=res)
        try:
            j = Job(0, Request.model_validate({"id": "re-0", "arrival_s": 0.0, "model": "gpt-5-mini",
                                               "input_tokens": 300, "output_tokens": 20, "prompt": "task"}), "fp")
            await rig.run("sync", [j])
            await rig.resolved([j])
            (back,) = rig.grouper.readmitted()
            assert back.req.model == "gpt-5" and emu.count("chat.completions") == 2
            assert rig.d._sync_calls == {}  # bounded: nothing stays for a request that left
            space = rig.d._sync_journal.space
            deadline = time.monotonic() + 3.0
            while await rig.hub.journal_items(space):  # cleared with the next outbox flush
                assert time.monotonic() < deadline, "the rerouted call's body stayed in the journal"
                await rig.d.flush()
                await asyncio.sleep(0)
            # The dispatcher restarts (same hub, so the same journal): nothing of that call is made again.
            again = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                               rig.budget, key=rig.d._key)
            try:
                await again.recover()
                assert again.resumed_calls == 0 and again.in_flight == 0
                assert emu.count("chat.completions") == 2 and emu.bill().items == ()
            finally:
                await again.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_key_names_the_body_and_keeps_the_request_first():
    from engine.core.provider_api import call_key, idempotency_key

    k = call_key("t", "r", "m")
    a, b = idempotency_key(k, {"x": 1, "y": [1, 2]}), idempotency_key(k, {"x": 1, "y": [1, 2]})
    assert a == b != idempotency_key(k, {"x": 1, "y": [2, 1]})
    assert a.rsplit("-", 1)[0] == k.rsplit("-", 1)[0]  # bills are matched to requests by this prefix
    assert idempotency_key(k, {"t": "\ud800"})  # a lone surrogate does not break the digest
    assert KEY not in a


def test_an_anthropic_batch_creates_key_names_its_body(emu):  # noqa: F811
    """A batch create refused with a 429 made nothing; made again without the members withdrawn while that was
    waited out, it is another create: under the batch's name alone (the key before), a server that pins a key to
    the first body it saw refused it 409. The key names the body, as a sync call's does, so a create made again
    after a lost answer, with the same (journaled) body, still gets the batch the lost one made."""
    from engine.core.errors import ProviderError
    from tests.unit.test_http_providers import direct, job_of, req

    emu.faults.script("anthropic", "messages.batches.create", [{"status": 429, "retry_after_s": 1.0}])

    async def go():
        p = direct(emu, "anthropic")
        batches, keys = p.client.messages.batches, []
        create = batches.create

        async def spy(**kw: Any) -> Any:
            keys.append(kw["extra_headers"]["Idempotency-Key"])
            return await create(**kw)

        batches.create = spy
        jobs = [job_of(req(i, "anthropic")) for i in range(3)]
        try:
            with pytest.raises(ProviderError) as refused:
                await p.submit_batch(jobs, None, "b-1", p.batch_body(jobs))
            assert refused.value.retry_after_s == 1.0
            made = await p.submit_batch(jobs[1:], None, "b-1", p.batch_body(jobs[1:]))  # jobs[0] withdrawn
            again = await p.submit_batch(jobs[1:], None, "b-1", p.batch_body(jobs[1:]))  # as after a lost answer
        finally:
            await p.close()
        assert keys[0] != keys[1] == keys[2] and all(k.startswith("b-1_") for k in keys)
        assert again.id == made.id and emu.count("messages.batches.create", status=200) == 2  # the second replayed
    asyncio.run(go())


def test_a_sync_record_whose_delete_failed_is_deleted_again_so_a_restart_never_calls_it_again(emu):  # noqa: F811
    """A request fails for good (its four attempts answered 500), and the journal fails once to delete its body
    record (a Redis blip). The delete is made again: dropped, the record stayed, and the next restart of the
    dispatcher made the ended call again, which the provider billed (a failed call's key holds nothing to answer
    from) and no budget counted (its claim had settled at 0)."""
    emu.faults.script("openai", "chat.completions", [{"status": 500}] * 4)

    async def go():
        rig = Rig(emu, "openai")
        space = rig.d._sync_journal.space
        failed = journal_delete_fails_once(rig, space)
        try:
            j = Job(0, Request.model_validate({"id": "gone-0", "arrival_s": 0.0, "model": "gpt-5-mini",
                                               "input_tokens": 300, "output_tokens": 20, "prompt": "task"}), "fp")
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get("gone-0"), "the result")
            assert r.status == "failed" and emu.bill().items == ()
            deadline = time.monotonic() + 10.0
            while not failed or rig.d._sync_journal._task is None or not rig.d._sync_journal._task.done():
                assert time.monotonic() < deadline, "the outbox never cleared the call's record"
                await rig.d.flush()
                await asyncio.sleep(0)
            await asyncio.gather(*rig.d._sync_journal.retries)
            assert await rig.hub.journal_items(space) == {}
            again = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                               rig.budget, key=rig.d._key)
            try:
                await again.recover()
                assert again.resumed_calls == 0 and emu.bill().items == ()
            finally:
                await again.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_failed_delete_does_not_keep_the_records_written_with_it_from_the_journal():
    """The journal writer sends the deletes and puts gathered meanwhile together: a delete that failed skipped the
    puts, whose callers were told their record was written and made their calls unjournaled."""
    from actors.journal import JournalWriter

    class Journal:
        closed = False

        def __init__(self) -> None:
            self.rows: dict[str, Any] = {"old": 0}
            self.fails = 1

        async def delete(self, space: str, keys: list[str]) -> None:
            if self.fails:
                self.fails -= 1
                raise ConnectionError("the journal's Redis timed out")
            for k in keys:
                self.rows.pop(k, None)

        async def put_many(self, space: str, values: dict[str, Any]) -> None:
            self.rows.update(values)

    async def go():
        journal = Journal()
        writer = JournalWriter(journal, "sync:x")
        writer.delete("old")  # an ended call's record
        await writer.put("new", 1)  # a call about to be made: written before it goes
        assert journal.rows.get("new") == 1
        await asyncio.gather(*writer.retries)
        assert journal.rows == {"new": 1}  # the delete, made again
    asyncio.run(go())
