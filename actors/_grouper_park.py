"""The grouper's budget waits (a mixin of ``actors.grouper.Grouper``, which owns the state): it applies the
kernel's rule (``engine.runtime.waiting.BudgetWaits``, which the simulator applies too) with a timer."""

from __future__ import annotations

import asyncio

from actors._types import BatchJob, Job
from engine.core.budgets import LEDGER
from engine.core.result import Result
from engine.runtime.waiting import STEP_S, Held, held_too_long

__all__ = ["PARK_RETRY_REAL_S", "Parking"]

PARK_RETRY_REAL_S = 0.05  # real seconds between tries at least (a replay at 1000x would try at 1 kHz)


class Parking:
    """Needs the grouper's ``clock``, ``waits``, ``_park_timer``, ``_reserving``, ``_tasks``, ``_ledger_down``,
    ``_dispatch``, ``_resolve`` and ``_failed``."""

    @property
    def _park_step(self) -> float:
        """Engine seconds between tries of held work."""
        return max(STEP_S, PARK_RETRY_REAL_S * getattr(self.clock, "speedup", 1.0))

    def _park(self, j: Job, due: float, budget: str, b: BatchJob) -> None:
        self.waits.hold(j.req.uid, j.req, due, budget, (j, b._replace(jobs=[])))

    def _arm_parked(self) -> None:
        now = self.clock.now()
        due = self.waits.next_try(now)
        if due is None:
            return
        if self._park_timer is not None:
            if self._park_timer[0] <= due:
                return
            self._park_timer[1].cancel()
        handle = asyncio.get_running_loop().call_later(self.clock.real_delay(due - now), self._retry_parked)
        self._park_timer = (due, handle)

    def _retry_parked(self) -> None:
        self._park_timer = None
        late, again = self.waits.take(self.clock.now())
        if not again:  # else the reservation of those tried again says (``_reserve``): until then they count as held
            self.table.budget.holding = self.waits.holding(self.budget_specs)
        # Until the tasks below take them, these are neither held nor pending: a copy re-admitted meanwhile
        # must still be recognised (``add``), or both would go on.
        self._reserving.update(h.key for h in late)
        self._reserving.update(h.key for h in again)
        batches: dict[str, BatchJob] = {}
        for h in again:
            j, meta = h.payload
            b = batches.get(meta.bid) or meta
            batches[meta.bid] = b._replace(jobs=[*b.jobs, j])
        loop = asyncio.get_running_loop()
        if late:
            task = loop.create_task(self._resolve([(h.payload[0], self._held_back(h)) for h in late],
                                                  release=[h.key for h in late]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if batches:
            # One reservation call takes them in this order, so the room that settled goes to urgent work
            # before normal and background (as in the simulator).
            task = loop.create_task(self._dispatch(list(batches.values())))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._arm_parked()

    def _held_back(self, h: Held) -> Result:
        """The rejection of work a budget (or an unanswering ledger) held back until it could no longer finish by
        its deadline."""
        j = h.payload[0]
        if h.budget == LEDGER:
            return self._failed(j, "budget_unavailable", status="rejected",
                                reason=f"{self._ledger_down}; still so when the request could no longer finish by "
                                       "its deadline")
        return self._failed(j, "budget_exhausted", status="rejected",
                            reason=held_too_long(h.budget))
