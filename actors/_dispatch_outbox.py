"""A dispatcher's outbox: results, cache fills, settlements, re-admissions and metrics leave in batches,
flushed every few milliseconds, never one actor call per request; a peer that fails does not stop the rest.
A mixin of ``Dispatcher``: it uses the dispatcher's state."""

from __future__ import annotations

import asyncio

from actors._batch_api import _short
from actors._dispatch_jobs import JOB
from actors._shards import by_result_uid
from actors._sync_index import SYNC
from actors._types import send_sharded
from actors.journal import delete_later
from actors.metrics import DispatchCounts
from actors.providers._wire import redact
from engine.core._logkeys import get_logger
from engine.core.cost import mode_factor, reserve_bound
from engine.core.grouping import WarmNote

log = get_logger("smartbatch.dispatcher")

FLUSH_S = 0.005
SPEND_WAIT_S = 2.0  # at most this long ``spend_told`` waits for the budget controller (real seconds)


def maybe_billed_error(error: str | None, maybe_usd: float) -> str | None:
    """A failed request's error, saying what its budget keeps when a call of it may have been billed."""
    if not maybe_usd:
        return error
    return (f"{error or 'failed'}; a call got no answer, so the provider may have billed it: its budget is charged "
            f"the call's upper bound, ${maybe_usd:.6f} (report: possibly_billed)")


def engine_error(provider, exc: BaseException) -> str:
    """A request's error for a call that raised in the engine: with the exception's words (an SDK refusing a call
    before it is sent says there what to change), redacted as a provider's answer is, since they may quote a key."""
    say = getattr(provider, "_redact", redact)  # an HTTP provider's also knows its own key
    words = str(exc)  # none for many (a bare TimeoutError, an assert): its type alone, not "TimeoutError: "
    return say(f"engine error: {type(exc).__name__}" + (f": {words}" if words else ""))[:500]


class Outbox:
    """Outbox methods of ``Dispatcher``."""

    _in_flight_sent: int | None = None  # the in-flight count the hub's gauge last got

    async def report_again(self) -> None:
        """Send every gauge again at the next flush: the hub restarted with none, and a gauge is sent when it
        moves (a circuit open across the restart never showed as open; a hunt)."""
        self._breaker_reported, self._breaker_dirty, self._in_flight_sent = {}, True, None
        self._kick()

    def _maybe_billed(self, j, out=None, answered: bool = False) -> float:
        """What a failed request is settled at: 0, unless one of its sync calls timed out. That call reached the
        provider and may have been billed (the retries under its key find the answer only if the provider is done
        and honours the key), so its budget keeps the call's upper bound at the model's output cap: settled at 0,
        a hard budget was overrun by calls billed unseen (a run of slow answers: the bill $0.0454, the ledger
        $0.0349, the limit $0.05). Counted in the report (``possibly_billed``), never hidden. Where the provider
        does not honour the key, each unanswered call may have been billed: that many bounds. ``out``: a failed
        batch member that may be billed too (its result line unreadable) carries its own bound as its cost.
        ``answered``: a retry under the key was answered by a provider that honours it (billed once: nothing more).
        A flex call given up at its timeout had a key (a body) of its own: its bound, at flex prices, stays.
        A job whose polls gave up on the last try (``_kept``, a video still under way) is billed when it ends,
        whoever polls it: one bound. A try that polled it again took it out: its outcome is that job's."""
        calls = 0 if answered else self._unanswered.get(j.req.uid, 0) + (j.req.uid in self._kept)
        if calls and self.provider.honours_keys:  # every retry went under the first call's key: billed once at most
            calls = 1
        usd = calls * reserve_bound(j.req, self.catalog, "sync", None) if calls else 0.0
        if flex := self._flex_unanswered.get(j.req.uid, 0):
            calls += flex
            usd += flex * self._flex_lost_bound(j.req)
        if out is not None and not out.ok and out.maybe_billed and out.cost:
            calls, usd = calls + 1, usd + out.cost
        self.possibly_billed += calls
        self.possibly_billed_usd += usd
        return usd

    def _flex_lost_bound(self, r) -> float:
        """What a flex call of ``r`` that got no answer may have billed: its upper bound at flex prices where the
        server is seen serving the tier (``flex_served``: OpenAI's and the emulator's address, or a flex answer at
        flex) and never seen ignoring it; else at standard prices, as a server that ignores the field bills it.
        Kept at flex prices there, a probe given up at its timeout held half what it may have cost, again at each
        probe (a server whose flex calls all time out is never seen serving the tier; a helper's hunt)."""
        p = self.provider
        served = getattr(p, "flex_served", True) and not getattr(p, "flex_unserved", False)
        return reserve_bound(r, self.catalog, "sync", None) * (mode_factor(self.sim.spec, "flex") if served else 1.0)

    def _note_warm(self, r, out, start: float) -> None:
        """A call or batch member that read or wrote ``r``'s prompt prefix (``WarmNote.of``), for the groupers'
        policy (``GroupTable.warm``)."""
        pc = self.sim.spec.cache_of(r.model)
        if self._warm_readers and out.ok and out.warm_blocks and pc is not None:
            self._warmth.append(WarmNote.of(r, out.warm_blocks, start, pc.ttl_s, self.settings.prefix_block_tokens))

    # -- the outbox -----------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def _outbox_empty(self) -> bool:
        return not (self._results or self._fills or self._orphans or self._readmit or self._settle
                    or self._observed or self._counts or self._breaker_dirty or self._unjournal
                    or self._turnarounds or self._warmth or self.in_flight != self._in_flight_sent
                    or self._undelivered_dirty)

    # -- settlements and charges the budget controller did not take at once ------------------------------------
    _undelivered_dirty = False  # the journaled copy of them (in the tally) is behind

    @property
    def _undelivered(self) -> dict[tuple[str, str], object]:
        """(method, claim or charge id) -> the settlement or charge, while the budget controller has not taken it."""
        return self.__dict__.setdefault("_undelivered_items", {})

    def _to_budget(self, method: str, items: list) -> None:
        """Send settlements (``settle_many``) or charges (``charge_many``) to the budget controller, asked again
        while it restarts (``Peer.deliver``). Those it did not take at first are in the journaled tally until it
        does, and a restart of this dispatcher sends them again: kept in its memory alone, they died with it when
        it died within seconds of a budget controller's restart (a helper's hunt: the ledger $0.016 against a bill
        of $0.040, and 57 claims holding 72 % of the budget until the engine stopped, later requests refused)."""
        keys = [(method, x.cid if method == "charge_many" else x[0]) for x in items]

        def held(waiting: bool) -> None:
            pending = self._undelivered
            if waiting:
                pending.update(zip(keys, items))
            elif not pending or not [k for k in keys if pending.pop(k, None) is not None]:
                return  # taken at once, as nearly always: nothing was journaled
            self._undelivered_dirty = True
            self._kick()

        self.budget.deliver(method, items, held=held)

    async def spend_told(self, timeout_s: float = SPEND_WAIT_S) -> bool:
        """Answers once the budget controller has taken the settlements and charges this dispatcher has sent (each
        leaves before the results it settles), or after ``timeout_s`` while it is restarting: the driver asks this
        before it reads the ledger for a report. Ray does not order this dispatcher's settlement and the driver's
        read of the ledger (two callers), so a report read as soon as the last result was in could miss that
        result's spend (a helper's hunt under load: the ledger one image short of the bill)."""
        return await self.budget.delivered(timeout_s)

    def _deliver_again(self, saved: dict) -> None:
        """After a restart: send again what the last process had not delivered (settling and charging count
        once); each leaves the journaled tally once taken."""
        self._undelivered.update(saved)
        for method in ("settle_many", "charge_many"):
            if items := [x for (m, _), x in saved.items() if m == method]:
                self._to_budget(method, items)

    async def _flush_soon(self) -> None:
        # Loop until empty: what timers add while a flush awaits a peer (the result hub, the journal) must not
        # wait for a later kick that may never come (the dispatcher's last completions).
        while not self._outbox_empty():
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        results, prices, self._results, self._list_prices = self._results, self._list_prices, [], []
        fills, self._fills = self._fills, []
        orphans, self._orphans = self._orphans, []
        readmit, self._readmit = self._readmit, []
        settle, self._settle = [*self._settle, *self._released_at_stop(readmit)], []  # (the stop's: see there)
        observed, self._observed = self._observed, []
        turnarounds, self._turnarounds = self._turnarounds, []
        warmth, self._warmth = self._warmth, []
        if self._breaker_dirty:
            self._counts.breaker_open.update(self._breaker_changes())
        counts, self._counts = self._counts, DispatchCounts()
        unjournal, self._unjournal = self._unjournal, []
        if observed or counts or self.in_flight != self._in_flight_sent:
            # The in-flight count with every message: sent only as work started, the gauge kept its peak after
            # the work ended (a hunt: 8 in flight 10 s after all 8 had answered).
            self._in_flight_sent = self.in_flight
            self.hub.send("observe_dispatches", self.name, observed, counts.as_dict(), self.in_flight)
        if turnarounds:  # every grouper decides for this provider's models: one message each per flush
            self._told_seq += 1
            self._told.append((self._told_seq, turnarounds))
            for g in self.groupers:
                g.send("observe_turnarounds", turnarounds, self.name, self._told_seq)
        for g in self.groupers if warmth else ():
            g.send("observe_warmth", warmth)
        if settle:
            # Before any await: a settlement needs no peer's answer, and behind the cache fill below it waited
            # for a cache that was restarting (seconds) or hung (until the driver kills it), so the ledger's spend
            # lagged results already delivered, and their claims held the budget at their reserved bounds.
            self._to_budget("settle_many", settle)
        # The fills leave before the results (a free lane's call starts before the push's): a driver that had a
        # result and at once sent the same prompt under a new id, due sooner, found its leader still in flight in
        # the cache, which it may not follow (``release_lead``), and it was generated and paid again.
        self._to_caches(fills, orphans)
        if results:
            try:
                await self.hubs.call("push", by_result_uid, results, prices)
            except Exception as exc:  # the hub died: its restart re-admits these, and ``recall`` sends them again
                log.warning("dispatcher %s: hub did not take %d result(s): %s", self.name, len(results), _short(exc))
                # Their records stay while this dispatcher may yet restart before a push goes through (its journal
                # then re-reads the batches they came from), and go with the next push that does. Kept for good,
                # a record made any later restart re-attach to an ended batch and hand its cancelled members back,
                # to be sent and paid again.
                self._unjournal_held.extend(unjournal)
                unjournal = []
            else:
                unjournal, self._unjournal_held = unjournal + self._unjournal_held, []
        # The hub's entries go with the records, the batches', sync calls' and jobs' in one message (``_batch_index``)
        marks = {self._space: "", self._sync_journal.space: SYNC, self._jobs_journal.space: JOB}
        self._index_drop([marks[sp] + k for sp, k in unjournal if sp in marks])
        self._sync_forget(k for sp, k in unjournal if sp == self._sync_journal.space)
        for space in {sp for sp, _ in unjournal}:
            keys = [k for sp, k in unjournal if sp == space]
            writer = next((w for w in (self._sync_journal, self._jobs_journal) if w.space == space), None)
            if writer is not None:  # with that space's writes, so a late delete never takes a newer record
                for k in keys:
                    writer.delete(k)
            else:
                try:
                    await self.journal.delete(space, keys)
                except Exception as exc:  # tried again: a record left for good is a batch a restart re-attaches to
                    log.warning("dispatcher %s: could not clear %d journal record(s), trying again: %s", self.name,
                                len(keys), _short(exc))
                    delete_later(self.journal, space, keys, self._journal_retries)
        if readmit:
            send_sharded(self.groupers, readmit)
        self._undelivered_dirty = False  # the tally below holds them
        await self._journal_tally()

    def _to_caches(self, fills: list, orphans: list) -> None:
        one = len(self.caches) == 1  # (as ``Shards`` routes: a lone cache takes every shard's part)
        for shard, fill in fills:
            self._cache_queues.setdefault(0 if one else shard, ([], []))[0].append(fill)
        for shard, orphan in orphans:
            self._cache_queues.setdefault(0 if one else shard, ([], []))[1].append(orphan)
        for shard in {0 if one else s for s, _ in (*fills, *orphans)}:
            task = self._cache_tasks.get(shard)
            if task is None or task.done():
                self._cache_tasks[shard] = asyncio.get_running_loop().create_task(self._cache_lane(shard))

    async def _cache_lane(self, shard: int) -> None:
        """Hand one cache shard its fills, then its orphans (a failed leader's followers come back for
        re-admission), one call at a time, in order. It runs beside the outbox and the other shards' lanes
        because, when these calls were awaited inside ``flush``, a cache shard that was restarting (seconds) or
        hung (until the driver kills it) held every later result, settlement and re-admission of this
        dispatcher, and every other shard's fills, behind it. A shard that died must not stop the rest: its
        losses are made good by the driver's re-admission."""
        peer, (fills_q, orphans_q) = self.caches[shard], self._cache_queues[shard]
        while fills_q or orphans_q:
            fills, orphans = fills_q[:], orphans_q[:]
            fills_q.clear()
            orphans_q.clear()
            if fills:
                try:
                    await peer.call("complete", fills)
                except Exception as exc:
                    log.warning("dispatcher %s: cache shard %d did not take %d result(s): %s", self.name, shard,
                                len(fills), _short(exc))
            if orphans:
                try:
                    back = await peer.call("orphans", orphans)
                except Exception as exc:
                    log.warning("dispatcher %s: cache shard %d did not answer for orphans: %s", self.name, shard,
                                _short(exc))
                    continue
                if back:
                    send_sharded(self.groupers, back)

    # -- the circuit breaker's state, for the metrics ---------------------------------------------------------
    def _breaker_failure(self, model: str) -> None:
        """Tell the breaker; count an opening and note when the circuit closes again, so the 0/1 gauge
        follows it even if no call of the model comes after."""
        before = self.sim.breaker.opened
        now = self.clock.now()
        self.sim.failure(model, now)
        if self.sim.breaker.opened > before:
            c = self._counts.breaker_openings
            c[model] = c.get(model, 0) + 1
            self._breaker_dirty = True
            until = self.sim.breaker.open_until(model, now)
            if until is not None:
                self._at(until + 1e-6, lambda: setattr(self, "_breaker_dirty", True))

    def _breaker_changes(self) -> dict[str, int]:
        """Models whose circuit state changed since the last report (all of them on the first)."""
        self._breaker_dirty = False
        now = self.clock.now()
        out = {}
        for m in self.sim.spec.models:
            state = int(self.sim.breaker.open_until(m, now) is not None)
            if self._breaker_reported.get(m) != state:
                out[m] = self._breaker_reported[m] = state
        return out

