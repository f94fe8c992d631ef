"""Budgets changed while the engine runs (a mixin of ``actors.budget.BudgetController``, which owns the ledger):
a budget added, its limit or soft limit changed, or removed, keeping what its current window spent and holds.

A change is kept as the ledger is, so a restart of this actor keeps it: in the memory ledger's journal snapshot
(``_budget_journal``: the budgets and the spend in one write), or in the ledger's Redis under
``{prefix}:specs:{ledger_id}`` (a Redis ledger has no journal). It is answered once kept; one that cannot be
kept (Redis down) is refused and changes nothing.

The groupers follow what this actor holds (``actors._grouper_budgets``): the driver that made a change tells
them at once, and each also asks ``budget_state`` on a timer of its own, since a driver may die between the
change and its telling. A state is (the number of its change, the budgets, this actor's incarnation): numbers
order the changes of one incarnation (a grouper told of two in the wrong order keeps the later); a restart
draws a new incarnation, whose number may have gone back (a journal write that failed, a Redis that lost its
key), and which a grouper takes whatever its number."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import NamedTuple

from engine.core._budget_check import changed_specs
from engine.core.budgets import BudgetSpec
from engine.core.errors import ConfigError

__all__ = ["SPECS_TTL_S", "LiveBudgets", "SpecState"]

SPECS_TTL_S = 400 * 86400  # the Redis copy of a ledger's budgets outlives any run of its engine, then goes
log = logging.getLogger("smartbatch.budget")


class SpecState(NamedTuple):
    """The budgets in force at a budget actor: ``Grouper.set_budgets(*state)`` takes it."""

    version: int  # the number of the last change, 0 for none (those of the settings)
    specs: tuple[BudgetSpec, ...]
    incarnation: str  # drawn by each start and restart of the budget actor


class LiveBudgets:
    """Needs the controller's ``book``, ``settings``, ``ledger_id``, ``spec_version``, ``spec_incarnation``,
    ``_errors``, ``_usable``,
    ``_failed``, ``_recovered``, ``_changed``, ``_durable``, ``_restored_first`` and ``_specs_lock``."""

    def _specs_key(self) -> str:
        return f"{self.settings.redis_prefix}:specs:{self.ledger_id}"

    async def budget_specs(self) -> tuple[int, tuple[BudgetSpec, ...]]:
        """(the number of the last change, 0 for none; the budgets in force)."""
        await self._restored_first()
        return self.spec_version, tuple(self.book.specs)

    async def budget_state(self, since: tuple[str, int] | None = None) -> SpecState | None:
        """The budgets in force, as the groupers ask for them once a second: None when they are ``since``
        (incarnation, version), the grouper's, so the usual answer is small; None too while a Redis ledger
        restarted by Ray has not read its budgets back (Redis down), as the settings' budgets it holds meanwhile
        are not those in force: an engine started without budgets would stop reserving under one set live."""
        await self._restored_first()
        if self._specs_unread or since == (self.spec_incarnation, self.spec_version):
            return None
        return SpecState(self.spec_version, tuple(self.book.specs), self.spec_incarnation)

    async def change_budgets(self, put: list[BudgetSpec] = (), remove: list[str] = (),
                             base: int | None = None) -> SpecState | None:
        """Set each budget of ``put`` (in place of the budget of its name, else added) and remove those named in
        ``remove``, in one step; returns the state after it (``budget_state``). Each window keeps what it spent and holds: a
        lower limit refuses new claims past it and leaves open ones be (they settle as before); a higher one lets
        claims through at once (the caller wakes the groupers' held work). ``base``: the change ``put`` was
        merged on (``budget_specs``); None, and nothing changed, when another change came since (the caller
        merges again). Raises ``ConfigError`` for a name no budget has, or when the change cannot be kept (the
        ledger's Redis down): nothing changed then."""
        await self._restored_first()
        # One change at a time: a Redis ledger awaits its write, and two drivers' changes made meanwhile were
        # both numbered alike and merged on the same budgets, the later dropping the earlier (a hunt).
        async with self._one_at_a_time():
            if base is not None and base != self.spec_version:
                return None
            return await self._change_now(put, remove)

    async def _change_now(self, put: list[BudgetSpec], remove: list[str]) -> SpecState:
        specs = changed_specs(self.book.specs, put, remove)  # checked against the budgets in force now
        version = self.spec_version + 1
        if self._errors:
            if not self._usable():
                raise ConfigError(f"the budget ledger's Redis is unavailable ({self._last_error}): the budget "
                                  "change was not made; try again once it answers")
            try:
                await self._write_specs(version, specs)
            except self._errors as exc:
                self._failed(exc)
                # Redis may have kept it and lost only the reply: the budgets in force are written back at the
                # next call it answers, or a restart of this actor would take up the change refused (a hunt).
                self._specs_unsure = True
                raise ConfigError(f"the budget ledger's Redis did not take the change ({self._describe(exc)}): "
                                  "the budget change was not made; try again once it answers") from None
            self._recovered()
        self.book.set_specs(list(specs))
        self.spec_version = version
        log.warning("budgets changed (change %d): %s", version, "; ".join(
            f"{s.name} limit ${s.max_budget:g}" + (f" soft ${s.soft_budget:g}" if s.soft_budget is not None else "")
            for s in specs) or "none")
        self._changed()
        await self._durable()  # in the journal before it is answered, as a reservation is
        return SpecState(version, specs, self.spec_incarnation)

    def _one_at_a_time(self) -> asyncio.Lock:
        """The lock of every step that reads or writes the budgets kept in Redis: a change, and a restart's read
        and rewrite of them (``_read_specs``, ``_rewrite_specs``)."""
        if self._specs_lock is None:
            self._specs_lock = asyncio.Lock()
        return self._specs_lock

    async def _write_specs(self, version: int, specs: tuple[BudgetSpec, ...]) -> None:
        body = json.dumps({"version": version, "specs": [s.model_dump() for s in specs]})
        await self.book.client.set(self._specs_key(), body, ex=SPECS_TTL_S)

    async def _rewrite_specs(self) -> None:
        """Write the budgets in force over a change Redis may have kept though it was refused."""
        async with self._one_at_a_time():  # a change's write may not land before this older one
            if not self._specs_unsure:  # another call wrote them while this one waited
                return
            try:
                await self._write_specs(self.spec_version, tuple(self.book.specs))
            except self._errors as exc:
                self._failed(exc)
            else:
                self._specs_unsure = False

    async def _read_specs(self) -> None:
        """A Redis ledger restarted by Ray: take back the budgets changed live, kept in its Redis. Tried again at
        the next call while Redis does not answer (its claims are answered budget_unavailable meanwhile). One read
        at a time, and none once one has taken them: every call of the restarted actor reads while they are unread,
        and a late answer of an earlier call put the budgets before a change made meanwhile back in force (a
        lowered limit raised again here while Redis kept it lowered; a review)."""
        async with self._one_at_a_time():
            if not self._specs_unread:
                return
            try:
                raw = await self.book.client.get(self._specs_key())
            except self._errors as exc:
                self._failed(exc)
                return
            self._specs_unread = False
            if raw is None:
                return
            kept = json.loads(raw)
            self.book.set_specs([BudgetSpec.model_validate(s) for s in kept["specs"]])
            self.spec_version = int(kept["version"])
        log.warning("budget ledger: budgets of change %d taken back after a restart", self.spec_version)
