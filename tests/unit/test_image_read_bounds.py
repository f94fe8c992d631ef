"""The two bounds on the memory an image batch's results take in a dispatcher. An image's results line must weigh
at most its bound (``image_line_bytes``), so a batch cut by those bounds holds at most ``batch_results_max_mb``:
a transparent png that does not compress is its raw RGBA, 4 bytes a pixel, and the bound was 3 (85 such lines
held ~680 MiB). And while one batch's read stalls, the batches past their hedges that read beside it share one
batch's worth more (``ResultsRoom``), not one each."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import struct
import zlib
from typing import Any

from actors._batch_parts import image_line_bytes
from actors._types import Job
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    CAT,
    VALIDATING_S,
    Rig,
    T,
    batch_key,
    billed_by_custom_id,
    emu,
)
from tests.unit.test_image_batch_memory import all_answered_from_their_batches, capped_rig, five_images
from tests.unit.test_image_batches import image

W, H = 1536, 1024
TRANSPARENT = {"background": "transparent", "output_format": "png", "quality": "high", "size": f"{W}x{H}"}


def transparent(i: int) -> Job:
    return Job(i, image(i, size=f"{W}x{H}", quality="high", body=dict(TRANSPARENT)), f"fp-t{i}", claim=f"c{i}")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def worst_line() -> bytes:
    """The results line of a transparent 1536x1024 png whose pixels do not compress (noise in four channels),
    written as an encoder does (8-bit RGBA, a filter byte a row, zlib at its default level) and as OpenAI's
    output file holds it."""
    rows = os.urandom(H * (W * 4 + 1))  # (the filter bytes random too: deflate sees no pattern)
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 6, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(rows, 6)) + _chunk(b"IEND", b""))
    body = {"created": 1765000000, "background": "transparent", "output_format": "png", "quality": "high",
            "size": f"{W}x{H}", "data": [{"b64_json": base64.b64encode(png).decode()}],
            "usage": {"input_tokens": 12, "output_tokens": 6240, "total_tokens": 6252,
                      "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}}}
    line = {"id": "batch_req_" + "0" * 32, "custom_id": "sb-" + "f" * 40,
            "response": {"status_code": 200, "request_id": "req_" + "0" * 32, "body": body}, "error": None}
    return json.dumps(line).encode() + b"\n"


def test_a_transparent_png_that_does_not_compress_fits_its_lines_bound():
    """It weighs more than 4 bytes a pixel in base64 (the bound before: 6 MiB at 1536x1024), and at most its own."""
    model = CAT.model("openai", "gpt-image-2")
    line = len(worst_line())
    assert line > W * H * 4 * 4 / 3  # the raw RGBA in base64: 8 MiB
    assert line <= image_line_bytes(model, transparent(0).req)
    assert line <= image_line_bytes(model)  # a request that names no size or format: the model's largest png


def test_a_dispatch_of_transparent_pngs_is_cut_so_each_batchs_results_fit_the_setting(emu):  # noqa: F811
    """At the default 512 MiB, no batch of such images may hold more than that (85 of them held ~680 MiB)."""
    rig = Rig(emu, "openai")
    try:
        jobs = [transparent(i) for i in range(200)]
        parts = rig.d._file_parts(jobs)
        assert [j for p in parts for j in p] == jobs
        limit = rig.settings.batch_results_max_mb * 2**20
        heaviest = max(len(p) for p in parts) * len(worst_line())
        assert heaviest <= limit, f"a batch's results may hold {heaviest / 2**20:.0f} MiB, over {limit / 2**20:g}"
    finally:
        asyncio.run(rig.close())


async def yielded(rounds: int = 50) -> None:
    """Let every task that is ready run: the room's waits are futures, not timers, so this is no sleep."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_batches_past_their_hedges_share_one_batchs_worth_beside_a_stalled_read(emu):  # noqa: F811
    """One batch's read holds the slot and stalls. Four batches are past their hedges: one reads beside it (the
    spare holds one batch's worth), the others wait and read one after another as room frees; a batch before its
    hedge waits for the slot alone. Before, every batch past its hedge read at once: memory without a bound."""
    cap = 2

    async def go():
        rig = capped_rig(emu, cap)
        d, room = rig.d, rig.d._image_reads
        bound = rig.settings.batch_results_max_mb * 2**20
        batches = [[transparent(2 * k), transparent(2 * k + 1)] for k in range(6)]
        model = rig.catalog.model("openai", "gpt-image-2")
        weight = [sum(image_line_bytes(model, j.req) for j in b) for b in batches]
        assert all(w <= bound < 2 * w for w in weight)  # the spare holds one such batch, not two
        entered = [asyncio.Event() for _ in batches]
        leave = [asyncio.Event() for _ in batches]
        inside: set[int] = set()
        peak = [0]

        async def read(k: int, until: float | None) -> None:
            async with d._results_slot(batches[k], until):
                inside.add(k)
                peak[0] = max(peak[0], sum(weight[i] for i in inside))
                entered[k].set()
                await leave[k].wait()
                inside.discard(k)

        now = rig.clock.now()
        past, later = now - 1.0, now + 1e6
        tasks = [asyncio.create_task(read(0, later))]  # the stalled read, in the slot
        await entered[0].wait()
        tasks += [asyncio.create_task(read(k, past)) for k in (1, 2, 3, 4)]
        tasks.append(asyncio.create_task(read(5, later)))  # before its hedge
        await yielded()
        assert len(inside) == 2 and 0 in inside, f"batches {sorted(inside)} read at once beside the stalled one"
        assert room.waiting == 4 and room.spare_used <= room.spare
        for _ in range(3):  # each read beside the stalled one ends; one waiter takes its room
            (k,) = inside - {0}
            leave[k].set()
            await yielded()
            assert k not in inside and len(inside) == 2 and 5 not in inside
        leave[0].set()  # the stall ends; the batch before its hedge takes the slot
        await asyncio.wait_for(entered[5].wait(), 5.0)  # a bound
        for e in leave:
            e.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)  # a bound
        assert all(e.is_set() for e in entered) and peak[0] <= 2 * bound
        assert not room.slot and room.spare_used == 0 and room.waiting == 0
        await rig.close()
    asyncio.run(go())


def test_a_stalled_read_holds_no_batch_past_its_hedge_and_nothing_is_lost_or_paid_twice(emu):  # noqa: F811
    """Three image batches end; the first one's read hangs. The two others read by their hedges one after another
    within the spare, never three reads at once; every member billed once, nothing sent sync."""
    jobs, cap = five_images(), 2

    async def go():
        rig = capped_rig(emu, cap)
        p = rig.d.provider
        fetch, stalled, first = p.fetch, asyncio.Event(), []
        reading, peak = [0], [0]

        async def fetched(handle: Any):
            reading[0] += 1
            peak[0] = max(peak[0], reading[0])
            try:
                if not first:  # the first read stalls until the test lets it go
                    first.append(handle.id)
                    await asyncio.wait_for(stalled.wait(), 30.0)  # a bound
                return await fetch(handle)
            finally:
                reading[0] -= 1

        p.fetch = fetched  # an instance attribute shadows the method
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 3 * T)

            def others_in() -> bool:  # every member but the stalled batch's (open while it stalls) is answered
                held = [len(rec[1]) for rec in rig.d._open.values() if getattr(rec[4], "id", None) in first]
                return bool(held) and len(rig.results) == len(jobs) - held[0]

            await rig.until(others_in, "the other batches' members, by their hedges")
            assert len(first) == 1 and not rig.grouper.readmitted() and peak[0] <= 2
            stalled.set()
            await all_answered_from_their_batches(rig, emu, jobs)
        finally:
            stalled.set()
            await rig.close()
    asyncio.run(go())
