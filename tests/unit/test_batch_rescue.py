"""A ``batch`` run cut off by a crash: what its journal beside the output file names is read back before a resume
sends anything (``engine.app._batch_rescue``). The crash is the dispatcher's tasks cancelled and its journal's
lock dropped, as a killed process's is; its provider batch runs on at the emulator."""

from __future__ import annotations

import asyncio
import os

import pytest

from actors._file_journal import ARCHIVE, engine_dirs, read_spaces
from engine.app._batch_rescue import journal_dir, kept_answers, prepare, rescue
from engine.core.errors import ConfigError
from engine.core.provider_api import Secret

from .test_http_providers import KEY, SPEED, Rig, batch_key, emu, jobs_of  # noqa: F401  (emu: the fixture)

FAR = 1e9  # a hedge that never comes: the batch runs until it ends or is cancelled


def _crash(rig: Rig) -> None:
    for t in [*rig.d._tasks, *rig.d._journal_retries, *rig.d._sync_journal.retries, *rig.d._files.tasks]:
        t.cancel()
    os.close(rig.d.journal._lock)  # the process is gone, and the kernel drops its lock


def _billed(emu) -> dict[str, float]:  # noqa: F811
    items = [i for i in emu.bill().items if i.custom_id is not None]
    ids = [i.custom_id for i in items]
    assert len(ids) == len(set(ids)), f"a member was billed twice: {ids}"
    return {i.custom_id: i.cost_usd for i in items}


def _records(root) -> dict[str, dict]:
    return {s: r for d in engine_dirs(root) for s, r in read_spaces(d).items()}


def _journaled(rig: Rig) -> bool:
    return any(rec[4] is not None for rec in _records(rig.settings.journal.dir).get("batches:openai", {}).values())


def _crashed_after(emu, root, jobs, until, what: str) -> Rig:  # noqa: F811
    """A dispatcher journaling under ``root`` sends ``jobs`` in one provider batch, and crashes once
    ``until(rig)`` holds."""
    async def go():
        rig = Rig(emu, "openai", journal={"dir": str(root)})
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=FAR)
            await rig.until(lambda: until(rig), what)
            _crash(rig)
        finally:
            await rig.close()
        return rig
    return asyncio.run(go())


def test_a_batch_under_way_at_the_crash_is_cancelled_and_its_finished_members_answered(emu, tmp_path):  # noqa: F811
    out = tmp_path / "out.jsonl"
    root = journal_dir(out)
    jobs = jobs_of("openai", claims=True)

    # (its id journaled too: a slow create's reply comes late)
    rig = _crashed_after(emu, root, jobs, lambda rig: _billed(emu) and _journaled(rig),
                         "a first member to finish at the provider, and the batch's id in the journal")
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):  # a rerun that would pay again is refused
        prepare(out, rig.settings, rig.catalog, [j.req for j in jobs], resume=False, overwrite=False, address=None,
                speedup=SPEED)
    got = rescue(root, rig.settings, rig.catalog, {"openai": Secret(KEY)}, speedup=SPEED, say=lambda m: None)
    billed = _billed(emu)
    assert got.batches == 1 and got.lost_batches == 0 and got.results
    by_key = {batch_key(j): j.req.id for j in jobs}
    assert {by_key[k] for k in billed} == set(got.results)  # every member billed is answered, and none other
    for r in got.results.values():
        assert r.status == "ok" and r.mode == "batch_api" and r.real and r.output and r.deadline_met
    assert sum(r.cost_usd for r in got.results.values()) == pytest.approx(sum(billed.values()), abs=1e-12)
    cancels = emu.count("batches.cancel")
    assert cancels <= 1 and (cancels == 1 or len(billed) == len(jobs))  # cancelled once, unless it had ended
    # What was read is kept whole, in one answers file, until the resume writes its output; the rest is gone.
    assert [p.name.startswith("answers.rescued-") for p in root.iterdir()] == [True]
    assert set(kept_answers(root)) == set(got.results)
    assert emu.files("batch") == {}  # the dead run's input file (its prompts) deleted once its batch was read


def test_a_batch_that_ended_before_the_crash_is_read_from_its_archived_record(emu, tmp_path):  # noqa: F811
    """The batch ended and its results reached the result hub, which cleared its record, and then the driver
    died before the answers reached the output file: the archived record still names it."""
    root = tmp_path / "j"
    jobs = jobs_of("openai", claims=True)

    ids = {j.req.id for j in jobs}
    rig = _crashed_after(emu, root, jobs, lambda rig: ids <= set(rig.results) and _records(root).get(
        ARCHIVE + "batches:openai"), "every member answered, and the batch's record archived")
    assert _records(root)["batches:openai"] == {}
    cancels = emu.count("batches.cancel")
    wanted = {jobs[0].req.id, jobs[2].req.id}  # the others are in the output file already
    got = rescue(root, rig.settings, rig.catalog, {"openai": Secret(KEY)}, speedup=SPEED, wanted=wanted,
                 say=lambda m: None)
    assert set(got.results) == wanted and got.lost_batches == 0
    assert emu.count("batches.cancel") == cancels  # an ended batch is read, not cancelled
    assert len(_billed(emu)) == len(jobs)  # nothing sent, nothing billed again


def test_a_batch_the_rescue_cannot_read_keeps_the_journal_and_is_refused(emu, tmp_path):  # noqa: F811
    """The provider unreachable during the resume: the batch was counted lost, the journal deleted, its lines
    sent again, and the next resume paid for what it finished twice (a helper's review)."""
    root = tmp_path / "j"
    jobs = jobs_of("openai", claims=True)

    rig = _crashed_after(emu, root, jobs, _journaled, "the batch journaled")
    before = {s: sorted(r) for s, r in _records(root).items()}
    gone = rig.settings.model_copy(update={"providers": rig.settings.providers.model_copy(update={
        "endpoints": {n: ep.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})
                      for n, ep in rig.settings.providers.endpoints.items()}})})
    with pytest.raises(ConfigError, match="could not be read.*nothing of its journal"):
        rescue(root, gone, rig.catalog, {"openai": Secret(KEY)}, speedup=SPEED, say=lambda m: None)
    assert {s: sorted(r) for s, r in _records(root).items()} == before  # nothing removed: the next resume reads it
    got = rescue(root, rig.settings, rig.catalog, {"openai": Secret(KEY)}, speedup=SPEED, say=lambda m: None)
    assert got.batches == 1 and set(got.results) <= {j.req.id for j in jobs}
