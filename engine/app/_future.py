"""The future of one submitted request, as the driver hands it out."""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

from engine.core.request import Request

if TYPE_CHECKING:
    from engine.app.driver import Engine

__all__ = ["ResultFuture"]


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

    def object_ref(self):
        """An ``ObjectRef`` that resolves to this request's ``Result`` (the same one each call)."""
        if self._ref is None:
            ray = self._engine._ray
            if self.done():
                self._ref = ray.put(self.result())
            else:
                self._ref = self._engine._hub_of(self._req.uid).result_of.remote(self._req.uid)
        return self._ref
