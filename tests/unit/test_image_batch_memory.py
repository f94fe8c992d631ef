"""The memory an image batch's results take in a dispatcher: an image's results line holds it in base64 (1-2 MB),
and a batch of the provider's 50,000 members, read whole, held ~75 GB in one actor. An image dispatch goes as
batches of at most ``batch_results_max_mb`` over an image line's bound (``results_cap``), and a dispatcher reads one
image batch's results at a time, handing them on before the next (``_results_slot``). Text is not cut by it."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from actors._batch_parts import file_parts, image_line_mb, results_cap
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
    """A dispatcher whose image batches hold at most ``cap`` members (the setting at ``cap`` image lines)."""
    mb = cap * image_line_mb(CAT.model("openai", "gpt-image-2")) + 0.5
    rig = Rig(emu, "openai", batch_results_max_mb=mb)
    assert results_cap(rig.catalog.model("openai", "gpt-image-2"), rig.settings.batch_results_max_mb) == cap
    return rig


def test_the_default_bound_is_512_mib_over_a_6_mib_image_line():
    """gpt-image-2's largest size, 1536x1024, at 4 bytes a pixel (RGB stored, in base64): 6 MiB, so 85 a batch."""
    model = CAT.model("openai", "gpt-image-2")
    assert image_line_mb(model) == 1536 * 1024 * 4 / 2**20 == 6.0
    assert results_cap(model, Settings().batch_results_max_mb) == 85
    assert results_cap(model, 1.0) == 1  # never 0: a line alone is a batch alone


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
    assert results_cap(rig.catalog.model("openai", text[0].req.model), 1e-3) is None
    limit = rig.catalog.provider("openai").batch_api.max_file_mb
    assert rig.d._file_parts(text) == file_parts(text, limit, rig.settings.chars_per_token) == [text]

    async def slots():
        async with rig.d._results_slot(five_images()):
            assert rig.d._image_reads.locked()
            async with rig.d._results_slot(text):  # text's read passes the held slot
                pass
        assert not rig.d._image_reads.locked()
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
            await rig.resolved(jobs)
            assert len(rig.results) == len(jobs) and not rig.grouper.readmitted()
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs} and len(emu.bill().items) == len(jobs)
            assert emu.count("images.generations") == 0
            await rig.settled_to(emu.bill().total_usd)
        finally:
            stalled.set()
            await rig.close()
    asyncio.run(go())
