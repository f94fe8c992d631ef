"""OpenAI image generations through OpenAI's Batch API (stop 71): the catalog declares ``image`` in OpenAI's
``batch_api.kinds``, the cost model prices an image line at the batch discount, the emulator runs and bills image
lines, the engine writes them (``url: /v1/images/generations``, the sync call's body) and reads their answers
streamed into the Result a sync image call gives, and smart sends an image whose deadline allows to a batch,
hedged to sync when it is late."""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import closing
from typing import Any

import pytest

from actors._types import Job
from actors.providers._http import jsonl_stream
from engine.core.catalog import default_catalog
from engine.core.cost import MODES, price_alone, price_batch
from engine.core.request import Request
from engine.emulator import Emulator
from engine.runtime.admission import release_lead
from engine.sim.simulator import simulate
from policies import load_policy
from tests.unit.test_emulator import Sdk, finished_batch, jsonl, upload
from tests.unit.test_http_providers import (  # noqa: F401  (emu, quarter: the fixtures)
    CAT,
    EMU_CANCEL_S,
    SPEED,
    VALIDATING_S,
    Rig,
    T,
    batch_key,
    billed_by_custom_id,
    emu,
    quarter,
)

IMAGES = "/v1/images/generations"
SHAPES = [("gpt-image-2", "1024x1024", "low"), ("gpt-image-2", "1536x1024", "high"),
          ("gpt-image-2", "1024x1536", "medium"), ("gpt-image-2", "1024x1024", "high")]


def image(i: int, model: str = "gpt-image-2", size: str = "1024x1024", quality: str = "medium", **kw: Any) -> Request:
    d = {"id": f"img-{i}", "arrival_s": 0.0, "model": model, "prompt": f"a poster of a red fox, take {i}",
         "params": {"size": size, "quality": quality}}
    d.update(kw)
    return Request.model_validate(d)


def image_jobs() -> list[Job]:
    return [Job(i, image(i, m, s, q), f"fp-img-{i}", claim=f"c{i}") for i, (m, s, q) in enumerate(SHAPES)]


def is_png(b64: str) -> bool:
    return base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")


# -- the cost model ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,size,quality", [("gpt-image-2", "1024x1024", "high"), ("gpt-image-1", "1536x1024",
                                                                                      "low")])
def test_an_openai_image_is_priced_at_half_its_list_price_in_a_batch(model, size, quality):
    cat = default_catalog()
    r = image(0, model, size, quality)
    sync, batch = price_alone(r, cat, "sync"), price_alone(r, cat, "batch_api")
    assert batch.total == pytest.approx(0.5 * sync.total, abs=1e-15) and batch.total > 0
    assert batch.media == pytest.approx(0.5 * cat.model("openai", model).per_image_quality[quality][size])
    # The simulator zips a batch's prices with what each member left warm: an image batch leaves one count each.
    warmed: list[int] = []
    prices = price_batch([r, image(1, model, size, quality)], cat, "batch_api", warmed=warmed)
    assert [p.total for p in prices] == [batch.total] * 2 and warmed == [0, 0]


# -- the emulator's image batch lines --------------------------------------------------------------------------------
def image_line(cid: str, model: str = "gpt-image-2", **body: Any) -> dict:
    return {"custom_id": cid, "method": "POST", "url": IMAGES,
            "body": {"model": model, "prompt": f"a lighthouse at dusk ({cid})", **body}}


def test_the_emulator_runs_image_batch_lines_and_bills_each_once_at_the_batch_price():
    with Emulator(latency_scale=0.0, speedup=1e4) as e, closing(Sdk(e)) as sdk:
        client = sdk.openai()
        lines = [image_line("a", size="1024x1024", quality="high"), image_line("b", size="1536x1024", quality="low"),
                 image_line("c", size="1024x1536", quality="medium")]
        done = finished_batch(client, client.batches.create(input_file_id=upload(client, lines), endpoint=IMAGES,
                                                            completion_window="24h").id)
        assert done.status == "completed" and done.request_counts.completed == 3
        out = jsonl(client, done.output_file_id)
        items = {i.custom_id: i for i in e.bill().items}
        assert set(out) == set(items) == {"a", "b", "c"}
        for x in lines:
            body, b = out[x["custom_id"]]["response"]["body"], x["body"]
            assert is_png(body["data"][0]["b64_json"]) and body["quality"] == b["quality"]
            r = image(0, b["model"], b["size"], b["quality"], prompt=b["prompt"])
            assert body["usage"]["input_tokens_details"]["text_tokens"] == r.input_tokens
            item = items[x["custom_id"]]
            assert item.mode == "batch_api" and item.route == "batches"
            assert item.cost_usd == pytest.approx(price_alone(r, e.catalog, "batch_api").total, abs=1e-15)
            assert item.cost_usd == pytest.approx(0.5 * price_alone(r, e.catalog, "sync").total, abs=1e-15)
        assert len(e.bill().items) == 3  # read again: billed nothing more


def test_an_image_batch_holds_image_lines_only():
    with Emulator(latency_scale=0.0, speedup=1e4) as e, closing(Sdk(e)) as sdk:
        client = sdk.openai()
        text = {"custom_id": "t", "method": "POST", "url": IMAGES, "body": {"model": "gpt-5-mini", "prompt": "hi"}}
        done = finished_batch(client, client.batches.create(input_file_id=upload(client, [image_line("a"), text]),
                                                            endpoint=IMAGES, completion_window="24h").id)
        assert done.status == "failed" and [x.code for x in done.errors.data] == ["model_not_found"]
        assert "not an image model" in done.errors.data[0].message and e.bill().items == ()


def test_a_provider_declaring_no_image_batches_refuses_an_image_batch_naming_the_setting():
    cat = default_catalog()
    openai_ = cat.providers["openai"]
    p = openai_.model_copy(update={"batch_api": openai_.batch_api.model_copy(update={"kinds": ("text",)})})
    text_only = cat.model_copy(update={"providers": {**cat.providers, "openai": p}})
    with Emulator(text_only, latency_scale=0.0, speedup=1e4) as e, closing(Sdk(e)) as sdk:
        client = sdk.openai()
        fid = upload(client, [image_line("a")])
        with pytest.raises(Exception, match="batch_api.kinds"):
            client.batches.create(input_file_id=fid, endpoint=IMAGES, completion_window="24h")


# -- the live path: the engine's dispatcher, the official SDK, the emulator ------------------------------------------
def assert_image_member(r: Any, j: Job, item: Any) -> None:
    """``r`` came from the batch's output: the image the sync call gives, billed once at the batch price."""
    assert r.status == "ok" and r.mode == "batch_api" and r.real, r
    assert is_png(r.output)
    assert item.mode == "batch_api" and item.route == "batches"
    expected = price_alone(j.req, CAT, "batch_api").total
    assert r.cost_usd == pytest.approx(expected, abs=1e-12) and item.cost_usd == pytest.approx(expected, abs=1e-12)
    assert r.cost_usd == pytest.approx(0.5 * price_alone(j.req, CAT, "sync").total, abs=1e-12)


def test_an_image_rides_an_openai_batch_through_the_sdk_and_is_billed_once_at_the_batch_price(emu):  # noqa: F811
    jobs = image_jobs()

    async def go():
        rig = Rig(emu, "openai")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_image_member(rig.results[j.req.id], j, billed[batch_key(j)])
            bill = emu.bill()
            assert len(bill.items) == len(jobs) and emu.count("images.generations") == 0  # nothing went sync
            (batch,) = emu._core.batches.values()
            assert batch.endpoint == IMAGES and {b["model"] for _, b in batch.members} == {"gpt-image-2"}
            assert {b["quality"] for _, b in batch.members} == {"low", "medium", "high"}
            await rig.settled_to(bill.total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_late_image_batch_hedges_to_sync_keeps_its_finished_members_and_bills_each_once(quarter):  # noqa: F811
    e, jobs = quarter, image_jobs()

    async def go():
        rig = Rig(e, "openai", cancel_s=10 * EMU_CANCEL_S, speed=SPEED / 4)
        try:
            await rig.reserve(jobs)
            # Member 0 finishes before the hedge (at 0.25 T), member 3 (at T) long after the cancel.
            hedge_at = rig.clock.now() + VALIDATING_S["openai"] + 0.6 * T
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs)
            billed = billed_by_custom_id(e)
            back = {j.req.id: j for j in rig.grouper.readmitted()}
            finished = {j.req.id for j in jobs if j.req.id in rig.results}
            assert jobs[0].req.id in finished and jobs[3].req.id not in finished
            for j in jobs:
                assert (j.req.id in rig.results) != (j.req.id in back)
                assert (batch_key(j) in billed) is (j.req.id in finished)
                if j.req.id in finished:
                    assert_image_member(rig.results[j.req.id], j, billed[batch_key(j)])
                else:
                    assert back[j.req.id].hedges == 1 and back[j.req.id].attempts == 0
            assert rig.d.batches_cancelled == 1 and rig.d.paid_twice == 0
            # The fallback sends what came back, sync: only the unfinished images are generated again.
            await rig.run("sync", rig.grouper.readmitted(), bid="fallback")
            await rig.until(lambda: len(rig.results) == len(jobs), "the fallback images")
            assert e.count("images.generations") == len(jobs) - len(finished)
            assert sorted(job.req.id for job, _, _ in rig.calls) == sorted(set(back))
            bill = e.bill()
            assert sorted(i.mode for i in bill.items) == (["batch_api"] * len(finished)
                                                          + ["sync"] * (len(jobs) - len(finished)))
            for j in jobs:
                r = rig.results[j.req.id]
                mode = "batch_api" if j.req.id in finished else "sync"
                assert r.mode == mode and is_png(r.output)
                assert r.cost_usd == pytest.approx(price_alone(j.req, CAT, mode).total, abs=1e-12)
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(bill.total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


# -- streamed results ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 7, 4096])
def test_a_results_file_is_read_a_line_at_a_time_whatever_its_chunks(size):
    """Lines split across chunks, a multibyte character cut between two, U+2028 inside a string, a last line
    with no newline and a line cut short: each read as ``jsonl_records`` reads the whole text."""
    lines = [json.dumps({"custom_id": f"k{i}", "response": {"body": {"data": [{"b64_json": "QUJD" * 50}]}},
                         "note": "caf\u00e9 \u2028 \u00fc"}, ensure_ascii=False) for i in range(5)]
    text = "\n".join(lines[:4]) + "\n" + '{"custom_id": "k9", "response": {"bo' + "\n" + lines[4]
    data = text.encode("utf-8")

    async def chunks():
        for k in range(0, len(data), size):
            yield data[k:k + size]

    records, unread = asyncio.run(jsonl_stream(chunks()))
    assert [r["custom_id"] for r in records] == ["k0", "k1", "k2", "k3", "k4"] and unread == ["k9"]
    assert records[0]["note"] == "caf\u00e9 \u2028 \u00fc"


# -- smart in the simulator ----------------------------------------------------------------------------------------
def test_smart_sends_an_image_with_a_long_deadline_to_a_batch_and_one_due_soon_sync():
    """An image's deadline of a day leaves a batch all the time it needs: half price. One due in two minutes goes
    sync at once (no batch is back by then), so every deadline is met."""
    cat = default_catalog()
    reqs = [image(i, quality="high", arrival_s=float(i), deadline_s=86_400.0) for i in range(20)]
    reqs += [image(100 + i, quality="high", arrival_s=float(i), deadline_s=120.0) for i in range(5)]
    res = simulate(reqs, load_policy("smart", cat), catalog=cat)
    sync_usd = price_alone(reqs[0], cat, "sync").total
    assert res.met.all()
    for i, r in enumerate(res.requests):
        mode, usd = MODES[int(res.mode[i])], float(res.cost[i])
        if r.deadline_s == 86_400.0:
            assert mode == "batch_api" and usd == pytest.approx(0.5 * sync_usd), (r.id, mode, usd)
        else:
            assert mode == "sync" and usd == pytest.approx(sync_usd), (r.id, mode, usd)


def test_an_image_copy_due_sooner_follows_a_leader_in_a_batch_until_its_release_time():
    """A copy of an image whose leader rides a batch waits for the leader's result until its own release time (as
    it waited for a sync leader before stop 71), and is reused at no cost; text with a batch lever still follows
    only a leader due no later than itself."""
    cat = default_catalog()
    smart = load_policy("smart", cat)
    lead = release_lead(cat, smart.reuse)
    same = "a poster of a red fox in the snow"
    copy = image(1, quality="high", arrival_s=1.0, deadline_s=20_000.0, reuse="exact", prompt=same)
    assert lead(copy) is not None and 0 < lead(copy) < 600
    text = Request.model_validate({"id": "t", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 100,
                                   "output_tokens": 10})
    assert lead(text) is None
    leader = image(0, quality="high", arrival_s=0.0, deadline_s=86_400.0, reuse="exact", prompt=same)
    res = simulate([leader, copy], smart, catalog=cat)
    (i_leader,), (i_copy,) = ([i for i, r in enumerate(res.requests) if r.id == x] for x in ("img-0", "img-1"))
    assert MODES[int(res.mode[i_leader])] == "batch_api" and res.met.all()
    assert MODES[int(res.mode[i_copy])] == "reuse" and float(res.cost[i_copy]) == 0.0
