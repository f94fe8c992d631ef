"""The grouper's copy of the budgets in force (a mixin of ``actors.grouper.Grouper``, which owns the state).

The budget actor keeps a live change (``actors._budget_live``); the driver that made it then tells each grouper
(``set_budgets``). That telling alone left two holes (a fault hunt): a driver killed between the two (Ctrl-C on
``smartbatch budget set``) left every grouper on the budgets before, and an engine started without budgets
reserved nothing under the one just set; and a budget actor restarted with an older change number (a journal
write that failed, a Redis that lost its key) was ignored by groupers holding a higher one, and so was every
change after it. So each grouper also asks the budget actor for its state on a timer of its own
(``sync_budgets``, once a second of real time: a cheap call, answered None when nothing changed), and a state
is told apart by the budget actor's incarnation as well as by its change number."""

from __future__ import annotations

import asyncio

from actors._dispatch_outbox import SPEND_WAIT_S
from engine.core._logkeys import get_logger

log = get_logger("smartbatch.grouper")

__all__ = ["BUDGET_ASK_S", "BudgetFollow"]

# Real seconds between a grouper's asks: a change no driver told reaches it within about this. Real time, not
# engine time: it bounds how long a user's change waits, and at 200x an engine second is 5 ms.
BUDGET_ASK_S = 1.0
BUDGET_ASK_TIMEOUT_S = 10.0  # an ask the budget actor does not answer (restarting) is given up, asked at the next


class BudgetFollow:
    """Needs the grouper's ``budget``, ``budget_specs``, ``budget_limited``, ``clock``, ``table``, ``waits``,
    ``_budget_version``, ``_budget_incarnation``, ``_left_incarnations``, ``_budget_ask``, ``_trying``,
    ``_park_timer`` and ``_retry_parked``."""

    async def spend_told(self, timeout_s: float = SPEND_WAIT_S) -> bool:
        """Answers once the budget actor has taken the claims this grouper let go (settled at 0: a member withdrawn,
        cancelled or refused here; each leaves before its result), or after ``timeout_s``: the driver asks this, as
        it asks each dispatcher, before it reads the ledger for a report, which held such a claim's bound after its
        result was in."""
        return await self.budget.delivered(timeout_s)

    async def set_budgets(self, version: int, specs: tuple, incarnation: str | None = None) -> int:
        """The budgets in force at the budget actor (``SpecState``: change ``version`` of its run
        ``incarnation``; None, of the run held): reserve under them from now on, and try the work they held back
        at once (a raised limit lets it go; what is still refused is held again, each as its new verdict says).
        A change older than one held of the same run is let be (two drivers' changes may come in either order),
        and so is any state of a run this grouper has left; a new run's is taken whatever its number. Returns
        how many members were held."""
        if not self._takes(version, incarnation):
            return len(self.waits)
        if incarnation is not None and incarnation != self._budget_incarnation:
            if self._budget_incarnation is not None:  # a late word of it (a slow driver's) is let be
                self._left_incarnations.add(self._budget_incarnation)
            self._budget_incarnation = incarnation
        self._budget_version = version
        specs = tuple(specs)
        if specs == self.budget_specs and self.budget_limited == bool(specs):
            return len(self.waits)  # the same budgets (a first ask, a restart that kept them): nothing to try again
        self.budget_specs = specs
        # An engine started without budgets reserved nothing: it reserves once one is set (and stops once none is).
        self.budget_limited = bool(specs)
        self.table.budget.holding = self.waits.holding(self.budget_specs)
        held = self.waits.wake(self.clock.now())
        if held and not self._trying:
            if self._park_timer is not None:
                self._park_timer[1].cancel()
            self._retry_parked()
        return held

    def _takes(self, version: int, incarnation: str | None) -> bool:
        if incarnation is None or incarnation == self._budget_incarnation:
            return version >= self._budget_version
        return incarnation not in self._left_incarnations

    async def sync_budgets(self) -> bool:
        """Ask the budget actor for the budgets in force and take them when they are not those held (the timer's
        step; a rewire asks it at once). True when a state was taken."""
        since = None if self._budget_incarnation is None else (self._budget_incarnation, self._budget_version)
        state = await self.budget.call("budget_state", since)
        if state is None:  # nothing new, or not known yet (a Redis ledger restarted while Redis is down)
            return False
        before = (self._budget_incarnation, self._budget_version)
        await self.set_budgets(*state)
        return (self._budget_incarnation, self._budget_version) != before

    def _arm_budget_ask(self) -> None:
        """Ask once ``BUDGET_ASK_S`` has passed, then again after each answer (one ask at a time)."""
        if self._budget_ask is None:
            self._budget_ask = asyncio.get_running_loop().call_later(BUDGET_ASK_S, self._ask_budgets)

    def _ask_budgets(self) -> None:
        self._budget_ask = asyncio.get_running_loop().create_task(self._ask_then_arm())

    async def _ask_then_arm(self) -> None:
        try:
            await asyncio.wait_for(self.sync_budgets(), BUDGET_ASK_TIMEOUT_S)
        except Exception as exc:  # restarting, or slow: the next ask tries again; the budgets held stay meanwhile
            log.debug("grouper %s: the budget actor did not say its budgets (%s)", self.name, type(exc).__name__)
        self._budget_ask = None
        self._arm_budget_ask()
