"""How a dispatched member ends (a mixin of ``actors.dispatcher.Dispatcher``): its claim settled at what it cost,
a failed attempt back to the policy while attempts remain, a hedged one back with its claim, and a final result
with what it may have been billed, queued in the outbox for the hub, the cache and the budget."""

from __future__ import annotations

from actors._dispatch_outbox import maybe_billed_error
from actors._types import BatchJob, Job
from actors.metrics import retry_reason
from engine.core.provider_api import CallOutcome, call_key
from engine.runtime.outcomes import failed_result, list_price, ok_result, verdict

__all__ = ["MemberEnds"]


class MemberEnds:
    """Needs the dispatcher's ``clock``, ``catalog``, ``provider``, ``caches``, ``max_att``, its counts and outbox
    lists, and its journal of sync bodies (``_sync_calls``, ``_sync_journal``, ``_unjournal``)."""

    def _body_done(self, j: Job) -> None:
        """``j`` left this dispatcher (ended, rerouted, back to the policy): its sync body record goes (from the
        journal once its result is with the hub). Left behind, it would grow and be called again after a restart."""
        key = call_key(j.req.tenant, j.req.id, j.req.model, 0)
        if self._sync_calls.pop(key, None) is not None:
            self._unjournal.append((self._sync_journal.space, key))
        self._job_done(key)

    def _member_done(self, j: Job, cost: float) -> None:
        self.in_flight -= 1
        self._unanswered.pop(j.req.uid, None)
        self._flex_unanswered.pop(j.req.uid, None)
        self._kept.discard(j.req.uid)
        self._known.discard(j.req.uid)
        self._body_done(j)
        if j.claim is not None and not (self._settled_at_stop and j.claim in self._settled_at_stop):
            self._settle.append((j.claim, cost))

    def _attempt(self, b: BatchJob, j: Job, ok: bool, cost: float, mode: str, out: CallOutcome | None = None) -> None:
        """A batch or GPU member's attempt ended; a failure goes back to the policy while attempts remain."""
        v = verdict(ok, j.attempts + 1, self.max_att, out is None or out.retryable)
        if not ok:
            self._counts.failed(retry_reason(out.retry_after_s, out.error) if out is not None else "other",
                                v == "retry")
        if v == "retry":
            self._member_done(j, 0.0)
            self._readmit.append(j._replace(attempts=j.attempts + 1, claim=None))
            return
        self._final(b, j, ok, cost, mode, out)

    def _hedged(self, j: Job) -> None:
        # The claim goes back with the job: the grouper releases it in the same budget call that reserves the
        # sync fallback, so the room it held cannot be taken in between.
        self.in_flight -= 1
        self._known.discard(j.req.uid)
        self._readmit.append(j._replace(hedges=j.hedges + 1))

    def _final(self, b: BatchJob, j: Job, ok: bool, cost: float, mode: str, out: CallOutcome | None = None,
               error: str | None = None) -> None:
        r = j.req
        now = max(self.clock.now(), r.arrival_s)
        # A success after an unanswered call: where the key is not honoured, that call may have been billed too,
        # unless the provider found that call's own job again and answered with it (``recovered``).
        maybe = 0.0 if self._settled_at_stop and j.claim in self._settled_at_stop else self._maybe_billed(  # (counted)
            j, out, ok and (self.provider.honours_keys or (out is not None and out.recovered)))
        self._member_done(j, cost + maybe if ok else maybe)
        if not ok or not r.met_by(now):
            missed = self._counts.deadline_missed
            missed[r.priority] = missed.get(r.priority, 0) + 1
        if ok:
            # Its earlier calls' bound too, as the ledger charged it (``_member_done``): a flex call given up at
            # its timeout ran at the emulator, billed, and the batch file's report said only the standard answer's
            # cost (a rehearsal under load: the bill $0.000288 over the report, bill84).
            res = ok_result(r, at=now, cost=cost, mode=mode, batch_id=b.bid, recommendation=b.recommendation,
                            reason=b.reason, out=out, possibly_billed_usd=maybe + j.billed_usd)
        else:
            res = failed_result(r, at=now, batch_id=b.bid, recommendation=b.recommendation, tries=j.attempts + 1,
                                max_attempts=self.max_att, real=out is not None and out.real,
                                error=maybe_billed_error(error or (out.error if out is not None and out.error else None),
                                                         maybe + j.billed_usd),
                                possibly_billed_usd=maybe + j.billed_usd)
        price = list_price(r, self.catalog, res.usage if ok else None)
        self._results.append(res)
        self._list_prices.append(price)
        if self.caches:
            shard = j.cache_shard
            self._fills.append((shard, (j.fp, res)))
            if not ok:
                self._orphans.append((shard, (j.fp, r.uid)))
        self._keep_done(r.uid, res, price)
