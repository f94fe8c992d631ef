"""A dispatcher keeps its finished requests for a while, to answer a re-admission after a restart with the
result rather than make the request again (``Dispatcher.recall``). It kept their outputs with no bound on bytes,
and an image's output is a base64 image (a review: a dispatch of images read batch after batch kept gigabytes).
Only the newest ``DONE_OUTPUT_MB`` of outputs are kept now; a request whose output was let go is still known (never
made again, so never paid twice) and is answered again as failed, saying why."""

from __future__ import annotations

import asyncio

import pytest

import actors._dispatch_recovery as recovery
from actors._types import Job
from engine.emulator import Emulator
from tests.unit.test_http_providers import SPEED, Rig
from tests.unit.test_image_batches import CAT, image


def test_a_dispatcher_keeps_only_its_newest_outputs_and_never_makes_one_let_go_again(monkeypatch):
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        async def go():
            rig = Rig(emu, "openai")
            try:
                jobs = [Job(i, image(i, quality="low"), f"fp-img-{i}", claim=f"c{i}") for i in range(4)]
                await rig.reserve(jobs)
                await rig.run("sync", jobs)
                await rig.resolved(jobs)
                first = {j.req.id: rig.results[j.req.id] for j in jobs}
                sizes = [len(first[j.req.id].output) for j in jobs]
                assert all(r.status == "ok" for r in first.values()) and min(sizes) > 0
                # Room for the newest two outputs only: the dispatcher lets the older ones go as the next ends.
                monkeypatch.setattr(recovery, "DONE_OUTPUT_MB", (sizes[2] + sizes[3]) / 2**20)
                d = rig.d
                for j in jobs:  # each ended again in turn, oldest first, as if just finished
                    d._keep_done(j.req.uid, first[j.req.id], 0.0)
                assert d._output_bytes == sum(len(r.output or "") for r, _, _ in d._done.values())
                assert d._output_bytes <= recovery.DONE_OUTPUT_MB * 2**20
                uids = [j.req.uid for j in jobs]
                assert sorted(await d.holds(uids)) == sorted(uids)  # all still known: none is sent again
                calls = emu.count("images.generations")
                assert sorted(await d.recall(uids)) == sorted(uids)  # answered again from what is kept
                assert emu.count("images.generations") == calls  # nothing made again
                for j, n in zip(jobs, sizes):
                    again = d._done[j.req.uid][0]  # what ``recall`` sends again (the hub counts a result once)
                    assert again.cost_usd == pytest.approx(first[j.req.id].cost_usd)
                    if j in jobs[2:]:
                        assert again.status == "ok" and again.output == first[j.req.id].output
                    else:
                        assert again.status == "failed" and again.output is None
                        assert "not made again" in again.error and f"{n:,} characters" in again.error
                await d.forget(uids)
                assert d._output_bytes == 0 and not d._outputs
            finally:
                await rig.close()
        asyncio.run(go())
