"""Faults of Gemini 2.5 Flash Image's native batches (``actors/providers/gemini_http.py``) found by a review
(gemrev): a read of an ended batch that came back short is read again, not re-checked from the same short answer; a
native batch survives the dispatcher's death, before or after its create was answered, re-attached (found by its
display name, or by its journaled handle), never created again; a prompt sent beside a body that omits it is
weighed against the 20 MB inline limit; lookups and polls read no images (a partial response, read whole where
Google refuses or ignores it), the images read once, within the dispatcher's results slot."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from actors import Dispatcher
from actors._batch_parts import file_parts
from actors._types import Job
from actors.providers.gemini_http import GeminiProvider, NativeHandle
from engine.core.clock import ManualClock
from engine.core.errors import ProviderError
from engine.core.provider_api import CallJob, Secret
from engine.core.request import Request, validation_context
from engine.core.settings import ProviderEndpoint
from engine.emulator._gemini_batch import INLINE_LIMIT_BYTES
from tests.unit.test_gemini_batch import (  # noqa: F401 - emu: a fixture
    CAT,
    NANO,
    assert_native_member,
    billed,
    emu,
    jobs_of,
    live,
)
from tests.unit.test_http_providers import KEY, Rig, T, _create_then_die, batch_key

CREATE = "gemini.batches.create"


class Replay:
    """A whole read's answer (streamed to the provider: ``_gemini_read``) that a spy of ``_native.get`` read first,
    handed on as the bytes it holds, in chunks as a socket gives them."""

    def __init__(self, body: bytes):
        self.body = body

    async def iter_bytes(self) -> Any:
        for at in range(0, len(self.body), 65536):
            yield self.body[at:at + 65536]

    async def close(self) -> None:
        pass


async def streamed(got: Any) -> bytes | None:
    """The body of a whole read's streamed answer, read (None for a masked read's answer: parsed by the SDK)."""
    if not hasattr(got, "iter_bytes"):
        return None
    try:
        return await got.read()
    finally:
        await got.close()


def short_first_read(rig: Rig) -> list[str]:
    """The first read of an ended native batch answers one response fewer than it holds (a read the batch's own
    ``batchStats`` shows short); later reads answer it whole. The keys dropped are in the list returned."""
    native = rig.d.provider._native
    inner, dropped = native.get, []

    async def get(path: str, **kw: Any) -> Any:
        got = await inner(path, **kw)
        body = await streamed(got)
        op = got if body is None else json.loads(body)
        out = (op.get("metadata") or {}).get("output") if isinstance(op, dict) else None
        if out is not None and not dropped:
            gone = out["inlinedResponses"]["inlinedResponses"].pop()
            op.get("response", {}).get("inlinedResponses", {}).get("inlinedResponses", [None]).pop()
            dropped.append(gone["metadata"]["key"])
        return op if body is None else Replay(json.dumps(op).encode())

    native.get = get
    return dropped


def test_a_short_read_of_an_ended_native_batch_is_read_again_and_no_member_goes_sync(emu):  # noqa: F811
    """The read of the ended batch holds fewer responses than its ``batchStats`` answered: the fetch refuses it
    ("read again") and the dispatcher tries again. Before, the next try re-checked the same short answer kept on
    the handle (only a handle with no answer was polled again), failed five times, and every member, finished
    and billed, went back to be sent sync: each paid twice."""
    jobs = jobs_of()

    async def go():
        rig = Rig(emu, "google")
        dropped = short_first_read(rig)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20.0)
            assert len(dropped) == 1
            assert rig.grouper.readmitted() == [] and rig.calls == [] and rig.d.paid_twice == 0
            got = billed(emu)
            assert set(got) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
            assert emu.count(CREATE) == 1
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def _on_handle_journaled(rig: Rig) -> asyncio.Future:
    """A future set to the batch's handle once the dispatcher's journal has taken the record holding it."""
    inner, fut = rig.d.journal.put, asyncio.get_running_loop().create_future()

    async def put(space: str, key: str, rec: Any) -> None:
        await inner(space, key, rec)
        if space == rig.d._space and rec[4] is not None and not fut.done():
            fut.set_result(rec[4])

    rig.d.journal.put = put
    return fut


def _restarted(rig: Rig) -> Dispatcher:
    return Dispatcher("google", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None, rig.budget,
                      key=Secret(KEY))


@pytest.mark.parametrize("answered", [False, True], ids=["create-cut", "create-answered"])
def test_a_native_batch_outlives_the_dispatchers_death_re_attached_never_created_again(emu, answered):  # noqa: F811
    """The dispatcher dies after its create reached Google: before its answer (the batch is found by its display
    name, the journal key) or after it (its ``NativeHandle`` read back from the journal, without the images it
    holds once ended). Restarted, it follows that batch; every member is answered from it, billed once."""
    jobs = jobs_of()

    async def go():
        rig = Rig(emu, "google")
        try:
            if answered:
                put = _on_handle_journaled(rig)
                await rig.reserve(jobs)
                await rig.run("batch_api", jobs)
                await asyncio.wait_for(put, 10.0)
                for t in list(rig.d._tasks):
                    t.cancel()
                (rec,) = (await rig.d.journal.items(rig.d._space)).values()
                assert isinstance(rec[4], NativeHandle) and rec[4].output is None  # read back, no images kept
            else:
                await _create_then_die(rig, emu, jobs, CREATE)
            d2 = _restarted(rig)
            assert await d2.recover() == 1
            assert await d2.recall([j.req.uid for j in jobs]) == [j.req.uid for j in jobs]
            await rig.resolved(jobs, timeout_s=20.0)
            assert rig.grouper.readmitted() == [] and emu.count("images.generations") == 0
            got = billed(emu)
            assert set(got) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
            assert emu.count(CREATE, status=200) == 1  # found or re-attached, never created again
            await rig.until(lambda: not d2._open, "the batch left the journal")
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_prompt_sent_beside_a_body_that_omits_it_is_weighed_so_no_create_passes_the_inline_limit():
    """An image request may give its prompt as the request's ``prompt`` beside a body that names no prompt
    (``{"model", "size"}``), and declare fewer ``input_tokens`` than its text holds (a trace's recorded size):
    the create sends that prompt (``inline_request``; OpenAI's line too, ``OpenAIProvider.body``). Before, its
    weight was the body's JSON and the declared tokens' text: 197 such members of 100,000 characters rode one create
    of 39,435,224 bytes, which Google refuses past 20 MB, every member then sent sync at twice the price."""
    p = GeminiProvider("google", CAT, live(), ProviderEndpoint(api="openai", base_url="http://127.0.0.1:9/google/v1",
                                                               api_key_env="X"), Secret("k"), None)
    req = Request.model_validate({"id": "i", "arrival_s": 0.0, "model": NANO, "prompt": "\u00e9\"" * 50_000,
                                  "input_tokens": 10, "body": {"model": NANO, "size": "1024x1024"}},
                                 context=validation_context(CAT, live()))
    jobs = [Job(i, req.model_copy(update={"id": f"i{i}"}), f"fp-{i}", claim=f"c{i}") for i in range(200)]
    parts = file_parts(jobs, CAT.provider("google").batch_api.media_max_mb, live().chars_per_token)
    assert len(parts) > 1 and sum(map(len, parts)) == len(jobs)
    for part in parts:
        body = {"batch": {"displayName": "sb-0123456789abcdef-01234567#12", "inputConfig": {"requests": {
            "requests": [p.inline_request(CallJob(batch_key(j), j.req, 0.0, 0, 0)) for j in part]}}}}
        assert len(json.dumps(body, ensure_ascii=False).encode()) < INLINE_LIMIT_BYTES


def test_a_lookup_reads_no_images_and_the_batch_it_finds_is_read_whole_by_its_poll(emu):  # noqa: F811
    """A lost create's lookup lists the account's batches (``GET v1beta/batches``, 100 a page): an ended one's
    operation holds its images, twice (``metadata.output`` and ``response``), so a page held every listed batch's
    images at once (batches each cut at ``batch_results_max_mb``, 512 MB). It now asks for a partial response (Google's
    ``fields`` system parameter): names, display names and states. The batch found is read whole by its poll, each
    member answered from it."""
    everyone = [CallJob(batch_key(j), j.req, 0.0, 0, 0) for j in jobs_of(4)]
    cjobs, others = everyone[:3], everyone[3:]
    clock = ManualClock(1000.0)
    emu.follow(clock)  # the emulator on a clock the test moves: no wait for the batches' turnaround

    async def go():
        rig = Rig(emu, "google")
        p = rig.d.provider
        inner, pages = p._native.get, []

        async def get(path: str, **kw: Any) -> Any:
            got = await inner(path, **kw)
            body = await streamed(got)  # every read of the native routes is streamed (``_gemini_read``)
            if path == "v1beta/batches":
                pages.append(json.dumps(got) if body is None else body.decode())
            return got if body is None else Replay(body)

        p._native.get = get
        try:
            other = await p.submit_batch(others, None, "ref-other")  # another batch, ended beside it
            made = await p.submit_batch(cjobs, None, "ref-lost")
            clock.advance(3 * T)
            found = await p.find_batch(cjobs, "ref-lost", frozenset({other.id}))
            assert found is not None and found.id == made.id and found.output is None
            assert pages and not any("inlineData" in page for page in pages)
            assert (await p.poll(found)).status == "ended"
            return await p.fetch(found)
        finally:
            await rig.close()

    out = asyncio.run(go())
    assert set(out) == {cj.key for cj in cjobs} and all(o.ok for o in out.values())
    assert set(billed(emu)) == {cj.key for cj in everyone}


def test_a_native_batchs_images_are_read_only_within_the_dispatchers_results_room(emu):  # noqa: F811
    """An ended native batch's answer holds its images, so whoever reads it holds them all: the polls ask for its
    state and counts alone (``fields``), and the fetch reads it whole within the results slot, as OpenAI's results
    file is read (``_results_slot``: image batches ending together are read one at a time, beside it a spare of one
    batch's worth). Before, the poll that saw the end read the images, outside the slot, and held them until the
    slot was free: k batches ending together held k batches' images."""
    jobs = jobs_of()

    async def go():
        rig = Rig(emu, "google")
        native, room = rig.d.provider._native, rig.d._image_reads
        inner, reads = native.get, []

        async def get(path: str, **kw: Any) -> Any:
            got = await inner(path, **kw)
            body = await streamed(got)
            reads.append(("inlineData" in (json.dumps(got) if body is None else body.decode()),
                          room.slot or room.spare_used > 0))
            return got if body is None else Replay(body)

        native.get = get
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            got = billed(emu)
            for j in jobs:
                assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
            assert any(images for images, _ in reads)  # the images were read once, whole
            assert all(in_room for images, in_room in reads if images), reads
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("server", ["drops-metadata", "refuses-fields"])
def test_a_partial_response_google_ignores_or_refuses_is_read_whole_never_a_batch_made_twice(emu, server):  # noqa: F811
    """The lookup's and the polls' partial responses (``fields``) reach into the operation's ``metadata``, a
    ``google.protobuf.Any``. Should Google answer such a mask without it (then every later read is whole) or refuse
    it (that read is made whole), the batch is still found and followed: taken as it came, the lookup of a lost
    create found nothing and made the batch again (each member paid twice), and a poll read a batch that never ends."""
    jobs = jobs_of()
    emu.faults.script("google", CREATE, [{"cut_connection": True}])  # made, its answer lost: looked up

    async def go():
        rig = Rig(emu, "google")
        p = rig.d.provider
        inner = p._native.get

        async def get(path: str, **kw: Any) -> Any:
            params = dict((kw.get("options") or {}).get("params") or {})
            if "fields" in params and server == "refuses-fields":
                params.pop("fields")
                await inner("v1beta/batches/none-such", **{**kw, "options": {**kw["options"], "params": params}})
            got = await inner(path, **kw)
            body = await streamed(got)  # a poll's answer is streamed (``_gemini_read``), a lookup's parsed
            out = got if body is None else json.loads(body)
            if "fields" in params:
                for op in (out.get("operations") or [out]):
                    op.pop("metadata", None)
            return out if body is None else Replay(json.dumps(out).encode())

        p._native.get = get
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20.0)
            assert rig.grouper.readmitted() == [] and rig.calls == []
            got = billed(emu)
            assert set(got) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
            assert len([b for b in emu._core.batches.values() if b.provider == "google"]) == 1
            assert p._partial is (server == "refuses-fields")  # a refused mask: that read whole, each time
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_key_quoted_in_a_native_routes_refusal_never_shows(emu, caplog):  # noqa: F811
    """Google's key goes in ``x-goog-api-key``; a refusal that quotes it back (one not shaped like a key) is redacted
    in every native route's error and in every log line, at DEBUG too (the SDK's and the transport's own)."""
    key = "plainsecret-gemrev-42"
    cjobs = [CallJob(batch_key(j), j.req, 0.0, 0, 0) for j in jobs_of(2)]
    for route, n in (("gemini.batches.create", 1), ("gemini.batches.list", 2), ("gemini.batches.get", 2),
                     ("gemini.batches.cancel", 1)):  # twice: a masked read refused is made whole once, refused again
        emu.faults.script("google", route, n * [{"status": 400, "message": f"API key not valid: {key}"}])

    async def go() -> list[str]:
        rig = Rig(emu, "google", key=key)
        p, said = rig.d.provider, []
        try:
            for call in (lambda: p.submit_batch(cjobs, None, "r"), lambda: p.find_batch(cjobs, "r")):
                with pytest.raises(ProviderError) as refused:
                    await call()
                said.append(str(refused.value))
            handle = await p.submit_batch(cjobs, None, "r")
            for call in (lambda: p.poll(handle), lambda: p.cancel(handle)):
                with pytest.raises(ProviderError) as refused:
                    await call()
                said.append(str(refused.value))
            return said
        finally:
            await rig.close()

    with caplog.at_level(logging.DEBUG):
        said = asyncio.run(go())
    assert len(said) == 4 and all("[redacted]" in s for s in said), said
    assert not any(key in s for s in said) and not any(key in r.getMessage() for r in caplog.records)


def test_a_native_member_named_twice_keeps_its_billed_answer_and_is_not_sent_again(emu):  # noqa: F811
    """The ended batch's responses name the first member twice: its image (billed) and, after it, an error (a
    response written again, Google's fault), as OpenAI's and Anthropic's results may (``BatchMembers._put``, a
    review of moneyhunt). Read in order, the error replaced the answer: the billed member went back to be sent again,
    paid twice, and its image's cost reached no ledger."""
    jobs = jobs_of()

    async def go():
        rig = Rig(emu, "google")
        native = rig.d.provider._native
        inner, doubled = native.get, []

        async def get(path: str, **kw: Any) -> Any:
            got = await inner(path, **kw)
            body = await streamed(got)
            op = got if body is None else json.loads(body)
            out = (op.get("metadata") or {}).get("output") if isinstance(op, dict) else None
            if out is not None:
                items = out["inlinedResponses"]["inlinedResponses"]
                key = items[0]["metadata"]["key"]
                items.insert(1, {"metadata": {"key": key}, "error": {"code": 13, "message": "Internal error"}})
                doubled.append(key)
            return op if body is None else Replay(json.dumps(op).encode())

        native.get = get
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20.0)
            assert doubled, "no ended batch's responses were read"
            assert rig.grouper.readmitted() == [] and rig.calls == [] and rig.d.paid_twice == 0
            got = billed(emu)
            assert set(got) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())
