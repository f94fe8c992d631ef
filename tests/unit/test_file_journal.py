"""The journal in files (``journal.dir``): what a dispatcher writes outlives its process, a torn last write loses
only itself, provider batches are archived rather than dropped, and a reader waits for the writers to be gone."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from actors._file_journal import ARCHIVE, FileJournal, engine_dirs, locked_out, read_spaces
from actors.journal import make_journal
from engine.core.settings import Settings


def test_records_outlive_the_writer_and_deletes_stick(tmp_path):
    async def go():
        j = FileJournal(tmp_path, "eng@run1")
        await j.put_many("sync:openai", {"a": (1, [2]), "b": "x"})
        await j.put("sync:openai", "c", {"k": 3})
        await j.delete("sync:openai", ["b", "missing"])
        again = FileJournal(tmp_path, "eng@run1")  # a restarted process: nothing but the files
        assert await again.items("sync:openai") == {"a": (1, [2]), "c": {"k": 3}}
        assert await again.items("never:written") == {}
    asyncio.run(go())
    assert [p.name for p in engine_dirs(tmp_path)] == ["eng@run1"]


def test_a_torn_last_write_loses_only_itself(tmp_path):
    async def go():
        j = FileJournal(tmp_path, "e")
        await j.put("batches:openai", "k1", "first")
        await j.put("batches:openai", "k2", "second")
    asyncio.run(go())
    (log,) = (tmp_path / "e").glob("*.log")
    data = log.read_bytes()
    log.write_bytes(data[:-3])  # killed in the middle of its last write
    assert read_spaces(tmp_path / "e") == {"batches:openai": {"k1": "first"}}


def test_a_provider_batchs_record_is_archived_when_deleted_and_others_are_dropped(tmp_path):
    async def go():
        j = FileJournal(tmp_path, "e")
        await j.put("batches:openai", "b1", ("batch", 1))
        await j.put("sync:openai", "s1", "call")
        await j.delete("batches:openai", ["b1"])
        await j.delete("sync:openai", ["s1"])
        assert await j.items("batches:openai") == {}
    asyncio.run(go())
    spaces = read_spaces(tmp_path / "e")
    assert spaces[ARCHIVE + "batches:openai"]["b1"][1] == ("batch", 1)
    assert spaces["sync:openai"] == {} and ARCHIVE + "sync:openai" not in spaces


def test_a_log_of_mostly_dead_records_is_rewritten_with_the_live_ones(tmp_path):
    async def go():
        j = FileJournal(tmp_path, "e")
        for i in range(300):
            await j.put("sync:x", f"k{i}", i)
            if i % 10:
                await j.delete("sync:x", [f"k{i}"])
        return await j.items("sync:x")
    live = asyncio.run(go())
    assert live == {f"k{i}": i for i in range(0, 300, 10)}
    assert read_spaces(tmp_path / "e")["sync:x"] == live
    (log,) = (tmp_path / "e").glob("*.log")
    assert log.stat().st_size < 300 * 40  # not every frame of 570 writes


def test_a_reader_is_locked_out_while_a_writer_lives(tmp_path):
    j = FileJournal(tmp_path, "e")
    asyncio.run(j.put("batches:openai", "b", 1))
    assert locked_out(tmp_path / "e", 0.2) is None  # the writer (this journal's open lock) still holds it
    os.close(j._lock)  # the writer's process ends: the kernel drops its lock
    fd = locked_out(tmp_path / "e", 0.2)
    assert fd is not None
    os.close(fd)


def test_a_value_that_cannot_be_pickled_fails_the_write_and_leaves_the_record_as_it_was(tmp_path):
    async def go():
        j = FileJournal(tmp_path, "e")
        await j.put("s", "k", "kept")
        with pytest.raises(Exception):
            await j.put("s", "k", lambda: None)
        assert await j.items("s") == {"k": "kept"}
    asyncio.run(go())


def test_journal_dir_takes_the_dispatchers_journal(tmp_path):
    s = Settings(journal={"dir": str(tmp_path)})
    j = make_journal(s, "eng@r", hub=None)
    assert isinstance(j, FileJournal) and j.dir == tmp_path / "eng@r"
    assert j.durable


def test_the_answers_a_killed_run_had_received_are_taken_by_its_resume(tmp_path):
    """A run killed before its end writes no output file: the answers its driver had (sync calls' among them,
    which no provider keeps) are in its journal, one line each as they came, and a resume takes them."""
    import concurrent.futures

    from engine.app._batch_rescue import journal_dir, kept_answers, rescue, watch_answers
    from engine.core.catalog import default_catalog
    from engine.core.result import Result

    root = journal_dir(tmp_path / "out.jsonl")
    root.mkdir()
    settings = Settings(journal={"dir": str(root)})
    futs = [concurrent.futures.Future() for _ in range(4)]
    assert watch_answers(settings, futs) is futs
    futs[0].set_result(Result(id="a", status="ok", output="answer a", cost_usd=0.02, mode="sync", real=True))
    futs[1].set_result(Result(id="b", status="failed", error="boom"))  # failed: sent again
    futs[2].set_result(Result(id="c", status="reused", output="answer c", mode="reuse", hit="exact"))
    # futs[3]: the kill came first
    (log,) = root.glob("answers.*.jsonl")
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"id": "d", "status": "o')  # the kill cut its last write
    got = rescue(root, settings, default_catalog(), {}, wanted={"a", "b", "c", "d"}, say=lambda m: None)
    assert set(got.results) == {"a", "c"} and got.answered == 2
    assert got.results["a"].output == "answer a" and got.results["a"].cost_usd == 0.02
    # Kept, whole, in one file until the run that took them has written its output (a resume killed before
    # that lost them, and the next paid again: a helper's review); the files read are gone.
    (kept,) = root.iterdir()
    assert kept.name.startswith("answers.rescued-") and set(kept_answers(root)) == {"a", "c"}


def test_archived_records_go_after_archive_s(tmp_path, monkeypatch):
    """A service's journal (``serve --state-dir``) archives every batch it ends: kept for ``archive_s`` only."""
    import actors._file_journal as fj

    clock = [1000.0]
    monkeypatch.setattr(fj.time, "time", lambda: clock[0])

    async def go():
        j = FileJournal(tmp_path, "e", archive_s=3600.0)
        for k in range(5):
            await j.put("batches:x", f"b{k}", k)
            await j.delete("batches:x", [f"b{k}"])
            clock[0] += 1000.0  # b0 archived at 1000, b4 at 5000
    asyncio.run(go())
    kept = read_spaces(tmp_path / "e")[ARCHIVE + "batches:x"]
    assert sorted(kept) == ["b1", "b2", "b3", "b4"]  # b0 (at 1000) is more than an hour older than b4 (5000)


def test_a_damaged_record_is_skipped_and_the_records_after_it_stand(tmp_path):
    async def go():
        j = FileJournal(tmp_path, "e")
        for k in range(5):
            await j.put("batches:openai", f"b{k}", ("batch", k))
    asyncio.run(go())
    (log,) = (tmp_path / "e").glob("*.log")
    data = bytearray(log.read_bytes())
    frame = len(data) // 5
    data[frame + 12] ^= 0xFF  # one byte of the second record's pickle
    log.write_bytes(bytes(data))
    assert sorted(read_spaces(tmp_path / "e")["batches:openai"]) == ["b0", "b2", "b3", "b4"]  # before: b0 only


def test_a_writer_restarted_after_a_torn_write_appends_where_readers_can_read_it(tmp_path):
    async def first():
        j = FileJournal(tmp_path, "e")
        await j.put("batches:openai", "b0", 0)
        await j.put("batches:openai", "b1", 1)
    asyncio.run(first())
    (log,) = (tmp_path / "e").glob("*.log")
    log.write_bytes(log.read_bytes()[:-4])  # killed mid-write of b1

    async def restarted():  # a dispatcher Ray restarted: its journal read back, then written to
        j = FileJournal(tmp_path, "e")
        assert await j.items("batches:openai") == {"b0": 0}
        await j.put("batches:openai", "b2", 2)
    asyncio.run(restarted())
    assert read_spaces(tmp_path / "e")["batches:openai"] == {"b0": 0, "b2": 2}  # before: b0 only


def test_a_second_endpoint_on_a_state_dir_in_use_is_refused_before_it_starts_anything(tmp_path, monkeypatch):
    """It started Ray and the engine, and its replica's refusal reached the user 25 s on as "a bug in
    smartbatch" (a helper's hunt). Now serve waits a moment for a killed endpoint's processes, then refuses."""
    import engine.app._endpoint_rescue as er
    from engine.app._endpoint_state import EndpointState
    from engine.core.errors import ConfigError

    monkeypatch.setattr(er, "LOCK_WAIT_S", 0.3)
    said: list[str] = []
    held = EndpointState(tmp_path)
    try:
        with pytest.raises(ConfigError, match="another endpoint uses this directory; give each its own"):
            er._wait_for_the_lock(tmp_path, said.append)
        assert said and "waiting up to" in said[0]
    finally:
        held.close()
    er._wait_for_the_lock(tmp_path, said.append)  # free again: taken at once


def test_a_clean_serve_stop_leaves_only_what_was_under_way(tmp_path):
    """After a stop that drained, the archived ended batches were read at the provider again at each restart
    within the hour, and the start refused while the provider was down (a helper's review)."""
    from engine.app._batch_rescue import pending
    from engine.app._endpoint_rescue import stopped_cleanly

    async def go():
        ended, open_ = FileJournal(tmp_path / "journal", "e@1"), FileJournal(tmp_path / "journal", "e@2")
        await ended.put("batches:openai", "b0", "rec")
        await ended.delete("batches:openai", ["b0"])  # archived
        await open_.put("batches:openai", "b1", "rec")  # still under way (a drain past its limit)
        os.close(ended._lock)
        os.close(open_._lock)
    asyncio.run(go())
    assert pending(tmp_path / "journal") == (2, 1, 0)
    stopped_cleanly(tmp_path)
    assert pending(tmp_path / "journal") == (1, 1, 0)
    assert [d.name for d in engine_dirs(tmp_path / "journal")] == ["e@2"]


def test_a_journaled_batch_of_a_provider_not_called_over_http_now_is_refused_not_read_from_a_simulator(tmp_path):
    """A restart whose catalog or endpoints changed: it failed as "a bug" (AttributeError), or would have read a
    real batch from the simulator (a helper's review)."""
    from actors._types import Job
    from engine.app._batch_rescue import rescue
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError
    from engine.core.request import Request

    job = Job(0, Request.model_validate({"id": "r0", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 10,
                                         "output_tokens": 5}), "fp")

    async def go():
        j = FileJournal(tmp_path, "e@1")
        await j.put("batches:openai", "k", ("batch", [job], 0.0, 0, _Handle(), None))
        os.close(j._lock)
    asyncio.run(go())
    with pytest.raises(ConfigError, match="openai is not called over HTTP in this run"):
        rescue(tmp_path, Settings(), default_catalog(), {}, say=lambda m: None)
    assert pending_records(tmp_path) == 1  # nothing removed


def pending_records(root) -> int:
    from engine.app._batch_rescue import pending

    return pending(root)[0]


class _Handle:  # a journaled provider batch's handle, as far as the rescue reads it
    id = "batch_real"
    jobs: dict = {}


def test_a_resume_waits_for_a_killed_runs_dispatcher_that_had_journaled_nothing_yet(tmp_path, monkeypatch):
    """A dispatcher outlives its killed driver by 1.5-2.3 s (Ray gives each worker a process group of its own,
    stop 83), its grouper still dispatching to it. One that had journaled nothing held nothing: a resume started
    meanwhile found no run to wait for, sent every line again, and what the survivor created next was paid twice.
    Its journal holds the run from the dispatcher's start, so the resume waits for it."""
    from engine.app import _batch_rescue
    from engine.app._batch_rescue import journal_dir, rescue
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError

    root = journal_dir(tmp_path / "out.jsonl")
    settings = Settings(journal={"dir": str(root)})
    survivor = make_journal(settings, "eng@killed", hub=None, holder="dispatcher:openai")  # nothing written yet
    monkeypatch.setattr(_batch_rescue, "WRITERS_GONE_S", 0.0)  # (its bound: 60 real seconds)
    said: list[str] = []
    with pytest.raises(ConfigError, match="still held"):
        rescue(root, settings, default_catalog(), {}, say=said.append)
    assert said == [f"waiting for the processes of the earlier run to end (they hold {survivor.dir})"]
    os.close(survivor._lock)  # its process ends: the kernel drops its lock
    got = rescue(root, settings, default_catalog(), {}, say=said.append)
    assert (got.batches, got.cut_calls, len(said)) == (0, 0, 1) and not engine_dirs(root)


def test_a_journal_held_after_a_sweep_removed_its_directory_holds_the_one_made_again(tmp_path, monkeypatch):
    """A sweep (another engine's resume on the directory) may remove a run's directory, empty and not yet held,
    between its making and its lock: the write after it failed on the directory gone (before stop 83; a
    dispatcher's journal is now held from its start, so the sweep could meet it as it starts)."""
    import shutil

    import actors._file_journal as fj

    j = FileJournal(tmp_path, "e")
    real_flock, swept = fj.fcntl.flock, []

    def flock(fd, how):
        if how == fj.fcntl.LOCK_SH and not swept:  # the sweep comes between the mkdir and the lock
            swept.append(True)
            shutil.rmtree(tmp_path / "e")
        return real_flock(fd, how)
    monkeypatch.setattr(fj.fcntl, "flock", flock)
    asyncio.run(j.put("batches:openai", "k", "record"))
    monkeypatch.setattr(fj.fcntl, "flock", real_flock)
    assert swept and locked_out(tmp_path / "e", 0.0) is None  # the directory there now is the one held
    assert read_spaces(tmp_path / "e") == {"batches:openai": {"k": "record"}}
    os.close(j._lock)


def test_a_journal_held_after_a_sweep_removed_its_directory_before_its_lock_file_was_made_holds_the_one_made_again(
        tmp_path, monkeypatch):
    """The same sweep one step earlier, between the directory's making and its lock file's: the lock file could not
    be made and the dispatcher's start failed (``FileNotFoundError``; a review of stop 83's hold)."""
    import shutil

    j = FileJournal(tmp_path, "e")
    real_mkdir, swept = Path.mkdir, []

    def mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self == j.dir and not swept:  # the sweep comes right after the making
            swept.append(True)
            shutil.rmtree(self)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    j.hold()
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert swept and locked_out(j.dir, 0.0) is None  # the directory there now is the one held
    os.close(j._lock)


def test_a_sweep_never_removes_a_live_runs_journal(tmp_path):
    """``sweep`` (a resume's, a clean end's) removed every run with nothing journaled, without the run's lock: a
    dispatcher holds its run from its start, before its first record, so a second engine on the same
    ``journal.dir`` swept a live run's directory from under it, and the run's next record failed on it (fails on
    the code before: ``[] == ['live']``, the held run's directory removed). Now only a run no process holds goes;
    the live one keeps its directory and journals on."""
    from engine.app._batch_rescue import sweep

    live, dead = FileJournal(tmp_path, "live"), FileJournal(tmp_path, "dead")
    live.hold()  # a dispatcher at its start: nothing journaled yet
    dead.hold()
    os.close(dead._lock)  # its process ended: the kernel dropped its lock
    sweep(tmp_path)
    assert [d.name for d in engine_dirs(tmp_path)] == ["live"]
    asyncio.run(live.put("batches:openai", "k", "record"))
    assert read_spaces(live.dir) == {"batches:openai": {"k": "record"}}
    asyncio.run(live.delete("batches:openai", ["k"]))  # its batch ended (archived)
    sweep(tmp_path, keep_ended=False)
    assert [d.name for d in engine_dirs(tmp_path)] == ["live"]  # held still: kept
    os.close(live._lock)
    sweep(tmp_path, keep_ended=False)  # once no process holds it, the run goes, and the root with it
    assert not tmp_path.exists()
