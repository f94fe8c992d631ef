"""What the budget controller tells the hub's metrics and the log (a mixin of ``actors.budget.BudgetController``,
which owns the state): each budget's current window, sent when the ledger moves and when a window ends, and a
WARNING once per window for a budget past its soft limit."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from engine.core._logkeys import get_logger
from engine.core.budgets import BudgetSpec, window_bounds, window_label

__all__ = ["METRICS_EVERY_S", "BudgetReports", "next_window_end"]

METRICS_EVERY_S = 0.5
log = get_logger("smartbatch.budget")


def next_window_end(specs: Iterable[BudgetSpec], now: float) -> float | None:
    """When the first of the current windows of ``specs`` ends (None: none of them resets)."""
    ends = [window_bounds(s.budget_duration, now)[1] for s in specs if s.budget_duration is not None]
    return min(ends) if ends else None


class BudgetReports:
    """Needs the controller's ``hub``, ``book``, ``clock``, ``settings``, ``refusals``, ``now``, ``_dirty``,
    ``_errors``, ``_usable``, ``_failed``, ``_changed``, ``_maybe``, ``_soft_said``, ``_window_timer`` and
    ``_reported``."""

    async def _report_soon(self) -> None:
        while self._dirty:
            self._dirty = False
            try:  # None: unread (Redis down), not "no budget", which would take every gauge off the page
                rows = await self._rows() if self._usable() else None
            except self._errors as exc:
                self._failed(exc)
                rows = None
            self._say_soft(rows or [])
            self.hub.send("observe_budget", rows, dict(self.refusals))
            self._arm_window_end()
            await asyncio.sleep(METRICS_EVERY_S)

    def _arm_window_end(self) -> None:
        """Send the gauges again when the first current window ends: sent only as the ledger moved, an idle
        engine's page showed an ended window's spend and what it had left for hours (a tour, stop 64)."""
        if self.clock is None:
            return
        now = self.now()
        end = next_window_end(self.book.specs, now)  # the budgets in force (changed live, perhaps)
        if end is None or (self._window_timer is not None and self._window_timer[0] == end):
            return
        if self._window_timer is not None:
            self._window_timer[1].cancel()
        handle = asyncio.get_running_loop().call_later(self.clock.real_delay(end - now), self._window_ended)
        self._window_timer = (end, handle)

    async def _loops_ended(self, *loops: asyncio.Task | None) -> None:
        """At ``close``: ``loops`` and the report under way cancelled and ended, and no gauges after, before the
        close closes the ledger's client. The report left running read the ledger again after the close and opened
        a connection on the closed client that nothing closed: collected later, its ResourceWarning failed an
        unrelated test of the CI worker (stop 80). Bounded: a cancel spent in a Redis read ends the flusher only
        at its next turn (``_closed``)."""
        if self._window_timer is not None:
            self._window_timer[1].cancel()
            self._window_timer = None
        tasks = [t for t in (*loops, self._reported) if t is not None and not t.done() and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    def _window_ended(self) -> None:
        self._window_timer = None
        self._changed(journal=False)

    def _say_soft(self, rows: list[dict]) -> None:
        """A WARNING, once per window, for a budget whose spend passed its soft limit ("an alert above it"):
        ``soft_exceeded`` turned true in a report nobody read, and nothing else said it (a tour, stop 64)."""
        for r in rows:
            if r["soft_exceeded"] and self._soft_said.get(r["budget"]) != r["window"]:
                self._soft_said[r["budget"]] = r["window"]
                log.warning("budget %s passed its soft limit: $%.6f spent of $%.6f soft ($%.6f hard) in its window "
                            "from %s", r["budget"], r["spent_usd"], r["soft_budget"], r["max_budget"],
                            window_label(float(r["window"])))

    async def report_again(self) -> None:
        """Send the budget gauges again: the hub restarted with none, and they are sent when they move. A
        restarted controller takes its ledger back first (the hub's rewire can come before its own): nothing is
        journaled here, the ledger did not change."""
        await self._restored_first()
        self._changed(journal=False)

    async def _rows(self) -> list[dict]:
        return await self._maybe(self.book.report(self.now()))
