"""Budgets changed on a running engine from a driver (a mixin of ``Engine``): ``set_budget``, ``remove_budget``,
``budgets``. The budget actor makes the change, keeps it as it keeps its ledger, and answers; then every grouper
is told, and tries the work the budgets held back at once (``actors._budget_live``, ``Grouper.set_budgets``). A
grouper this telling misses (the driver killed before it) asks the budget actor itself within a second
(``actors._grouper_budgets``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from engine.app._actor_errors import actor_errors, masked_actor_errors
from engine.app._driver_report import _through_restarts
from engine.core._budget_check import budget_of
from engine.core.budgets import BudgetSpec
from engine.core.errors import ConfigError, EngineStopped

__all__ = ["LiveBudgeting"]


class LiveBudgeting:
    """Needs the engine's ``_ray``, ``_h``, ``_running``, ``name`` and ``catalog``."""

    @masked_actor_errors
    def budgets(self, timeout_s: float = 60.0) -> list[dict]:
        """Each budget in force, its current window: budget (its name), window, budget_duration, max_budget,
        soft_budget, spent_usd, reserved_usd, remaining_usd, soft_exceeded (as ``report()['budget']['budgets']``)."""
        rep = self._budget_call("report", timeout_s=timeout_s)
        ledger = rep.get("ledger")
        if ledger is not None and not ledger["up"]:  # its rows are empty then: read as "no budget" (a hunt)
            raise ConfigError(f"engine {self.name!r}: its budget ledger's Redis at {ledger['redis_url']} is "
                              f"unavailable ({ledger['error']}): its budgets cannot be read now; try again once it "
                              "answers")
        return rep["budgets"]

    @masked_actor_errors  # (the groupers' too, told of a change: ``_tell_groupers``)
    def set_budget(self, budget: BudgetSpec | Mapping[str, Any] | None = None, *, timeout_s: float = 60.0,
                   **fields: Any) -> dict:
        """Add a budget, or change the limit or soft limit of the one of its name (tenant, provider, model and
        budget_duration name a budget), while the engine runs, for every driver of it: e.g.
        ``eng.set_budget(tenant="acme", budget_duration="1d", max_budget=80)``. A field left out keeps the
        running budget's value (``soft_budget=None`` removes its soft limit). Its current window keeps what it
        spent and holds: a higher limit lets held work go at once; a lower one, under the spend, refuses new
        work and lets what was reserved or sent finish. The change outlives a restart of the budget actor.
        Checked as a budget at start is (``ConfigError`` naming the field and the fix). Returns its window."""
        given = {**(budget.model_dump(exclude_unset=True) if isinstance(budget, BudgetSpec) else dict(budget or {})),
                 **fields}
        # Merged on the budgets read, and made only if no other change came between (else read and merged again):
        # a soft limit set from a stale read put back the limit another driver had just lowered (a hunt).
        while True:
            base, current = self._budget_call("budget_specs", timeout_s=timeout_s)
            spec = budget_of(given, current, self.catalog)
            if self._change_budgets([spec], [], timeout_s, base):
                break
        try:
            return next(r for r in self.budgets(timeout_s) if r["budget"] == spec.name)
        except (ConfigError, StopIteration) as exc:  # made: never said as failed (another driver may remove it)
            raise ConfigError(f"budget {spec.name} set (change {base + 1}), but its window cannot be read now: "
                              f"{exc or 'another change removed it since'}") from None

    @masked_actor_errors  # (the groupers' too, told of a change: ``_tell_groupers``)
    def remove_budget(self, name: str, *, timeout_s: float = 60.0) -> dict:
        """Remove the budget ``name`` (as ``budgets()`` names it, e.g. ``tenant=acme/1d``) while the engine runs:
        the work it held back is tried at once. Returns its last window."""
        last = next((r for r in self.budgets(timeout_s) if r["budget"] == name), None)
        made = False
        while True:
            base, current = self._budget_call("budget_specs", timeout_s=timeout_s)
            if made and name not in {s.name for s in current}:
                # Made by a call whose answer a restart of the budget actor cut (asked again, it found the budget
                # gone and was refused: "no budget named" of a removal made, and no grouper told; a hunt).
                state = self._budget_call("budget_state", timeout_s=timeout_s)
                if state is not None:  # else a Redis ledger not read back yet: the groupers ask it themselves
                    self._tell_groupers(*state, timeout_s)
                return last
            made = True
            if self._change_budgets([], [name], timeout_s, base):
                return last

    def _change_budgets(self, put: list[BudgetSpec], remove: list[str], timeout_s: float,
                        base: int | None = None) -> bool:
        """Make the change and tell every grouper; False, nothing changed, when ``base`` is not the last change."""
        made = self._budget_call("change_budgets", put, remove, base, timeout_s=timeout_s)
        if made is None:
            return False
        self._tell_groupers(*made, timeout_s)
        return True

    def _tell_groupers(self, version: int, specs: tuple, incarnation: str, timeout_s: float) -> None:
        # At once, for every grouper; one that restarts meanwhile, or that this misses (the driver killed
        # first), asks the budget actor for them (``actors.remote.rewire``, ``Grouper.sync_budgets``).
        end = time.monotonic() + timeout_s
        _through_restarts(self._ray, lambda: [g.set_budgets.remote(version, specs, incarnation)
                                              for g in self._h["groupers"]], end)

    def _budget_call(self, method: str, *args: Any, timeout_s: float) -> Any:
        if not self._running:
            raise EngineStopped(f"engine {self.name!r} was stopped: its budgets cannot be read or changed")
        ray = self._ray
        try:
            with actor_errors(ray, self.name, method, who="its budget actor"):
                return _through_restarts(ray, lambda: getattr(self._h["budget"], method).remote(*args),
                                         time.monotonic() + timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"engine {self.name!r}: its budget actor did not answer in {timeout_s:g} s; the "
                              "change may or may not be made: read budgets() and try again") from None
