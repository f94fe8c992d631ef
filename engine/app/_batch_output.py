"""``smartbatch batch``'s output files: OUT locked for the run, both files written whole or left as they were,
and Ctrl-C and SIGTERM held while they are written (they hold what was paid for)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from engine.app._batch_record import recorder

__all__ = ["_output_lock", "_signals_held", "_write"]


def _write(bf, results: list, out: Path, errors: Path, kept: dict[int, dict]) -> tuple[int, int]:
    """``write_results``, whose failure (a full disk) leaves both files as they were, said plainly."""
    import time

    from engine.core.batchfile import write_results
    from engine.core.errors import ConfigError
    by_id = {r.id: r for r in results}  # in the input's order: answers taken from a killed run come first
    try:
        return write_results(bf, [by_id[q.id] for q in bf.requests], out, errors, created=int(time.time()), kept=kept,
                             before=recorder(out, errors))  # where the error file went, for the next run on OUT
    except OSError as exc:
        paid = sum(r.status in ("ok", "reused") for r in results)
        raise ConfigError(f"could not write {out} or {errors}: {exc.strerror or exc}. Both are left as they were"
                          + (f" (with the {len(kept):,} line(s) an earlier run wrote)" if kept else "")
                          + f"; the {paid:,} line(s) answered in this run are not written, and a --resume once "
                          "there is room sends them again") from None


@contextlib.contextmanager
def _output_lock(out: Path):
    """Hold an exclusive lock on OUT for the run: two runs writing one output left the last writer's lines
    only, the other's answers paid for and gone, and both said they wrote theirs (a helper's fault hunt). A
    stream (/dev/stdout, a pipe) is not locked."""
    import fcntl

    from engine.core.errors import ConfigError

    if out.exists() and not out.is_file():
        yield
        return
    made = not out.exists()
    with open(out, "a", encoding="utf-8") as held:  # "a": the lock never truncates what a run before wrote
        try:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--out {out}: another run is writing it (it holds the file's lock); wait for it to "
                              "end, or give another --out") from None
        try:
            yield
        finally:
            # A run refused or cut before it wrote OUT (a key not set, a bad --address): the empty file the lock
            # made goes, not left as the answers of a batch that never ran (a helper's hunt). A run that wrote
            # OUT renamed a whole file over this one.
            with contextlib.suppress(OSError):
                mine, now = os.fstat(held.fileno()), out.stat()
                if made and mine.st_size == 0 and (mine.st_ino, mine.st_dev) == (now.st_ino, now.st_dev):
                    out.unlink()


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait while the files are written (they hold what was paid for); yields those that came."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
