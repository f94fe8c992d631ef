"""The SDKs' tries of a generation kept on disk (``--state-dir``), so a retry after a restart still takes its try's id.

``SdkRetries`` lives in the replica's memory: a retry that came after the endpoint's replica restarted (the named
engine still running, the try's request still under way or answered in it) was a new request id, and paid again.
Batch and video creates keep their ``retry_key`` in their own records; a generation has no record, so each of its
SDK tries (retry count 0 or more) appends a line here: the try (tenant, the table's key, the request id, the wall
time), and its end (answered, or refused: a refused try is never taken by a retry, on disk as in memory). A
restarted endpoint replays the lines into the table (``KeptTries.resume``): a retry within ``ANSWERED_KEEP_S`` of
its try's answer takes its id, and the engine answers that id from the request it holds (billed once). A first
try (retry count 0) never takes an old id, and the key holds the tenant: what the table does, after a restart too.

The key a line holds (``h``) is the content's SHA-256 keyed by an HMAC under the state directory's secret
(``_endpoint_retry_secret``), and the table holds the generations' tries under it too: a plain SHA-256 of the
tenant, route and body let anyone who reads the directory confirm a guessed short prompt (retrylog, stop 74). The
lines of stop 73 and before (``k``, unkeyed) are read, keyed at the start, and their files written again keyed.

The log is append-only and bounded: two files, ``retries-0.jsonl`` and ``retries-1.jsonl``, one per window of
``ANSWERED_KEEP_S`` by the parity of the window; entering a window empties its file, which held only lines two
windows old (all past the keep), but for the tries still under way, written again in the new file (``UNDER``): a
call may run for minutes. While a try is under way, a line every ``BEAT_S`` (and one at the stop) says the process
lives: a try a crash cut is aged from it, not from its own line. A line is one ``write`` on an ``O_APPEND``
descriptor, before the engine gets the request: a killed process loses none. It reaches the disk as the
batch-create records do, by ``fsync``, but off the event loop, in a daemon thread of the log's own, one ``fsync``
for all the lines written meanwhile: on the loop, each line cost every call the disk's latency
(``benchmarks/bench_retry_log.py``), and the lines a power loss may cut before their ``fsync`` are the last
milliseconds' of a head node whose engine goes with it. The stop waits ``CLOSE_WAIT_S`` at most for the last
``fsync`` (a hung disk or NFS server held it for good), logs the file it hangs on, and goes on; the thread closes
the files once it returns. A line cut by a power loss is skipped; a write that fails (a full disk) is logged and
counted: the call goes on, its retry after a restart is a new request, as without a state directory. Not
bounded: the ``write`` itself, on the loop (it reaches the page cache, not the disk, but a hard NFS mount under
memory pressure can block it), and the start's reading of the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine.app._endpoint_retries import ANSWERED_KEEP_S, SdkRetries, retry_count
from engine.app._endpoint_retry_secret import SECRET_FILE, state_secret
from engine.core._logkeys import get_logger
from engine.core.files import write_atomic

__all__ = ["KeptTries", "RetryLog", "replay"]

log = get_logger("smartbatch.endpoint")

TRIED, ANSWERED, REFUSED = "try", "answered", "refused"
UNDER = "under"  # a try still under way as its window's file is emptied, written again in the next (logrev)
ALIVE = "alive"  # the process still lives (a beat while tries are under way, its stop): when they may be cut
BEAT_S = 10.0  # real seconds between two ALIVE lines while a try is under way: a crash cuts it at most this before
CLOSE_WAIT_S = 10.0  # real seconds the stop waits for the log's last fsync (a hung disk or NFS server holds it)


class RetryLog:
    """The two files of the log under ``root`` (see the module docstring). Single-threaded but for its ``fsync``,
    which runs in a daemon thread of its own (``_work``) on descriptors kept open for the log's life."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time,
                 under_way: Callable[[], list[tuple[str, str]]] = list, beat_s: float = BEAT_S,
                 close_wait_s: float = CLOSE_WAIT_S) -> None:
        self._clock, self._under_way = clock, under_way  # the (key, id) of the tries under way, oldest first
        self._paths = (Path(root) / "retries-0.jsonl", Path(root) / "retries-1.jsonl")
        self._fds: tuple[int, ...] = ()
        self._window = 0
        self.write_errors = 0
        self._mac: Any = None  # an HMAC-SHA256 under the state directory's secret (``keyed`` copies it), once ``open``
        self._dirty: set[int] = set()  # descriptors written since their last fsync
        self._syncing: asyncio.Future | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._in_fsync: int | None = None  # the descriptor the worker is in an fsync of (a close's message)
        self._close_wait_s = close_wait_s
        self._beat_s, self._beating = beat_s, None  # the timer of the next beat (asyncio.TimerHandle)
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once: 4x faster

    def __repr__(self) -> str:
        return f"RetryLog({str(self._paths[0].parent)!r}, open={bool(self._fds)}, write_errors={self.write_errors})"

    def keyed(self, key: str) -> str:
        """``key`` (a SHA-256 of a try's content, ``SdkRetries.key``) as the log keeps it: an HMAC under the state
        directory's secret, so the files confirm no guessed content (``_endpoint_retry_secret``)."""
        if self._mac is None:  # no secret, no file written: nothing to hide it from
            return key
        mac = self._mac.copy()  # (its key's pads hashed once: 1.1 us a key here, against 1.7 for ``hmac.digest``)
        mac.update(key.encode("utf-8", "surrogatepass"))
        return mac.hexdigest()

    def open(self) -> list[dict[str, Any]]:
        """The lines kept, oldest first (a cut or foreign line skipped); from now on, lines are appended."""
        root = self._paths[0].parent
        made = not (root / SECRET_FILE).exists()  # then a line keyed before was keyed by a secret lost
        try:
            self._mac = hmac.new(state_secret(root), digestmod=hashlib.sha256)
        except OSError as exc:  # no line can be keyed: none is written, as without a state directory
            self._failed(exc)
            return []
        lines: list[dict[str, Any]] = []
        cut: set[Path] = set()
        unkeyed, lost = 0, False
        for path in self._paths:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if data and not data.endswith(b"\n"):
                cut.add(path)
            mine: list[dict[str, Any]] = []
            for raw in data.split(b"\n"):
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(line, dict) and isinstance(at := line.get("at"), (int, float)) and math.isfinite(at):
                    mine.append(line)
            lost = lost or made and any(line.get("h") for line in mine)  # (not those of stop 73, keyed now)
            if n := self._key_old(mine):
                try:
                    write_atomic(path, b"".join(self._encode(line).encode("utf-8", "surrogatepass") + b"\n"
                                                for line in mine), durable=True, mode=0o600)
                    unkeyed += n
                    cut.discard(path)
                except OSError as exc:  # read so again at the next start, and emptied in turn
                    self._failed(exc)
            lines += mine
        if unkeyed:
            log.info("endpoint state: %d lines of the log of SDK tries under %s had the unkeyed hashes of stop 73 "
                     "and before; read, and written again keyed with the state directory's secret", unkeyed, root)
        if lost:  # deleted, left out of a copy of the directory: said, as a cut one is
            log.error("endpoint state: %s was missing beside the log of SDK tries under it and a new one was made: "
                      "the tries kept are not taken by their retries after this restart", root / SECRET_FILE)
        lines.sort(key=lambda line: line["at"])  # the two files' lines in one order (a sort that keeps ties)
        # Not emptied now: the file of this window may hold lines of it, written before the restart.
        self._window = int(self._clock() // ANSWERED_KEEP_S)
        fds: list[int] = []
        try:
            for path in self._paths:
                fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
                if path in cut:  # a power loss cut its last line: the next is not glued to it (logrev)
                    os.write(fds[-1], b"\n")
        except OSError as exc:  # the endpoint starts all the same, as without a state directory for these
            for fd in fds:
                os.close(fd)
            self._failed(exc)
            return lines
        self._fds = tuple(fds)
        return lines

    def _key_old(self, lines: list[dict[str, Any]]) -> int:
        """The lines of stop 73 and before (their content's SHA-256 as ``k``) keyed as this version's (``h``), in
        place: read, their tries are taken by their retries across the upgrade too. How many there were."""
        n = 0
        for line in lines:
            if "h" not in line and isinstance(key := line.pop("k", None), str):
                line["h"] = self.keyed(key) if key else ""
                n += 1
        return n

    def note(self, event: str, tenant: str, key: str, rid: str) -> None:
        if self._fds and (fd := self._write(event, tenant, key, rid)) is not None:
            self._dirty.add(fd)
            self._sync_soon()
            if self._beating is None:
                with contextlib.suppress(RuntimeError):  # no loop (a unit test): no beat
                    self._beating = asyncio.get_running_loop().call_later(self._beat_s, self.beat)

    def beat(self) -> None:
        """While a try is under way: a line saying the process lives. A crash (a replica's actor killed) writes
        no stop, and a quiet replica's last line may be the try's own, minutes old: its retry after the restart
        found it past the keep, a new request paid again (logrev)."""
        self._beating = None
        if self._fds and self._under_way():
            self.note(ALIVE, "", "", "")  # (and the next beat)

    def _write(self, event: str, tenant: str, key: str, rid: str) -> int | None:
        now = self._clock()
        line = self._line(event, tenant, key, rid, now)
        try:
            if (window := int(now // ANSWERED_KEEP_S)) > self._window:  # time going back keeps the file it had
                self._window = window
                os.ftruncate(self._fds[window % 2], 0)  # its lines are of window - 2 or before: all past the keep
                # But for the tries still under way: a call may outlive a window (a deadline of 600 s), and its
                # retry after a restart must find it as the table does; written again, oldest first.
                line = b"".join(self._line(UNDER, "", k, r, now) for k, r in self._under_way()) + line
            fd = self._fds[self._window % 2]
            os.write(fd, line)
        except OSError as exc:
            self._failed(exc)
            return None
        return fd

    def _line(self, event: str, tenant: str, key: str, rid: str, now: float) -> bytes:
        return self._encode({"e": event, "t": tenant, "h": key, "id": rid, "at": round(now, 3)}
                            ).encode("utf-8", "surrogatepass") + b"\n"

    def _sync_soon(self) -> None:
        if self._syncing is not None or not self._dirty:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): at once
            self._sync(self._take_dirty())
            return
        self._syncing = self._to_worker(loop, self._take_dirty())
        self._syncing.add_done_callback(self._synced)

    def _take_dirty(self) -> set[int]:
        fds, self._dirty = self._dirty, set()
        return fds

    def _synced(self, _: asyncio.Future) -> None:
        self._syncing = None
        if self._fds:
            self._sync_soon()  # the lines written while it ran

    def _to_worker(self, loop: asyncio.AbstractEventLoop, fds: set[int],
                   last: tuple[int, ...] = ()) -> asyncio.Future:
        """``fds`` fsynced by the worker, after what it was given before; ``last``: then closed, and the worker
        ends. Its own daemon thread, not the loop's executor: a hung fsync there held the stop of the whole
        process (the executor's threads are joined at the loop's and the interpreter's end)."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="smartbatch-retry-log-fsync", daemon=True)
            self._worker.start()
        done = loop.create_future()
        self._jobs.put((fds, last, loop, done))
        return done

    def _work(self) -> None:
        while True:
            fds, last, loop, done = self._jobs.get()
            self._sync(fds)
            for fd in last:  # here, after every fsync of it: never under one, nor its number reused by another
                try:
                    os.close(fd)
                except OSError as exc:  # (a write-back's EIO) it is closed all the same; raised, it ended the
                    self._failed(exc)  # thread: the stop waited its whole bound for a hung fsync, the next fd open
            with contextlib.suppress(RuntimeError):  # the loop is gone (a stop that waited no longer)
                loop.call_soon_threadsafe(_settle, done)
            if last:
                return

    def _sync(self, fds: set[int]) -> None:
        for fd in fds:
            self._in_fsync = fd
            try:
                os.fsync(fd)
            except OSError as exc:
                self._failed(exc)
            finally:
                self._in_fsync = None

    def _failed(self, exc: OSError) -> None:
        self.write_errors += 1
        log.error("endpoint state: could not keep an SDK try under %s (%s); its retry after a restart would be a "
                  "new request", self._paths[0].parent, exc)

    async def close(self) -> None:
        """The stop's line, its fsync and the files closed, after the fsyncs under way; waited for
        ``close_wait_s`` at most: a hung fsync (an NFS server gone) held the endpoint's stop for good."""
        if self._beating is not None:
            self._beating.cancel()
            self._beating = None
        if not self._fds:
            return
        if (fd := self._write(ALIVE, "", "", "")) is not None:  # when the tries under way were cut
            self._dirty.add(fd)
        fds, self._fds = self._fds, ()
        done = self._to_worker(asyncio.get_running_loop(), self._take_dirty(), fds)
        try:
            await asyncio.wait_for(asyncio.shield(done), self._close_wait_s)
        except asyncio.TimeoutError:
            stuck = self._in_fsync
            where = (str(self._paths[fds.index(stuck)]) if stuck in fds else
                     " and ".join(str(p) for p in self._paths))
            log.error("endpoint state: the fsync of %s has not returned in %.0f s (a hung disk or NFS server?); "
                      "the stop goes on without it: the SDK tries written since the last fsync may not be on disk, "
                      "and the log's files are closed once it returns", where, self._close_wait_s)


def _settle(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)

def replay(lines: list[dict[str, Any]], now: float) -> list[tuple[str, str, float]]:
    """What the table held at the end of ``lines`` (oldest first), replayed through ``SdkRetries`` itself on their
    clock: ``(key, request id, age in seconds)`` of each try within ``ANSWERED_KEEP_S``, each content's in the
    order of its tries. A try still under way when the lines end was cut by the restart: its client lost the
    connection then, so its age counts from the last line (the last sign of the process's life: a beat, its
    stop). A try whose own line went with its file (under way longer than a window) is known by its later lines. The wall clock stepped back across the restart (NTP) makes a try answered just before it younger than
    0 s: taken as just answered."""
    at = [now]
    table = SdkRetries(clock=lambda: at[0])
    seen: set[str] = set()
    for line in lines:
        at[0] = line["at"]
        key, rid, event = line.get("h"), line.get("id"), line.get("e")
        if not isinstance(key, str) or not isinstance(rid, str) or event not in (TRIED, UNDER, ANSWERED, REFUSED):
            continue  # a sign of life, or a line of an event this version does not know
        if event == TRIED or rid not in seen:
            seen.add(rid)
            table.tried(key, rid)
        if event in (ANSWERED, REFUSED):
            (table.answered if event == ANSWERED else table.refused)(key, rid)
    out = []
    for key, rid, answered_at in table.kept():
        age = now - (at[0] if answered_at is None else answered_at)
        if -ANSWERED_KEEP_S < age < ANSWERED_KEEP_S:
            out.append((key, rid, max(age, 0.0)))
    return out


class KeptTries:
    """``SdkRetries`` for the generation routes, each SDK try also on a ``RetryLog`` once ``resume`` opened one (a
    state directory); without one, the table alone, as before."""

    def __init__(self, table: SdkRetries) -> None:
        self.table, self.log = table, None
        # The generations' tries under way (id -> key, oldest first), not the table's: it holds the batch and video
        # creates' too, which their own records keep.
        self._under: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"KeptTries({self.table!r}, log={self.log!r})"

    def resume(self, root: Path | None, clock: Callable[[], float] = time.time) -> None:
        """At the endpoint's start: the tries kept under ``root`` (the state directory) back in the table."""
        if root is None:
            return
        self.log = RetryLog(root, clock, lambda: [(key, rid) for rid, key in self._under.items()])
        lines = self.log.open()
        self.table.hide_keys_with(self.log.keyed)  # the batch and video creates' keys too, before their resume
        for key, rid, age in replay(lines, clock()):
            self.table.remember(key, rid, age)

    def request_id(self, tenant: str, key: str, headers: Mapping[str, str], fresh: Callable[[], str]) -> str:
        if retry_count(headers) is None:  # not an SDK's try: a fresh id, as the table gives it, and no key made
            return fresh()
        key = self._keyed(key)
        rid = self.table.request_id(key, headers, fresh)
        if self.log is not None:
            self._under.pop(rid, None)
            self._under[rid] = key  # a retry's: the latest again
            self.log.note(TRIED, tenant, key, rid)
        return rid

    def answered(self, key: str, rid: str) -> None:
        if (key := self._key_of(key, rid)) is not None and self.table.answered(key, rid) and self.log is not None:
            self.log.note(ANSWERED, "", key, rid)

    def refused(self, key: str, rid: str) -> None:
        if (key := self._key_of(key, rid)) is not None and self.table.refused(key, rid) and self.log is not None:
            self.log.note(REFUSED, "", key, rid)

    def _key_of(self, key: str, rid: str) -> str | None:
        """The key the table holds the try ``rid`` under, or None: it holds none (not an SDK's try). The HMAC is
        made once a call, by its try, and kept while it is under way: made again at the answer, and for a call of
        no SDK too, it cost each call two for one or none (a review, revlog)."""
        if (kept := self._under.pop(rid, None)) is not None:
            return kept
        return self._keyed(key) if self.table.holds(rid) else None

    def _keyed(self, key: str) -> str:
        """The table holds a generation's tries under the key the log writes (keyed by the state directory's
        secret), so the tries replayed from it are found by their retries; so are the batch and video creates'."""
        return self.table.keyed(key)

    async def close(self) -> None:
        if self.log is not None:
            await self.log.close()
