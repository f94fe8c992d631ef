"""A dispatcher's created batch followed to its end: polled, cancelled at its hedge (or at a withdrawal or the
engine's cancel), its results read and its members resolved. Split from ``actors._batch_api`` (the create), a
mixin placed first in ``BatchApiRuns``' bases."""

from __future__ import annotations

import logging

from actors._batch_watch import CANCEL_RETRY_S, POLL_RETRY_S, _short, known_ran
from actors._types import BatchJob, Job
from engine.core._logkeys import get_logger
from engine.core.provider_api import CallJob, refusal_state
from engine.runtime.turnaround import Turnaround, batch_turnaround, submitted

__all__ = ["BatchFollow"]

log = get_logger("smartbatch.dispatcher")

# More rounds of ``_fetch``'s reads (``_batch_api.FETCH_TRIES``), POLL_RETRY_S apart, once the engine is
# cancelled (nobody waits).
CANCELLED_READS = 20


class BatchFollow:
    """``Dispatcher``'s following of a created batch (its state is ``Dispatcher``'s)."""

    async def _follow_batch(self, key: str, b: BatchJob, jobs: list[Job], start: float, tokens: int, handle,
                            cjobs: list[CallJob]) -> None:
        """Poll until the batch ends, cancel it at its hedge time, then resolve every member: finished ones
        from the output (billed once, never sent again), the rest back to the policy."""
        p = self.provider
        hedge_at = b.hedge_at
        outs: dict = {}
        read = None  # its lines, once read
        again = None  # refused whole for a full queue: the parts it goes again in (``_queue_refused``)
        was_cancelled = hedged = False  # hedged: cancelled at its hedge time, not withdrawn nor by the engine's cancel
        told = learn = self._learners and handle is not None and submitted(start, hedge_at)
        if handle is not None:
            allowance = self.catalog.provider(self.name).batch_api.cancel_s
            cancel_deadline = None  # when the members go back if the batch has not ended by then
            cancel_taken = False  # the provider took the cancel (it answered, or a poll said it is cancelling)
            finishing = False  # every member ran (OpenAI's "finalizing"): it ends with them all
            while True:
                now = self.clock.now()
                if self._cancelled and (cancel_taken or finishing):  # nothing left to cancel: ending on its own
                    self._cancel_sent.add(key)
                if ((self._cancelled or hedge_at is not None and now >= hedge_at or self._all_withdrawn(jobs))
                        and not (cancel_taken or finishing)):
                    # Cancel first, poll after: until it lands, a late batch finishes members that go sync too.
                    try:
                        said = await p.cancel(handle)
                        cancel_taken = True
                        if self._cancelled:  # the engine's cancel waits for it (``CancelDispatches.cancel``)
                            self._cancel_sent.add(key)
                        # The provider may go on cancelling (and finishing members) for the allowance from when
                        # it took the cancel, not from a first try that failed, nor the time spent on the wire.
                        cancel_deadline = self.clock.now() + allowance
                    except Exception as exc:  # e.g. it ended meanwhile; the poll below tells
                        # A batch that ended just before its hedge is the common case, and harmless: its members
                        # come from its output. Else a warning, and the cancel is made again soon.
                        said = refusal_state(exc)
                        log.log(logging.INFO if said else logging.WARNING, "dispatcher %s: batch cancel failed: %s",
                                self.name, _short(exc))
                        if cancel_deadline is None:  # never taken, the wait is still bounded: deadlines first
                            cancel_deadline = self.clock.now() + allowance
                    if not was_cancelled:
                        self.batches_cancelled += 1
                        early = hedge_at is None or now < hedge_at  # withdrawn, or the engine's cancel: no hedge
                        hedged = not early
                        self._counts.hedged_batches += hedged
                        learn = learn and not early  # it ran until now, not its hedge: learned, it read as that long
                        was_cancelled = True
                    if said is not None and said.status == "ended":  # read, never sent again (polls failing past
                        break  # the allowance sent every member again, each paid twice: a helper's hunt)
                    finishing = finishing or (said is not None and said.status == "finalizing")
                polled_at = self.clock.now()  # a status is the provider's when the poll was sent
                try:
                    st = await p.poll(handle)
                except Exception as exc:  # a failed poll is retried; the hedge still bounds the wait
                    log.warning("dispatcher %s: batch poll failed: %s", self.name, _short(exc))
                    st = None
                if st is not None and st.status == "ended":
                    break
                if st is not None and st.status == "cancelling" and not cancel_taken:
                    # Taken by a try whose answer was lost, before this poll was sent: it ends within the allowance.
                    cancel_taken, cancel_deadline = True, polled_at + allowance
                # Every member ran and is billed, and the output is being written: sent again, each is paid
                # twice, so the batch is waited for (a cancel is refused now, and it ends in minutes).
                finishing = finishing or (st is not None and st.status == "finalizing")
                now = self.clock.now()
                # Never once the engine is cancelled: nobody waits then, and giving up left what it had finished
                # unread, each paid twice at the next start (a fault hunt); the stop's drain bounds the wait.
                gives_up = cancel_deadline is not None and not finishing and not self._cancelled
                if gives_up and polled_at >= cancel_deadline:
                    # The cancel outlasted its allowance: the deadline comes first. Unfinished members go sync (any
                    # the provider still finishes is counted paid twice). Judged by a poll sent after the allowance:
                    # one sent before says "cancelling" of a cancel that may have ended since (a busy event loop).
                    log.warning("dispatcher %s: batch cancel still pending; sending its unfinished members", self.name)
                    await self._watch(b, key, jobs, start, handle, cancel=not cancel_taken)
                    handle = None
                    break
                wait = st.next_poll_s if st is not None else POLL_RETRY_S
                if was_cancelled and not (cancel_taken or finishing):
                    wait = min(wait, CANCEL_RETRY_S)  # a cancel not yet taken is made again soon
                limit = (hedge_at if cancel_deadline is None and hedge_at is not None and not finishing else
                         cancel_deadline if gives_up else float("inf"))  # (finishing past its hedge: a spin)
                await self._sleep(max(min(wait, limit - now), 0.0))
        if handle is not None:  # ended: a stop has nothing of it to cancel while it is read (``_being_read``)
            self._being_read = self._being_read | {key}
        # Held from the read of an image batch's results until every member is handed on (``_results_slot``).
        async with self._results_slot(self._weighed(key, jobs) if handle is not None else [], hedge_at):
            if handle is not None:  # its strays' lines too: its read's bound, and a give-up's failures (a review)
                lines = self._with_strays(key, cjobs)
                read, rounds = await self._fetch(handle, lines, hedge_at), 0
                while read is None and self._cancelled and (rounds := rounds + 1) <= CANCELLED_READS:  # as above
                    read = await self._sleep(POLL_RETRY_S) or await self._fetch(handle, lines, hedge_at)
                if read is None:
                    # The members go again for their deadlines, and the batch is read until it answers: what it
                    # finished is then on the bill twice, so it is counted (paid_twice) and charged to the
                    # budgets. Before, it was paid twice with the report saying 0 and the ledger short of it.
                    await self._watch(b, key, jobs, start, handle)
                else:  # read: nothing needs its input any more (its output stays for a resume: _batch_files)
                    self._files.discard(p, handle)
                outs, read = self._strays_apart(key, read)  # (their lines apart: ``_batch_strays``)
                again = self._queue_refused(key, b, jobs, handle, outs)
                learn = learn and again is None
            self._release_dispatch(key, tokens, jobs[0].req.model)
            self._being_read = self._being_read - {key}
            self._counts.turnaround_s.append(self.clock.now() - start)
            if told and not learn:  # its start was told: closed with a bound of 0, it is left out of the fit; left
                # open, it read as a batch still running, later and later (a review)
                self._turnarounds.append(Turnaround(self.name, jobs[0].req.model, start, start, censored=True))
            elif learn:
                ends = [o.at for _, o in known_ran(list(outs.items()))]  # (members failed unnamed: as many as ran)
                self._turnarounds.append(batch_turnaround(self.name, jobs[0].req.model, start, ends, len(jobs),
                                                          hedge_at if was_cancelled else self.clock.now()))
            for part in again or ():  # never ran: still this dispatcher's, they wait at its gate for room
                self._enqueue("batch_api", b._replace(jobs=part), part)
            for j, cj in zip(jobs, cjobs, strict=True) if again is None else ():
                o = outs.get(cj.key)
                if o is None:
                    self._hedged(j)
                else:
                    if was_cancelled:
                        self.members_saved_by_cancel += o.ok
                        # The hedge panel's members: a withdrawn batch's counted there beside no hedged batch
                        self._counts.hedge_kept_members += o.ok if hedged else 0
                    self._note_warm(j.req, o, start)
                    self._attempt(b, j, o.ok, o.cost, "batch_api", o)
            self._strays_end(key, read)  # lines of members no driver re-admitted (``_batch_strays``)
            self._pump()
