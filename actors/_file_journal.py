"""A journal in files on this machine's disk (``journal.dir``): the dispatchers' records outlive the whole process
tree, so a run cut off by a crash (SIGKILL, an OOM kill, a lost terminal) leaves behind what it had under way at
the providers. ``smartbatch batch`` keeps one beside its output file, and ``--resume`` collects the finished
members of the provider batches it names instead of paying for them again (``engine.app._batch_rescue``).

One directory per engine run, one append-only log per space, and a lock file every writing process holds shared
while it lives (``locked_out`` waits for them all to be gone: a dispatcher outlives its killed driver by seconds,
and a reader that took its batches meanwhile raced it): each write is a framed pickle of ``("put",
{key: value})`` or ``("del", [keys])``. A space has one writer (its dispatcher; a restarted one replaces a dead
one), so appends need no lock. A torn last frame (the writer killed mid-write) is dropped when read: the records
before it stand. The log is rewritten whole (to a temporary file, then renamed over it) once it holds far more
frames than live records. The records of provider batches are archived when deleted, never dropped
(``ARCHIVE``): a resume reads every batch the run made. Writes reach the operating system at once (they survive the process, not a power cut:
no fsync, which would cost each journaled call a disk flush).
"""

from __future__ import annotations

import fcntl
import math
import os
import pickle
import re
import struct
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from engine.core._logkeys import get_logger

__all__ = ["ARCHIVE", "FileJournal", "engine_dirs", "locked_out", "read_spaces"]

log = get_logger("smartbatch.journal")

_FRAME = struct.Struct("<Q")  # the length of the pickle that follows
_SUFFIX = ".log"
_LOCK = ".lock"
ARCHIVE = "archive:"  # a space's deleted records, as (when, record), for ``archive_s`` (``ARCHIVED_SPACES``)
ARCHIVED_SPACES = ("batches:",)  # provider batches: their output can be read again at the provider


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", name) or "_"


def engine_dirs(root: Path) -> list[Path]:
    """The engine runs that journaled under ``root``, oldest first. A directory whose name starts with a dot is
    not one (``.budget-outbox``, ``actors._budget_kept``: a job's clean end swept it with the runs)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime)


def _replay(path: Path) -> tuple[dict[str, Any], int, int]:
    """The live records of one space's log, how many whole frames it holds, and where the last whole one ends."""
    records: dict[str, Any] = {}
    frames = bad = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return records, 0, 0
    at = 0
    while at + _FRAME.size <= len(data):
        (n,) = _FRAME.unpack_from(data, at)
        if at + _FRAME.size + n > len(data):
            break  # torn by a kill mid-write: what came before stands
        try:
            op, arg = pickle.loads(data[at + _FRAME.size:at + _FRAME.size + n])
        except Exception:  # a damaged frame whose length holds: skipped, not every frame after it
            bad += 1
            op, arg = "", ()
        if op == "put":
            records.update(arg)
        elif op == "del":
            for k in arg:
                records.pop(k, None)
        frames += 1
        at += _FRAME.size + n
    if bad:
        log.error("journal %s: %d damaged record(s) skipped; what they named is not known", path, bad)
    return records, frames, at


def locked_out(run_dir: Path, wait_s: float) -> int | None:
    """An exclusive hold on ``run_dir``'s journal once no process writes it any more (waited for up to ``wait_s``
    real seconds): a descriptor to ``os.close`` when done, or None if a writer still lives."""
    fd = os.open(run_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    give_up = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > give_up:
                os.close(fd)
                return None
            time.sleep(0.1)  # a process ending: no event to wait on but its lock


def read_spaces(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every space of one engine run's journal directory, with its live records."""
    return {unquote(p.name[:-len(_SUFFIX)]): _replay(p)[0] for p in sorted(run_dir.glob("*" + _SUFFIX))}


class FileJournal:
    """Journal records in append-only files under ``root/<engine>/``: they survive every process of the run."""

    durable = True
    closed = False  # its close holds nothing to end: a write after it opens its files again

    def __init__(self, root: Path | str, engine: str, archive_s: float = math.inf):
        self.dir = Path(root) / _safe(engine)
        self.archive_s = archive_s  # how long an archived record is kept (``ARCHIVE``): a service's would grow
        self._live: dict[str, dict[str, Any]] = {}
        self._frames: dict[str, int] = {}
        self._lock: int | None = None  # held shared from ``hold`` (or the first write) until the process ends

    def _path(self, space: str) -> Path:
        return self.dir / (quote(space, safe="") + _SUFFIX)

    def _space(self, space: str) -> dict[str, Any]:
        live = self._live.get(space)
        if live is None:
            path = self._path(space)
            live, self._frames[space], end = _replay(path)
            if path.exists() and path.stat().st_size > end:
                # Torn by a kill mid-write (a dispatcher Ray restarted): cut back to the last whole frame, or
                # what this process appends would follow the torn bytes, unreadable by anyone.
                os.truncate(path, end)
            self._live[space] = live
        return live

    def hold(self) -> None:
        """Hold this run's directory (shared) from now until the process ends, so that a resume of the run
        (``locked_out``) waits for this process. A dispatcher takes it at its start (``actors.journal.make_journal``),
        not at its first write: Ray gives each worker a process group of its own, and a dispatcher outlives its
        killed driver by 1.5-2.3 s (measured, stop 83); one that had written nothing held nothing, a resume started
        meanwhile found no run to wait for and sent the lines again, and what the survivor still created for them
        from its grouper's last dispatch was paid twice."""
        while self._lock is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a sweep removed it already, before its lock file was made: make it again
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                ours = os.stat(self.dir / _LOCK).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                ours = False
            if ours:
                self._lock = fd
            else:  # a sweep removed the directory, empty and not yet held, between its making and the lock
                os.close(fd)

    def _append(self, space: str, op: str, arg: Any) -> None:
        live = self._space(space)
        self.hold()
        blob = pickle.dumps((op, arg))
        frames = self._frames[space] + 1
        if frames > 2 * len(live) + 64:  # mostly dead frames: rewrite the live records as one
            tmp = self._path(space).with_suffix(".tmp")
            whole = pickle.dumps(("put", live))
            tmp.write_bytes(_FRAME.pack(len(whole)) + whole)
            os.replace(tmp, self._path(space))
            self._frames[space] = 1
            return
        with open(self._path(space), "ab") as f:  # one write of the whole frame
            f.write(_FRAME.pack(len(blob)) + blob)
        self._frames[space] = frames

    async def put(self, space: str, key: str, value: Any) -> None:
        await self.put_many(space, {key: value})

    async def put_many(self, space: str, values: dict[str, Any]) -> None:
        # Pickled before it is taken as written: a value that cannot be pickled fails the write, as Redis's does.
        copies = pickle.loads(pickle.dumps(values))
        self._space(space).update(copies)
        self._append(space, "put", values)

    async def delete(self, space: str, keys: list[str]) -> None:
        if keys:
            live = self._space(space)
            if space.startswith(ARCHIVED_SPACES):
                # Kept: a record goes once its results are with the result hub, and the hub dies with a killed
                # driver, whose dispatchers lived on for seconds (a run's answers reach its output file only at
                # its end): the batch, ended and billed, was read by nobody, and a resume paid for it again.
                gone = {k: (time.time(), live[k]) for k in keys if k in live}
                if gone:
                    self._archive(ARCHIVE + space, gone)
            for k in keys:
                live.pop(k, None)
            self._append(space, "del", list(keys))

    def _archive(self, space: str, gone: dict[str, tuple[float, Any]]) -> None:
        """Keep ``gone`` ((when, record) by key) in the archive ``space``, past ``archive_s`` no longer."""
        arch = self._space(space)
        for k in gone:  # (to the end: the order they came in is the order they go)
            arch.pop(k, None)
        arch.update(gone)
        cutoff, old = time.time() - self.archive_s, 0
        while arch and next(iter(arch.values()))[0] < cutoff:  # (kept in the order they came)
            arch.pop(next(iter(arch)))
            old += 1
        if old:  # rewritten with what is kept
            self._frames[space] = 2 * len(arch) + 64
        self._append(space, "put", gone)

    async def items(self, space: str) -> dict[str, Any]:
        return pickle.loads(pickle.dumps(self._space(space)))

    async def close(self) -> None:
        return None
