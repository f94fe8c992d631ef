"""A driver's crash insurance: an engine started with ``journal.dir`` (real providers) takes back what an engine on
that directory left when its process was killed, before it sends anything, and answers from it the requests its
driver submits again.

A SIGKILL, an OOM kill or a closed laptop ends a driver script with no word: the engine's provider batches run on
and bill every member they finish, and the script run again sent those requests again, paying twice. Its
dispatchers journal every batch in the directory (``actors._file_journal``); a new engine on it cancels and reads
each batch named there (``_batch_rescue.rescue``: a cancel keeps what finished, billed) and keeps the answers, with
the answers the killed driver had received (written here, each before its future resolved). A request submitted
again under the same tenant and id, with the same content, gets its kept answer at once, at the cost the earlier
run paid; one with other content is sent as new (an id reused across jobs never gets another job's answer). A
stop with nothing open, not on an error, removes what its engine wrote and took back there: the job ended. An
engine's answers file is locked while it lives (as its dispatchers' journal is): another engine on the directory
neither takes it over nor removes it.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from engine.core._logkeys import get_logger
from engine.core.errors import ConfigError
from engine.core.files import locked
from engine.core.request import Request
from engine.core.result import Result

__all__ = ["DRIVER_ANSWERS", "KeptAnswers", "content_digest", "take_back"]

log = get_logger("smartbatch.driver")

DRIVER_ANSWERS = "driver-answers"  # one JSON line an answer: {"digest": ..., "result": ...}
KEPT_REASON = "answered by an earlier run of this job (journal.dir), not sent again"


def content_digest(req: Request) -> str:
    """What a request asks, whatever its arrival: the same content submitted again has the same digest."""
    return hashlib.sha256(req.model_dump_json(exclude={"arrival_s"}).encode()).hexdigest()


class KeptAnswers:
    """The answers an earlier run of the job paid for, by ``Request.uid`` with their request's digest, and the file
    this run's answers are appended to as they reach the driver."""

    def __init__(self, root: Path, kept: dict[str, tuple[str, Result]], taken: Iterable[Path] = ()):
        self.root = root
        self._kept = kept
        self._taken = list(taken)  # what this run took over (answers files, runs of dead engines): its own to clear
        self._path = root / f"{DRIVER_ANSWERS}.{os.getpid()}-{time.time_ns()}.jsonl"
        self._fd: int | None = None  # this run's answers file, made at its first answer (``_open``)
        self._closed = False  # by the engine's stop
        self._lock = threading.Lock()
        self._write_failed = False
        self.given, self.given_usd = 0, 0.0

    def __repr__(self) -> str:
        return f"KeptAnswers(root={str(self.root)!r}, kept={len(self._kept)}, given={self.given})"

    def __len__(self) -> int:
        return len(self._kept)

    def holds(self, req: Request) -> bool:
        """Whether an earlier run answered this tenant, id and content (``take`` gives it)."""
        got = self._kept.get(req.uid)
        return got is not None and got[0] == content_digest(req)

    def take(self, req: Request) -> Result | None:
        """The kept answer to ``req`` if an earlier run answered this tenant, id and content (else None)."""
        if not self.holds(req):
            return None
        got = self._kept[req.uid]
        with self._lock:
            self.given += 1
            self.given_usd += got[1].cost_usd
        return got[1].model_copy(update={"reason": KEPT_REASON})

    def results(self) -> list[Result]:
        """Every kept answer (the driver learns whose its response ids are from them)."""
        return [r for _, r in self._kept.values()]

    def charges(self) -> list:
        """Every kept answer as a charge for this run's budgets: billed, never counted by the run cut off; and
        every kept failure that may be billed, at its bound (``Result.possibly_billed_usd``)."""
        from engine.core.budgets import Charge

        return [Charge(f"resume:{self.root}:{r.tenant}:{r.id}", r.tenant, r.provider, r.model, usd)
                for _, r in self._kept.values() if (usd := r.billed_bound_usd)
                and r.provider and r.model]

    def record(self, pairs: Iterable[tuple[Request, Result]]) -> None:
        """Append the answers among ``pairs`` (billed or reused) before their futures resolve: a kill after this
        leaves them to the next run, never paid again. Lines go in one write (a kill cuts the last at most)."""
        data = "".join(_line(content_digest(q), r) for q, r in pairs if r.status in ("ok", "reused"))
        if not data:
            return
        try:
            with self._lock:
                os.write(self._open(), data.encode())
        except OSError as exc:  # the answers still reach the driver; only the insurance is lost
            if not self._write_failed:
                self._write_failed = True
                log.error("journal.dir %s: answers could not be kept (%s): if this run is killed, the next pays "
                          "for them again", self.root, exc.strerror or exc)

    def _open(self) -> int:
        """This run's answers file, held (exclusive) while the engine lives, as a dispatcher holds its journal:
        another engine on the directory (a second job, a second engine of the script) neither takes it over nor
        removes it. Locked before it has its name, so no other engine ever sees it unheld. Holds ``_lock``."""
        if self._closed:
            raise OSError(f"{self._path} was closed by the engine's stop")
        if self._fd is None:
            self.root.mkdir(parents=True, exist_ok=True)  # (another engine's clean stop removed it, empty)
            made = self.root / f".{self._path.name}.new"
            fd = os.open(made, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(made, self._path)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def finish(self, clean: bool, engine: str) -> None:
        """After the stop of the engine whose journal is named ``engine`` (``actors.remote.start_actors``).
        ``clean`` (nothing was open): the job ended, so what it wrote and took over goes (its answers, its journal,
        the files and runs of the dead engines it took back); else it stays for the next run to take back. Another
        engine's on the directory is left: it may still run."""
        with self._lock:
            fd, self._fd, self._closed = self._fd, None, True
        if not clean:
            if fd is not None:
                os.close(fd)
            return
        from actors._file_journal import FileJournal
        from engine.app._batch_rescue import STOPPED_GONE_S, sweep

        self._path.unlink(missing_ok=True)
        if fd is not None:  # (unlinked first: no engine starting meanwhile takes it over)
            os.close(fd)
        # (the runs it took over looked again at: one another engine had made but not yet locked looked dead)
        runs = _dead_runs(self.root, [p for p in self._taken if p.is_dir()]) + [FileJournal(self.root, engine).dir]
        for p in self._taken:
            if not p.is_dir():
                p.unlink(missing_ok=True)
        sweep(self.root, keep_ended=False, runs=runs, wait_s=STOPPED_GONE_S)  # (its own: killed by the stop)


def _line(digest: str, res: Result) -> str:
    return json.dumps({"digest": digest, "result": res.model_dump(mode="json")}) + "\n"


def _read(paths: Iterable[Path]) -> dict[str, tuple[str, Result]]:
    out: dict[str, tuple[str, Result]] = {}
    for p in paths:
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:  # a torn last line (a kill mid-write) is skipped
                d = json.loads(line)
                res = Result.model_validate(d["result"])
                out.setdefault(res.uid, (str(d["digest"]), res))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def take_back(settings, catalog, keys: dict, *, speedup: float) -> KeptAnswers | None:
    """Before an engine a driver starts sends anything: what an engine killed on ``journal.dir`` left (None: no
    directory, take-back off, or simulated providers, whose calls bill nothing)."""
    j = settings.journal
    if j.dir is None or not j.take_back or settings.providers.mode != "http":
        return None
    from engine.app._batch_rescue import pending, rescue
    from engine.core.files import write_atomic

    root = Path(j.dir).absolute()
    old = [p for p in sorted(root.glob(f"{DRIVER_ANSWERS}.*.jsonl")) if root.is_dir() and not _held(p)]
    kept = _read(old)
    batches, open_, calls = pending(root)
    if batches or calls:
        log.warning("journal.dir %s: an engine on it was cut off with %d provider batch(es) (%d under way) and %d "
                    "sync call(s) out; reading what they finished before anything is sent", root, batches, open_, calls)

        written: list[Path] = []

        def keep(got) -> None:  # whole, before the records it read are removed
            merged = dict(kept)
            for uid, (req, res) in got.members.items():
                merged.setdefault(uid, (content_digest(req), res))
            if len(merged) > len(kept):
                path = root / f"{DRIVER_ANSWERS}.rescued-{time.time_ns()}.jsonl"
                write_atomic(path, "".join(_line(d, r) for d, r in merged.values()).encode(), durable=True)
                written.append(path)
            kept.update(merged)

        try:  # (in a thread of its own: the driver may call this from a running event loop)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                got = pool.submit(rescue, root, settings, catalog, keys, speedup=speedup, wanted=None,
                                  say=log.warning, keep=keep).result()
        except ConfigError as exc:
            raise ConfigError(f"journal.dir={root}: {exc}; or remove that directory to send everything again") from None
        if written:  # the old answers are in the file just written
            for p in old:
                p.unlink(missing_ok=True)
            old = written
        if got.cut_calls:
            log.warning("journal.dir %s: %d sync call(s) were under way when the earlier engine was cut off; they "
                        "may have been billed, and are sent again when submitted", root, got.cut_calls)
    if kept:
        log.warning("journal.dir %s: %d answer(s) an earlier run of this job paid for are kept: the same requests "
                    "submitted again get them, not sent again", root, len(kept))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, or no right to write: the setting's to fix, not a bug
        raise ConfigError(f"setting journal.dir = {root}: cannot be a directory ({exc.strerror or exc}); point "
                          "SMARTBATCH_JOURNAL__DIR at a directory this machine can write, or unset it") from None
    return KeptAnswers(root, kept, [*old, *_dead_runs(root)])


def _held(path: Path) -> bool:
    """Whether a live engine holds ``path`` (its answers file, ``KeptAnswers``); one gone meanwhile is nothing to
    take over either."""
    return locked(path) is not False


def _dead_runs(root: Path, runs: list[Path] | None = None) -> list[Path]:
    """The journal runs under ``root`` (of ``runs``) that no process writes any more (a live engine's is left)."""
    from actors._file_journal import engine_dirs, locked_out

    out = []
    for run in engine_dirs(root) if runs is None else runs:
        fd = locked_out(run, 0.0)
        if fd is not None:
            os.close(fd)
            out.append(run)
    return out
