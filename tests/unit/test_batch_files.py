"""What an ended provider batch leaves at the provider (``actors._batch_files``): OpenAI's input file is deleted
once the batch's results are read, best effort; its output file stays for a resume or a take-back."""

from __future__ import annotations

import asyncio

import pytest

import actors._batch_files as batch_files
from actors._file_journal import ARCHIVE
from engine.app._batch_rescue import rescue
from engine.core.provider_api import Secret

from .test_batch_rescue import FAR, _billed, _crashed_after, _records
from .test_http_providers import (  # noqa: F401  (emu: the fixture)
    KEY,
    SPEED,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
)


async def _deletes_done(rig: Rig, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while rig.d._files.tasks:
            await asyncio.wait(list(rig.d._files.tasks))


async def _two_batches(rig: Rig, emu) -> list:  # noqa: F811
    jobs = jobs_of("openai", n=6, claims=True)
    await rig.reserve(jobs)
    await rig.run("batch_api", jobs[:3], hedge_at=FAR, bid="b1")
    await rig.run("batch_api", jobs[3:], hedge_at=FAR, bid="b2")
    await rig.resolved(jobs)
    return jobs


def _answered_once(rig: Rig, emu, jobs) -> None:  # noqa: F811
    assert rig.grouper.readmitted() == []  # nothing went again
    billed = billed_by_custom_id(emu)  # (and nothing billed twice)
    assert set(billed) == {batch_key(j) for j in jobs}
    for j in jobs:
        assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "openai")


def test_every_batchs_input_file_is_deleted_once_read_and_its_output_stays(emu):  # noqa: F811
    async def go():
        rig = Rig(emu, "openai")
        try:
            jobs = await _two_batches(rig, emu)
            await _deletes_done(rig)
            _answered_once(rig, emu, jobs)
            assert emu.count("batches.create", status=200) == 2
            assert emu.files("batch") == {}, "an input file (the prompts) was left at the provider"
            assert emu.count("files.delete", status=200) == 2
            assert len(emu.files("batch_output")) == 2  # a resume may read them again (docs/providers.md)
            assert (await rig.d.stats())["files_deleted"] == 2
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_delete_that_keeps_failing_changes_nothing_for_the_members(emu, monkeypatch):  # noqa: F811
    monkeypatch.setattr(batch_files, "RETRY_S", 0.01)
    emu.faults.script("openai", "files.delete", [{"status": 500}] * (2 * batch_files.DISCARD_TRIES))

    async def go():
        rig = Rig(emu, "openai")
        try:
            jobs = await _two_batches(rig, emu)
            await _deletes_done(rig)
            _answered_once(rig, emu, jobs)
            assert emu.count("files.delete", status=500) == 2 * batch_files.DISCARD_TRIES  # tried, then given up
            assert len(emu.files("batch")) == 2
            stats = await rig.d.stats()
            assert stats["files_deleted"] == 0 and stats["files_undeleted"] == 2
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_delete_that_never_answers_does_not_hold_the_members(emu):  # noqa: F811
    async def go():
        rig = Rig(emu, "openai")
        held = asyncio.Event()

        async def hung(handle):
            held.set()
            await asyncio.Event().wait()

        rig.d.provider.discard = hung
        try:
            jobs = await _two_batches(rig, emu)  # every member answered while both deletes hang
            _answered_once(rig, emu, jobs)
            assert held.is_set() and rig.d._files.tasks
        finally:
            for t in rig.d._files.tasks:
                t.cancel()
            await rig.close()
    asyncio.run(go())


def test_a_take_back_reads_an_ended_batchs_output_after_its_input_file_was_deleted(emu, tmp_path):  # noqa: F811
    """The batch ended, its input file was deleted, and the driver died before its answers were written: the
    archived record's batch is read again from its output file, which the engine left."""
    root = tmp_path / "j"
    jobs = jobs_of("openai", claims=True)
    ids = {j.req.id for j in jobs}
    rig = _crashed_after(emu, root, jobs, lambda rig: ids <= set(rig.results) and _records(root).get(
        ARCHIVE + "batches:openai") and not emu.files("batch"), "every member answered, archived, input deleted")
    deleted = emu.count("files.delete", status=200)
    assert deleted == 1
    got = rescue(root, rig.settings, rig.catalog, {"openai": Secret(KEY)}, speedup=SPEED, wanted=ids,
                 say=lambda m: None)
    assert set(got.results) == ids and got.lost_batches == 0
    assert len(_billed(emu)) == len(jobs)  # read, not sent again
    assert emu.count("files.delete", status=200) == deleted  # (asked again: already gone, a 404)


def test_anthropic_batches_are_not_deleted(emu):  # noqa: F811
    """A Message Batch deleted takes its results with it, which a resume reads again: left to the provider."""
    async def go():
        rig = Rig(emu, "anthropic")
        try:
            jobs = jobs_of("anthropic", claims=True)
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=FAR)
            await rig.resolved(jobs)
            await _deletes_done(rig)
            assert (await rig.d.stats())["files_deleted"] == 0
            assert not any(c.method == "DELETE" for c in emu.calls)
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("route", ["files.delete"])
def test_the_emulator_deletes_a_file_once_and_404s_after(emu, route):  # noqa: F811
    import openai

    c = openai.OpenAI(base_url=emu.base_url("openai"), api_key="k", max_retries=0)
    f = c.files.create(file=("x.jsonl", b"{}\n", "application/jsonl"), purpose="batch")
    assert c.files.delete(f.id).deleted is True
    assert emu.files() == {}
    with pytest.raises(openai.NotFoundError):
        c.files.delete(f.id)
    assert emu.count(route, status=200) == 1 and emu.count(route, status=404) == 1


@pytest.mark.parametrize("status, deleted", [(400, 1), (429, 1), (500, 0)])
def test_the_upload_of_a_refused_batch_create_is_deleted_but_not_one_a_5xx_may_have_used(emu, status, deleted):  # noqa: F811
    """A create refused (4xx) made no batch: the create made again uploads anew, so each refusal left a file of
    prompts behind. A 5xx may have made the batch (the lookup follows it): its upload stays."""
    from engine.core.errors import ProviderError
    from engine.core.provider_api import CallJob, call_key

    from .test_http_providers import direct, req

    emu.faults.script("openai", "batches.create", [{"status": status}])

    async def go():
        p = direct(emu, "openai")
        jobs = [CallJob(call_key(r.tenant, r.id, r.model, 0), r, 0.0, 0, 0) for r in (req(0), req(1))]
        try:
            with pytest.raises(ProviderError):
                await p.submit_batch(jobs, None, "ref-1")
        finally:
            await p.close()  # lets a delete under way finish
        assert emu.count("files.create", status=200) == 1
        assert emu.count("files.delete", status=200) == deleted
        assert len(emu.files("batch")) == 1 - deleted
    asyncio.run(go())


def test_the_engines_stop_waits_for_the_deletes_under_way_a_bounded_time(emu, monkeypatch):  # noqa: F811
    """A batch ended and was read just before the engine stopped: its delete ran in the background, and the stop
    (``Dispatcher.stop_spending``, then the actor killed) cut it; the batch left the journal when it ended, so
    no later start knew of the file, and its prompts stayed at the provider for 30 days (a fault hunt). The stop
    waits for the deletes under way, up to ``STOP_WAIT_S``; one that never answers holds it no longer."""
    async def go():
        rig = Rig(emu, "openai")
        inner, slow, held = rig.d.provider.discard, asyncio.Event(), asyncio.Event()

        async def late(handle):  # the delete is slower than the stop's call
            held.set()
            await slow.wait()
            return await inner(handle)

        rig.d.provider.discard = late
        try:
            await _two_batches(rig, emu)
            await held.wait()
            asyncio.get_running_loop().call_later(0.2, slow.set)
            assert await rig.d.stop_spending() == (0, 0, 0)
            assert emu.files("batch") == {} and (await rig.d.stats())["files_deleted"] == 2
        finally:
            await rig.close()
    asyncio.run(go())

    async def hung():
        rig = Rig(emu, "openai")
        monkeypatch.setattr(batch_files, "STOP_WAIT_S", 0.2)

        async def never(handle):
            await asyncio.Event().wait()

        rig.d.provider.discard = never
        try:
            await _two_batches(rig, emu)
            async with asyncio.timeout(5.0):
                assert await rig.d.stop_spending() == (0, 0, 0)
        finally:
            for t in rig.d._files.tasks:
                t.cancel()
            await rig.close()
    asyncio.run(hung())
