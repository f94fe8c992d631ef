"""Budgets changed while the engine runs (a mixin of ``actors.budget.BudgetController``, which owns the ledger):
a budget added, its limit or soft limit changed, or removed, keeping what its current window spent and holds.

A change is kept as the ledger is, so a restart of this actor keeps it: in the memory ledger's journal snapshot
(``_budget_journal``: the budgets and the spend in one write), or in the ledger's Redis (``_budget_specs``: one
hash per ledger, shared by every engine on it; a Redis ledger has no journal). It is answered once kept; one
that cannot be kept (Redis down) is refused and changes nothing. One whose reply Redis lost is sent again at
once, and else settled at the next call Redis answers (made or not, on every engine alike): it is never said
refused while it may be in force.

Engines sharing a Redis ledger share its budgets: a change is written over the ledger's version it was merged on
(else merged again on the budgets another engine wrote meanwhile), each budget actor checks the ledger's version
at most once a second when its groupers ask (``follow_ledger``) and takes a newer one, and an actor starting or
restarting takes the ledger's budgets over those of its settings.

The groupers follow what this actor holds (``actors._grouper_budgets``): the driver that made a change tells
them at once, and each also asks ``budget_state`` on a timer of its own, since a driver may die between the
change and its telling. A state is (the number of its change, the budgets, this actor's incarnation): numbers
order the changes of one incarnation (a grouper told of two in the wrong order keeps the later); a restart
draws a new incarnation, whose number may have gone back (a journal write that failed, a Redis that lost its
key), and which a grouper takes whatever its number."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import NamedTuple

from actors._budget_specs import SPECS_TTL_S, Kept, SpecStore
from engine.core._budget_check import changed_specs
from engine.core._logkeys import get_logger
from engine.core.budgets import BudgetSpec
from engine.core.errors import ConfigError

__all__ = ["SPECS_CHECK_S", "SPECS_TTL_S", "LiveBudgets", "SpecState"]

# Real seconds between two checks of a Redis ledger's version for changes made on other engines: the groupers
# ask once a second (``BUDGET_ASK_S``), so a change reaches another engine's groupers within about two.
SPECS_CHECK_S = 1.0
log = get_logger("smartbatch.budget")


class SpecState(NamedTuple):
    """The budgets in force at a budget actor: ``Grouper.set_budgets(*state)`` takes it."""

    version: int  # the number of the last change, 0 for none (those of the settings)
    specs: tuple[BudgetSpec, ...]
    incarnation: str  # drawn by each start and restart of the budget actor


class LiveBudgets:
    """Needs the controller's ``book``, ``settings``, ``spec_version``, ``_spec_by``, ``spec_incarnation``, ``_errors``,
    ``_config_error``, ``_usable``, ``_failed``, ``_recovered``, ``_changed``, ``_durable``, ``_restored_first``,
    ``_restarted``, ``_specs_lock``, ``_specs_unread``, ``_specs_unsure`` and ``_specs_checked``."""

    @property
    def _store(self) -> SpecStore:
        return SpecStore(self.book.client, self.book.prefix)  # the ledger's namespace: one slot on a cluster

    async def budget_specs(self) -> tuple[int, tuple[BudgetSpec, ...]]:
        """(the number of the last change, 0 for none; the budgets in force). A Redis ledger's are checked first:
        a driver merges its change on them, and a budget another engine added is one it may change or remove."""
        await self._restored_first()
        await self.follow_ledger()
        return self.spec_version, tuple(self.book.specs)

    async def budget_state(self, since: tuple[str, int] | None = None) -> SpecState | None:
        """The budgets in force, as the groupers ask for them once a second: None when they are ``since``
        (incarnation, version), the grouper's, so the usual answer is small; None too while a Redis ledger
        restarted by Ray has not read its budgets back (Redis down), as the settings' budgets it holds meanwhile
        are not those in force: an engine started without budgets would stop reserving under one set live."""
        await self._restored_first()
        await self.follow_ledger(SPECS_CHECK_S)
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
            return await self._change_now(put, remove, base is None)


    async def _change_now(self, put: list[BudgetSpec], remove: list[str], again: bool) -> SpecState | None:
        """Under the lock. On a Redis ledger, written only over the ledger's version this actor holds: when another
        engine's change came first, its budgets are taken, and ``put`` is merged on them again here when ``again``
        (else None: the driver merges again, as for another driver's change on this engine)."""
        on = self.spec_version  # the ledger's version the change is written over
        while True:
            specs = changed_specs(self.book.specs, put, remove)  # checked against the budgets in force now
            version = self.spec_version + 1
            if not self._errors:
                break
            if not self._usable():
                raise ConfigError(f"the budget ledger's Redis is unavailable ({self._last_error}): the budget "
                                  "change was not made; try again once it answers")
            by = secrets.token_hex(4)
            ledger = await self._write_change(on, version, specs, by)
            if ledger is None:
                break
            if ledger.built_on(by):  # made, its reply lost, and found on the ledger (another change made on it)
                specs, version, by = ledger.specs, ledger.version, ledger.by
                break
            if self._newer(ledger):  # another engine's change came first
                self._take(ledger)
                if not again:
                    return None
            on = ledger.version  # else a Redis that lost them or went back: written over what it holds
        self.book.set_specs(list(specs))
        self.spec_version, self._spec_by = version, (by if self._errors else "")
        log.warning("budgets changed (change %d): %s", version, _listed(specs))
        self._changed()
        await self._durable()  # in the journal before it is answered, as a reservation is
        return SpecState(version, specs, self.spec_incarnation)

    async def _write_change(self, on: int, version: int, specs: tuple[BudgetSpec, ...], by: str) -> Kept | None:
        """Write the change (``SpecStore.write``). Its reply lost, Redis may have kept it: it is sent again at once,
        under its token, so it is either written then, or found on the ledger (made), or found written over by
        another change (not made). Never said refused while it may be in force: another engine may have taken
        it, and made a change on it, before this one's next call (a review). When Redis does not answer that
        either, whether it was made is settled at the next call Redis answers (``_settle_unsure``)."""
        for _ in range(2):
            try:
                ledger = await self._store.write(on, version, specs, by)
            except self._errors as exc:
                self._failed(exc)
                error = exc
                continue
            self._recovered()
            return ledger
        self._specs_unsure = (on, version, by)
        raise ConfigError(f"the budget ledger's Redis did not answer the budget change ({self._describe(error)}): "
                          "whether it was made is not known yet. It is settled at this engine's next call that "
                          "Redis answers, and is then in force on every engine sharing the ledger or on none; "
                          "read the budgets (`smartbatch budget list`) before making it again")

    def _one_at_a_time(self) -> asyncio.Lock:
        """The lock of every step that reads or writes the budgets kept in Redis: a change, a check of the
        ledger's version, and a start's or restart's read of them (``_read_specs``, ``_settle_unsure``)."""
        if self._specs_lock is None:
            self._specs_lock = asyncio.Lock()
        return self._specs_lock

    async def follow_ledger(self, unless_within_s: float = 0.0) -> None:
        """A Redis ledger: read the version of its budgets (a few bytes) and take them when another engine changed
        them since; should Redis hold an older version (it lost them, or went back to a snapshot), write the
        budgets in force here back over it. Not again within ``unless_within_s`` real seconds of the last check
        (the groupers' asks call it every second each)."""
        if not self._may_follow():
            return
        t = time.monotonic()
        if t - self._specs_checked < unless_within_s:
            return
        self._specs_checked = t
        async with self._one_at_a_time():
            # Again once the lock is held: a change it waited for may have lost its reply, the ledger holding the
            # change refused (taken here as another engine's, it was written again as the next change; a review).
            if not self._may_follow():
                return
            try:
                if await self._store.head() != (self.spec_version, self._spec_by):
                    await self._follow(await self._store.read())
            except self._errors as exc:
                self._failed(exc)
                return
        self._recovered()

    def _may_follow(self) -> bool:
        return not (not self._errors or self._config_error is not None or self._specs_unread or self._specs_unsure
                    or not self._usable())

    async def _follow(self, ledger: Kept | None) -> None:
        """Under the lock: take the ledger's budgets if newer than this actor's, else write these back over them
        (as the change they are, under its token: an engine holding it already has nothing to take)."""
        while ledger is not None and (ledger.version, ledger.by) != (self.spec_version, self._spec_by):
            if self._newer(ledger):
                self._take(ledger)
                return
            ledger = await self._store.write(ledger.version, self.spec_version, tuple(self.book.specs),
                                             self._spec_by)

    def _newer(self, ledger: Kept) -> bool:
        """Whether the ledger's budgets are to be taken over this actor's: a later change, or another change of
        the same number. The second is made where Redis lost the budgets: an engine a change behind wrote its next
        change under the number the others held, and comparing numbers alone, each went on with its own budgets.
        The ledger's are those every engine can agree on."""
        return ledger.version > self.spec_version or (ledger.version == self.spec_version
                                                      and ledger.by != self._spec_by)

    def _take(self, ledger: Kept) -> None:
        if ledger.version == self.spec_version:  # not a later number: the groupers holding it must take them too
            self.spec_incarnation = secrets.token_hex(4)
        self.book.set_specs(list(ledger.specs))
        self.spec_version, self._spec_by = ledger.version, ledger.by
        log.warning("budgets of change %d taken from the ledger (made on another engine sharing it): %s",
                    ledger.version, _listed(ledger.specs))
        self._changed()

    async def _settle_unsure(self) -> None:
        """Settle whether a change whose reply was lost was made, at the first call Redis answers after it: its
        change's number is written over the change it was merged on, with the budgets in force here (a new
        token). Written, the change was not made, nor can it be made later (a delivery Redis reads late finds
        its number taken). Else the ledger moved on: it was made if the budgets in force there are its change or
        were made on it (its token in their chain), and this engine follows them either way."""
        async with self._one_at_a_time():  # a change's write may not land before this older one
            if not self._specs_unsure:  # another call settled it while this one waited
                return
            on, version, by = self._specs_unsure
            fence = secrets.token_hex(4)
            try:
                ledger = await self._store.write(on, version, tuple(self.book.specs), fence)
            except self._errors as exc:
                self._failed(exc)
                return
            self._recovered()
            self._specs_unsure = None
            if ledger is not None and ledger.built_on(by):
                said = "was made: in force on the ledger"
            elif ledger is None or ledger.tells(version):
                said = "was not made: nothing changed"
            else:
                said = (f"may have been made: the ledger, at change {ledger.version}, no longer tells (its Redis "
                        "lost the budgets, or a hundred changes were made since); its budgets are followed")
            log.warning("budget change %d, whose reply Redis lost, %s", version, said)
            if ledger is None:
                self.spec_version, self._spec_by = version, fence
                self._changed()
                return
            try:
                await self._follow(ledger)
            except self._errors as exc:  # settled all the same: the next check follows the ledger
                self._failed(exc)

    async def _read_specs(self) -> None:
        """A Redis ledger started, or restarted by Ray: take the budgets in force on the ledger (changed live, on
        this engine or another) over those of the settings. Tried again at the next call while Redis does not
        answer (its claims are answered budget_unavailable meanwhile). One read at a time, and none once one has
        taken them: every call of the restarted actor reads while they are unread, and a late answer of an
        earlier call put the budgets before a change made meanwhile back in force (a lowered limit raised again
        here while Redis kept it lowered; a review)."""
        async with self._one_at_a_time():
            # Not before its retry time: a Redis that does not answer made every call wait a timeout in turn.
            if not self._specs_unread or not self._usable():
                return
            try:
                ledger = await self._store.read()
            except self._errors as exc:
                self._failed(exc)
                return
            self._specs_unread = False
            if not ledger.version:  # no change made on this ledger: each engine starts with its settings'
                return
            settings = tuple(self.book.specs)
            self.book.set_specs(list(ledger.specs))
            self.spec_version, self._spec_by = ledger.version, ledger.by
        if self._restarted:
            log.warning("budget ledger: budgets of change %d taken back after a restart", self.spec_version)
        elif set(settings) != set(ledger.specs):
            log.warning("budget ledger at %s: this engine follows the budgets in force on it (change %d, made "
                        "live on an engine sharing it): %s; not those of its settings: %s. Change them with "
                        "`smartbatch budget set` (or Engine.set_budget) on any engine sharing the ledger",
                        self._url, ledger.version, _listed(ledger.specs), _listed(settings))


def _listed(specs) -> str:
    return "; ".join(f"{s.name} limit ${s.max_budget:g}" + (f" soft ${s.soft_budget:g}"
                                                            if s.soft_budget is not None else "")
                     for s in specs) or "none"
