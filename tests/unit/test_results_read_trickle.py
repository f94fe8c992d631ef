"""A batch's results read whose server trickles: a byte just inside the endpoint's ``timeout_s`` between chunks
keeps each try alive for the file's length times that (hours for a real file). Each try is bounded by the file's
size at a floor rate (``batch_results_min_kib_s``), then made again (the file stays at the provider: reading it
again is free); its members are never sent again (paid twice). Reads that keep failing past
``batch_results_read_max_s`` after the batch's hedge fail every member, possibly billed at its bound, with an error
naming the batch and its results file."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from actors._batch_parts import image_line_bytes, text_line_bytes
from actors._cancel import CANCEL_CALL_S
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    CAT,
    PROVIDERS,
    RESULTS_ROUTE,
    ROUTE,
    N,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
    req,
)
from tests.unit.test_image_read_bounds import transparent

TIMEOUT_S = 0.5  # real seconds between chunks before a read times out
TRICKLE_S = 0.1  # a byte this often: inside the timeout, so no try of the read times out by it
FAST = 1e6  # KiB/s: the floor rate in these tests, so a try is bounded by little more than its calls' timeouts


@PROVIDERS
def test_a_trickling_results_read_is_made_again_and_its_members_answered_once_never_sent_again(emu, provider):  # noqa: F811
    """The first two reads trickle (each would last minutes); each try ends at its bound, the third reads the
    file: every member answered from its batch, billed once, nothing sent sync. Before, the first read held
    every member's future for the whole trickle."""
    jobs = jobs_of(provider, claims=True)
    emu.faults.script(provider, RESULTS_ROUTE[provider], [{"trickle_s": TRICKLE_S}] * 2)

    async def go():
        rig = Rig(emu, provider, timeout_s=TIMEOUT_S, batch_results_min_kib_s=FAST)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=15.0)  # a bound: one trickled read alone lasts minutes
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs} and len(emu.bill().items) == N
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            assert emu.count(ROUTE[provider]) == 0  # nothing went sync
            assert emu.count(RESULTS_ROUTE[provider]) >= 3  # two trickled tries, then the one that read it
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_results_that_trickle_past_the_read_allowance_fail_every_member_possibly_billed_naming_the_file(emu,  # noqa: F811
                                                                                                        provider):
    """Every read trickles. Past ``batch_results_read_max_s`` every member's future resolves, failed, with an
    error naming the batch and where its results are; none is sent again, and the budget keeps each member's
    bound (at least the bill: the batch ran every member). Before, no future ever resolved."""
    jobs = jobs_of(provider, claims=True)
    emu.faults.script(provider, RESULTS_ROUTE[provider], [{"trickle_s": TRICKLE_S}] * 100)

    async def go():
        rig = Rig(emu, provider, timeout_s=TIMEOUT_S, batch_results_min_kib_s=FAST,
                  batch_results_read_max_s=1000.0)  # engine s: 1 s real at the rig's speed-up
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=15.0)  # a bound
            assert rig.grouper.readmitted() == [] and len(rig.results) == N
            where = {re.search(r"[Bb]atch (\S+) \(", rig.results[j.req.id].error or "")[1] for j in jobs}
            assert len(where) == 1, where  # one batch, named
            (bid,) = where
            assert bid.startswith("msgbatch_" if provider == "anthropic" else "batch_"), bid
            files = {"openai": list(emu.files("batch_output")), "anthropic": [f"batches/{bid}/results"]}[provider]
            assert len(files) == 1
            for j in jobs:
                r = rig.results[j.req.id]
                assert r.status == "failed", r
                assert "could not be read" in r.error and "batch_results_read_max_s" in r.error, r.error
                assert files[0] in r.error, r.error  # where to fetch its results
            assert emu.count(ROUTE[provider]) == 0  # nothing went sync
            assert len(emu.bill().items) == N  # each billed once, by the batch
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            assert sum(rig.budget.book.spend.values()) >= emu.bill().total_usd - 1e-12
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_tries_bound_is_its_calls_timeouts_and_its_results_size_at_the_floor_rate(emu):  # noqa: F811
    """At the defaults (64 KiB/s): a full batch of 1536x1024 images, its lines' bounds, 512 MiB at most; a text
    batch, its answers' caps at 6 bytes a character, however many (text is not cut by that setting, so its file
    may weigh more: a bound capped at it cut a healthy read)."""
    rig = Rig(emu, "openai")
    try:
        d, s = rig.d, rig.settings
        assert s.batch_results_min_kib_s == 64.0 and s.batch_results_read_max_s == 3600.0
        calls = 3 * s.providers.endpoints["openai"].timeout_s
        images = [d._call_job(j, 0.0, batch=True) for j in d._file_parts([transparent(i) for i in range(62)])[0]]
        size = sum(image_line_bytes(rig.catalog.model("openai", "gpt-image-2"), cj.req) for cj in images)
        assert size <= 512 * 2**20 and d._read_bound_s(images) == pytest.approx(calls + size / 65536)
        text = [d._call_job(j, 0.0, batch=True) for j in jobs_of("openai", 10_000)]
        lines = sum(text_line_bytes(rig.catalog.model("openai", cj.req.model), cj.req, 4.0) for cj in text)
        assert lines > 512 * 2**20 and d._read_bound_s(text) == pytest.approx(calls + lines / 65536)  # not capped
        one = [d._call_job(j, 0.0, batch=True) for j in jobs_of("openai", 1, max_output_tokens=1000)]
        assert d._read_bound_s(one) == pytest.approx(calls + (6 * 4 * 1000 + 8 * 1024) / 65536)
    finally:
        asyncio.run(rig.close())


def _openai_line(i: int, message: dict, logprobs: dict | None = None) -> bytes:
    """A chat completion's line as OpenAI's output file holds it (its fields, ids and usage at their longest)."""
    body = {"id": f"chatcmpl-{'x' * 29}", "object": "chat.completion", "created": 1_780_000_000,
            "model": "gpt-5-mini-2025-08-07", "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                                                          "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10**6, "completion_tokens": 10**6, "total_tokens": 2 * 10**6,
                      "prompt_tokens_details": {"cached_tokens": 10**6, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 10**6, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0,
                                                    "rejected_prediction_tokens": 0}},
            "service_tier": "default", "system_fingerprint": "fp_" + "0" * 10}
    line = {"id": f"batch_req_{'x' * 32}", "custom_id": f"t{i}", "error": None,
            "response": {"status_code": 200, "request_id": "r" * 32, "body": body}}
    return json.dumps(line).encode() + b"\n"


def test_a_text_batch_heavier_than_batch_results_max_mb_has_its_whole_size_read_at_the_floor_rate(emu):  # noqa: F811
    """Text is not cut by ``batch_results_max_mb``, so its results may weigh more (OpenAI takes 50,000 requests a
    batch: 50,000 answers of 4,000 tokens are 800 MB). A try's bound must cover every line at the floor rate, else
    a healthy read above that rate is cut at each try and, past the allowance, every member fails while the file
    was whole. Scaled down here (a 1 MiB setting; 100 answers of 4,000 tokens, 1.6 MB); before, the bound was
    the setting's 1 MiB at the floor rate."""
    rig = Rig(emu, "openai", batch_results_max_mb=1.0)
    try:
        d, s = rig.d, rig.settings
        calls = 3 * s.providers.endpoints["openai"].timeout_s
        jobs = jobs_of("openai", 100, max_output_tokens=4000)
        text = [d._call_job(j, 0.0, batch=True) for j in jobs]
        answer = {"role": "assistant", "content": "abcd" * 4000, "refusal": None, "annotations": []}
        size = sum(len(_openai_line(i, answer)) for i in range(len(jobs)))  # 4 characters a token, as English
        assert size > 1.5 * 2**20
        assert d._read_bound_s(text) >= calls + size / (s.batch_results_min_kib_s * 1024)
    finally:
        asyncio.run(rig.close())


@pytest.mark.parametrize("top", [0, 5, 20])
def test_a_line_with_logprobs_fits_its_bound(top):
    """``logprobs`` (``top_logprobs`` up to 20) writes each token of the answer again, with its bytes and its
    alternatives, a line many times the answer's own: a bound of the answer alone cut a healthy read of a batch
    asking for them (and past the allowance failed every member, the file whole). Each token here is the bound's
    4 characters, non-ASCII (each written \\uXXXX, 3 bytes in UTF-8)."""
    cap = 500
    r = req(0, max_output_tokens=cap, body={"logprobs": True, **({"top_logprobs": top} if top else {})})
    model = CAT.model("openai", r.model)
    tok = "\u00e9\u4e2d\u00e9\u4e2d"
    entry = {"token": tok, "logprob": -1.2345678901234567e-05, "bytes": list(tok.encode())}
    content = [{**entry, "top_logprobs": [dict(entry) for _ in range(top)]} for _ in range(cap)]
    line = _openai_line(0, {"role": "assistant", "content": tok * cap, "refusal": None, "annotations": []},
                        {"content": content, "refusal": None})
    assert len(line) <= text_line_bytes(model, r, 4.0), (len(line), text_line_bytes(model, r, 4.0))


def test_a_responses_line_echoing_its_instructions_and_tools_fits_its_bound():
    """A model served by OpenAI's Responses API (``api: responses``): its answer echoes the request's
    ``instructions``, ``tools`` and ``text`` format, however long, beside a short answer. Before, its bound was
    the answer's alone."""
    tools = [{"type": "function", "name": f"f{k}", "description": "d\u00e9" * 500, "strict": True,
              "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}} for k in range(20)]
    body = {"instructions": "\u4e2d" * 20_000, "tools": tools, "input": "hi"}
    r = req(0, max_output_tokens=32, body=body)
    model = CAT.model("openai", r.model).model_copy(update={"api": "responses"})
    answer = {"id": "resp_" + "x" * 48, "object": "response", "created_at": 1_780_000_000, "status": "completed",
              "error": None, "incomplete_details": None, "instructions": body["instructions"],
              "max_output_tokens": 32, "model": "gpt-5-mini-2025-08-07", "parallel_tool_calls": True,
              "output": [{"type": "message", "id": "msg_" + "x" * 48, "status": "completed", "role": "assistant",
                          "content": [{"type": "output_text", "text": "abcd" * 32, "annotations": [],
                                       "logprobs": []}]}],
              "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": True,
              "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
              "tools": tools, "top_p": 1.0, "truncation": "disabled", "user": None, "metadata": {},
              "usage": {"input_tokens": 10**6, "input_tokens_details": {"cached_tokens": 10**6},
                        "output_tokens": 10**6, "output_tokens_details": {"reasoning_tokens": 10**6},
                        "total_tokens": 2 * 10**6}}
    line = json.dumps({"id": "batch_req_" + "x" * 32, "custom_id": "t0", "error": None,
                       "response": {"status_code": 200, "request_id": "r" * 32, "body": answer}}).encode() + b"\n"
    assert len(line) <= text_line_bytes(model, r, 4.0), (len(line), text_line_bytes(model, r, 4.0))


@PROVIDERS
def test_a_slow_healthy_read_outlasting_the_allowance_in_engine_seconds_is_read_not_given_up(emu, provider):  # noqa: F811
    """``batch_results_read_max_s`` is engine seconds and a try's bound real ones: at the rig's 1000x clock, a
    read a byte each millisecond (seconds real, thousands of engine seconds) faster than the floor rate runs past
    the allowance and is read whole, every member answered from its batch, none failed or sent again."""
    jobs = jobs_of(provider, claims=True)
    emu.faults.script(provider, RESULTS_ROUTE[provider], [{"trickle_s": 0.001}])

    async def go():
        rig = Rig(emu, provider, timeout_s=TIMEOUT_S, batch_results_min_kib_s=0.05,  # 51 B/s, under the trickle's
                  batch_results_read_max_s=100.0)  # engine s: 0.1 s real
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=30.0)
            billed = billed_by_custom_id(emu)
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            assert emu.count(RESULTS_ROUTE[provider]) == 1 and emu.count(ROUTE[provider]) == 0  # read once, whole
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_trickled_read_of_a_batch_sent_without_output_caps_is_cut_at_its_files_length(emu, provider):  # noqa: F811
    """Requests without ``max_output_tokens``: each line's bound is the model's cap (128,000 tokens, 3 MB), the
    try's bound hours at the floor rate (here 6,000 s at 2 KiB/s), each held that long by a trickle. The file's
    ``content-length`` (3 KB) bounds the try at that rate instead: the trickled tries are cut in seconds and the
    third reads it, every member answered from its batch. Before, no future resolved in 20 s."""
    jobs = jobs_of(provider, claims=True)
    assert all(j.req.max_output_tokens is None for j in jobs)
    emu.faults.script(provider, RESULTS_ROUTE[provider], [{"trickle_s": TRICKLE_S}] * 2)

    async def go():
        rig = Rig(emu, provider, timeout_s=TIMEOUT_S, batch_results_min_kib_s=2.0,
                  batch_results_read_max_s=30_000.0)  # engine s: 30 s real at the rig's speed-up
        try:
            assert rig.d._read_bound_s([rig.d._call_job(j, 0.0, batch=True) for j in jobs]) > 3000
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20.0)
            billed = billed_by_custom_id(emu)
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            assert emu.count(ROUTE[provider]) == 0 and emu.count(RESULTS_ROUTE[provider]) >= 3
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_stop_during_a_trickled_read_waits_for_no_cancel_and_says_no_batch_runs_on(emu):  # noqa: F811
    """The engine stops while an ended batch's results trickle in: it bills nothing more and has nothing to
    cancel. Before, the stop waited ``CANCEL_CALL_S`` (10 s) for a cancel never sent, then counted it among the
    batches "that no cancel reached: they may run on, billed" (``stop_spending``: 1 of 1)."""
    jobs = jobs_of("openai", claims=True)
    emu.faults.script("openai", RESULTS_ROUTE["openai"], [{"trickle_s": TRICKLE_S}] * 100)

    async def go():
        rig = Rig(emu, "openai", timeout_s=TIMEOUT_S, batch_results_min_kib_s=FAST,
                  batch_results_read_max_s=1e6)  # engine s: the reads go on for the whole test
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.until(lambda: emu.count(RESULTS_ROUTE["openai"]) >= 1, "a read of the ended batch", 15.0)
            t = time.monotonic()
            open_, left, videos = await rig.d.stop_spending()
            assert (open_, left, videos) == (1, 0, 0)
            assert time.monotonic() - t < CANCEL_CALL_S / 2
            assert emu.count("batches.cancel") == 0  # nothing to cancel: it ended
        finally:
            await rig.close()
    asyncio.run(go())
