"""The read of an ended Gemini native batch (``GET v1beta/batches/{id}``, its images inline, twice), made as the
answer arrives (``actors/providers/_gemini_read.py``): the same operation and members as a parse of the whole, in
any chunking; an answer cut short refused as before; and the memory it takes. Before (a review, stop 73), the SDK
read the body whole and parsed it: the bytes, their text and the parsed copies of both, 6 times the images at once."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import tracemalloc
from typing import Any

import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.providers._gemini_read import read_operation
from actors.providers._http import PollBackoff
from actors.providers._veo import native_root
from actors.providers.gemini_http import GeminiProvider, NativeHandle
from engine.core.clock import ManualClock
from engine.core.errors import ProviderError
from engine.core.provider_api import CallJob, Secret
from tests.unit.test_gemini_batch import CAT, image, live

# Strings that hold what the scan must not take for structure: quotes, backslashes, brackets, commas, colons,
# escapes and characters of several UTF-8 bytes (split between chunks).
_TEXT = st.text(alphabet=st.sampled_from(list('ab"\\[]{},: \n\té€😀\x00/')), max_size=12)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | _TEXT, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_TEXT, kids, max_size=4),
                     max_leaves=12)


def _operation(members: list, extra: dict) -> dict:
    output = {"inlinedResponses": {"inlinedResponses": members}}
    return {"name": "batches/b1", "done": True, "response": copy.deepcopy(output),
            "metadata": {**extra, "state": "BATCH_STATE_SUCCEEDED", "output": output}}


def _expected(op: dict) -> tuple[dict, list]:
    rest = copy.deepcopy(op)
    members = rest["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    rest["metadata"]["output"]["inlinedResponses"]["inlinedResponses"], rest["response"] = [], None
    return rest, members


async def _chunks(body: bytes, cuts: list[int]) -> Any:
    at = 0
    for cut in sorted(set(cuts)):
        yield body[at:cut]
        at = cut
    yield body[at:]


@settings(max_examples=300, deadline=None)
@given(members=st.lists(_JSON, max_size=5), extra=st.dictionaries(_TEXT, _JSON, max_size=3),
       ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 2]), data=st.data())
def test_the_streamed_read_gives_what_a_parse_of_the_whole_gives_in_any_chunking(members, extra, ascii_only,
                                                                                   indent, data):
    op = _operation(members, extra)
    body = json.dumps(op, ensure_ascii=ascii_only, indent=indent).encode()
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    got = asyncio.run(read_operation(_chunks(body, cuts)))
    assert got == _expected(json.loads(body))
    # A poll's read passes the members over as it does ``response``: the same operation, no members
    assert asyncio.run(read_operation(_chunks(body, cuts), members=False)) == (got[0], None)


def test_an_answer_cut_short_anywhere_or_not_json_is_refused_as_a_parse_of_the_whole_refused_it():
    body = json.dumps(_operation([{"metadata": {"key": "k"}, "response": {"x": ['a"]', "\\", 1.5]}}], {})).encode()
    for end in range(len(body)):  # every strict prefix
        with pytest.raises(ValueError):
            asyncio.run(read_operation(_chunks(body[:end], [end // 2])))
    for bad in (b'{"metadata": {"output": {"inlinedResponses": {"inlinedResponses": [1,,2]}}}}',
                b'{"metadata": {"output": {"inlinedResponses": {"inlinedResponses": [1}}}}}', b'{"a": 1}}', b"nope"):
        with pytest.raises(ValueError):
            asyncio.run(read_operation(_chunks(bad, [])))


def _provider(body: bytes, mask: str = "ignored") -> GeminiProvider:
    """The engine's Gemini provider, its native routes answered ``body`` in 64 KiB chunks by an in-process transport
    (no server's allocations in a measure of memory). ``mask``: what it makes of a partial response (``fields``):
    ignores it, refuses it (a 400), or answers it without the batch's state (``_get`` then reads it whole)."""

    async def answer(request: httpx2.Request) -> httpx2.Response:
        if "fields" in request.url.params and mask == "refused":
            return httpx2.Response(400, json={"error": {"code": 400, "message": "Invalid field mask",
                                                        "status": "INVALID_ARGUMENT"}})
        if "fields" in request.url.params and mask == "dropped":
            return httpx2.Response(200, json={"name": "batches/b1", "done": True})
        return httpx2.Response(200, headers={"content-type": "application/json"}, content=_chunks(
            body, list(range(65536, len(body), 65536))))

    settings_ = live()
    ep = settings_.providers.endpoints["google"]
    p = GeminiProvider("google", CAT, settings_, ep, Secret("k"), ManualClock(0.0))
    asyncio.run(p._native.close())
    p._native = openai.AsyncOpenAI(api_key="k", base_url=native_root(ep.base_url), max_retries=0,
                                   http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)))
    return p


def _ended(n: int, image_bytes: int) -> tuple[bytes, list[CallJob], int]:
    jobs = [CallJob(f"k{i}", image(i), 0.0, 0, 0) for i in range(n)]
    images = [base64.b64encode(os.urandom(image_bytes)).decode() for _ in range(n)]
    members = [{"metadata": {"key": j.key}, "response": {
        "candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": data}}]},
                        "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 7}, "responseId": f"r{i}"}}
        for i, (j, data) in enumerate(zip(jobs, images, strict=True))]
    op = _operation(members, {"batchStats": {"successfulRequestCount": str(n), "failedRequestCount": "0"}})
    return json.dumps(op).encode(), jobs, sum(map(len, images))


def test_reading_an_ended_batch_holds_little_more_than_its_images_once():
    """8 images of 256 KB, the answer holding them twice: the read peaks below 2x the images' base64 (their one
    copy is what the results hand on). Before, the body, its text and the parse of both peaked at 6x."""
    body, jobs, b64 = _ended(8, 256_000)
    p = _provider(body)
    handle = NativeHandle("batches/b1", jobs, PollBackoff(1.0, 2.0))

    async def go() -> tuple[dict, int]:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            out = await p.fetch(handle)
            return out, tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
            await p.close()

    out, peak = asyncio.run(go())
    assert sorted(out) == [j.key for j in jobs] and all(o.ok and o.output for o in out.values())
    assert {o.output for o in out.values()} == {m["response"]["candidates"][0]["content"]["parts"][0]["inlineData"]
                                                ["data"] for m in json.loads(body)["metadata"]["output"]
                                                ["inlinedResponses"]["inlinedResponses"]}
    assert peak < 2 * b64, f"peak {peak / b64:.2f}x the images"


def test_an_answer_cut_short_is_a_read_that_ran_and_keeps_no_output():
    """As when the SDK parsed it whole: a ``ProviderError`` whose call ran (``maybe_done``), nothing kept on the
    handle, so the next try reads the batch again."""
    body, jobs, _ = _ended(2, 1000)
    p = _provider(body[:-40])
    handle = NativeHandle("batches/b1", jobs, PollBackoff(1.0, 2.0))

    async def go() -> None:
        try:
            with pytest.raises(ProviderError) as cut:
                await p.fetch(handle)
            assert cut.value.maybe_done and "could not be read" in str(cut.value)
            assert handle.output is None
        finally:
            await p.close()
    asyncio.run(go())


def _parsed_whole(body: bytes) -> tuple[Any, list | None]:
    """What ``read_operation`` promises, from a parse of the whole: the members where the parse keeps a list of
    them (None elsewhere), that list left empty, and ``response`` (an object or array) null."""
    op = json.loads(body)
    if isinstance(op.get("response"), dict | list):
        op["response"] = None
    holder = op
    for key in ("metadata", "output", "inlinedResponses"):
        holder = holder.get(key) if isinstance(holder, dict) else None
    members = holder.get("inlinedResponses") if isinstance(holder, dict) else None
    if not isinstance(members, list):
        return op, None
    holder["inlinedResponses"] = []
    return op, members


_MEMBERS = '"inlinedResponses": {"inlinedResponses": [{"metadata": {"key": "k1"}, "response": {"x": "\\"]"}}]}'


@pytest.mark.parametrize("body", [
    # the members' list, then a later copy of its key that holds none: a parse keeps the null
    '{"name": "b", "metadata": {"state": "S", "output": {' + _MEMBERS[:-1] + ', "inlinedResponses": null}}}}',
    # the members under a metadata that a later metadata replaces
    '{"metadata": {"output": {' + _MEMBERS + '}}, "metadata": {"state": "S"}, "response": {' + _MEMBERS + '}}',
    # an output replaced by a later one without inline responses (a responses file)
    '{"metadata": {"output": {' + _MEMBERS + '}, "output": {"responsesFile": "files/f"}}}',
    # a later copy that holds a list replaces the earlier members, as it does in the parse
    '{"metadata": {"output": {' + _MEMBERS + ', "inlinedResponses": {"inlinedResponses": []}}}}',
])
def test_a_key_given_twice_reads_as_a_parse_of_the_whole_reads_it(body):
    """JSON leaves a key given twice to the reader, and Python's parse keeps its last value. The scan kept the
    members of an earlier copy that the parse drops: ``fetch`` read members the batch's own answer, read whole, does
    not hold (a review, revgem: fails on the code before). Every chunking, a cut at each byte among them."""
    raw = body.encode()
    want = _parsed_whole(raw)
    for cut in range(len(raw) + 1):
        assert asyncio.run(read_operation(_chunks(raw, [cut]))) == want
    assert asyncio.run(read_operation(_chunks(raw, list(range(len(raw)))))) == want


@pytest.mark.parametrize("mask", ["ignored", "refused", "dropped"])
def test_a_poll_of_an_ended_batch_holds_none_of_its_images_whatever_google_makes_of_the_mask(mask):
    """A poll asks for the batch's state and counts alone (``fields``). A server that ignores the mask answers the
    whole operation, its images twice, and ``_get`` took it as complete (it holds the state); one that refuses the
    mask, or answers without the state, is read whole. Before (a review, revgem), the SDK parsed either whole: 6.06x
    the images held by every poll that saw an end, outside the dispatcher's results slot, however many batches
    ended together (fails on the code before). Now read streamed, its responses passed over."""
    body, jobs, b64 = _ended(8, 256_000)
    p = _provider(body, mask)
    handle = NativeHandle("batches/b1", jobs, PollBackoff(1.0, 2.0))

    async def go() -> tuple[Any, int]:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            state = await p.poll(handle)
            return state, tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
            await p.close()

    state, peak = asyncio.run(go())
    assert state.status == "ended" and handle.output is None  # the fetch reads them, within the slot
    assert handle.batch["metadata"]["batchStats"]["successfulRequestCount"] == "8"
    assert peak < 0.25 * b64, f"peak {peak / b64:.2f}x the images"


def test_a_lookup_holds_none_of_the_listed_batches_images_where_google_ignores_the_mask():
    """A lookup (``GET v1beta/batches``, a create whose answer was lost) asks for each listed batch's name, display
    name and state alone; a server that ignores the mask answers every listed operation whole, each ended one's
    images twice. Before (a review, revgem), the SDK parsed the page whole: 6 times the images of every batch on it
    (a page of 100 ended image batches: gigabytes). Now read streamed, each operation's responses passed over."""
    n, per = 4, 3
    ops, b64 = [], 0
    for b in range(n):
        body, jobs, size = _ended(per, 256_000)
        op = json.loads(body)
        op["name"], op["metadata"]["displayName"] = f"batches/b{b}", f"ref-{b}"
        ops.append(op)
        b64 += size
    p = _provider(json.dumps({"operations": ops, "nextPageToken": ""}).encode())

    async def go() -> tuple[Any, int]:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            found = await p.find_batch(jobs, f"ref-{n - 1}")
            return found, tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
            await p.close()

    found, peak = asyncio.run(go())
    assert found is not None and found.id == f"batches/b{n - 1}" and found.output is None  # its fetch reads them
    assert peak < 0.25 * b64, f"peak {peak / b64:.2f}x the images"
