"""A Redis ledger's outbox, journaled (a mixin of ``actors.budget.BudgetController``, which owns the outbox): the
settlements and charges Redis has not taken yet, kept where they outlive the budget controller, and sent once
Redis answers.

Where: the controller's ``kv_journal`` when it has one (the engine gives it Ray's key-value store,
``actors._kv_journal``, which outlives the hub too), else the hub's memory. In the hub's memory alone, the
outbox was lost when the hub and the controller died together while Redis was away (a helper's hunt): the
engine no longer runs so; a controller made without either (a test's) journals nothing.

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

    def _outbox_journal(self):
        """Where the outbox is journaled: the controller's ``kv_journal``, else the hub's memory (None: a
        memory ledger, or neither)."""
        j = self.__dict__.get("_outbox_j")
        if j is None and self._errors:
            j = self.kv_journal if self.kv_journal is not None else (
                HubJournal(self.hub) if self.hub is not None else None)
            self.__dict__["_outbox_j"] = j
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

    def unjournaled(self) -> int:
        """How many items waiting for Redis no journal holds now (none given, or its write failed: tried again at
        the next retry): a restart now would lose them. Reported with the ledger, as `unjournaled`."""
        keys = self.__dict__.get("_outbox_keys", ())
        return (sum(_settlement_key(r, u) not in keys for r, u in self._outbox)
                + sum(_charge_key(c) not in keys for c, _ in self._charges))

    async def rejournal_outbox(self) -> None:
        """The hub restarted (its journal empty): write what waits for Redis again, if the hub kept it."""
        journal = self._outbox_journal()
        if journal is None or journal.durable:  # kept apart from the hub: its restart took nothing
            return
        self._outbox_state()[0].clear()
        await self._keep_pending(list(self._outbox), list(self._charges))

    async def recover_outbox(self) -> bool:
        """After a restart: take back what waited for Redis, to be sent once it answers. Merged with what came
        since (no ledger call waits for it: nothing is overwritten). Once per incarnation; a second caller (the
        driver's rewire beside the first call) returns once the first has taken them back, so a report it makes
        counts them."""
        journal = self._outbox_journal()
        if journal is None:
            return False
        reading = self.__dict__.get("_outbox_read")
        if reading is not None:
            await reading.wait()
            return False
        reading = self._outbox_read = asyncio.Event()
        try:
            try:
                records: dict[str, Any] = await read_patiently(lambda: journal.items(OUTBOX_SPACE),
                                                               "budget outbox", self.recover_wait_s)
            except Exception as exc:
                log.error("budget ledger: outbox journal unreadable after a restart (%s); what waited for Redis "
                          "then is not sent (its claims are released at their expiry)", exc)
                return False
            return self._take_back(records)
        finally:
            reading.set()

    def _take_back(self, records: dict[str, Any]) -> bool:
        """Put the journal's ``records`` back in the outbox, ahead of what came since."""
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

    def _arm_flush(self) -> None:
        """Replay the outbox once Redis is back, even if no other call comes to do it."""
        if not self._closed and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_outbox())

    async def _flush_outbox(self) -> None:
        # A close's cancel that lands in a Redis read can come back as the client's own error, which ``_settle``
        # takes for an outage: the cancel was spent, and with Redis away the flusher ran on for good.
        while not self._closed and (self._outbox or self._charges):
            await asyncio.sleep(self.settings.redis_retry_s)
            if self._usable() and await self._settle([]) and await self._charge():
                self._changed()
