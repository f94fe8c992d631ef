"""An engine-wide cancel, as a provider cancels a batch: nothing more is sent; what waits to be sent ends at no
cost; provider batches under way are cancelled, and what they finished (billed) is kept and answered; calls under
way finish. Mixins of the grouper and the dispatcher, which own the state. The engine takes no work after it.

Before it, an interrupted ``smartbatch batch`` left its provider batches running: they finished and billed every
member, whose answers nobody read, and ``--resume`` sent those lines again (a helper's tour, stop 45)."""

from __future__ import annotations

import asyncio
import logging
import math

from actors._shards import by_result_uid
from actors._types import Job
from engine.core.result import CANCELLED

__all__ = ["CancelDispatches", "CancelGroups"]

log = logging.getLogger("smartbatch.cancel")

_WHY = (f"{CANCELLED}: the engine was cancelled (Engine.cancel) before this request finished: it is not sent "
        "again; a provider batch it rode was cancelled and bills only the members it finished")
CANCEL_CALL_S = 10.0  # real seconds the cancel waits for the providers to take the cancels of their batches


class CancelGroups:
    """The grouper's side: needs its ``pending``, ``table``, ``waits``, ``_timers``, ``_park_timer``, ``_ended``,
    ``_reserving``, ``hubs``, ``_resolve`` and ``_failed``."""

    _cancelled = False

    async def cancel(self) -> int:
        """Nothing held here is sent: every request waiting (in a group, or held by a budget) ends failed
        (``cancelled``), billed nothing, and so does every request that comes later (back from a cancelled
        batch, a follower of a request that ended so). Returns how many ended now."""
        self._cancelled = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for g in list(self.table.groups.values()):
            self.table.drop(g)
        jobs = [*self.pending.values(), *self._take_parked()]
        self.pending.clear()
        await self._resolve([(j, self._failed(j, _WHY)) for j in jobs])
        return len(jobs)

    async def _cancel_reserved(self, batches: list, refused: list) -> None:
        """A dispatch whose reservation was under way when the cancel came: its members (and any the ledger
        had the grouper hold back) end cancelled, their claims settled at 0, and the budget's refusals stand."""
        jobs = [*(j for b in batches for j in b.jobs), *self._take_parked()]
        await self._resolve([*refused, *((j, self._failed(j, _WHY)) for j in jobs)])

    def _take_parked(self) -> list[Job]:
        """Every job a budget holds back here, taken out, and their timer stopped."""
        if self._park_timer is not None:
            self._park_timer[1].cancel()
            self._park_timer = None
        late, again = self.waits.take(math.inf)
        return [h.payload[0] for h in (*late, *again)]

    async def _refuse_cancelled(self, jobs: list[Job]) -> None:
        """``add`` after the cancel: each job ends cancelled (one that ended here gets its result again; one
        held here already is a re-admitted copy, and is dropped)."""
        ended = self._ended
        again = [ended[j.req.uid] for j in jobs if j.req.uid in ended]
        if again:
            self.hubs.send("push", by_result_uid, again, [0.0] * len(again))
        fresh = {j.req.uid: j for j in jobs if not any(j.req.uid in held for held in
                                                       (ended, self.pending, self._reserving, self.waits))}
        if fresh:
            await self._resolve([(j, self._failed(j, _WHY)) for j in fresh.values()])


class CancelDispatches:
    """The dispatcher's side: needs its ``provider``, ``_open``, ``sim``, ``clock``, ``_queued_at``, ``_final``,
    ``_pump`` and ``_kick``. Work queued at a rate gate ends cancelled at once, and work that comes later when
    its gate lets it start; a batch not yet created is never created; a batch under way is cancelled now (its
    follow-up, woken, reads what it finished, and its unfinished members go back to a grouper, which ends
    them)."""

    _cancelled = False
    _cancel_event: asyncio.Event | None = None

    async def cancel(self) -> int:
        """Cancel every provider batch under way: each one's follow-up, woken, sends its cancel now (a batch
        being created, once its create answers). Returns once each was sent (``CANCEL_CALL_S`` at most), so an
        engine stopped right after leaves none running; how many were."""
        if not self._cancelled:
            self._cancel_sent: set[str] = set()  # journal keys of the batches whose cancel went out (or ending)
        self._cancelled = True
        self._woken().set()
        for w in self.sim.take_queued():  # not started: ended here, never sent
            b, jobs = w.item
            self._queued_at.pop(id(w.item), None)
            for j in jobs:
                self._final(b, j, False, 0.0, b.mode, error=_WHY)
        self._pump()
        self._kick()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CANCEL_CALL_S
        while not self._open.keys() <= self._cancel_sent and loop.time() < give_up:
            await asyncio.sleep(0.05)  # the follow-ups' cancels go out on this loop
        return len(self._cancel_sent)

    def _woken(self) -> asyncio.Event:
        if self._cancel_event is None:
            self._cancel_event = asyncio.Event()
        return self._cancel_event

    async def _sleep(self, engine_s: float) -> None:
        """Sleep ``engine_s`` engine seconds, or until the engine is cancelled (a batch's follow-up then cancels
        it at once, not at its next poll)."""
        delay = min(self.clock.real_delay(engine_s), 3600.0)
        if self._cancelled:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(self._woken().wait(), delay)
        except asyncio.TimeoutError:
            pass

    def _cancel_started(self, kind: str, b, jobs: list[Job]) -> bool:
        """Work the rate gate let start after the cancel: ended here, its gate's room given back (True), except
        a batch, which its run never creates (False)."""
        if not self._cancelled or kind in ("batch_api", "reroute"):
            return False
        now = self.clock.now()
        if kind == "sync":
            self.sim.finish_sync(jobs[0].req.model, now, 0)
        for j in jobs:
            self._final(b, j, False, 0.0, b.mode, error=_WHY)
        return True
