"""Gemini 2.5 Flash Image through Google's native Batch API (``models/{model}:batchGenerateContent``, inline
requests): the emulator serves its routes in Google's shapes and bills each member once at the batch price; the
engine's Gemini provider sends an image dispatch there (not through the OpenAI layer's Batch API, which documents
chat completions only), reads each member back by ``metadata.key``, cancels a late batch at its hedge, and cuts a
dispatch so that no create passes Google's 20 MB inline limit. Before, the model was sync only."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from actors._batch_parts import file_parts
from actors._types import Job
from actors.providers.gemini_http import GeminiProvider
from engine.core.clock import ManualClock
from engine.core.cost import price_alone
from engine.core.provider_api import CallJob, Secret
from engine.core.request import Request, validation_context
from engine.core.settings import ProviderEndpoint, ProvidersSettings, Settings
from engine.emulator import Emulator
from engine.emulator._gemini_batch import INLINE_LIMIT_BYTES
from tests.unit.test_http_providers import (
    EMU_CANCEL_S,
    SPEED,
    VALIDATING_S,
    Rig,
    T,
    batch_key,
    fixed_turnaround_catalog,
)

NANO = "gemini-2.5-flash-image"
IMAGES = "/v1/images/generations"
CAT = fixed_turnaround_catalog(T, ("openai", "anthropic", "google"))
ASPECTS = {"1024x1024": "1:1", "1344x768": "16:9", "768x1344": "9:16", "1536x672": "21:9"}


def emulator(speed: float = SPEED) -> Emulator:
    return Emulator(CAT, latency_scale=0.0, speedup=speed, cancel_s=EMU_CANCEL_S, validating_s=VALIDATING_S["openai"],
                    finalizing_s=1.0)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with emulator() as e:
        yield e


@pytest.fixture
def quarter() -> Iterator[Emulator]:
    """A quarter of ``SPEED``: the split of a batch's members at its hedge rests on round trips of real time."""
    with emulator(SPEED / 4) as e:
        yield e


def live() -> Settings:
    return Settings(providers=ProvidersSettings(mode="http", endpoints={"google": {}}))


def image(i: int, size: str = "1024x1024", prompt: str | None = None) -> Request:
    d = {"id": f"nano-{i}", "arrival_s": 0.0, "model": NANO, "prompt": prompt or f"a banana on a plate, take {i}",
         "params": {"size": size}}
    return Request.model_validate(d, context=validation_context(CAT, live()))


def jobs_of(n: int = 4) -> list[Job]:
    sizes = list(ASPECTS)
    return [Job(i, image(i, sizes[i % len(sizes)]), f"fp-nano-{i}", claim=f"c{i}") for i in range(n)]


def is_png(b64: str) -> bool:
    return base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")


class Native:
    """Google's native routes at the emulator, over plain HTTP with Google's key header."""

    def __init__(self, emu: Emulator):
        self.root = emu.base_url("google").removesuffix("/v1")

    def send(self, method: str, path: str, body: Any = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, method=method, headers={
            "x-goog-api-key": "k", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post(self, path: str, body: Any) -> dict:
        status, out = self.send("POST", path, body)
        assert status == 200, out
        return out

    def get(self, path: str) -> dict:
        status, out = self.send("GET", path)
        assert status == 200, out
        return out


def inline(prompt: str, key: str, aspect: str = "1:1") -> dict[str, Any]:
    return {"request": {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
                        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": aspect}}},
            "metadata": {"key": key}}


# -- the emulator, in Google's shapes ------------------------------------------------------------------------------
def test_the_emulator_runs_an_inline_image_batch_in_googles_shapes_billing_each_member_once_at_the_batch_price(emu):
    body = {"batch": {"displayName": "ref-1", "inputConfig": {"requests": {"requests": [
        inline("a banana", "k0"), inline("a pear", "k1", "16:9"), inline("a plum", "k2", "21:9")]}}}}
    clock = ManualClock(1000.0)
    emu.follow(clock)  # the emulator on a clock the test moves: no wait for the batch's turnaround
    c = Native(emu)
    op = c.post(f"/v1beta/models/{NANO}:batchGenerateContent", body)
    assert op["name"].startswith("batches/") and op["metadata"]["state"] == "BATCH_STATE_PENDING"
    assert op["metadata"]["displayName"] == "ref-1" and "done" not in op
    clock.advance(VALIDATING_S["openai"])
    assert c.get(f"/v1beta/{op['name']}")["metadata"]["state"] == "BATCH_STATE_RUNNING"
    clock.advance(2 * T)
    end = c.get(f"/v1beta/{op['name']}")
    assert end["done"] is True
    listed = c.get("/v1beta/batches")["operations"]
    meta = end["metadata"]
    assert meta["state"] == "BATCH_STATE_SUCCEEDED" and meta["batchStats"]["successfulRequestCount"] == "3"
    responses = meta["output"]["inlinedResponses"]["inlinedResponses"]
    assert [r["metadata"]["key"] for r in responses] == ["k0", "k1", "k2"]
    bill = {i.custom_id: i for i in emu.bill().items}
    for r, size in zip(responses, ("1024x1024", "1344x768", "1536x672"), strict=True):
        (part,) = r["response"]["candidates"][0]["content"]["parts"]
        assert part["inlineData"]["mimeType"] == "image/png" and is_png(part["inlineData"]["data"])
        usage = r["response"]["usageMetadata"]
        assert usage["candidatesTokensDetails"] == [{"modality": "IMAGE", "tokenCount": 1290}]
        item = bill[r["metadata"]["key"]]
        req = image(0, size, prompt={"k0": "a banana", "k1": "a pear", "k2": "a plum"}[r["metadata"]["key"]])
        assert item.mode == "batch_api" and item.route == "gemini.batches"
        assert usage["promptTokenCount"] == req.input_tokens
        assert item.cost_usd == pytest.approx(price_alone(req, CAT, "batch_api").total, abs=1e-12)
        assert item.cost_usd == pytest.approx(0.0195 + req.input_tokens * 0.15 / 1e6, abs=1e-12)
    assert len(emu.bill().items) == 3 and [o["name"] for o in listed] == [op["name"]]


@pytest.mark.parametrize("model, said", [("imagen-4", "batch_api.kinds"), ("gemini-2.5-flash", "generates text")])
def test_the_emulator_refuses_a_native_batch_of_a_model_the_catalog_does_not_batch_there(emu, model, said):
    body = {"batch": {"displayName": "r", "inputConfig": {"requests": {"requests": [inline("a banana", "k")]}}}}
    status, out = Native(emu).send("POST", f"/v1beta/models/{model}:batchGenerateContent", body)
    assert status == 400 and said in out["error"]["message"]
    assert not emu.bill().items


def test_the_emulator_refuses_a_create_over_the_inline_limit_and_the_layers_batch_refuses_images(emu):
    big = "x" * (INLINE_LIMIT_BYTES // 2)
    body = {"batch": {"displayName": "r", "inputConfig": {"requests": {"requests": [inline(big, "a"), inline(big, "b")]}}}}
    status, out = Native(emu).send("POST", f"/v1beta/models/{NANO}:batchGenerateContent", body)
    assert status == 400 and out["error"]["status"] == "INVALID_ARGUMENT"
    assert "payload size exceeds the limit" in out["error"]["message"]
    layer = openai.OpenAI(base_url=emu.base_url("google"), api_key="k", max_retries=0)
    up = layer.files.create(file=("b.jsonl", json.dumps({"custom_id": "a", "method": "POST", "url": IMAGES, "body": {
        "model": NANO, "prompt": "a banana"}}).encode(), "application/jsonl"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        layer.batches.create(input_file_id=up.id, endpoint=IMAGES, completion_window="24h")
    (said,) = refused.value.body  # Google's layer answers a list of one error
    assert "chat completions only" in said["error"]["message"]
    assert not emu.bill().items


# -- the engine, through the provider a user runs ------------------------------------------------------------------
def assert_native_member(r: Any, j: Job, item: Any) -> None:
    assert r.status == "ok" and r.mode == "batch_api" and r.real and is_png(r.output), r
    assert item.mode == "batch_api" and item.route == "gemini.batches"
    expected = price_alone(j.req, CAT, "batch_api").total
    assert r.cost_usd == pytest.approx(expected, abs=1e-12) and item.cost_usd == pytest.approx(expected, abs=1e-12)
    assert r.cost_usd == pytest.approx(0.5 * price_alone(j.req, CAT, "sync").total, abs=1e-12)


def billed(emu: Emulator) -> dict[str, Any]:
    ids = [i.custom_id for i in emu.bill().items if i.custom_id is not None]
    assert len(ids) == len(set(ids)), f"a member was billed twice: {ids}"
    return {i.custom_id: i for i in emu.bill().items if i.custom_id is not None}


def test_a_batch_of_images_rides_googles_native_batch_answered_once_each_at_the_batch_price(emu):
    jobs = jobs_of()

    async def go():
        rig = Rig(emu, "google")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == [] and rig.calls == []  # nothing sync
            got = billed(emu)
            assert set(got) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
            (batch,) = emu._core.batches.values()
            assert [m["size"] for _, m in batch.members] == [j.req.params["size"] for j in jobs]
            assert emu.count("gemini.batches.create") == 1 and emu.count("batches.create") == 0
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_late_native_batch_is_cancelled_at_its_hedge_and_only_its_unfinished_members_go_sync(quarter):
    e, jobs = quarter, jobs_of()

    async def go():
        rig = Rig(e, "google", cancel_s=10 * EMU_CANCEL_S, speed=SPEED / 4)
        try:
            await rig.reserve(jobs)
            # Member 0 finishes at 0.25 T, before the hedge; member 3 at T, long after the cancel.
            hedge_at = rig.clock.now() + VALIDATING_S["openai"] + 0.6 * T
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs)
            got = billed(e)
            back = {j.req.id: j for j in rig.grouper.readmitted()}
            finished = {j.req.id for j in jobs if j.req.id in rig.results}
            assert jobs[0].req.id in finished and jobs[3].req.id not in finished
            for j in jobs:
                assert (j.req.id in rig.results) != (j.req.id in back)
                assert (batch_key(j) in got) is (j.req.id in finished)
                if j.req.id in finished:
                    assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
                else:
                    assert back[j.req.id].hedges == 1 and back[j.req.id].attempts == 0
            assert e.count("gemini.batches.cancel") == 1 and rig.d.batches_cancelled == 1 and rig.d.paid_twice == 0
            await rig.run("sync", rig.grouper.readmitted(), bid="fallback")
            await rig.until(lambda: len(rig.results) == len(jobs), "the fallback images")
            assert e.count("images.generations") == len(jobs) - len(finished)  # finished ones never sent again
            bill = e.bill()
            assert sorted(i.mode for i in bill.items) == (["batch_api"] * len(finished)
                                                          + ["sync"] * (len(jobs) - len(finished)))
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(bill.total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


# -- the inline limit ----------------------------------------------------------------------------------------------
def test_a_dispatch_is_cut_so_that_no_create_passes_the_inline_limit_by_a_true_bound_of_each_member():
    """Each member's weight (``file_parts``) bounds the bytes its inline request adds to the create, whatever its
    prompt (past ASCII, JSON escapes), so no part's create body passes ``media_max_mb``."""
    cat = CAT
    ba = cat.provider("google").batch_api
    assert ba.media_max_mb == 20 and INLINE_LIMIT_BYTES == 20 * 2**20
    p = GeminiProvider("google", cat, live(), ProviderEndpoint(api="openai", base_url="http://127.0.0.1:9/google/v1",
                                                               api_key_env="X"), Secret("k"), None)
    prompts = ["\u00e9\u6f22\"\\\n" * 120_000, "plain " * 200_000, "\U0001f34c" * 300_000, "a\tb" * 250_000]
    jobs = [Job(i, image(i, list(ASPECTS)[i % 4], prompt=prompts[i % 4]), f"fp-{i}", claim=f"c{i}") for i in range(24)]
    parts = file_parts(jobs, ba.media_max_mb, live().chars_per_token)
    assert len(parts) > 1 and sum(map(len, parts)) == len(jobs)
    for part in parts:
        cjobs = [CallJob(batch_key(j), j.req, 0.0, 0, 0) for j in part]
        body = {"batch": {"displayName": "sb-0123456789abcdef-01234567#12", "inputConfig": {"requests": {
            "requests": [p.inline_request(cj) for cj in cjobs]}}}}
        assert len(json.dumps(body, ensure_ascii=False).encode()) < INLINE_LIMIT_BYTES


def test_the_provider_reads_members_by_key_a_failed_one_unbilled_and_a_cancel_after_the_end_reads_it_ended(emu):
    jobs = jobs_of(3)
    cjobs = [CallJob(batch_key(j), j.req, 0.0, 0, 0) for j in jobs]
    emu.faults.configure({"fail_members": [cjobs[1].key]})
    clock = ManualClock(1000.0)
    emu.follow(clock)  # the emulator on a clock the test moves: no wait for the batch's turnaround

    async def go():
        rig = Rig(emu, "google")
        p = rig.d.provider
        try:
            handle = await p.submit_batch(cjobs[::-1], None, "ref-x")  # sent in another order: read by key
            assert await p.find_batch(cjobs, "ref-x") is not None and await p.find_batch(cjobs, "ref-y") is None
            assert (await p.poll(handle)).status == "running"
            clock.advance(2 * T)
            assert (await p.cancel(handle)).status == "ended"  # refused by Google, ended by its poll
            return await p.fetch(handle)
        finally:
            await rig.close()

    out = asyncio.run(go())
    assert set(out) == {cj.key for cj in cjobs}
    bad = out[cjobs[1].key]
    assert not bad.ok and bad.retryable and bad.cost == 0 and "code 13" in bad.error
    for cj in (cjobs[0], cjobs[2]):
        assert out[cj.key].ok and is_png(out[cj.key].output)
        assert out[cj.key].cost == pytest.approx(price_alone(cj.req, CAT, "batch_api").total, abs=1e-12)
    assert set(billed(emu)) == {cjobs[0].key, cjobs[2].key}
