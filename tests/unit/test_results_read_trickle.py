"""A batch's results read whose server trickles: a byte just inside the endpoint's ``timeout_s`` between chunks
keeps each try alive for the file's length times that (hours for a real file). Each try is bounded by the file's
size at a floor rate (``batch_results_min_kib_s``), then made again (the file stays at the provider: reading it
again is free); its members are never sent again (paid twice). Reads that keep failing past
``batch_results_read_max_s`` after the batch's hedge fail every member, possibly billed at its bound, with an error
naming the batch and its results file."""

from __future__ import annotations

import asyncio
import re

import pytest

from actors._batch_parts import image_line_bytes
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
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
    batch, its answers' caps at 6 bytes a character, also 512 MiB at most (text is not cut by it, the time is)."""
    rig = Rig(emu, "openai")
    try:
        d, s = rig.d, rig.settings
        assert s.batch_results_min_kib_s == 64.0 and s.batch_results_read_max_s == 3600.0
        calls = 3 * s.providers.endpoints["openai"].timeout_s
        images = [d._call_job(j, 0.0, batch=True) for j in d._file_parts([transparent(i) for i in range(62)])[0]]
        size = sum(image_line_bytes(rig.catalog.model("openai", "gpt-image-2"), cj.req) for cj in images)
        assert size <= 512 * 2**20 and d._read_bound_s(images) == pytest.approx(calls + size / 65536)
        text = [d._call_job(j, 0.0, batch=True) for j in jobs_of("openai", 10_000)]
        assert d._read_bound_s(text) == pytest.approx(calls + 512 * 2**20 / 65536)  # 8,192 s past the timeouts
        one = [d._call_job(j, 0.0, batch=True) for j in jobs_of("openai", 1, max_output_tokens=1000)]
        assert d._read_bound_s(one) == pytest.approx(calls + (6 * 4 * 1000 + 8 * 1024) / 65536)
    finally:
        asyncio.run(rig.close())
