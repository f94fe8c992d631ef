"""An engine-wide cancel, as a provider cancels a batch: nothing more is sent; what waits to be sent ends at no
cost; provider batches under way are cancelled, and what they finished (billed) is kept and answered; calls under
way finish. Mixins of the grouper (``actors._cancel_groups``) and the dispatcher (here), which own the state.
The engine takes no work after it.

Before it, an interrupted ``smartbatch batch`` left its provider batches running: they finished and billed every
member, whose answers nobody read, and ``--resume`` sent those lines again (a helper's tour, stop 45)."""

from __future__ import annotations

import asyncio

from actors._dispatch_outbox import SPEND_WAIT_S
from actors._types import Job
from engine.core._logkeys import get_logger
from engine.core._within import within
from engine.core.cost import reserve_bound
from engine.core.errors import CatalogError
from engine.core.result import CANCELLED, ENGINE_CANCELLED

__all__ = ["CancelDispatches"]

log = get_logger("smartbatch.cancel")

_WHY = ENGINE_CANCELLED
# "Before it ran at the provider": a member of a provider batch cancelled for its withdrawal was sent, in the
# batch, and never ran (a helper's hunt read "before it was sent" there).
_WITHDRAWN = (f"{CANCELLED}: withdrawn by a driver (Engine.cancel_requests) before it ran at the provider; billed "
              "nothing, and not sent again")
_WITHDRAWN_AFTER_TRY = (f"{CANCELLED}: withdrawn by a driver (Engine.cancel_requests) before it was sent again; "
                        "an earlier try got no answer and may have been billed (possibly_billed in the report)")
CANCEL_CALL_S = 10.0  # real seconds the cancel waits for the providers to take the cancels of their batches
WITHDRAWN_KEEP = 262_144  # withdrawn ids kept, for copies that come after the withdrawal (back from a batch)


def _remember(memo: dict[str, None], uids: list[str]) -> None:
    memo.update(dict.fromkeys(uids))
    while len(memo) > WITHDRAWN_KEEP:
        del memo[next(iter(memo))]


class CancelDispatches:
    """The dispatcher's side: needs its ``provider``, ``_open``, ``_files``, ``sim``, ``clock``, ``_queued_at``,
    ``_final``, ``_unanswered``, ``_pump``, ``_kick``, ``_at``, ``_queue_call``, ``_flusher``, ``hubs`` and
    ``_batch_gate``'s methods. Work queued at a rate gate, or waiting for its next try, ends cancelled at once, and
    work that comes later when its gate lets it start; a batch not yet created is never created; a batch under way
    is cancelled now (its follow-up, woken, reads what it finished, and its unfinished members go back to a
    grouper, which ends them)."""

    _cancelled = False
    _cancel_event: asyncio.Event | None = None
    # Journal keys of the batches that ended and are being read: nothing to cancel, they bill no more. Replaced,
    # never changed in place (a class default). Before, a stop during a long read (a trickle) waited
    # ``CANCEL_CALL_S`` for a cancel never sent, then said the batch might run on, billed.
    _being_read: frozenset[str] = frozenset()

    async def cancel(self) -> int:
        """Cancel every provider batch under way: each one's follow-up, woken, sends its cancel now (a batch
        being created, once its create answers). Returns once each was sent (``CANCEL_CALL_S`` at most), so an
        engine stopped right after leaves none running; how many were."""
        if not self._cancelled:
            self._cancel_sent: set[str] = set()  # journal keys of the batches whose cancel went out (or ending)
        self._cancelled = True
        self._woken().set()
        retrying, self._retrying = list((self._retrying or {}).values()), {}
        for b, j in retrying:  # waiting for a next try: ended here, never sent again
            self._final(b, j, False, 0.0, b.mode, error=_WHY)
        for w in self.sim.take_queued():  # not started: ended here, never sent
            b, jobs = w.item
            self._unqueued(w.item)
            for j in jobs:
                self._final(b, j, False, 0.0, b.mode, error=_WHY)
        self._pump()
        self._kick()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CANCEL_CALL_S
        while not self._open.keys() <= self._cancel_sent | self._being_read and loop.time() < give_up:
            await asyncio.sleep(0.05)  # the follow-ups' cancels go out on this loop
        return len(self._cancel_sent)

    async def stop_spending(self, clock=None, journal_copy: list | None = None) -> tuple[int, int, int]:
        """The engine stops (its other actors are gone already, so nothing this publishes reaches a driver): cancel
        the provider batches under way, as ``cancel`` does, and wait a little for the deletes of ended batches'
        input files (``FileCleanup.drain``). Returns how many were open, how many of those no cancel reached in
        time (they run on, billed), and how many jobs its calls were polling (videos: no cancel exists, each is
        billed when it completes; their records stay in the journal, ``_dispatch_jobs``). A dispatcher Ray restarted
        reads its journal first (``_recover_at_stop``): asked before, it knew of no batch, and they ran on, billed."""
        if self._must_recover:
            await self._recover_at_stop(clock, journal_copy)
        self._named_left_out()  # (``CutDispatches``: a cut create its journal's read, before the stop's list, resumed)
        under_way = set(self._open)
        self._stopping = True
        await self.cancel()
        held, missed = await self._cancel_held(CANCEL_CALL_S)  # (taken from the hub's index, ``_batch_index``)
        await self._files.drain()  # the ended batches' input files: known to no later start once cut
        await self._settle_cut_short()
        if self.open_jobs:  # (a drain, ``stop(drain_s=...)``, waits for them: they are calls under way)
            log.warning("dispatcher %s: the engine stops with %d video(s) under way: each is billed when it "
                        "completes and is not read; their records stay in the journal (%s)", self.name,
                        self.open_jobs, self._jobs_journal.space)
        return (len(under_way) + held, len(self._open.keys() - self._cancel_sent - self._being_read) + missed,
                self.open_jobs)

    _settled_at_stop: set[str] | None = None  # claims ``_settle_cut_short`` settled: never settled again

    async def _settle_cut_short(self) -> None:
        """What the stop cuts short here may have been billed, and nobody will read what it cost: a provider batch
        under way (cancelled, or being created: any member it finished before the cancel took effect is billed)
        and a sync call under way (sent: billed when it ends, a video when it completes). Each member's claim is
        settled at its bound in the mode it was sent in, counted ``possibly_billed``, and handed to the budget
        controller before this returns (bounded), which the stop keeps alive until then
        (``actors._engine_stop.kill_engine``). Left to the actor's kill, its claim held its room until
        ``reservation_ttl_s`` (a Redis ledger) and was then released: spend billed and counted by no ledger."""
        cut = [(rec[0].mode, j) for rec in self._open.values() for j in rec[1]] + self._strays_cut()
        calling = self._calling or {}
        cut += [(rec[0].mode if key in calling else None, rec[1]) for key, rec in self._sync_calls.items()]
        # A simulated provider's call (journaled nowhere: a restart makes it anew): left out, its claim held its
        # room until ``reservation_ttl_s``, and a kept report showed it reserved. (A real call under way with no
        # record any more belongs to a request that ended here, withdrawn say: settled then.)
        # A GPU batch's members (``Dispatcher._start_gpu_batch``) are no HTTP call, on any provider.
        cut += [(b.mode, j) for b, j in calling.values() if not self.provider.real or b.mode == "gpu_batch"]
        done = self._settled_at_stop = self._settled_at_stop or set()
        for mode, j in cut:
            if j.claim is None or j.claim in done:
                continue
            if mode is None:  # not at the provider (its body being journaled): never sent now, as at ``_not_sent``.
                # At 0, unless an earlier try (or a call before a restart) got no answer (``_maybe_billed``). Taken
                # for a call under way, it was settled at its bound: charged for a call no provider saw (a review).
                done.add(j.claim)
                self._settle.append((j.claim, self._maybe_billed(j)))
                continue
            try:
                usd = reserve_bound(j.req, self.catalog, mode, None)
            except (ValueError, CatalogError):  # a mode its model no longer offers (a catalog changed under a restart)
                usd = reserve_bound(j.req, self.catalog, "sync", None)
            done.add(j.claim)
            self._settle.append((j.claim, usd))
            self.possibly_billed += 1
            self.possibly_billed_usd += usd
        self._sync_held_at_stop(done)  # (sync calls a restart holds for their requests: ``_sync_index``)
        settle, self._settle = [*self._settle, *self._released_at_stop(self._readmit)], []
        if settle:  # now, not at the next flush: the actor is killed once this answers
            self._to_budget("settle_many", settle)
        if self.budget is not None and not await self.budget.delivered(SPEND_WAIT_S):
            log.error("dispatcher %s: the budget controller did not take the settlements of the work the stop cut "
                      "short within %.0f s: their claims hold their room until they expire, their spend uncounted",
                      self.name, SPEND_WAIT_S)

    _stopping = False  # ``stop_spending`` began: the groupers are gone (the stop kills them first)

    def _released_at_stop(self, readmit: list[Job]) -> list[tuple[str, float]]:
        """The claims of ``readmit`` (work handed back to a grouper, billed nothing: a batch the stop kept from
        being created, say) released at 0 once the stop began: their grouper is gone, and nobody else releases
        them. Handed back with them, each held its room until ``reservation_ttl_s`` (a review)."""
        if not self._stopping:
            return []
        done = self._settled_at_stop = self._settled_at_stop or set()
        out = [(j.claim, 0.0) for j in readmit if j.claim is not None and j.claim not in done]
        done.update(c for c, _ in out)
        return out

    _retrying: dict[object, tuple] | None = None  # a sync call's next try, waiting for its time: (batch, job)

    def _retry_later(self, at: float, b, j: Job) -> None:
        """Send ``j`` (a sync call's next try) at engine time ``at``, unless the engine is cancelled first: it then
        ends at once, as work queued at a rate gate does. Left to its timer, a Retry-After of an hour held a
        stop's drain for all of it, with nothing under way (a review)."""
        if self._cancelled:
            self._final(b, j, False, 0.0, b.mode, error=_WHY)
            return
        if self._retrying is None:
            self._retrying = {}
        token = object()
        self._retrying[token] = (b, j)

        def fire() -> None:
            if self._retrying.pop(token, None) is not None:
                self._queue_call(b, j)
                self._pump()
        self._at(at, fire)

    async def settled(self, quiet_s: float = 5.0) -> int:
        """What a stop after a cancel would still cut short here: the provider batches under way (their finished
        members not yet read) and the calls under way (billed, answered once they return), or, once none is, the
        answers this dispatcher gave that wait at a result hub for a driver still pulling (``quiet_s``). Asked of
        the hubs from here, after the pushes of those answers. A dispatcher Ray restarted reads its journal first:
        asked before, it knew of no batch."""
        await self._ready()
        if self._open or self.in_flight:
            return len(self._open) + self.in_flight
        if self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        return sum(await asyncio.gather(*(h.call("undelivered", quiet_s) for h in self.hubs)))

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
        try:  # (within: wait_for swallowed a death's cancel that came with the wake, and the follow-up polled on)
            await within(self._woken().wait(), delay)
        except asyncio.TimeoutError:
            pass

    _withdrawn: dict[str, None] | None = None

    async def withdraw(self, uids: list[str]) -> int:
        """Requests their driver withdrew (``Engine.cancel_requests``): work that starts later leaves them out
        (they end cancelled, billed nothing), and a provider batch under way whose members are all withdrawn is
        cancelled now, as at its hedge: what it finished is answered, the others go back to their grouper,
        which ends them. A sync call waiting for its next try (a 429's wait) ends now: left to its timer, it
        ended when the wait was over. So do the withdrawn members of a provider batch waiting at the gate for the
        batch queue's room (``_withdraw_at_gate``): they ended when the gate let it start, or at its hedge. A call
        under way, or a batch created with other work too, runs on. Returns how many open batches it cancels."""
        if self._withdrawn is None:
            self._withdrawn = {}
        _remember(self._withdrawn, uids)
        w = self._withdrawn
        waiting = [(t, bj) for t, bj in (self._retrying or {}).items() if bj[1].req.uid in w]
        for token, (b, j) in waiting:  # waiting for a next try (a 429's wait may be an hour): ended now
            del self._retrying[token]
            self._final(b, j, False, 0.0, b.mode, error=self._why_withdrawn(j))
        if self._withdraw_at_gate():  # waiting for the batch queue's room (``_batch_gate``): what is left may fit
            self._pump()
        elif waiting:
            self._kick()
        gone = [rec for rec in self._open.values() if self._all_withdrawn(rec[1])]
        # A create waiting out a 429 leaves its withdrawn members out now (``_wait_out``), not after the wait.
        creating = any(cj.req.uid in w for cjobs in self._creates_waiting.values() for cj in cjobs)
        if gone or creating:  # each follow-up (or lookup) wakes and acts now; the event is made anew for later sleeps
            event, self._cancel_event = self._woken(), None
            event.set()
        return sum(rec[4] is not None for rec in gone)  # those created: each is cancelled now

    def _all_withdrawn(self, jobs: list[Job]) -> bool:
        w = self._withdrawn
        return bool(w) and bool(jobs) and all(j.req.uid in w for j in jobs)

    def _some_withdrawn(self, jobs: list) -> bool:
        w = self._withdrawn
        return bool(w) and any(j.req.uid in w for j in jobs)

    def _not_sent(self, j: Job) -> str | None:
        """Why ``j``, let start, is not sent after all (the engine cancelled, or ``j`` withdrawn, while its start
        awaited something); None: it is sent."""
        if self._cancelled:
            return _WHY
        return self._why_withdrawn(j) if self._some_withdrawn([j]) else None

    def _to_start(self, kind: str, b, jobs: list[Job]) -> list[Job]:
        """Of work the rate gate lets start, what is sent. After the cancel, nothing: it ends here, its gate's
        room given back, except a batch, which its run never creates. Withdrawn members are left out (ended
        here); a batch they all left is not created either (``_run_batch``)."""
        w = self._withdrawn if kind != "reroute" else None
        if self._cancelled and kind not in ("batch_api", "reroute"):
            gone = jobs
        elif w and (kind in ("sync", "flex") or kind == "batch_api" and not self._all_withdrawn(jobs)):
            gone = [j for j in jobs if j.req.uid in w]  # (a GPU batch runs whole: its lane is held for it)
        else:
            return jobs
        if not gone:
            return jobs
        if kind in ("sync", "flex"):
            self.sim.finish_sync(jobs[0].req.model, self.clock.now(), 0)
        for j in gone:
            why = _WHY if self._cancelled else self._why_withdrawn(j)
            self._final(b, j, False, 0.0, b.mode, error=why)
        return [] if gone is jobs else [j for j in jobs if j.req.uid not in w]
