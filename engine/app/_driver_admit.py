"""A driver's admission of submitted requests (a mixin of ``Engine``): one future per (tenant, id), room
within ``max_pending``, and the resolution that frees it. Its state is the engine's (``Engine.__init__``)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import threading
import time
from collections.abc import Iterator

from engine.app._future import ResultFuture
from engine.core.errors import EngineStopped, Overloaded, RequestError
from engine.core.request import Request
from engine.core.result import ID_TAKEN, Result

__all__ = ["Admitting", "signals_held"]


@contextlib.contextmanager
def signals_held(deliver: bool = True) -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM wait until the block is done, so a KeyboardInterrupt never lands between steps that must
    happen together: each is noted (the list yielded) and, with ``deliver``, raised again after the block, to the
    handler it had. Python runs signal handlers in the main thread only, whichever thread the kernel picks (a
    mask on the main thread let one through, by another thread), so handlers are swapped, not signals blocked.
    In another thread, or beside a handler Python did not install, the block runs as it is."""
    got: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(s) is None for s in kinds):
        yield got
        return
    previous = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in kinds}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for n in got if deliver else ():
            signal.raise_signal(n)


class Admitting:
    _admits = 0  # submits that queued requests: a submit waiting for room looks again when it has moved

    def _admit(self, reqs: list[Request]) -> tuple[list[ResultFuture], bool]:
        """Futures for ``reqs`` (existing ones for a repeated (tenant, id)), queuing the new ones; waits for
        room as ``overload`` says. Holds the lock."""
        if not self._running:
            raise EngineStopped("this engine was stopped; start a new one with Engine.start()" if self._owner else
                                f"this driver left engine {self.name!r}; attach again with Engine.connect()")
        if self._gone is not None:
            raise EngineStopped(f"{self._gone}; start a new one with Engine.start(), or connect to another")
        if self._h.get("cancelled"):  # accepted, it only ended failed "cancelled" (a helper's tour)
            raise EngineStopped("this engine was cancelled (Engine.cancel) and takes no more work; start a new one")
        futs: dict[str, ResultFuture] = {}  # by uid: the existing future, or a new one
        new: list[Request] = []
        for r in reqs:
            fut = self._futs.get(r.uid) or futs.get(r.uid)
            if fut is not None:
                _same_content(r, fut)
            else:
                fut = ResultFuture(r, self)
                new.append(r)
            futs[r.uid] = fut
        if new:
            deadline = time.monotonic() + self._submit_timeout_s
            while new and self._pending + len(new) > self._max_pending and self._pending > 0:
                left = deadline - time.monotonic()
                if self._overload == "raise" or left <= 0:
                    raise Overloaded(f"{self._pending:,} requests are unfinished (max_pending={self._max_pending:,}); "
                                     "retry later, or start the engine with a larger max_pending")
                seen = self._admits
                self._room.wait(left)
                if not self._running or self._gone is not None:
                    raise EngineStopped(self._gone or "the engine was stopped while this submit waited for room")
                if self._admits != seen:
                    new = self._queued_meanwhile(new, futs)
            # Together or not at all: a Ctrl-C between them left futures registered and never sent, and the same
            # ids submitted again got those futures back, answered only by the sweep past their deadlines (a
            # helper's hunt).
            with signals_held():
                self._futs.update((r.uid, futs[r.uid]) for r in new)
                self._admits += 1
                self._pending += len(new)
                self._buffer.extend(new)
            if self._idle:
                self._wake.set()
        return [futs[r.uid] for r in reqs], bool(new)

    def _queued_meanwhile(self, new: list[Request], futs: dict[str, ResultFuture]) -> list[Request]:
        """The wait for room let the lock go, and another submit may have queued some of ``new`` meanwhile: those
        take its future (``futs``), and the rest is returned. Queued again under a second future, such a request
        was sent twice, and that future never resolved nor freed its room; with other content, one of the two was
        billed and answered nobody (a helper's fault hunt)."""
        for r in new:
            if (fut := self._futs.get(r.uid)) is not None:
                _same_content(r, fut)
                futs[r.uid] = fut
        return [r for r in new if r.uid not in self._futs]

    def _resolve(self, fut: ResultFuture, res: Result) -> None:
        if fut.done():
            return
        try:
            fut.set_result(res)
        except concurrent.futures.InvalidStateError:  # another thread resolved it meanwhile, and counted it
            return
        with self._room:
            self._pending -= 1
            if res.reason == ID_TAKEN and self._futs.get(fut._req.uid) is fut:
                del self._futs[fut._req.uid]  # refused for its id, taken elsewhere: free for the right content
            else:
                self._finished.append((time.monotonic(), fut._req.uid))
            self._room.notify_all()


def _same_content(r: Request, fut: ResultFuture) -> None:
    if r.model_copy(update={"arrival_s": fut._req.arrival_s}) != fut._req:
        raise RequestError(r.id, "id", f"tenant {r.tenant!r} already submitted id {r.id!r} with other content; an "
                           "id names one request: use a new id for a new request")
