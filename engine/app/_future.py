"""The future of one submitted request, as the driver hands it out."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.core._logkeys import get_logger
from engine.core.errors import ConfigError
from engine.core.request import Request

if TYPE_CHECKING:
    from engine.app.driver import Engine

__all__ = ["ResultFuture"]

log = get_logger("smartbatch")


class ResultFuture(concurrent.futures.Future):
    """The future of one request: ``result()`` blocks for its ``Result``; ``object_ref()`` gives a Ray
    ``ObjectRef[Result]`` to pass to Ray tasks or ``ray.get``/``ray.wait``.

    Why not an ObjectRef from the start: a Ray ref exists only as the return of a task or actor call, so one
    ref per request would cost one actor call per request (about 300 requests/s through an actor chain here)
    or tie a micro-batch's results together (``num_returns`` resolves all at once, so an urgent result would
    wait for a background one). The ref is made on demand, by one call to the result hub for this request.
    """

    def __init__(self, req: Request, engine: Engine):
        super().__init__()
        self.request_id = req.id
        self.tenant = req.tenant
        self._req = req  # what was asked under this (tenant, id): a resubmission must ask the same
        self._engine = engine
        self._ref = None
        self._claimed = False  # its result is being set (``Admitting._resolve``): counted off max_pending once

    def cancel(self) -> bool:
        """False, as for a call already running: a request handed to the engine is not called back. It runs on
        (it may be billed), its result comes, and only then does it leave its place under ``max_pending``. A
        cancelled future would never take its result, and so never leave that place: after ``max_pending`` of
        them every ``submit`` was refused for good. Stop waiting with ``result(timeout=...)`` instead."""
        return False

    def result(self, timeout: float | None = None) -> Any:
        self._not_in_delivery("result", timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._not_in_delivery("exception", timeout)
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[ResultFuture], object]) -> None:
        """As ``concurrent.futures.Future``'s (an ``Exception`` it raises is logged), and a ``SystemExit`` (a
        ``sys.exit()``) or another ``BaseException`` it raises in one of the engine's threads is logged too: it
        ended the thread that delivers every result (each later one then waited for good) and skipped the future's
        other callbacks (an ``asubmit`` awaiting it). There it could end no process anyway (``sys.exit()`` ends the
        process only from the main thread, where it still goes on up)."""
        def guarded(fut: ResultFuture) -> None:
            try:
                fn(fut)
            except Exception:
                raise
            except BaseException as exc:
                if threading.current_thread() is threading.main_thread():
                    raise
                log.error("a done-callback of request %r raised %s in the engine's result thread, which delivers every "
                          "result and which it cannot end: ignored (end the script from the main thread, e.g. with a "
                          "flag it reads)", self.request_id, type(exc).__name__, exc_info=True)

        super().add_done_callback(guarded)

    def _not_in_delivery(self, what: str, timeout: float | None) -> None:
        """Refuse a wait that could never end: in the thread that delivers results (a done-callback), for a result
        that thread has not delivered yet. It waited for good (or its whole timeout), every later result with it; in
        a stop() failing what is open, the stop hung for good. A look that does not wait (``timeout=0``, a callback
        joining two requests) raises ``TimeoutError`` as anywhere: refused, it broke that callback (a review)."""
        if timeout is not None and timeout <= 0:
            return
        if not self.done() and self._engine is not None and self._engine._delivering():
            raise ConfigError(f"{what}() of request {self.request_id!r}, not finished yet, was called in a "
                              "done-callback, in the thread that delivers results (the engine's result thread, or a "
                              "stop() failing what is open): that thread delivers the result it would wait for, so "
                              "it would wait for good and hold every other result. In a callback, add a callback to "
                              "this future too, or wait for it in a thread of your own (an executor)")

    def object_ref(self):
        """An ``ObjectRef`` that resolves to this request's ``Result`` (the same one each call)."""
        if self._ref is None:
            ray = self._engine._ray
            if self.done():
                self._ref = ray.put(self.result())
            else:
                self._ref = self._engine._hub_of(self._req.uid).result_of.remote(self._req.uid)
        return self._ref
