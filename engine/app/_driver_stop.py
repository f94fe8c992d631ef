"""A driver's stop (a mixin of ``Engine``): ``stop()`` and the ``with`` block's exit. The stop runs once, whoever
calls it: a second caller (another thread, a signal handler's, a ``with`` block left while a watchdog stops the
engine) returns once the first has ended, so what it does next (``report()``, leaving the process) finds the engine
stopped. It returned at once instead, with the actors still running and no report kept yet: ``report()`` said the
report "could not be read then" while the first stop was still keeping it (a helper's hunt, stop 77)."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

from engine.app._actor_errors import actor_errors, masked_actor_errors
from engine.core._logkeys import get_logger, words
from engine.core.errors import ConfigError, SmartbatchError

if TYPE_CHECKING:
    from engine.app.driver import Engine

__all__ = ["NEVER_SENT", "Stopping", "ended_by_stop", "unsent_at_stop"]

log = get_logger("smartbatch")

STOP_LOCK_WAIT_S = 10.0  # real seconds stop() waits for the engine's lock before it takes it for its own thread's
_NOT_HOLDING = frozenset({"stop", "_first_stop", "_lock_for_stop", "__exit__", "shutdown"})  # call stop(), hold no lock

# What a request of a stopped engine that this driver had not sent yet ends with.
NEVER_SENT = ("cancelled: the engine stopped before this request was sent (drain() first waits for it); it was never "
              "sent, and is billed nothing")


def unsent_at_stop(gone: str) -> str:
    """What a request ends with that a stop of the engine elsewhere (``gone``: "engine 'prod' was stopped") cut
    before it was sent: held by this driver, or named by the stop (``actors._stop_cut``)."""
    return f"{gone} before this request was sent: it never reached a provider, and is billed nothing"


def ended_by_stop(res: object, gone: str | None) -> bool:
    """Whether result ``res`` is no answer but the failure the engine's going away (``gone``) gave it, sent or not."""
    error = getattr(res, "error", None)
    return (gone is not None and getattr(res, "status", None) == "failed" and error is not None
            and error in (gone, unsent_at_stop(gone)))


class Stopping:
    """Mixed into ``Engine``; uses its state (``Engine.__init__``) and the ``SharedEngine`` drain."""

    _stopping: threading.Event | None = None  # made by the first stop(), set once it has ended
    _stopper: threading.Thread | None = None  # the thread that runs it
    _drain_cut: threading.Event | None = None  # set by a Ctrl-C in a thread waiting for it: its drain ends
    _cut_short = False  # left its ``with`` block on an error: the job did not end (``__exit__``)

    @masked_actor_errors
    def stop(self, timeout_s: float = 5.0, *, drain_s: float = 0.0) -> None:
        """Stop the threads and (for an engine this driver started, not detached) the actors; any future still
        open resolves as failed, so none hangs, and what this driver had not sent yet is never sent (``NEVER_SENT``,
        billed nothing). A driver of a shared engine sends it and leaves the engine running: its open requests
        still run, and ``submit`` of the same (tenant, id) from any driver gets their results.
        ``drain_s``: first, if this driver started the engine and work is under way, cancel it and wait up to that
        long for what its provider batches finished (billed) to be answered (``cancel``, ``wait_cancelled``;
        Ctrl-C leaves now); called so in a done-callback, in the thread that delivers those answers, the stop runs
        in a thread of its own and this call returns at once. Leaving a ``with`` block on an error or Ctrl-C drains
        for ``settings.stop_drain_s``.
        A Redis budget ledger's settlements waiting for its Redis get up to ``journal.ledger_wait_s``, then go to
        ``journal.ledger_dir`` for the next engine on that ledger (``report()["budget"]["ledger"]["left_at_stop"]``).
        Called again, from any thread, it returns once the first call has ended. Not from a signal handler: one
        that interrupts a submit finds the engine's lock held by its own thread (``ConfigError`` at once; held by
        another thread as it interrupts the engine's code, after ``STOP_LOCK_WAIT_S``); raise ``KeyboardInterrupt``
        there instead."""
        if not self._first_stop():
            return
        if drain_s > 0 and threading.current_thread() is self._puller:
            # A drain waits for answers this very thread delivers: run here it was skipped, and what the calls under
            # way finished (billed) failed unread (a new user's tour, stop 86). Claimed here (a stop() elsewhere now
            # waits for this one), run in a thread of its own, it drains as a stop from any other thread does while
            # this one goes back to delivering.
            # Not a daemon (as it would be, made by the result thread): the interpreter's exit waits for it, the
            # drain bounded by ``drain_s``. A daemon, a script leaving once its callback had stopped the engine
            # abandoned the drain and the rest of the stop: the answers under way lost, the actors not stopped (a
            # review, ``rvtour86``).
            self._stopper = threading.Thread(target=self._stop_in_thread, args=(timeout_s, drain_s),
                                             name="smartbatch-stop", daemon=False)
            self._stopper.start()
            return
        self._stop_and_end(timeout_s, drain_s)

    def _stop_in_thread(self, timeout_s: float, drain_s: float) -> None:
        """The drained stop a done-callback made: no caller to raise to, its error is logged, masked as ``stop()``
        raises it. Outside ``masked_actor_errors``, an actor's ``RayTaskError`` (the actor's traceback, a provider's
        key in its words) went whole to ``threading.excepthook``, printed to stderr (a review, ``rvtour86``)."""
        try:
            with actor_errors(getattr(self, "_ray", None), lambda: self.name, "stop()"):
                self._stop_and_end(timeout_s, drain_s)
        except Exception as exc:
            log.error("engine %r: the stop failed (%s: %s)", self.name, type(exc).__name__, words(exc))

    def _stop_and_end(self, timeout_s: float, drain_s: float) -> None:
        try:
            self._stop(timeout_s, drain_s)
        finally:
            self._stopping.set()

    def _first_stop(self) -> bool:
        """Whether this is the engine's first ``stop()``; if not, wait for that one to end, except in its own thread
        (a callback of a future it fails, a signal handler run inside it) or in a thread it joins (the result
        thread's callback)."""
        me = threading.current_thread()
        if self._stopper is me:  # (set by this very thread): a stop inside its own, or after it
            # At once, without the lock, which the stop may hold as it is interrupted (a SIGTERM handler's stop()
            # inside the ``with`` block's): waited for STOP_LOCK_WAIT_S, the ConfigError unwound that stop half
            # done, open futures left open for good and the actors not stopped (a review of stop 77).
            return False
        if not self._lock_for_stop(me):
            raise ConfigError(f"stop() could not take the engine's lock within {STOP_LOCK_WAIT_S:g} s: this thread holds "
                              "it, most likely a signal handler's stop() interrupting a submit. In a handler, raise "
                              "KeyboardInterrupt (the with block's exit then stops the engine) or set a flag the "
                              "script reads, rather than call stop()")
        try:
            first = self._stopping is None
            if first:
                self._stopping, self._stopper, self._drain_cut = threading.Event(), me, threading.Event()
        finally:
            self._lock.release()
        if not first and me not in (self._flusher, self._puller, self._checker):
            self._wait_stopped()
        return first

    def _wait_stopped(self) -> None:
        """Wait for the stop under way in another thread. A Ctrl-C meanwhile cuts its drain short, as it does a
        drain in its own thread, and is raised once that stop has ended. Raised at once, it left a done-callback's
        drained stop draining for up to ``drain_s`` ("Ctrl-C leaves now" not so), and the process, leaving, cut it
        there: the actors not stopped, the open futures never failed (a review, ``rvtour86``). A second Ctrl-C
        leaves at once."""
        try:
            self._stopping.wait()
        except KeyboardInterrupt:
            self._drain_cut.set()
            self._stopping.wait()
            raise

    def _lock_for_stop(self, me: threading.Thread) -> bool:
        """Take the engine's lock: bounded (``STOP_LOCK_WAIT_S``) only where this thread may hold it itself, a signal
        handler's stop() having interrupted the engine's own code (a submit) in the main thread, where Python runs
        handlers; waited for, the script hung for good (a helper's hunt: a SIGALRM handler's stop() in a loop of
        submit_many hung 6 runs of 15). Anywhere else the lock is another thread's, held as long as its call takes:
        a submit_many of 600,000 requests holds it 12 s (about 20 us a request), and a watchdog's stop() raised
        after 10 s instead of stopping the engine (a review of stop 77). The lock is an RLock (``admission_lock``):
        held by this very thread, it would be taken again at once, and the stop run inside the interrupted submit."""
        if self._lock._is_owned():  # (the handler's stop() inside a submit that holds it: refused at once)
            return False
        if me is threading.main_thread() and _inside(self, sys._getframe()):
            return self._lock.acquire(timeout=STOP_LOCK_WAIT_S)
        return self._lock.acquire()

    def _stop(self, timeout_s: float, drain_s: float) -> None:
        try:
            self._drain_before_stop(drain_s)
        except KeyboardInterrupt:  # (one that lands between its own guards): the stop below must still run
            pass
        with self._lock:  # from here on a submit is refused: none can slip in after the last flush below
            if not self._running:
                return
            self._running = False
            # An engine this driver started sends nothing more: what it has not sent yet (buffered, or waiting in a
            # lane) is never sent. Flushed here, it was sent as the actors went, and billed behind a result that
            # said it failed (a helper's hunt: 20 buffered, 20 billed at the emulator, 12 answered "failed"). A
            # driver of a shared engine sends it (below): it runs on there for any driver to get.
            unsent, interrupted = self._take_unsent()
        me = threading.current_thread()  # a result's callback may call stop() in the thread that delivers it
        from engine.runtime.collector import driver_gc

        running: Any = type(self)._running_engines
        failed = False
        try:
            try:
                self._wake.set()
                for t in (self._flusher, self._puller, self._checker):
                    if t is not me:
                        t.join(timeout_s)
                # A stop a done-callback made in the result thread, which it cannot join: the rest of that thread's
                # turn (answers paid for) is resolved here, where the join lets it end, before anything fails.
                self._deliver_turn()
                self._flush()
                self._lanes_turn(force=True)  # what waits for a call to return leaves now: the flush thread stopped
                clean = self._pending == 0 and not self._cut_short  # the job ended: its journal.dir goes
                unsent |= self._cut_in_groupers()
                if unsent:  # in the user's log as the others are (``_fail_open``)
                    log.warning("%d request(s) not sent yet were never sent: the engine stopped (billed nothing)",
                                len(unsent))
                failed = self._fail_all(unsent)
                if self._owner:
                    self._keep_last_report()  # report() after stop() answers with it
            finally:  # a Ctrl-C anywhere above (the joins, the flush, failing the futures, the report's read):
                # the actors go all the same. They ran on, a batch under way billed, and the next stop() returned.
                try:  # and what is open fails: the next stop() returns at once, so nothing else resolves it (a
                    if not failed:  # thread on its result() hung for good, the process with it at its exit)
                        self._fail_all(unsent)
                finally:
                    if self._owner:
                        from actors.remote import kill_engine

                        kill_engine(self._h["engine"], self._h["all"], self._h["dispatchers"],
                                    self._h.get("budget"), self._keep_ledger, wait_s=self._stop_wait_s(),
                                    on_left=self._note_left)
            if self._owner:
                if self._kept is not None:  # (its dispatchers gone: nothing writes the journal now)
                    self._kept.finish(clean, self._h.get("journal", self.name))
            else:  # the ids only this driver held are forgotten after its retention window, as it would have
                for h in self._h["hubs"]:
                    h.leave.remote(self._client)
                for i in self._h["ingests"]:
                    i.leave.remote(self._client, self._retention_s)
        finally:  # raised or not, this engine no longer runs
            running.discard(self)
            driver_gc.engine_stopped()  # the user's collector is theirs again, even on this error path
        if self._started_ray:
            heir = next(iter(running), None)
            if heir is None:
                self._ray.shutdown()
            else:  # another engine still runs on this Ray: it shuts Ray down when it stops
                heir._started_ray = True
        if interrupted is not None:
            raise interrupted

    def _end_stopped(self, why: str) -> None:
        """The engine was stopped elsewhere (``smartbatch stop --name``, another driver's ``shutdown``): what it cut
        before it was sent says so (``unsent_at_stop``), what this driver had not handed over yet too; the rest
        fails with ``why``, as it may have been cut under way at a provider, billed."""
        from actors._stop_cut import read_cut

        cut = read_cut(self.name)  # published before the layout went (``actors._engine_stop``)
        with self._lock:  # read and dropped at once: the flush thread sends nothing of it after this
            mine = {r.uid for r in self._buffer} | self._lane_uids()
            self._drop_unsent(mine)
        self._gone = why
        self._fail_ids(sorted(mine | cut), unsent_at_stop(why))
        self._fail_open(why)

    def _cut_in_groupers(self) -> set:
        """For an engine this driver stops: what its groupers and dispatchers held, never sent (``actors._stop_cut``,
        named for the other drivers too), so its futures say so (``NEVER_SENT``) rather than that they may have run."""
        groupers = self._h.get("groupers") if self._owner and self._gone is None else None
        if not groupers:
            return set()
        from actors._stop_cut import cut_unsent

        try:
            return set(cut_unsent(self.name, groupers, dispatchers=list((self._h.get("dispatchers") or {}).values())))
        except SmartbatchError as exc:  # its mark or list not written: which key, which Ray, the fix (ours to show)
            log.warning("%s", exc)
            return set()
        except Exception as exc:  # (Ray going down) nothing known for sure: they may have run
            log.warning("engine %r: the stop could not ask what it cut unsent (%s)", self.name, type(exc).__name__)
            return set()

    def _take_unsent(self) -> tuple[set, KeyboardInterrupt | None]:
        """Under the lock: take what this driver has not sent out of the buffer and the lanes (``_drop_unsent``),
        its ids, and the Ctrl-C that landed meanwhile, to raise once the stop has run. Taken again after it: a pass
        over every request waiting, and a Ctrl-C there left the engine turned off, every actor running and every
        future open, the next ``stop()`` returning at once (a review of stop 80)."""
        unsent: set = set()
        interrupted = None
        while self._owner:
            try:
                unsent |= {r.uid for r in self._buffer} | self._lane_uids()
                self._drop_unsent(unsent)
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        return unsent, interrupted

    def _fail_all(self, unsent: set) -> bool:
        """Fail what is open as the engine stops: what this driver never sent says so (``NEVER_SENT``)."""
        self._fail_ids(sorted(unsent), NEVER_SENT)
        self._fail_open(self._stop_error())
        with self._room:
            self._room.notify_all()  # a submit waiting for room learns the engine stopped
        return True

    def __enter__(self) -> Engine:
        return self  # type: ignore[return-value]

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        # Left on an error, a Ctrl-C or a SIGTERM, the job has not ended even with nothing open (a script that
        # failed between two submits): what a killed run of it paid for stays for the next run (``_kept``).
        self._cut_short = exc_type is not None and not (issubclass(exc_type, SystemExit)
                                                        and getattr(exc[0], "code", 1) in (0, None))
        self.stop(drain_s=self._drain_on_exit(exc_type))


def _inside(eng: object, frame: Any) -> bool:
    """Whether ``frame`` or one it was called from runs a method of ``eng`` that may hold its lock (``_NOT_HOLDING``
    aside): a signal handler's frame is called from the frame it interrupted."""
    while frame is not None:
        code = frame.f_code
        if code.co_varnames[:1] == ("self",) and code.co_name not in _NOT_HOLDING and frame.f_locals.get("self") is eng:
            return True
        frame = frame.f_back
    return False
