"""A dispatcher's batch-API work: journal the batch before its create, create it (or find the one a restart
cut), then follow it to its end, cancel it at its hedge and resolve its members (``_batch_follow``). A mixin of
``Dispatcher``."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from actors._batch_follow import BatchFollow
from actors._batch_watch import _UNKNOWN, POLL_RETRY_S, BatchWatch, _short
from actors._queue_full import QueueFull
from actors._results_room import ResultsReads
from actors._types import BatchJob, Job
from engine.core._logkeys import get_logger
from engine.core.errors import ProviderError
from engine.core.provider_api import CallJob
from engine.runtime.providers import Event
from engine.runtime.turnaround import Turnaround, submitted

log = get_logger("smartbatch.dispatcher")

FIND_TRIES = 5  # lookups of a lost create's batch a real second or more apart; then every POLL_RETRY_S engine s
SUBMIT_TRIES = 3  # creates of a batch whose answer was lost, each after a lookup that did not find it
FETCH_TRIES = 5  # reads of an ended batch's results: its finished members are billed, never to be sent again
RETRY_BASE_S = 0.2  # real seconds before a lookup or a read is tried again, doubling each time


class BatchApiRuns(BatchFollow, QueueFull, BatchWatch, ResultsReads):
    """Batch-API methods of ``Dispatcher``."""

    def _start_batch_api(self, e: Event, b: BatchJob, jobs: list[Job], first: bool = False) -> None:
        """``first``: its members' first arrival here (``CutDispatches._before_create``)."""
        parts = self._file_parts(jobs) if self.provider.real else [jobs]
        if len(parts) == 1:
            key = self._before_create(f"{b.bid}-{secrets.token_hex(4)}", b, jobs, first)
            self._spawn(self._run_batch(b, jobs, e.start, e.outcome, name=key), jobs, b)
            return
        # The provider's limit on one batch's size (OpenAI's 200 MB input file, Anthropic's 256 MB): a larger
        # batch is refused whole, and its members would all go sync at the full price; and for images, the memory
        # their results take here (``batch_results_max_mb``, ``ResultsReads._file_parts``). Each part is a batch of
        # its own (journalled, followed, hedged alike); the dispatch's enqueued tokens are released when the
        # last part ends. The parts' keys name the dispatch (``stem#k``), not its batch id: one id may come
        # twice (members parked for a budget go later under it; a restarted grouper numbers from 0 again).
        stem = f"{b.bid}-{secrets.token_hex(4)}"
        self._parts_left[stem] = len(parts)
        log.info("dispatcher %s: a batch of %d requests is sent as %d batches (at most %g MB of input each; "
                 "images: at most %g MB of results each)", self.name, len(jobs), len(parts), self._max_file_mb(jobs),
                 self.settings.batch_results_max_mb)
        for k, part in enumerate(parts):
            key = self._before_create(f"{stem}#{k}", b, part, first)
            self._spawn(self._run_batch(b, part, e.start, e.outcome, name=key), part, b)

    def _max_file_mb(self, jobs: list[Job] | None = None) -> float | None:
        """The provider's limit on one batch of ``jobs`` (one model's): ``media_max_mb`` for a model of
        ``media_models`` where the catalog gives one (Google's inline requests), else ``max_file_mb``."""
        ba = self.catalog.provider(self.name).batch_api
        if ba is None:
            return None
        media = ba.media_max_mb is not None and bool(jobs) and jobs[0].req.model in (ba.media_models or ())
        return ba.media_max_mb if media else ba.max_file_mb

    async def _run_batch(self, b: BatchJob, jobs: list[Job], start: float, tokens: int, key: str | None = None,
                         body=None, name: str | None = None) -> None:
        """Journal the batch about to be created, create it, journal its handle (so a restarted dispatcher
        re-attaches to it, never submits it again), then follow it. With ``key``: a create that a restart cut;
        the provider is asked for the batch first, and a create made again sends the same name and body. ``name``:
        the key of a new batch (a part of a split dispatch)."""
        cjobs = [self._call_job(j, start, batch=True) for j in jobs]
        p, handle = self.provider, None
        cut = key is not None
        key = key or name or f"{b.bid}-{secrets.token_hex(4)}"
        # Held until the batch's handle is journaled: where batches carry nothing that names them (Anthropic),
        # a lost create's lookup then never meets a look-alike of this dispatcher's own, now or after a restart.
        asked = self.clock.now()
        async with p.create_slot(len(cjobs)):
            # A batch whose hedge passed while it waited (for the provider's enqueued-token room, or for a create
            # of its size) is never created, as the simulator never submits it (``SimProvider.batch``): its
            # members go back to the policy, as at a hedge. Created, it was cancelled at once, and its members
            # waited out the cancel, or were billed in it. Judged at its start unless it waited for the slot.
            now = self.clock.now()
            late = (self._cancelled or self._all_withdrawn(jobs)  # (a create a restart cut too: a review)
                    or self._stop_took(key) or cut and self._stop_began()  # (the stop's word: ``cut_at_stop``)
                    or not cut and b.hedge_at is not None and b.hedge_at <= (now if now > asked else start))
            if not cut and not late and self._withdrawn:  # withdrawn while it waited for the slot: left out
                jobs, cjobs = self._left_in(b, jobs, cjobs)
            # A billing refusal held (``QuotaStop``): never created, but for the probe (``_batch_gate``)
            unpaid = None if cut or late else self._quota.refuses(now, key, len(jobs))
            late = late or unpaid is not None

            async def left_in() -> tuple[list[CallJob], object]:  # withdrawn while journaled, or waiting out a 429
                nonlocal jobs, cjobs, body
                jobs, cjobs, body = await self._left_in_journaled(key, b, jobs, cjobs, start, tokens, body)
                return cjobs, body

            if p.real and not cut and not late:  # the create may reach the provider, and this dispatcher die
                body = p.batch_body(cjobs)       # before it hears back
                self._open[key] = (b, jobs, start, tokens, None, body)
                await self._journal_put(key)
                # Withdrawn while it was journaled (a write may wait behind others): left out, as at the slot;
                # all of them, or the engine cancelled, and it is never created. Before, sent in it and billed.
                while not (late := self._cancelled or self._all_withdrawn(jobs) or self._stop_took(key)) and \
                        self._some_withdrawn(jobs):
                    await left_in()
            if not self._create_begins(key):  # the stop's word came first: never created (``cut_at_stop``)
                self._not_created(key, b, jobs, tokens)
                return
            try:
                if cut:
                    handle = await self._find_batch(cjobs, key, b.hedge_at)
                if handle is None and not (late or self._named_in(key)):  # (a cut create's body stays as cut)
                    handle = await self._submit(cjobs, b.hedge_at, key, body, None if cut else left_in)
            except Exception as exc:  # the provider refused the batch: nothing ran, so the members go back
                log.warning("dispatcher %s: batch submission failed: %s", self.name, _short(exc))
                if getattr(exc, "quota", None):  # for billing: its members fail, and the provider's work is held
                    unpaid = self._refused_for_billing(exc.quota)
            self._quota.ended(key)  # a probe's create has its answer
            unknown = handle is _UNKNOWN
            if unknown:
                handle = None
            if handle is not None:
                self._created_after_refusal(now)
                self._open[key] = (b, jobs, start, tokens, handle, None)
                if self._learners and submitted(start, b.hedge_at):  # every grouper learns it is running
                    self._turnarounds.append(Turnaround(self.name, jobs[0].req.model, start))
                await self._journal_put(key)
        if unpaid is not None:
            self._unpaid(key, b, jobs, tokens, unpaid)
            return
        if unknown:  # its members go back now; the batch, if it was made, is found later and cancelled
            await self._watch(b, key, jobs, start, None, cancel=True)
        await self._follow_batch(key, b, jobs, start, tokens, handle, cjobs)

    async def _submit(self, cjobs: list[CallJob], hedge_at: float | None, key: str, body, left_in=None):
        """Create the batch. A create that got no answer (a timeout, a dropped connection, a 5xx) may have made
        it: the provider is asked for it as after a restart's cut create (OpenAI: by the name in its metadata;
        Anthropic: the create made again under its Idempotency-Key, with the same body). Taken for a refusal,
        the batch ran unfollowed beside its members sent sync: each paid twice, and counted nowhere. ``left_in``:
        called while a rate limit is waited out, for the members and body of the create made after it."""
        # Asked by a provider whose create leaves after an upload: made with a member withdrawn meanwhile, or
        # after the engine's cancel, it was sent and billed. ``cjobs`` as it is when asked.
        wanted = None if left_in is None else lambda: not (self._cancelled or self._some_withdrawn(cjobs))
        for attempt in range(SUBMIT_TRIES):
            try:
                while (made := await self.provider.submit_batch(cjobs, hedge_at, key, body, wanted)) is None:
                    if self._cancelled or self._all_withdrawn(cjobs):  # not created: its members go back
                        return None
                    cjobs, body = await left_in()  # created anew without those withdrawn during the upload
                return made
            except ProviderError as exc:
                # Rate limited (a 429): nothing was made, so made again after its wait while the hedge allows (sent
                # back, four such refusals sent every member sync, far from its deadline: a helper's hunt).
                if exc.retry_after_s is not None and attempt + 1 < SUBMIT_TRIES and (
                        hedge_at is None or self.clock.now() + exc.retry_after_s < hedge_at):
                    log.warning("dispatcher %s: batch %s: its create was rate limited (%s); made again in %g s",
                                self.name, key, _short(exc), exc.retry_after_s)
                    cjobs, body = await self._wait_out(exc.retry_after_s, cjobs, body, left_in)
                    if not (self._cancelled or self._all_withdrawn(cjobs)):
                        continue
                if not exc.maybe_done:
                    raise
                left_in = wanted = None  # this create may have made the batch: made again, it sends the same body
                log.warning("dispatcher %s: batch %s got no answer to its create (%s); looking for it", self.name,
                            key, _short(exc))
                error = exc
            await asyncio.sleep(RETRY_BASE_S * 2 ** attempt)
            # The last try's too: taken for a refusal, a batch it made ran unfollowed while its members went again
            # (each paid twice, counted nowhere; a helper's fault hunt).
            found = await self._find_batch(cjobs, key, hedge_at)
            if found is not None:
                return found
            if self._cancelled or self._all_withdrawn(cjobs):  # nobody waits: not made again, looked for (a review)
                return _UNKNOWN
        raise error

    async def _wait_out(self, wait_s: float, cjobs: list[CallJob], body, left_in) -> tuple[list[CallJob], object]:
        """Wait out a rate limit's ``wait_s`` engine seconds before a create is made again; the members and body
        of that create. With ``left_in`` (every try so far refused: no batch holds the body), a member withdrawn
        meanwhile is left out at once, its withdrawal waking the wait; left in, it was sent in the create after
        the wait, and billed. A wake for another batch (its withdrawal) does not end the wait."""
        until, token = self.clock.now() + wait_s, object()
        try:
            while True:
                if left_in is not None and not (self._cancelled or self._all_withdrawn(cjobs)) and \
                        self._some_withdrawn(cjobs):
                    cjobs, body = await left_in()
                now = self.clock.now()
                if now >= until or self._cancelled or self._all_withdrawn(cjobs):
                    return cjobs, body
                if left_in is not None:  # a withdrawal of one of them wakes this wait (``withdraw``)
                    self._creates_waiting[token] = cjobs
                await self._sleep(until - now)
        finally:
            self._creates_waiting.pop(token, None)

    async def _find_batch(self, cjobs: list[CallJob], key: str, until: float | None, *, watch: bool = False):
        """The provider's batch for a create whose answer was lost, or that a restart cut: its handle, or None
        when the provider answered that it has none (it is then created). A lookup that fails is tried again, at
        backoff, then every ``POLL_RETRY_S`` until ``until`` (engine time; the batch's hedge, before which
        waiting costs its members no deadline) or the engine's cancel, and then ``_UNKNOWN``. Created again
        without an answer, a batch the lost create did make ran beside the new one, each member paid twice.
        ``watch``: the engine's cancel does not end the lookups (``_watch_to_end``)."""
        attempt = 0
        while True:
            try:  # A watch looks outside its create's slot: one of this dispatcher's own creates of that size may
                # be unanswered, its batch a look-alike (Anthropic) that the watch would take and cancel (a review).
                async with self.provider.create_slot(len(cjobs)) if watch else contextlib.nullcontext():
                    known = frozenset(getattr(rec[4], "id", None) for rec in self._open.values()) - {None}
                    return await self.provider.find_batch(cjobs, key, known)
            except Exception as exc:
                log.warning("dispatcher %s: looking up batch %s failed (%s)", self.name, key, _short(exc))
            attempt += 1
            now = self.clock.now()
            stop = not watch and (self._cancelled or self._all_withdrawn(cjobs))  # nobody waits for it now
            if attempt >= FIND_TRIES and (until is None or now >= until or stop):
                log.error("dispatcher %s: batch %s could not be looked up%s", self.name, key,
                          "" if watch else "; its members go back, and the batch is looked for until found, "
                          "then cancelled")
                return _UNKNOWN
            if attempt < FIND_TRIES:
                await asyncio.sleep(RETRY_BASE_S * 2 ** (attempt - 1))
            else:
                await self._sleep(min(POLL_RETRY_S, until - now))

    async def _fetch(self, handle, cjobs: list[CallJob], hedge_at: float | None) -> dict | None:
        """The results of an ended batch, or None if they could not be read. Its finished members were billed: a
        failed read is tried again (a member handed back is sent again, paid twice), then given up on loudly. A
        try that outlasts its bound (``_read_bound_s``: a server trickling the file) is made again, not counted:
        the file stays at the provider, and a read given up on sends the members again. Past
        ``batch_results_read_max_s`` after the hedge, every member fails possibly billed (``_unread_batch``)."""
        since = self.clock.now()
        until = max(since, hedge_at or 0.0) + self.settings.batch_results_read_max_s
        attempt = 0
        while attempt < FETCH_TRIES:
            try:
                return await self._read_results(handle, cjobs)
            except asyncio.TimeoutError as exc:  # (TimeoutError from 3.11); with a text, its file's length's (paced)
                log.warning("dispatcher %s: a try at reading batch results outlasted its bound (%s); read again",
                            self.name, exc or f"{self._read_bound_s(cjobs):.0f} s")
                if self.clock.now() >= until:
                    return self._unread_batch(handle, cjobs, since)
                await asyncio.sleep(RETRY_BASE_S)
            except Exception as exc:
                log.warning("dispatcher %s: batch results could not be read (%s)", self.name, _short(exc))
                attempt += 1
                if attempt < FETCH_TRIES:
                    await asyncio.sleep(RETRY_BASE_S * 2 ** (attempt - 1))
        log.error("dispatcher %s: the results of an ended batch could not be read after %d tries%s", self.name,
                  FETCH_TRIES, " (the engine is cancelled: tried again)" if self._cancelled else "; its members are "
                  "sent again, and those it finished are paid twice (read later, counted and charged)")
        return None

    async def _journal_put(self, key: str) -> None:
        rec = self._open.get(key)
        if rec is None:  # it ended meanwhile (``rejournal`` awaits between records): nothing left to journal
            return
        try:
            await self.journal.put(self._space, key, rec)
        except Exception as exc:  # the batch still runs; only a restart of this dispatcher would lose track of it
            log.warning("dispatcher %s: could not journal batch %s: %s", self.name, key, _short(exc))
            return
        if key not in self._open:  # it ended while the write was out, its delete maybe run first: deleted again
            self._unjournal.append((self._space, key))  # (left, a later restart re-attached to the ended batch)
            self._kick()
            return
        self._index_put([key], journaled=True)  # the hub's entry, for a restart after its Redis lost the record
