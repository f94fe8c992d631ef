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

Written in groups (since stop 72): one record per write, holding every item queued while the write before it was
out, and each call waits for the write holding its items before it is answered (a group commit: the guarantee is
the one-record-per-item journal's). Before, each item was a record and a write of its own: a burst of settlements
while Redis was away made one call to Ray's store each, in line behind each other (``benchmarks/bench_outbox_kv.py``:
200 calls for a burst of 200, now 2). An item is dropped from its record once Redis took it, and a record goes once
all its items went (the whole space in one call once the outbox is empty), whatever other calls queue or flush
meanwhile. The journal's calls go one at a time (one writer task): Ray does not order calls to an async actor, and
a delete sent beside its put could land first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from actors.journal import HubJournal, read_patiently
from engine.core._logkeys import get_logger
from engine.core.budgets import Charge

__all__ = ["OUTBOX_SPACE", "OutboxJournal"]

OUTBOX_SPACE = "budget-outbox"
_SEP = "\x1f"
PUT_TIMEOUT_S = 10.0  # a write that takes longer is given up (logged): the item stays in the outbox in memory
log = get_logger("smartbatch.budget")


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

    def _outbox_state(self) -> _Segments:
        if "_outbox_segs" not in self.__dict__:
            # A restarted controller's journal may hold a dead incarnation's records not read back yet.
            self.__dict__["_outbox_segs"] = _Segments(self.spec_incarnation, whole=not self._restarted)
        return self.__dict__["_outbox_segs"]

    async def _keep_pending(self, settlements: list[tuple[str, float]] = (),
                            charges: list[tuple[Charge, float]] = ()) -> None:
        """Journal the items just queued for want of Redis that the journal does not hold yet (the flusher's
        retries of the same items write nothing); return once the write holding them ended."""
        journal = self._outbox_journal()
        if journal is None:
            return
        st = self._outbox_state()
        copy = self.book.claim_copy
        # A settlement carries what the book knew of its claim (whose spend, which windows), so a restarted
        # controller still counts it should Redis have lost the claim's record meanwhile.
        new = {k: (rid, usd, copy(rid)) for rid, usd in settlements
               if (k := _settlement_key(rid, usd)) not in st.keys}
        new.update((k, (c, t)) for c, t in charges if (k := _charge_key(c)) not in st.keys)
        if new:
            st.keys.update(new)
            st.pending.update(new)
            await self._outbox_written(st)

    async def _taken(self, settlements: list[tuple[str, float]] = (), charges: list[tuple[Charge, float]] = ()) -> None:
        """Redis took these: their records go (none on the normal path, where nothing was journaled)."""
        st = self._outbox_state()
        if not st.keys:
            return
        gone = [k for k in (*(_settlement_key(r, u) for r, u in settlements), *(_charge_key(c) for c, _ in charges))
                if k in st.keys]
        if gone:
            st.drop(gone)
            await self._outbox_written(st)

    async def _outbox_written(self, st: _Segments) -> None:
        """Have the writer take what ``st`` has to write or delete now, and return once it has."""
        st.asked += 1
        want = st.asked
        if st.writer is None or st.writer.done():
            st.writer = asyncio.get_running_loop().create_task(self._outbox_writer(st))
        async with st.cond:
            await st.cond.wait_for(lambda: st.done >= want)

    async def _outbox_writer(self, st: _Segments) -> None:
        # One call to the journal at a time, so a delete never lands before the put it follows (Ray does not order
        # calls to an async actor); each put carries every item queued while the one before was out.
        journal = self._outbox_journal()
        while st.done < st.asked:
            upto, batch = st.asked, st.pending
            st.pending = {}
            if batch:
                seg = st.open(batch)
                try:
                    await asyncio.wait_for(journal.put_many(OUTBOX_SPACE, {seg: batch}), PUT_TIMEOUT_S)
                except Exception as exc:
                    st.failed(seg)  # the next queueing of them tries again
                    log.warning("budget ledger: %d item(s) waiting for Redis not journaled (%s: %s); a restart of "
                                "this actor before Redis answers loses them", len(batch), type(exc).__name__, exc)
                else:
                    st.landed(seg)
            dead = st.dead()
            if dead:
                try:
                    # The outbox empty and the journal holding nothing else: one call for them all.
                    if not st.live and st.whole and hasattr(journal, "clear"):
                        await asyncio.wait_for(journal.clear(OUTBOX_SPACE), PUT_TIMEOUT_S)
                    else:
                        await asyncio.wait_for(journal.delete(OUTBOX_SPACE, dead), PUT_TIMEOUT_S)
                except Exception as exc:  # left: a restart sends them again, which counts nothing twice
                    log.warning("budget ledger: %d taken record(s) not cleared from the journal (%s: %s)",
                                len(dead), type(exc).__name__, exc)
            st.done = upto
            async with st.cond:
                st.cond.notify_all()

    def unjournaled(self) -> int:
        """How many items waiting for Redis no journal holds now (none given, or its write failed: tried again at
        the next retry): a restart now would lose them. Reported with the ledger, as `unjournaled`."""
        st = self.__dict__.get("_outbox_segs")
        keys = st.keys if st is not None else ()
        return (sum(_settlement_key(r, u) not in keys for r, u in self._outbox)
                + sum(_charge_key(c) not in keys for c, _ in self._charges))

    async def rejournal_outbox(self) -> None:
        """The hub restarted (its journal empty): write what waits for Redis again, if the hub kept it."""
        journal = self._outbox_journal()
        if journal is None or journal.durable:  # kept apart from the hub: its restart took nothing
            return
        old = self.__dict__.pop("_outbox_segs", None)
        if old is not None:  # numbered on: the old writer, if still out, deletes none of the new records
            self._outbox_state().seq = old.seq
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
            taken = self._take_back(records)
            self._outbox_state().whole = True  # read back: a clear removes nothing unread from now on
            return taken
        finally:
            reading.set()

    def _take_back(self, records: dict[str, Any]) -> bool:
        """Put the journal's ``records`` back in the outbox, ahead of what came since."""
        if not records:
            return False
        settlements, charges = [], []
        for k, v in self._outbox_state().read(records).items():
            if k.startswith("s\x1f"):
                rid, usd, known = v
                settlements.append((rid, usd))
                if known is not None:
                    self.book.restore_copy(rid, known)
            else:
                charges.append(v)
                self._charged.add(v[0].cid, v[0].usd, self.now())
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


class _Segments:
    """Where the outbox's records are in the journal: one key (a segment) per write, holding every item queued
    while the write before it was out, so a burst of calls while Redis is away costs the journal a write or two,
    not one per item. ``g<sep><number><sep><incarnation>``: numbered on across restarts, so read back in order."""

    def __init__(self, incarnation: str, whole: bool = True):
        self.incarnation = incarnation
        # The journal holds no records but those this knows of (a new controller's, or once the restart's read
        # them back): only then may the space be cleared whole. Cleared before, a restarted controller whose
        # calls came beside its slow read-back wiped a dead incarnation's records unread (a review).
        self.whole = whole
        self.keys: set[str] = set()  # every item the journal holds or is being given (``unjournaled``)
        self.pending: dict[str, Any] = {}  # queued for the next write
        self.live: dict[str, set[str]] = {}  # segment -> its items Redis has not taken
        self.where: dict[str, str] = {}  # item -> its segment
        self.out: str | None = None  # the segment being written
        self.seq = 0
        self.asked = self.done = 0  # calls that gave the writer work, and how many of them it has done
        self.writer: asyncio.Task | None = None
        self.cond = asyncio.Condition()

    def open(self, batch: dict[str, Any]) -> str:
        self.seq += 1
        seg = self.out = f"g{_SEP}{self.seq:010d}{_SEP}{self.incarnation}"
        self.live[seg] = set(batch)
        self.where.update((k, seg) for k in batch)
        return seg

    def landed(self, seg: str) -> None:
        self.out = None

    def failed(self, seg: str) -> None:
        self.out = None
        for k in self.live.pop(seg, ()):
            self.keys.discard(k)
            self.where.pop(k, None)

    def drop(self, gone: list[str]) -> None:
        """Redis took ``gone``: out of what is still to write, or of their segment."""
        for k in gone:
            self.keys.discard(k)
            if self.pending.pop(k, None) is None and (seg := self.where.pop(k, None)) is not None:
                self.live[seg].discard(k)

    def dead(self) -> list[str]:
        """The segments written whose items Redis took all: to delete (one being written waits for its put)."""
        gone = [seg for seg, items in self.live.items() if not items and seg != self.out]
        for seg in gone:
            del self.live[seg]
        return gone

    def read(self, records: dict[str, Any]) -> dict[str, Any]:
        """The items of the journal's ``records`` (segments, read back after a restart), in the order queued;
        their segments are this controller's to delete once Redis took them, and its own number on after them."""
        items: dict[str, Any] = {}
        for seg in sorted(records):
            batch = records[seg] if seg.startswith("g" + _SEP) else {seg: records[seg]}  # (one item a key: before)
            fresh = {k: v for k, v in batch.items() if k not in self.keys and k not in items}
            items.update(fresh)
            self.live[seg] = set(fresh)
            self.where.update((k, seg) for k in fresh)
            if seg.startswith("g" + _SEP):
                self.seq = max(self.seq, int(seg.split(_SEP)[1]))
        self.keys.update(items)
        return items
