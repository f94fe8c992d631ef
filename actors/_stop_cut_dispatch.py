"""The dispatcher's side of what an engine's stop cuts unsent (``actors._stop_cut``): work a grouper sent here that
never left, queued at the provider's gate (its rate limit, its concurrency, the batch queue's room, an open
circuit), a sync, flex, GPU or batch-API dispatch alike. Before, only the groupers named theirs, and a request that
waited here got the final 502 "may have been billed" at the endpoint, as one cut under way at a provider.

The stop asks the groupers first (they send nothing more), then each dispatcher (``cut_at_stop``): it takes out
what waits at its gate and what waits for its next try, ends it, and from then on queues nothing (what comes later,
a next try, a late dispatch, ends at once, unnamed). It names only what is known for
sure: work queued here on its first arrival (``run``), never let start at the gate, whose job says no call of it was
ever made anywhere (``never_called``: not a retry, a hedged member, a reroute, a flex call gone standard), by a
dispatcher Ray never restarted that never took a copy of a request it knew, nor re-attached batches of an earlier
start. Those end ``cancelled`` (the retryable 503 at an endpoint); what it takes out and does not name ends with no
result from here, its claim settled as a failure's is (at what an earlier call may have billed): a "cancelled"
pulled before its driver saw the engine gone was the retryable 503 of a request that may have been billed (the
groupers' rule, ``end_at_stop``). The rest, a batch whose create started, a sync call being journaled, a call
under way, runs on until the stop's cancel and stays "may have been billed"."""

from __future__ import annotations

from actors._stop_cut import never_called
from actors._types import OWN_ROWS, BatchJob, Job
from engine.core.result import ENGINE_CANCELLED
from engine.runtime.providers import Work

__all__ = ["CutDispatches"]


class CutDispatches:
    """Needs the dispatcher's ``sim``, ``clock``, ``_queued_at``, ``_retrying``, ``_known``, ``_done``,
    ``_unanswered``, ``_flex_unanswered``, ``_kept``, ``reattached``, ``_final``, ``_member_done``,
    ``_maybe_billed``, ``_pump`` and ``_kick``."""

    _cut = False  # the stop named what waited here: nothing is queued from now on
    _reborn = False  # restarted by Ray: what it holds may be calls made before (``Recovery.reconstructed``)
    _copies = False  # took a request it knew already (a re-admitted copy): its original may have been sent
    # id(work item) -> item, of the items queued on their first arrival and not started (the item kept, so its id
    # is not reused while it is here)
    _first: dict[int, tuple] | None = None

    def _enqueue(self, kind: str, b: BatchJob, jobs: list[Job], since: float | None = None,
                 first: bool = False) -> None:
        """Queue ``jobs`` of ``b`` at the gate as ``kind``; ``first``: their first arrival here (``run``). After
        the stop's cut, nothing is queued: each ends here, never sent."""
        if self._cut:
            self._end_unnamed(jobs)
            return
        item = (b, jobs)
        # Keyed by identity: the Work holds the item until it starts, so the id is not reused before then.
        self._queued_at[id(item)] = self.clock.now() if since is None else since
        if first:
            if self._first is None:
                self._first = {}
            self._first[id(item)] = item
        self.sim.enqueue(Work(kind, item, [j.req for j in jobs], [j.seq for j in jobs],
                              [j.attempts for j in jobs], b.cache_write and kind in ("sync", "flex"),
                              b.hedge_at if kind == "batch_api" else None))

    def _unqueued(self, item: tuple) -> tuple[float | None, bool]:
        """``item`` left the gate (started, taken out): when it joined, and whether it was a first arrival."""
        first = self._first is not None and self._first.pop(id(item), None) is not None
        return self._queued_at.pop(id(item), None), first

    def _note_copies(self, jobs: list[Job]) -> None:
        if not self._copies and any(
                j.seq >= OWN_ROWS or j.req.uid in self._known or j.req.uid in self._done for j in jobs):
            self._copies = True

    async def cut_at_stop(self) -> list[str]:
        """The engine stops: what waits at the gate ends here, unsent, and nothing more is queued; the ids of those
        known never sent. One Ray restarted names nothing and cuts nothing: its journal's calls, made before,
        are settled by ``stop_spending`` as ever."""
        if self._reborn:
            return []
        self._cut = True
        sure = not (self._copies or self.reattached or self.__dict__.get("_stray"))
        named: list[str] = []
        rest: list[Job] = []
        for w in self.sim.take_queued():
            b, jobs = w.item
            first = self._unqueued(w.item)[1]
            for j in jobs:
                if sure and first and self._never_called_here(j):
                    named.append(j.req.uid)
                    self._final(b, j, False, 0.0, b.mode, error=ENGINE_CANCELLED)  # (its claim let go at 0)
                else:
                    rest.append(j)
        # Waiting for a next try: never sent again, not named (a try was made).
        rest += [j for _, j in (self._retrying or {}).values()]
        self._retrying = {}
        self._end_unnamed(rest)
        self._pump()
        return named

    def _retry_later(self, at: float, b: BatchJob, j: Job) -> None:
        """After the stop's word a next try is sent nowhere: it ends now, unnamed (a try of it was made). Left to
        its timer (``CancelDispatches._retry_later``, after this in ``Dispatcher``'s bases), it waited its time, a
        Retry-After's hour, and the stop's cancel ended it "cancelled", a retryable answer (a review)."""
        if self._cut:
            self._end_unnamed([j])
            return
        super()._retry_later(at, b, j)

    def _end_unnamed(self, jobs: list[Job]) -> None:
        """``jobs`` taken out, never sent from here: no result (their drivers fail them as the engine goes, "may
        have been billed"), each claim settled at what an earlier call of it may have billed, as at a failure."""
        for j in jobs:
            self._member_done(j, self._maybe_billed(j))
        self._kick()

    def _never_called_here(self, j: Job) -> bool:
        uid = j.req.uid
        return (never_called(j) and uid not in self._unanswered and uid not in self._flex_unanswered
                and uid not in self._kept)
