"""The budget controller's memory ledger in the hub's journal: written before a change is answered, read
back after a restart (a Redis ledger needs no journal)."""

from __future__ import annotations

import asyncio
import logging

from actors.journal import read_patiently
from engine.core.budgets import BudgetSpec

__all__ = ["JOURNAL_KEY", "LedgerJournal"]

JOURNAL_KEY = ("budget", "ledger")
PUT_TIMEOUT_S = 10.0  # a snapshot write that takes longer is given up (logged); the next change writes again
log = logging.getLogger("smartbatch.budget")


class LedgerJournal:
    """Journal methods of ``BudgetController``."""

    # -- journal (memory ledger only) ----------------------------------------------------------------------------
    def _snapshot(self) -> tuple:
        b = self.book
        # Last: the budgets changed live, if any (every budget its windows name, and the names in force), so a
        # restart takes back the limits with the spend they were judged against, in one write.
        live = ((self.spec_version, [s.model_dump() for s in b.by_name.values()], [s.name for s in b.specs])
                if self.spec_version else None)
        return (dict(b.spent), dict(b.reserved), dict(b.claims), dict(b.spend), dict(self.refusals), list(b.ended),
                b.ended_overrun, b.latest, set(b.charged), live, dict(b.granted))

    async def _journal_soon(self) -> None:
        # One write at a time, of every change made before it: the changes made while one is out go in the next.
        while self._journal_dirty:
            self._journal_dirty = False
            upto = self._asked
            await self.rejournal()  # a write that fails is logged: the ledger goes on, as without a journal
            self._written = upto
            cond = self._cond()
            async with cond:
                cond.notify_all()

    def _cond(self) -> asyncio.Condition:
        if self._written_cond is None:
            self._written_cond = asyncio.Condition()
        return self._written_cond

    async def _durable(self) -> None:
        """Return once every change made so far is in the journal (at once without a journal)."""
        want = self._asked
        if self._written >= want:
            return
        cond = self._cond()
        async with cond:
            await cond.wait_for(lambda: self._written >= want)

    async def rejournal(self) -> None:
        """Write the ledger's snapshot to the journal (also after the hub, which keeps it, restarted); a Redis
        ledger's outbox instead, if it holds anything."""
        if self.journal is None:
            return await self.rejournal_outbox()
        try:  # bounded: a reservation waits for this write (``_durable``), and a wedged hub must not hold it for good
            await asyncio.wait_for(self.journal.put(*JOURNAL_KEY, self._snapshot()), PUT_TIMEOUT_S)
        except Exception as exc:
            log.warning("budget ledger: snapshot not journaled (%s: %s)", type(exc).__name__, exc)

    async def recover(self) -> bool:
        """After a restart: take the memory ledger back from the journal. Its reservations still open are
        released after ``budgets.reservation_ttl_s`` if nobody settles them (their settlement may have come
        between the snapshot and the restart). Once per incarnation: every driver of a shared engine that sees
        the restart asks, and a second restore would overwrite what was spent since the first."""
        if self.journal is None:  # a Redis ledger: what waited for Redis
            return await self.recover_outbox()
        if self.__dict__.get("_restored"):
            return False
        self._restored = True
        self._restoring = asyncio.Event()  # ledger calls wait: the restore overwrites what they would do meanwhile
        try:
            return self._restore(await read_patiently(lambda: self.journal.items(JOURNAL_KEY[0]), "budget ledger",
                                                      self.recover_wait_s))
        except Exception as exc:
            log.error("budget ledger: journal unreadable after a restart (%s); spend restarts from zero", exc)
            return False
        finally:
            self._restoring.set()
            self._restoring = None

    def _restore(self, journal: dict) -> bool:
        snap = journal.get(JOURNAL_KEY[1])
        if snap is None:
            return False
        b = self.book
        # 5 parts before ended windows, 7 before latest, 8 before charged, 9 before the budgets changed live, 10
        # before what windows had granted under a limit lowered since
        spent, reserved, claims, spend, refusals, *ended = snap
        granted = ended.pop(5) if len(ended) > 5 else {}
        live = ended.pop(4) if len(ended) > 4 else None
        if live is not None:  # the budgets first: the windows' ends are read from them
            version, known, names = live
            known = {s.name: s for s in (BudgetSpec.model_validate(d) for d in known)}
            b.set_specs([known[n] for n in names])
            b.by_name.update(known)
            self.spec_version = version
        b.restore(spent, reserved, claims, spend, *ended)
        b.granted = dict(granted)
        self.refusals.update(refusals)
        stale = list(b.claims)
        if stale:
            asyncio.get_running_loop().call_later(self.settings.reservation_ttl_s, self._expire, stale)
        log.warning("budget ledger: restored after a restart (spent %.6f USD, %d reservation(s) open)",
                    sum(b.spend.values()), len(stale))
        self._changed()
        return True

    def _expire(self, rids: list[str]) -> None:
        open_ = [r for r in rids if r in self.book.claims]
        if open_:
            self.book.settle_many([(r, 0.0) for r in open_])
            self._changed()
