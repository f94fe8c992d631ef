"""A Redis ledger's outbox at the engine's stop (a mixin of ``actors.budget.BudgetController``): what Redis has
not taken yet is not dropped with the engine.

Ray's key-value store, where the outbox is journaled (``actors._budget_outbox``), goes with a local Ray, and the
engine's stop removes its records anyway. So the stop first gives Redis a bounded time to come back and take them
(``leave``); what is still waiting then goes to the driver, which keeps it on disk for the next engine on the same
ledger (``actors._budget_kept``), whose controller takes it back at its start (``take_kept``) and sends it once
Redis answers. Sending one again is safe: a settlement leaves a marker, a charge counts once by its id.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from actors._budget_outbox import _charge_key, _settlement_key
from engine.core._logkeys import get_logger

__all__ = ["OutboxAtStop"]

log = get_logger("smartbatch.budget")


class OutboxAtStop:
    """``leave`` and ``take_kept`` of ``BudgetController`` (a Redis ledger only)."""

    async def leave(self, wait_s: float) -> dict[str, Any]:
        """The engine stops: wait up to ``wait_s`` real seconds for Redis to take what waits for it. Returns {} if
        nothing is left, else what is (``records``, as the outbox journal holds them) and its figures, for the
        driver to keep where the next engine on this ledger reads it."""
        if not self._errors:
            return {}
        await self._restored_first()
        give_up = time.monotonic() + wait_s
        # Items in a call to Redis (the flusher's, another ``leave``'s: a stop taken over from one whose process
        # died, its call still running here) are neither taken nor in the outbox until it ends: waited for too.
        # Only the lists read, this answered {} while both items were out, and the stop killed the controller
        # with them ($2 kept in no file, a review of stop 77's take-over).
        while self._outbox or self._charges or self._settling:
            if self._outbox or self._charges:
                if self._usable() and await self._settle([]) and await self._charge() and not self._settling:
                    break
            now = time.monotonic()
            if now >= give_up:
                break
            # Redis is tried again once its retry pause ends (``budgets.redis_retry_s``), not before.
            await asyncio.sleep(min(give_up, max(self._down_until or now, now + 0.01)) - now)
        # They come back to the outbox when the call fails: within its timeouts (the watch's read of which Redis
        # answers, the script, its load), well inside the stop's wait for this answer (``leave_call_s``).
        settled_by = time.monotonic() + 4 * self.settings.redis_timeout_s + 1.0
        while self._settling and time.monotonic() < settled_by:
            await asyncio.sleep(0.01)  # no event marks the end of a ledger call: bounded by its timeouts
        if not (self._outbox or self._charges):
            return {}
        copy = self.book.claim_copy
        records = {_settlement_key(rid, usd): (rid, usd, copy(rid)) for rid, usd in self._outbox}
        records.update((_charge_key(c), (c, t)) for c, t in self._charges)
        return {"settlements": len(self._outbox), "charges": len(self._charges),
                "unsettled_usd": round(sum(u for _, u in self._outbox) + sum(c.usd for c, _ in self._charges), 9),
                "redis_url": self._url, "error": self._last_error, "records": records}

    async def take_kept(self, records: dict[str, Any]) -> int:
        """Take into the outbox what an engine stopped on this ledger left (``leave``'s records), journal it, and
        send it now if Redis answers. Returns how many of them no journal holds (0: the driver may delete its
        copy on disk)."""
        if not self._errors or not records:
            return 0
        await self._restored_first()
        settlements, charges = [], []
        # An item waiting already (two kept files may hold one: one given back, then kept anew) waits once.
        here = {_settlement_key(rid, usd) for rid, usd in self._outbox} | {_charge_key(c) for c, _ in self._charges}
        for k, v in records.items():
            if k in here:
                continue
            if k.startswith("s\x1f"):
                rid, usd, known = v
                settlements.append((rid, usd))
                if known is not None:  # its spend counted even if Redis lost the claim's record meanwhile
                    self.book.restore_copy(rid, known)
            else:
                charges.append(v)
                self._charged.add(v[0].cid, v[0].usd, self.now())
        self._outbox[:0] = settlements
        self._charges[:0] = charges
        await self._keep_pending(settlements, charges)
        if self._usable():
            await self._settle([])
            await self._charge()
        if self._outbox or self._charges:
            self._arm_flush()
        self._changed(journal=False)
        log.warning("budget ledger: %d settlement(s) and %d charge(s) an engine stopped on this ledger left "
                    "unsettled taken back; %s", len(settlements), len(charges),
                    "sent once Redis answers" if self._outbox or self._charges else "Redis took them")
        return self.unjournaled()

    async def kept_waiting(self, keys: list[str]) -> list[str]:
        """Which of ``keys`` (``take_kept``'s records) Redis has not taken yet: all while a call to Redis is out
        (its items come back should it fail). The driver deletes a file it took back once none of its items wait:
        held on after Redis took them, a crash of the engine days later had the next one send them again past
        their markers' life (counted twice)."""
        await self._restored_first()  # (a restarted controller's outbox is read back first)
        if self._settling:
            return list(keys)
        waiting = {_settlement_key(rid, usd) for rid, usd in self._outbox}
        waiting.update(_charge_key(c) for c, _ in self._charges)
        return [k for k in keys if k in waiting]

