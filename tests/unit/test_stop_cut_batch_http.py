"""A stop takes a batch over HTTP whose create has not begun (``actors/_stop_cut_dispatch.py``): journaled before
its first HTTP call (an OpenAI upload, an Anthropic create), the stop's word during that write names its fresh
members and the batch is never uploaded nor created. Before (stop 82's ``cutq82`` left it), the stop named none of
them, and the batch was uploaded and created after the stop's word, its members billed, the endpoint's answer the
final 502. A dispatcher over HTTP at the emulator (``Rig``), its journal write held."""

from __future__ import annotations

import asyncio

import pytest

from engine.core.result import ENGINE_CANCELLED
from tests.unit.test_http_providers import Rig, emu, jobs_of  # noqa: F401  (``emu``: a fixture)
from tests.unit.test_withdraw import _held_once

UPLOAD = {"openai": "files.create", "anthropic": "messages.batches.create"}
CREATE = {"openai": "batches.create", "anthropic": "messages.batches.create"}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_batch_journaled_before_its_create_when_the_stop_comes_is_named_and_never_created(emu, provider):  # noqa: F811
    """Fails on the code before: ``assert [] == [...]`` (nothing named), and the batch was created."""
    jobs = jobs_of(provider, claims=True)

    async def go():
        rig = Rig(emu, provider)
        held, release = _held_once(rig.d.journal, "put")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await asyncio.wait_for(held.wait(), 10.0)
            named = await rig.d.cut_at_stop()
            assert sorted(named) == sorted(j.req.uid for j in jobs)
            release.set()
            await rig.until(lambda: len(rig.results) == len(jobs), "every answer")
            assert all(r.status == "failed" and r.error == ENGINE_CANCELLED and r.cost_usd == 0.0
                       for r in rig.results.values()), rig.results
            assert emu.count(UPLOAD[provider]) == 0 and emu.count(CREATE[provider]) == 0 and emu.bill().items == ()
            assert rig.grouper.readmitted() == []
            await rig.settled_to(0.0)  # (every claim let go at 0, nothing under way, its journal record gone)
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())
