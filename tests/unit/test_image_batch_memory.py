"""The memory an image batch's results take in a dispatcher: an image's results line holds it in base64 (1-2 MB),
and a batch of the provider's 50,000 members, read whole, held ~75 GB in one actor. An image dispatch goes as
batches whose lines' bounds sum to at most ``batch_results_max_mb`` (``results_parts``), and a dispatcher reads one
image batch's results at a time, handing them on before the next (``_results_slot``). Text is not cut by it."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from actors._batch_parts import file_parts, image_line_bytes, results_parts
from actors._types import Job
from engine.core.settings import Settings
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    CAT,
    VALIDATING_S,
    Rig,
    T,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
)
from tests.unit.test_image_batches import IMAGES, assert_image_member, image

SHAPES = [("1024x1024", "low"), ("1536x1024", "high"), ("1024x1536", "medium"), ("1024x1024", "high"),
          ("1536x1024", "low")]


def five_images() -> list[Job]:
    return [Job(i, image(i, size=s, quality=q), f"fp-img-{i}", claim=f"c{i}") for i, (s, q) in enumerate(SHAPES)]


def capped_rig(emu: Any, cap: int) -> Rig:  # noqa: F811
    """A dispatcher whose image batches hold ``cap`` of ``five_images`` (the setting at ``cap`` of the model's
    largest lines, and a little more: a small image and a large one fit, a third does not)."""
    mb = (cap * image_line_bytes(CAT.model("openai", "gpt-image-2")) + 2**19) / 2**20
    rig = Rig(emu, "openai", batch_results_max_mb=mb)
    assert [len(p) for p in rig.d._file_parts(five_images())] == [cap] * (5 // cap) + [5 % cap] * (5 % cap > 0)
    return rig


async def all_answered_from_their_batches(rig: Rig, emu: Any, jobs: list[Job]) -> None:  # noqa: F811
    """Once a stalled read lets go: every member answered once, none sent back, each billed once in its batch and
    none made by a sync call, and the budget settled to the emulator's bill."""
    await rig.resolved(jobs)
    assert len(rig.results) == len(jobs) and not rig.grouper.readmitted()
    billed = billed_by_custom_id(emu)
    assert set(billed) == {batch_key(j) for j in jobs} and len(emu.bill().items) == len(jobs)
    assert emu.count("images.generations") == 0
    await rig.settled_to(emu.bill().total_usd)


def test_the_default_bound_is_512_mib_over_each_image_lines_own_bound():
    """An image dispatch is cut by its lines' bounds: gpt-image-2's largest size, 1536x1024, as a png stored
    uncompressed (4 bytes a pixel of RGBA, in base64: over 8 MiB) fits 62 to a batch; 1024x1024 ones fit 93."""
    model = CAT.model("openai", "gpt-image-2")
    assert 8 * 2**20 < image_line_bytes(model) < 8.3 * 2**20
    max_mb = Settings().batch_results_max_mb
    assert max_mb == 512.0
    for size, fit in (("1536x1024", 62), ("1024x1536", 62), ("1024x1024", 93)):
        jobs = [Job(i, image(i, size=size), f"fp-{i}", claim=f"c{i}") for i in range(200)]
        parts = results_parts([jobs], lambda j: image_line_bytes(model, j.req), max_mb)
        assert [len(p) for p in parts] == [fit] * (200 // fit) + [200 % fit], size
    one = [Job(0, image(0), "fp-0", claim="c0")]
    assert results_parts([one], lambda j: image_line_bytes(model, j.req), 1.0) == [one]  # a line alone: a part alone


def test_an_image_dispatch_goes_as_batches_of_at_most_the_cap_each_member_billed_once_at_the_batch_price(emu):  # noqa: F811
    jobs, cap = five_images(), 2

    async def go():
        rig = capped_rig(emu, cap)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            batches = list(emu._core.batches.values())
            assert len(batches) == math.ceil(len(jobs) / cap) == 3
            assert sorted(len(b.members) for b in batches) == [1, cap, cap]
            assert all(b.endpoint == IMAGES for b in batches)
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs} and len(emu.bill().items) == len(jobs)
            for j in jobs:
                assert_image_member(rig.results[j.req.id], j, billed[batch_key(j)])
            assert emu.count("images.generations") == 0  # nothing went sync
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_image_batches_ending_together_are_read_one_at_a_time_each_handed_on_before_the_next(emu):  # noqa: F811
    """Three image batches end together: each read waits (bounded) until all three have polled ended, so reads
    not held one at a time overlap; with the slot, each starts after the last one's members were handed on."""
    jobs, cap = five_images(), 2
    n_parts = math.ceil(len(jobs) / cap)

    async def go():
        rig = capped_rig(emu, cap)
        p, d = rig.d.provider, rig.d
        poll, fetch, attempt = p.poll, p.fetch, d._attempt
        ended: set[str] = set()
        all_ended = asyncio.Event()
        reading: list[str] = []
        peak, seen = [0], []  # (members handed on, members read) as each read began
        handed: list[str] = []
        read = [0]

        async def polled(handle):
            st = await poll(handle)
            if st.status == "ended":
                ended.add(handle.id)
                if len(ended) == n_parts:
                    all_ended.set()
            return st

        async def fetched(handle):
            reading.append(handle.id)
            peak[0] = max(peak[0], len(reading))
            seen.append((len(handed), read[0]))
            try:
                await asyncio.wait_for(all_ended.wait(), 30.0)  # a bound: every batch polls ended
                out = await fetch(handle)
                read[0] += len(out)
                return out
            finally:
                reading.remove(handle.id)

        def attempted(b, j, *a, **kw):
            handed.append(j.req.id)
            return attempt(b, j, *a, **kw)

        p.poll, p.fetch, d._attempt = polled, fetched, attempted  # instance attributes shadow the methods
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert len(emu._core.batches) == n_parts and len(seen) == n_parts
            assert peak[0] == 1, f"{peak[0]} image batches' results were read at once"
            assert all(h == r for h, r in seen) and [r for _, r in seen][0] == 0 and read[0] == len(jobs)
            assert sorted(handed) == sorted(j.req.id for j in jobs)
            for j in jobs:
                assert rig.results[j.req.id].status == "ok"
        finally:
            await rig.close()
    asyncio.run(go())


def test_text_batches_are_cut_as_before_and_read_freely(emu):  # noqa: F811
    """A text dispatch's parts are ``file_parts``'s alone, however small the image bound; its reads take no slot."""
    rig = Rig(emu, "openai", batch_results_max_mb=1e-3)
    text = jobs_of("openai", 7)
    assert rig.d._line_bytes(text[0]) is None
    limit = rig.catalog.provider("openai").batch_api.max_file_mb
    assert rig.d._file_parts(text) == file_parts(text, limit, rig.settings.chars_per_token) == [text]

    async def slots():
        async with rig.d._results_slot(five_images()):
            assert rig.d._image_reads.slot
            async with rig.d._results_slot(text):  # text's read passes the held slot
                pass
        assert not rig.d._image_reads.slot
    asyncio.run(asyncio.wait_for(slots(), 5.0))  # a bound
    asyncio.run(rig.close())


def test_a_hung_image_read_holds_no_other_image_batch_past_its_hedge(emu):  # noqa: F811
    """Two image batches end; the first one's results read hangs (a stalled download). The other waits for the
    slot no later than its hedge, then reads and hands its members on: before, it waited behind the hung read
    for as long as it hung, its finished members past their deadlines (a review)."""
    jobs, cap = five_images()[:4], 2

    async def go():
        rig = capped_rig(emu, cap)
        p = rig.d.provider
        fetch, stalled, first = p.fetch, asyncio.Event(), []

        async def fetched(handle):
            if not first:  # the first read stalls until the test lets it go
                first.append(handle.id)
                await asyncio.wait_for(stalled.wait(), 30.0)  # a bound
            return await fetch(handle)

        p.fetch = fetched  # an instance attribute shadows the method
        try:
            await rig.reserve(jobs)
            # Every member is done within T; the hedge 2 T later, well after both batches ended.
            await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 3 * T)
            await rig.until(lambda: len(rig.results) == cap, "the other batch's members, by its hedge")
            assert len(first) == 1 and not rig.grouper.readmitted()
            stalled.set()
            await all_answered_from_their_batches(rig, emu, jobs)
        finally:
            stalled.set()
            await rig.close()
    asyncio.run(go())
