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
groupers' rule, ``end_at_stop``). Since stop 82 (``cut2_82``) a batch the gate let start whose create has not
begun (no HTTP call of it made: waiting for its create's slot, its journal record, or its task's first step) is
taken alike, its members named by the same rule, and never created: its run checks the stop's word where the create
begins, with no await before that call (``_create_begins``). Since stop 84 a sync call waiting for its next try
is named when every try of it billed nothing as this dispatcher classes outcomes (a 429, a connection never made,
a 5xx but 502/504: ``_tries_billed_nothing``); one whose try may have been billed is not. The rest, a batch
whose upload or create began, a call under way, runs on until the stop's cancel and stays "may have been billed";
a sync call being journaled ends unsent once written, unnamed (``SyncCalls._run_sync``: sent, a review of stop 84
found it billed after the stop's word, its answer read by nobody)."""

from __future__ import annotations

import re

from actors._stop_cut import never_called, read_cut, stop_began
from actors._types import OWN_ROWS, BatchJob, Job
from engine.core.provider_api import call_key
from engine.core.result import ENGINE_CANCELLED
from engine.runtime.providers import Work

__all__ = ["CutDispatches"]


def _engine_of(journal: str) -> str:
    """The engine's name, which its stop publishes under (``actors._stop_cut``), of the name a dispatcher is given:
    its run's journal's, ``<engine>@<8 hex>`` (``actors.remote.start_actors``). Read under that one (a review,
    ``rvcut3_82``), the stop's mark and list were never found: every restart made its cut creates."""
    m = re.fullmatch(r"(.+)@[0-9a-f]{8}", journal)
    return m.group(1) if m else journal


class CutDispatches:
    """Needs the dispatcher's ``sim``, ``clock``, ``_queued_at``, ``_retrying``, ``_known``, ``_done``,
    ``_unanswered``, ``_flex_unanswered``, ``_kept``, ``reattached``, ``_final``, ``_member_done``,
    ``_maybe_billed``, ``_pump``, ``_kick``, ``_withdrawn``, ``_end_withdrawn``, ``_release_dispatch``,
    ``_quota``, ``_open``, ``_unjournal``, ``_space``, ``_settle``, ``_settled_at_stop``, ``provider``, ``_sync_calls``
    and ``_engine``."""

    _cut = False  # the stop named what waited here: nothing is queued from now on
    _reborn = False  # restarted by Ray: what it holds may be calls made before (``Recovery.reconstructed``)
    _copies = False  # took a request it knew already (a re-admitted copy): its original may have been sent
    # id(work item) -> item, of the items queued on their first arrival and not started (the item kept, so its id
    # is not reused while it is here)
    _first: dict[int, tuple] | None = None
    # key -> (BatchJob, jobs, first arrival) of batches the gate let start whose create has not begun: no HTTP call
    # of them made, not the upload, not the create (``_create_begins``)
    _creating: dict[str, tuple] | None = None
    _taken: dict[str, set[str]] | None = None  # key -> its members' ids, of those batches the stop took: never created
    _bodies_named: set[str] | None = None  # keys of a restart's cut creates the stop named members of (``_named_in``)

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
                              [j.attempts for j in jobs], b.cache_write if kind in ("sync", "flex") else False,
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
        # Let start but not yet created (waiting for the create's slot, its journal record, or its task's first
        # step): the batch is never created now (``_create_begins``). A member withdrawn ends as such on its run's way.
        w, self._taken = self._withdrawn or {}, self._taken or {}
        for key, (b, jobs, first) in (self._creating or {}).items():
            took = [j for j in jobs if j.req.uid not in w and j.req.uid in self._known]  # (not ended: a bug's)
            self._taken[key] = {j.req.uid for j in took}
            # Its record being written (before its upload or create): out of ``_open`` now, the write deleted once
            # done (``_journal_put``). Left there, a stop that came before the write ended cancelled it as a batch
            # under way, "no cancel reached" it, and settled its named members' claims again at their batch bound,
            # counted possibly billed, for a batch never created (a review, ``rvcut2_82``).
            if self._open.pop(key, None) is not None:
                self._unjournal.append((self._space, key))
            for j in took:
                if sure and first and self._never_called_here(j):
                    named.append(j.req.uid)
                    self._final(b, j, False, 0.0, b.mode, error=ENGINE_CANCELLED)
                else:
                    rest.append(j)
        self._creating = {}
        # Waiting for a next try: never sent again. Named where every try of it billed nothing as this dispatcher
        # classes its outcomes (``_tries_billed_nothing``); else not named, the 502 (a try may have been billed).
        # Before (stop 82's "left"), none was named: a 429 waited out was the 502 "may have been billed".
        for b, j in (self._retrying or {}).values():
            if sure and self._tries_billed_nothing(j):
                named.append(j.req.uid)
                self._final(b, j, False, 0.0, b.mode, error=ENGINE_CANCELLED)  # (at 0: nothing unanswered)
            else:
                rest.append(j)
        self._retrying = {}
        self._end_unnamed(rest)
        self._pump()
        return named

    def _before_create(self, key: str, b: BatchJob, jobs: list[Job], first: bool) -> str:
        """Batch ``key`` of ``jobs`` is let start: until its create begins, a stop takes it (``cut_at_stop``)."""
        if self._creating is None:
            self._creating = {}
        self._creating[key] = (b, jobs, first)
        return key

    def _stop_took(self, key: str) -> bool:
        return bool(self._taken) and key in self._taken

    def _stop_began(self) -> bool:
        """Whether the engine's stop began naming what it cut (``stop_began``: its mark, written before it asks
        anyone): a cut create, resumed from a journal record, is then looked for, never made. The record may be
        one a batch the stop took left (its process dead before the delete), its members told never sent. Guarded
        by the published list (``rvcut2_82``), a restart that read its journal before the stop published, 2 s at
        most later, made the create: its members billed, and again when retried. The stop cancels the rest."""
        return stop_began(_engine_of(self.__dict__.get("_engine", "")))

    def _stop_named(self, records: dict) -> frozenset[str]:
        """What the engine's stop published as never sent (``read_cut``), read once a restart finds ``records``
        (its journal's, or ``_open`` at the stop's cancel) with a cut create (no handle): the only ones that can hold
        them."""
        return read_cut(_engine_of(self.__dict__.get("_engine", ""))) if any(r[4] is None for r in records.values()) \
            else frozenset()

    def _named_out(self, jobs: list[Job], handle, named: frozenset[str], key: str | None = None) -> list[Job]:
        """Of a restart's record of a cut create, the members the stop did not name. Those it named (their batch
        taken, its process dead before the record's delete) were answered never sent and their claims let go at 0:
        let go at 0 again here (the ledger takes a claim once; that process may have died before its settlement
        left), never in a batch under way. Resumed (a review, ``rvcut2_82``), a stop's cancel that came before the
        create's lookup ended settled them at their bound, possibly billed: a ledger's over-count. A re-admitted copy
        (its original's id) stays: none is named, and it may have gone out in the create. ``key``: the record's, its
        create then never made (``_named_in``)."""
        if handle is not None or not named:
            return jobs
        out = [j for j in jobs if j.req.uid in named and j.seq < OWN_ROWS]  # (a copy shares its id: never named)
        if out and key is not None:  # its body holds them: looked up, never made (``_named_in``)
            self._bodies_named = {*(self._bodies_named or ()), key}
        done = self.__dict__.get("_settled_at_stop")
        for j in out:
            if j.claim is not None and not (done and j.claim in done):
                self._settle.append((j.claim, 0.0))
                if done is not None:  # (the stop's settlements began: none of these is settled again)
                    done.add(j.claim)
        if out:
            self._kick()  # (sent now: held until the next flush, their room stayed taken)
        gone = {id(j) for j in out}
        return [j for j in jobs if id(j) not in gone]

    def _named_left_out(self) -> None:
        """At the stop's cancel, in a restarted dispatcher: the members the stop named leave its cut creates, as in
        its journal's read (``_named_out``), their claims at 0, a create with none left gone. That read, made
        before the stop published (a grouper's late dispatch, the journal's watch: the mark alone kept the create
        from being made), named none, and the cancel settled them at their bound, counted possibly billed, for
        requests told never sent and a batch never made (a review, ``rvcut3_82``: ``(1, 1, 0)``, $0.51 for 4)."""
        if not self._reborn or not (named := self._stop_named(self._open)):
            return
        self._settled_at_stop = self.__dict__.get("_settled_at_stop") or set()  # (their run's end settles them not)
        for key, rec in list(self._open.items()):
            if len(left := self._named_out(rec[1], rec[4], named, key)) == len(rec[1]):
                continue
            if left:
                self._open[key] = (rec[0], left, *rec[2:])
            else:
                del self._open[key]
                self._unjournal.append((self._space, key))
                self._kick()

    def _named_in(self, key: str) -> bool:
        """Whether cut create ``key``'s body holds members the stop named (``_named_out`` left them out of its
        jobs, not of its body, made again as it was cut): looked up, never made, whatever the mark's read says.
        Made (a review, ``rvcut3_82``: a read of the mark that failed), they were sent in it, billed, told never
        sent, their claims let go at 0."""
        return bool(self._bodies_named) and key in self._bodies_named

    def _create_begins(self, key: str) -> bool:
        """Batch ``key``'s first HTTP call (its upload or its create) is made next, with no await between: False if
        the stop took it first. In the same step it leaves the stop's reach, so a batch the stop names is never
        created and one it does not is never named: both run on this one event loop."""
        if self._creating:
            self._creating.pop(key, None)
        return not self._stop_took(key)

    def _not_created(self, key: str, b: BatchJob, jobs: list[Job], tokens: int) -> None:
        """Batch ``key``, taken by the stop, is never created: its gate's tokens and journal record go, and its
        members the stop did not take (withdrawn then) end as withdrawn ones do."""
        taken = self._taken.pop(key)
        self._quota.ended(key)
        self._release_dispatch(key, tokens, jobs[0].req.model)
        self._end_unnamed(self._end_withdrawn(b, [j for j in jobs if j.req.uid not in taken]))
        self._pump()

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

    def _tries_billed_nothing(self, j: Job) -> bool:
        """Whether every call of ``j``, which waits for its next try, is known to have billed nothing: its job says
        no call of it was made but its own tries here (``attempts``, 429s waited out), none hedged, rerouted, gone
        standard nor a copy, and no try of it got an outcome that may be billed. Every such outcome is counted where
        the try ends (``_run_sync``): ``maybe_billed`` (a timeout, a connection cut after it was made, a 502/504,
        an answer not read whole) in ``_unanswered``, a flex one in ``_flex_unanswered``, a job the provider keeps in
        ``_kept``; an id there at any count (a 0 left by a charge, ``_lost_key``) is taken as billed. What is left
        out of them billed nothing by the same rule the ledger settles a failure at (0): a 429, a connection never
        made, a refusal, a 5xx but 502/504, a video the provider failed. Its tries must all be this dispatcher's
        sync tries: the job its call record (``_sync_calls``, made at its first try here) keeps was never called,
        so ``attempts`` counts no earlier batch member's attempt (a member a failed batch gave back to its grouper
        with ``attempts`` + 1, sent sync; its batch not watched here)."""
        if self.provider.real:  # its first try here was its first call anywhere: not a batch member's retry
            rec = self._sync_calls.get(call_key(j.req.tenant, j.req.id, j.req.model, 0))
            if rec is None or not never_called(rec[1]):
                return False
        # (A simulated provider bills no failed call, in a batch or not: the simulator's cost model.)
        return self._never_called_here(j._replace(attempts=0, throttled=0))

    def _never_called_here(self, j: Job) -> bool:
        uid = j.req.uid
        return (never_called(j) and uid not in self._unanswered and uid not in self._flex_unanswered
                and uid not in self._kept)
