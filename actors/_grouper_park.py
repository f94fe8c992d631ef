"""The grouper's budget waits (a mixin of ``actors.grouper.Grouper``, which owns the state): work a budget
holds back is parked and tried again on one timer, most urgent first, a growing share per try; what is
still held back at its deadline is rejected."""

from __future__ import annotations

import asyncio

from actors._types import BatchJob, Job
from engine.core.budgets import LEDGER
from engine.core.request import PRIORITY_RANK
from engine.core.result import Result

__all__ = ["PARK_MIN_BATCH", "PARK_RETRY_REAL_S", "PARK_RETRY_S", "Parking"]

PARK_RETRY_S = 1.0  # engine seconds between tries of work waiting for reservations to settle
PARK_RETRY_REAL_S = 0.05  # and at least this many real seconds (a replay at 1000x would poll at 1 kHz)
PARK_MIN_BATCH = 1


class Parking:
    """Needs the grouper's ``clock``, ``parked``, ``_held``, ``_park_timer``, ``_park_batch``, ``_reserving``,
    ``_tasks``, ``_ledger_down``, ``_dispatch``, ``_resolve`` and ``_failed``."""

    @property
    def _park_step(self) -> float:
        """Engine seconds between tries of parked work."""
        return max(PARK_RETRY_S, PARK_RETRY_REAL_S * getattr(self.clock, "speedup", 1.0))

    def _park(self, j: Job, due: float, budget: str, b: BatchJob) -> None:
        self._unpark(j.req.uid)
        self.parked[j.req.uid] = (due, j, budget, b._replace(jobs=[]))
        self._held.setdefault(budget, [0, 0, 0])[PRIORITY_RANK[j.req.priority]] += 1

    def _unpark(self, rid: str) -> None:
        e = self.parked.pop(rid, None)
        if e is not None:
            self._held[e[2]][PRIORITY_RANK[e[1].req.priority]] -= 1

    def _arm_parked(self) -> None:
        if not self.parked:
            return
        now = self.clock.now()
        due = min(min(e[0] for e in self.parked.values()), min(e[1].req.deadline_at for e in self.parked.values()))
        # At most one try per step: jobs left over by the last try are due already, and a timer at their due
        # time would fire at once, again and again.
        due = max(due, now + self._park_step / 2)
        if self._park_timer is not None:
            if self._park_timer[0] <= due:
                return
            self._park_timer[1].cancel()
        handle = asyncio.get_running_loop().call_later(self.clock.real_delay(due - now), self._retry_parked)
        self._park_timer = (due, handle)

    def _retry_parked(self) -> None:
        self._park_timer = None
        now = self.clock.now()
        late, again = [], []
        for rid, (due, j, budget, meta) in list(self.parked.items()):
            if j.req.deadline_at <= now:
                late.append((j, budget))
                self._unpark(rid)
            elif due <= now + 1e-9:
                again.append((j, meta))
        # Most urgent first, and only as many as recently got through; the rest wait for the next try.
        again.sort(key=lambda e: (PRIORITY_RANK[e[0].req.priority], e[0].req.deadline_at))
        again = again[: self._park_batch]
        # Until the tasks below take them, these are neither parked nor pending: a copy re-admitted meanwhile
        # must still be recognised (``add``), or both would go on.
        self._reserving.update(j.req.uid for j, _ in late)
        self._reserving.update(j.req.uid for j, _ in again)
        batches: dict[str, BatchJob] = {}
        for j, meta in again:
            self._unpark(j.req.uid)
            b = batches.get(meta.bid) or meta
            batches[meta.bid] = b._replace(jobs=[*b.jobs, j])
        loop = asyncio.get_running_loop()
        if late:
            task = loop.create_task(self._resolve([(j, self._held_back(j, budget)) for j, budget in late],
                                                  release=[j.req.uid for j, _ in late]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if batches:
            # One reservation call takes them in this order, so the room that settled goes to urgent work
            # before normal and background (as the simulator's waiting queue does).
            task = loop.create_task(self._dispatch(list(batches.values())))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._arm_parked()

    def _held_back(self, j: Job, budget: str) -> Result:
        """The rejection of work a budget (or an unanswering ledger) held back until its deadline."""
        if budget == LEDGER:
            return self._failed(j, "budget_unavailable", status="rejected",
                                reason=f"{self._ledger_down}; still so at the request's deadline")
        return self._failed(j, "budget_exhausted", status="rejected",
                            reason=f"budget {budget} held it back until its deadline")
