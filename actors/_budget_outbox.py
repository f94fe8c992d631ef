"""A Redis ledger's outbox in the hub's journal (a mixin of ``actors.budget.BudgetController``, which owns the
outbox): the settlements and charges Redis has not taken yet, kept where they outlive the budget controller.

Without it, a controller Ray restarted while Redis was away lost them: a lost settlement's claim was released at its
expiry with its spend uncounted, a lost charge was never counted, and a hard budget could be passed unseen. Each is
written when it is queued for want of Redis, before the call that handed it over is answered, and deleted once
Redis took it; a restarted controller reads them back and sends them when Redis answers. Sending one again is safe:
a settlement leaves a marker and a charge counts once by its id (``actors/_budget_scripts.py``). While Redis
answers the outbox stays empty and nothing is written.

One record per item, keyed by what it is (a settlement by claim and amount, a charge by id), so a record is
deleted only once Redis took that item, whatever other calls queue or flush meanwhile. The journal's calls go one
at a time (a lock): Ray does not order calls to an async actor, and a delete sent beside its put could land first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from actors.journal import HubJournal, read_patiently
from engine.core.budgets import Charge

__all__ = ["OUTBOX_SPACE", "OutboxJournal"]

OUTBOX_SPACE = "budget-outbox"
PUT_TIMEOUT_S = 10.0  # a write that takes longer is given up (logged): the item stays in the outbox in memory
log = logging.getLogger("smartbatch.budget")


def _settlement_key(rid: str, usd: float) -> str:
    return f"s\x1f{rid}\x1f{usd!r}"


def _charge_key(c: Charge) -> str:
    return f"c\x1f{c.cid}"


class OutboxJournal:
    """Outbox journal methods of ``BudgetController`` (a Redis ledger only: a memory ledger's snapshot holds all)."""

    def _outbox_journal(self) -> HubJournal | None:
        j = self.__dict__.get("_outbox_j")
        if j is None and self.hub is not None and self._errors:
            j = self.__dict__["_outbox_j"] = HubJournal(self.hub)
        return j

    def _outbox_state(self) -> tuple[set[str], asyncio.Lock]:
        """The keys the journal holds (or is being given), and the lock that orders the journal's calls."""
        if "_outbox_keys" not in self.__dict__:
            self.__dict__["_outbox_keys"], self.__dict__["_outbox_lock"] = set(), asyncio.Lock()
        return self.__dict__["_outbox_keys"], self.__dict__["_outbox_lock"]

    async def _keep_pending(self, settlements: list[tuple[str, float]] = (),
                            charges: list[tuple[Charge, float]] = ()) -> None:
        """Journal the items just queued for want of Redis that the journal does not hold yet (the flusher's
        retries of the same items write nothing)."""
        journal = self._outbox_journal()
        if journal is None:
            return
        keys, lock = self._outbox_state()
        copy = self.book.claim_copy
        # A settlement carries what the book knew of its claim (whose spend, which windows), so a restarted
        # controller still counts it should Redis have lost the claim's record meanwhile.
        new = {k: (rid, usd, copy(rid)) for rid, usd in settlements
               if (k := _settlement_key(rid, usd)) not in keys}
        new.update((k, (c, t)) for c, t in charges if (k := _charge_key(c)) not in keys)
        if not new:
            return
        keys.update(new)  # before the put: a flush that lands meanwhile deletes them, after it (the lock)
        async with lock:
            try:
                await asyncio.wait_for(journal.put_many(OUTBOX_SPACE, new), PUT_TIMEOUT_S)
            except Exception as exc:
                keys.difference_update(new)  # the next queueing of them tries again
                log.warning("budget ledger: %d item(s) waiting for Redis not journaled (%s: %s); a restart of "
                            "this actor before Redis answers loses them", len(new), type(exc).__name__, exc)

    async def _taken(self, settlements: list[tuple[str, float]] = (), charges: list[tuple[Charge, float]] = ()) -> None:
        """Redis took these: their records go (none on the normal path, where nothing was journaled)."""
        keys, lock = self._outbox_state()
        if not keys:
            return
        gone = [k for k in (*(_settlement_key(r, u) for r, u in settlements), *(_charge_key(c) for c, _ in charges))
                if k in keys]
        if not gone:
            return
        keys.difference_update(gone)
        async with lock:
            try:
                await asyncio.wait_for(self._outbox_journal().delete(OUTBOX_SPACE, gone), PUT_TIMEOUT_S)
            except Exception as exc:  # left: a restart sends them again, which counts nothing twice
                log.warning("budget ledger: %d taken item(s) not cleared from the journal (%s: %s)", len(gone),
                            type(exc).__name__, exc)

    async def rejournal_outbox(self) -> None:
        """The hub restarted (its journal empty): write what waits for Redis again."""
        if self._outbox_journal() is None:
            return
        self._outbox_state()[0].clear()
        await self._keep_pending(list(self._outbox), list(self._charges))

    async def recover_outbox(self) -> bool:
        """After a restart: take back what waited for Redis, to be sent once it answers. Merged with what came
        since (no ledger call waits for it: nothing is overwritten). Once per incarnation."""
        journal = self._outbox_journal()
        if journal is None or self.__dict__.get("_outbox_read"):
            return False
        self._outbox_read = True
        try:
            records: dict[str, Any] = await read_patiently(lambda: journal.items(OUTBOX_SPACE), "budget outbox",
                                                           self.recover_wait_s)
        except Exception as exc:
            log.error("budget ledger: outbox journal unreadable after a restart (%s); what waited for Redis then "
                      "is not sent (its claims are released at their expiry)", exc)
            return False
        if not records:
            return False
        keys, _ = self._outbox_state()
        keys.update(records)
        settlements, charges = [], []
        for k, v in records.items():
            if k.startswith("s\x1f"):
                rid, usd, known = v
                settlements.append((rid, usd))
                if known is not None:
                    self.book.restore_copy(rid, known)
            else:
                charges.append(v)
                self._charged[v[0].cid] = v[0].usd
        self._outbox[:0] = settlements
        self._charges[:0] = charges
        log.warning("budget ledger: %d settlement(s) and %d charge(s) waiting for Redis taken back after a "
                    "restart; sent once Redis answers", len(settlements), len(charges))
        self._arm_flush()
        self._changed(journal=False)
        return True
