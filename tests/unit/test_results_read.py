"""A batch's results read cut short: the provider answers 200 with fewer result lines than the batch answered (a
stream that ended early, a proxy's cut), against the HTTP emulator (its ``cut_body`` fault on the results route:
the first half of the lines whole, the rest missing). A member whose line is missing ran and was billed; taken
for one that never ran, it was sent again and paid twice, uncounted (a fault hunt). The read is made again."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from actors import Dispatcher
from actors.providers._http import BatchHandle, jsonl_records
from engine.core.errors import ProviderError
from engine.core.provider_api import Secret
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    KEY,
    PROVIDERS,
    RESULTS_ROUTE,
    ROUTE,
    Rig,
    _create_then_die,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    direct,
    emu,
    job_of,
    jobs_of,
    req,
)

CUT = [{"cut_body": True}]


@PROVIDERS
@pytest.mark.parametrize("expired", [False, True], ids=["ended", "expired"])
def test_a_results_read_cut_short_is_read_again_and_no_finished_member_is_sent_again(emu, provider,  # noqa: F811
                                                                                       expired):
    jobs = jobs_of(provider, n=6, claims=True)
    if expired:  # members 0-3 finish (at 1/6 T ... 4/6 T), then the batch expires with the other two
        emu.faults.expire_batches(1, finished_fraction=0.7)
    emu.faults.script(provider, RESULTS_ROUTE[provider], CUT)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            billed = billed_by_custom_id(emu)  # each billed once
            finished = [j for j in jobs if batch_key(j) in billed]
            assert len(finished) == (4 if expired else 6)
            # Only the members the batch never ran go back; every one it finished is answered from its results.
            assert sorted(j.req.id for j in rig.grouper.readmitted()) == sorted(
                j.req.id for j in jobs if j not in finished)
            for j in finished:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            # The cut read, then a whole one (each with OpenAI's error file, of the expired members: it bounds the
            # output's lines, ``OpenAIProvider._results``)
            assert emu.count(RESULTS_ROUTE[provider], status=200) == 2 + 2 * (expired and provider == "openai")
            assert rig.d.paid_twice == 0 and emu.count(ROUTE[provider]) == 0
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_cut_anthropic_create_is_told_by_its_results_though_the_first_read_of_them_is_cut_short(emu):  # noqa: F811
    """A restart after the cut create's batch ended: the lookup reads the ended look-alike's results to tell it
    is this create's. Read cut short, its custom_ids were not all the members': taken for another's batch, the
    create was made again and every member billed in both."""
    emu.honour_keys = False
    jobs = jobs_of("anthropic", n=6, claims=True)
    create = "messages.batches.create"

    async def go():
        rig = Rig(emu, "anthropic")
        client = rig.d.provider.client
        try:
            await _create_then_die(rig, emu, jobs, create)
            async for b in client.messages.batches.list():  # ended once its turnaround passed (bounded, below)
                async with asyncio.timeout(20):
                    while (await client.messages.batches.retrieve(b.id)).processing_status != "ended":
                        await asyncio.sleep(0.05)
            emu.faults.script("anthropic", RESULTS_ROUTE["anthropic"], CUT)
            d2 = Dispatcher("anthropic", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            assert await d2.recover() == 1
            assert await d2.recall([j.req.uid for j in jobs]) == [j.req.uid for j in jobs]
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)  # no member billed twice
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "anthropic")
            assert emu.count(create, status=200) == 1 and emu.count(ROUTE["anthropic"]) == 0
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def _answer(key: str) -> dict:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
    return {"custom_id": key, "response": {"status_code": 200, "request_id": "r", "body": body}, "error": None}


def _refusal(key: str) -> dict:
    return {"custom_id": key, "response": {"status_code": 400, "request_id": "r", "body": {"error": {
        "message": "bad", "type": "invalid_request_error", "code": None}}}, "error": None}


@pytest.mark.parametrize(("counts", "output", "errors", "whole"), [
    # An OpenAI-compatible server that counts a refused member as completed (its line in the error file, as
    # AIBrix's batch API does): read whole, it was refused at every read, and after the last every member went
    # again, the finished ones paid twice, the batch read again for hours and never counted (a review).
    ({"completed": 3, "failed": 0, "total": 3}, 2, 1, True),
    ({"completed": 2, "failed": 1, "total": 3}, 2, 1, True),  # as OpenAI counts
    ({"completed": 3, "failed": 0, "total": 3}, 2, 0, False),  # the output cut short: read again
    ({"completed": 2, "failed": 1, "total": 3}, 1, 1, False),
    ({"completed": 0, "failed": 1, "total": 3}, None, 1, True),  # no output file, none completed: nothing was cut
    # Completed members, yet no output file named: an older view of the batch (test_money_hunt), read again. Taken
    # for one that wrote nothing (as before), its billed members went again, paid twice.
    ({"completed": 2, "failed": 0, "total": 3}, None, 1, False),
])
def test_an_openai_results_read_is_whole_when_its_lines_are_all_the_batch_has(emu, counts, output, errors,  # noqa: F811
                                                                               whole):
    jobs = [job_of(req(i, "openai")) for i in range(3)]
    files = {"out": [_answer(j.key) for j in jobs[:output or 0]],
             "err": [_refusal(j.key) for j in jobs[output or 0:(output or 0) + errors]]}

    async def go():
        p = direct(emu, "openai")
        try:
            async def lines(file_id):  # the results files as read (streamed: ``_lines``)
                return jsonl_records("".join(json.dumps(x) + "\n" for x in files[file_id])) if file_id else ([], [])
            p._lines = lines
            p.poll = lambda handle: asyncio.sleep(0)  # a fresh read of the batch gives the same view
            handle = BatchHandle("batch_x", jobs, None)
            handle.batch = SimpleNamespace(id="batch_x", status="completed", endpoint="/v1/chat/completions", errors=None,
                                           output_file_id="out" if output is not None else None,
                                           error_file_id="err" if errors else None,
                                           request_counts=SimpleNamespace(**counts))
            return await p.fetch(handle)
        finally:
            await p.close()
    if not whole:
        # (no output file named: the fetch reads the batch again first, and fails while no view names it)
        with pytest.raises(ProviderError, match="the read was cut short|no view of it names its output file"):
            asyncio.run(go())
        return
    out = asyncio.run(go())
    assert [out[j.key].ok for j in jobs if j.key in out] == [True] * (output or 0) + [False] * errors
