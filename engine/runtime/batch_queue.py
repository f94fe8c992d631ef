"""Batch-API batches waiting for the provider's enqueued-token room, each one only until its hedge."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

from engine.core.scheduling import FairQueue, Scheduling, Unit

__all__ = ["BatchQueue"]


class BatchQueue:
    """A ``FairQueue`` of batch units that also gives back, at its hedge time, a batch still waiting then.

    A batch waits here while the provider's queue of enqueued tokens is full, and the queue frees only when
    earlier batches end. Before, it waited for that alone: started long past its hedge, it was never submitted,
    and its members went back to the policy then, past their deadlines (a helper's hunt: a batch of 3 started
    2,246 s after its hedge). A unit given back stays in the fair queue, void, and is skipped when it comes up:
    the queue takes out only what it peeked."""

    def __init__(self, sched: Scheduling, max_attempts: int):
        self._q = FairQueue(sched, max_attempts)
        self._hedges: list[tuple[float, int, Unit]] = []  # (hedge time, seq, unit), the waiting ones' and stale
        self._seq = itertools.count()
        self._waiting: dict[int, Unit] = {}  # id -> unit, for units not yet started nor given back
        self._void: set[int] = set()

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, u: Unit, hedge_at: float | None) -> None:
        self._q.push(u)
        self._waiting[id(u)] = u
        if hedge_at is not None:
            heapq.heappush(self._hedges, (hedge_at, next(self._seq), u))

    def late(self, now: float) -> list[Unit]:
        """The waiting units whose hedge is at or before ``now``, taken out."""
        out: list[Unit] = []
        h = self._hedges
        while h and (h[0][0] <= now or id(h[0][2]) not in self._waiting):
            u = heapq.heappop(h)[2]
            if self._waiting.pop(id(u), None) is not None:
                self._void.add(id(u))
                out.append(u)
        return out

    def next_hedge(self) -> float:
        """When the next waiting unit's hedge comes (infinity: none)."""
        h = self._hedges
        while h and id(h[0][2]) not in self._waiting:
            heapq.heappop(h)
        return h[0][0] if h else math.inf

    def peek(self, now: float) -> tuple[str, int, Unit] | None:
        q = self._q
        while len(q):
            picked = q.peek(now)
            if id(picked[2]) not in self._void:
                return picked
            self._void.discard(id(q.take(picked, served=False)))  # not served: no share charged
        return None

    def take(self, picked: tuple[str, int, Unit]) -> Unit:
        u = self._q.take(picked)
        self._waiting.pop(id(u), None)
        return u

    def take_where(self, pred: Callable[[Unit], bool]) -> list[Unit]:
        """The waiting units for which ``pred`` holds, taken out (void in the fair queue, as one given back)."""
        out = [u for u in self._waiting.values() if pred(u)]
        for u in out:
            del self._waiting[id(u)]
            self._void.add(id(u))
        return out

    def take_all(self) -> list[Unit]:
        out = []
        while (picked := self.peek(0.0)) is not None:
            out.append(self.take(picked))
        self._hedges.clear()
        return out
