"""The budget controller's memory ledger in the hub's journal: written before a change is answered, read
back after a restart (a Redis ledger needs no journal).

A copy goes to Ray's key-value store (the controller's ``kv_journal``, ``actors._kv_journal``), which outlives the
hub: the hub's journal is its memory, rewritten by the controller after the hub restarts, so the hub and the
controller dying together (a node lost, both workers killed) restarted every budget from zero, its spend forgotten
and a hard budget passable. The copy is off the hot path: no answer waits for it, at most one write is out at a time
and the next carries the newest state, started at most every ``KV_EVERY_S``: a joint death loses at most the changes
of that and one write's latency (never one write per request: Ray's store is the cluster's, on the head node).

Each snapshot carries an epoch (one past every snapshot the incarnation's restore read), when the incarnation began
and a change number that goes on across restarts; each incarnation writes to a key of its own
(``ledger@<incarnation>``), in the hub's journal as in Ray's store, and a restart takes back the newest by (epoch,
start, change) (``actors._incarnations``): a dead incarnation's write still in flight when its successor wrote lands
in its own key, never over the successor's, and ranks below it. In one key of the hub's journal (until stop 73),
such a late write replaced the successor's snapshot, and a restart of the controller alone then took back the dead
one's ledger over the successor's copies in Ray's store that had not landed yet (its last 0.25 s), or had none.
"""

from __future__ import annotations

import asyncio
import math

from actors._incarnations import began, drop_earlier, earlier, next_epoch, own_key
from actors.journal import read_patiently
from engine.core._logkeys import get_logger
from engine.core.budgets import BudgetSpec
from engine.core.ledger import KeptCharges

__all__ = ["JOURNAL_KEY", "LedgerJournal"]

JOURNAL_KEY = ("budget", "ledger")  # the space, and the stem of every key: ``ledger`` alone before stop 73
# The stem of the charge ids' record in the hub (``charges@<incarnation>``): written with a snapshot only when the ids
# changed since the last that landed there, the snapshot's own place for them then None (since stop 82).
IDS_STEM = "charges"
PUT_TIMEOUT_S = 10.0  # a snapshot write that takes longer is given up (logged); the next change writes again
KV_RETRY_S = 1.0  # a copy Ray's store refused is written again this long after (the latest state), until it takes one
# Copies start at most this often: under steady load the ledger changes all the time, and back-to-back copies would
# pickle the whole snapshot again per write and keep the head node's store busy; the loss window grows by this much.
KV_EVERY_S = 0.25
log = get_logger("smartbatch.budget")


class LedgerJournal:
    """Journal methods of ``BudgetController``."""

    # -- journal (memory ledger only) ----------------------------------------------------------------------------
    def _snapshot(self, ids: bool = True) -> tuple:
        """The ledger's state; ``ids``: with the charge ids in it (a copy in Ray's store), or not (the hub's, beside
        its ids' record)."""
        b = self.book
        # Last: the budgets changed live, if any (every budget its windows name, and the names in force), so a
        # restart takes back the limits with the spend they were judged against, in one write.
        live = ((self.spec_version, [s.model_dump() for s in b.by_name.values()], [s.name for s in b.specs])
                if self.spec_version else None)
        # The charge ids once, pickled once per change of them (``KeptCharges.blob``), or None: in the hub, their
        # own record (``_put_hub``); the controller's place, None, the same object (until stop 82 both, each built
        # and pickled again per snapshot: 1 MB at 16,384 + 16,384, and each group of reservations waited for it).
        return (dict(b.spent), dict(b.reserved), dict(b.claims), dict(b.spend), dict(self.refusals), list(b.ended),
                b.ended_overrun, b.latest, b.charged.blob() if ids else None, live, dict(b.granted),
                self.__dict__.get("_seq_base", 0) + self._asked, None, self.__dict__.get("_epoch", 0), began(self))

    def _kv_soon(self) -> None:
        """Have the copy in Ray's store follow the ledger: one write at a time, each of the state when it starts."""
        if self.kv_journal is None or "_must_recover" in self.__dict__ or self._restoring is not None:
            return  # not before a restart took the ledger back: the empty one would replace the copy
        self.__dict__["_kv_dirty"] = True
        task = self.__dict__.get("_kv_task")
        if task is None or task.done():
            self._kv_task = asyncio.get_running_loop().create_task(self._kv_write())

    async def _kv_write(self) -> None:
        failing, loop = False, asyncio.get_running_loop()
        while self.__dict__.get("_kv_dirty") and not self._closed:
            # From the last copy's start, this task's or an earlier one's: timed within a task alone, a change after
            # each copy had landed (one every 10 ms, at a low rate) started a copy of its own, the whole snapshot each.
            if (wait := self.__dict__.get("_kv_started", -math.inf) + KV_EVERY_S - loop.time()) > 0:
                await asyncio.sleep(wait)
                if self._closed:
                    return
            self._kv_dirty = False
            self._kv_started = loop.time()
            try:  # the snapshot is taken here, so the changes made while the last write was out all go in this one
                await asyncio.wait_for(self.kv_journal.put(JOURNAL_KEY[0], self._own_key(), self._snapshot()),
                                       PUT_TIMEOUT_S)
                await self._drop_superseded(self.kv_journal, "_kv_superseded")
            except Exception as exc:
                if not failing:
                    log.warning("budget ledger: snapshot not copied to Ray's key-value store (%s: %s); tried again "
                                "every %.0f s: the hub and this actor dying together meanwhile lose the changes since "
                                "the last copy", type(exc).__name__, exc, KV_RETRY_S)
                failing = self._kv_dirty = True
                await asyncio.sleep(KV_RETRY_S)
            else:
                if failing:
                    log.warning("budget ledger: snapshot copied to Ray's key-value store again")
                failing = False

    def _own_key(self) -> str:
        return own_key(JOURNAL_KEY[1], self.spec_incarnation)

    async def _drop_superseded(self, journal, which: str) -> None:
        """Remove from ``journal`` the snapshots of the incarnations before this one (``which``: those its restore
        read there), now that its own there holds what they held."""
        await drop_earlier(journal, JOURNAL_KEY[0], self.__dict__.pop(which, None) or [], "budget ledger",
                           PUT_TIMEOUT_S)

    async def _journal_soon(self) -> None:
        # One write at a time, of every change made before it: the changes made while one is out go in the next.
        while self._journal_dirty:
            self._journal_dirty = False
            upto = self._asked
            landed = await self._put_snapshot()  # a write that fails is logged: the ledger goes on, as without one
            self._written = upto
            cond = self._cond()
            async with cond:
                cond.notify_all()
            if landed:  # after the answers: they wait for this incarnation's snapshot, not for the older ones' end
                await self._drop_superseded(self.journal, "_hub_superseded")

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
        # A restarted controller takes its ledger back first: the hub's rewire can come before its own, and it
        # wrote the empty ledger of the new incarnation over the journal's.
        await self._restored_first()
        if self.journal is None:
            return await self.rejournal_outbox()
        if await self._put_snapshot():
            await self._drop_superseded(self.journal, "_hub_superseded")

    async def _put_snapshot(self) -> bool:
        """Whether the snapshot landed in the hub's journal."""
        lock = self.__dict__.setdefault("_hub_lock", asyncio.Lock())
        async with lock:  # one write out at a time: two landing out of order would pair a snapshot with older ids
            try:  # bounded: a reservation waits for this write (``_durable``); a wedged hub must not hold it for good
                await asyncio.wait_for(self._put_hub(), PUT_TIMEOUT_S)
            except Exception as exc:
                self._hub_ids = None  # landed or not, unknown: the next write carries them
                log.warning("budget ledger: snapshot not journaled (%s: %s)", type(exc).__name__, exc)
                return False
        return True

    async def _put_hub(self) -> None:
        """The snapshot without its charge ids, and with them their own record when they changed since the last
        write that landed (up to 16,384 ids, 633 KB, were in every snapshot: a group of reservations waited for them
        to be copied to the hub; stop 82). Refused by a hub restarted since, whose records are gone: then whole.
        Each write numbered (``_hub_put``): one given up on here lands after the next too (Ray runs it anyway), and
        its older ids would be paired with the snapshots written without them after it; the hub refuses it."""
        key = self._own_key()
        if not len(self.book.charged):  # none yet: no record of their own, the snapshot holds the empty set
            self._hub_ids = None
            self._hub_store = await self._hub_put({key: self._snapshot()}, None)
            return
        if self.__dict__.get("_hub_ids") is self.book.charged.blob():  # the snapshot built before any await
            store = await self._hub_put({key: self._snapshot(ids=False)}, self._hub_store)
            if store == self._hub_store:
                return
        ids = self.book.charged.blob()  # taken again after that await: the ids and the snapshot of one moment
        self._hub_store = await self._hub_put({key: self._snapshot(ids=False)}, None,
                                              {own_key(IDS_STEM, self.spec_incarnation): ids})
        self._hub_ids = ids

    async def _hub_put(self, values: dict, store: str | None, ids: dict | None = None) -> str:
        self._hub_seq = self.__dict__.get("_hub_seq", 0) + 1
        name = await self.journal.put_checked(JOURNAL_KEY[0], values, store, ids, self._hub_seq)
        if not name:  # a later write of this ledger's took its keys: never one this actor waits for (one at a time)
            raise RuntimeError("the hub holds a later write of this ledger")
        return name

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
        self.__dict__.pop("_must_recover", None)  # the driver's rewire asked first
        self._restoring = asyncio.Event()  # ledger calls wait: the restore overwrites what they would do meanwhile
        restored = False
        try:
            own = self._own_key()
            records = await self._read(self.journal, "the hub's journal")
            hub = earlier(records, JOURNAL_KEY[1], own)
            ids = earlier(records, IDS_STEM, own_key(IDS_STEM, self.spec_incarnation))
            copies = earlier(await self._read(self.kv_journal, "Ray's key-value store"), JOURNAL_KEY[1], own)
            self._hub_superseded, self._kv_superseded = [*hub, *ids], list(copies)
            found = [(snap, k) for k, snap in hub.items() if snap] + [(s, None) for s in copies.values() if s]
            # Numbered past every incarnation read (one whose copy never landed is ranked below by its changes).
            self._epoch = next_epoch(_rank(snap)[0] for snap, _ in found)
            if not found:
                return False
            # The newest: the hub's while it lived (the copy lags it by 0.25 s and a write at most), else Ray's
            # store's; of the incarnations', the last one's (a dead one's late write is its own key's, ranked below).
            snap, key = max(found, key=lambda f: _rank(f[0]))
            restored = self._restore(snap if key is None else _with_ids(snap, key, ids))  # a hub's: its ids back
            return restored
        finally:
            self._restoring.set()
            self._restoring = None
            if restored:  # copied from now on (not while it was read back: the empty ledger would replace the copy)
                self._kv_soon()

    async def _read(self, journal, where: str) -> dict:
        if journal is None:
            return {}
        try:
            return await read_patiently(lambda: journal.items(JOURNAL_KEY[0]), "budget ledger", self.recover_wait_s)
        except Exception as exc:
            log.error("budget ledger: snapshot in %s unreadable after a restart (%s)", where, exc)
            return {}

    def _restore(self, snap: tuple) -> bool:
        b, before, charged = self.book, self._charged, None
        if len(snap) > 11:  # the change number (this run's snapshots number on from it), and the charges' USD
            self._seq_base, charged, snap = snap[11], snap[12], snap[:11]  # (then the rank: ``recover`` read it)
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
        if charged is not None:  # a snapshot of before stop 82: the controller's ids too, with their USD (in the
            restored = KeptCharges.restore(charged)  # book's, a set before stop 81, none); the report's
            restored.take(b.charged)  # charged_usd said 0 after every restart without them
            b.charged = restored
        b.charged.take(before)  # noted before the snapshot was read back
        self._charged = b.charged
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


def _with_ids(snap: tuple, key: str, ids: dict) -> tuple:
    """A hub snapshot with its charge ids back in their place, from its incarnation's ids' record."""
    if len(snap) <= 8 or snap[8] is not None:  # written with them (before stop 82)
        return snap
    kept = ids.get(own_key(IDS_STEM, key.partition("@")[2]))
    if kept is None:  # never, a snapshot without them is written only after its ids' record landed: said, not hidden
        log.error("budget ledger: the charge ids of snapshot %s are missing from the hub's journal: a charge sent "
                  "again after this restart counts again", key)
        kept = KeptCharges().state()
    return (*snap[:8], kept, *snap[9:])


def _rank(snap: tuple) -> tuple[int, float, int]:
    """(epoch, start, change number): the later incarnation's first, then the later change (``actors._incarnations``;
    a snapshot of before stop 72 has no epoch, of before stop 73 no start)."""
    return (snap[13] if len(snap) > 13 else 0, snap[14] if len(snap) > 14 else 0.0, snap[11] if len(snap) > 11 else 0)
