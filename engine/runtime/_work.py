"""What a runtime and a ``SimProvider`` hand each other: work to start, what started, and attempts' outcomes."""

from __future__ import annotations

from typing import Any, NamedTuple

from engine.core.cost import Mode
from engine.core.request import Request

__all__ = ["Attempt", "BatchOutcome", "Event", "SyncAttempt", "Work"]


class SyncAttempt(NamedTuple):
    ok: bool
    at: float  # when the call ended (result or error)
    cost: float
    retry_after_s: float | None  # a 429's Retry-After; None for success or a 5xx
    cached: int = 0  # leading prefix blocks it read or wrote in the provider's prompt cache
    refused: bool = False  # a flex call the provider had no capacity for: not billed, to send at the standard tier


class Attempt(NamedTuple):
    """One member's attempt in a batch or GPU dispatch."""

    ok: bool
    at: float
    cost: float
    cached: int = 0  # as ``SyncAttempt.cached``


class BatchOutcome(NamedTuple):
    hedged: bool
    at: float  # when hedged, the end of its cancel (``SimProvider.cancel_s`` past the hedge); else completion
    members: list[Attempt]  # filled when the batch ends (``SimProvider.end_batch``): members use the cache then
    pending: tuple | None = None  # (reqs, oks) until then


class Work(NamedTuple):
    """What a runtime hands a provider: one sync call, one GPU dispatch or one batch-API batch."""

    kind: Mode  # sync | flex | gpu_batch | batch_api: the modes of engine.core.cost, one vocabulary
    item: Any  # the runtime's own handle, returned in the Event
    reqs: list[Request]
    idxs: list[int]  # rows of the draws
    attempts: list[int]
    cache_write: bool | tuple[int, ...] = False  # ``Decision.cache_write``
    hedge_at: float | None = None


class Event(NamedTuple):
    """Work that left the queue: started (``sync``/``gpu_batch``/``batch_api`` with its outcome), ``reroute``d to the
    fallback ``provider/model`` in ``outcome`` because its model's circuit is open, or a flex call handed back
    unstarted (``to_standard``) to reserve the standard price before it goes standard."""

    kind: str
    work: Work
    start: float
    outcome: Any
