"""A dispatcher's outbox: results, cache fills, settlements, re-admissions and metrics leave in batches,
flushed every few milliseconds, never one actor call per request; a peer that fails does not stop the rest.
A mixin of ``Dispatcher``: it uses the dispatcher's state."""

from __future__ import annotations

import asyncio
import logging

from actors._batch_api import _short
from actors._shards import by_result_uid
from actors._types import send_sharded
from actors.metrics import DispatchCounts

log = logging.getLogger("smartbatch.dispatcher")

FLUSH_S = 0.005


class Outbox:
    """Outbox methods of ``Dispatcher``."""

    # -- the outbox -----------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def _outbox_empty(self) -> bool:
        return not (self._results or self._fills or self._orphans or self._readmit or self._settle
                    or self._observed or self._counts or self._breaker_dirty or self._unjournal
                    or self._turnarounds)

    async def _flush_soon(self) -> None:
        # Loop until empty: what timers add while a flush awaits the cache must not wait for a later kick
        # that may never come (the dispatcher's last completions).
        while not self._outbox_empty():
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        results, prices, self._results, self._list_prices = self._results, self._list_prices, [], []
        fills, self._fills = self._fills, []
        orphans, self._orphans = self._orphans, []
        readmit, self._readmit = self._readmit, []
        settle, self._settle = self._settle, []
        observed, self._observed = self._observed, []
        turnarounds, self._turnarounds = self._turnarounds, []
        if self._breaker_dirty:
            self._counts.breaker_open.update(self._breaker_changes())
        counts, self._counts = self._counts, DispatchCounts()
        unjournal, self._unjournal = self._unjournal, []
        if observed or counts:
            self.hub.send("observe_dispatches", self.name, observed, counts.as_dict())
        if turnarounds:  # every grouper decides for this provider's models: one message each per flush
            self._told_seq += 1
            self._told.append((self._told_seq, turnarounds))
            for g in self.groupers:
                g.send("observe_turnarounds", turnarounds, self.name, self._told_seq)
        if results:
            try:
                await self.hubs.call("push", by_result_uid, results, prices)
            except Exception as exc:  # the hub died: its restart re-admits these; keep their records
                log.warning("dispatcher %s: hub did not take %d result(s): %s", self.name, len(results), _short(exc))
                unjournal = []
        for space in {sp for sp, _ in unjournal}:
            keys = [k for sp, k in unjournal if sp == space]
            if space == self._sync_journal.space:
                for k in keys:
                    self._sync_journal.delete(k)
            else:
                try:
                    await self.journal.delete(space, keys)
                except Exception as exc:  # a stale record only makes a restarted dispatcher poll an ended batch
                    log.warning("dispatcher %s: could not clear %d journal record(s): %s", self.name, len(keys),
                                _short(exc))
        # A peer that died (and restarts) must not stop the rest of the outbox: the cache's losses are made
        # good by the driver's re-admission, a lost settlement by the reservation's TTL.
        if fills:
            try:
                await self.caches.call("complete", [s for s, _ in fills], [f for _, f in fills])
            except Exception as exc:
                log.warning("dispatcher %s: cache did not take %d result(s): %s", self.name, len(fills), _short(exc))
        if orphans:
            answers, errors = await self.caches.call_partial("orphans", [s for s, _ in orphans],
                                                             [o for _, o in orphans])
            readmit.extend(f for _, part in answers for f in part)
            for exc in errors:
                log.warning("dispatcher %s: cache did not answer for orphans: %s", self.name, _short(exc))
        if settle:
            self.budget.send("settle_many", settle)
        if readmit:
            send_sharded(self.groupers, readmit)
