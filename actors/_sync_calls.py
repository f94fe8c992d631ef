"""A dispatcher's sync calls: make one, then complete, retry or fail its request. A mixin of ``Dispatcher``.

Two refusals are not failures of a try. A rate limit's 429 billed nothing and says when to come back: the request
waits (``throttled_wait``) and goes again through the rate gate while its deadline leaves room for the call,
however many times (``throttled_verdict``), without spending one of its ``max_attempts``; past that room, each
429 is one of its tries, waited out alike. A billing refusal (no credit, a spend limit) fails the request at
once, and the provider's other sync requests fail unsent with the same message (``QuotaStop``) but for one call a
``QUOTA_PROBE_S`` (its retries included), whose success lifts the stop. Its batch creates are held alike, with the
same probe (``actors._batch_gate``).

A flex dispatch (OpenAI's ``service_tier: "flex"``, batch prices) is one call per request, as sync. Where the
tier does not serve it, it is sent again at once at the standard tier, no try spent, no breaker failure, no 429 in
the metrics: refused for want of capacity (a 429 "Resource Unavailable", billed nothing; ``flex_refused``, and
``smartbatch_flex_refused_calls_total`` on the metrics page), or given up at its timeout (``flex_timed_out``,
``smartbatch_flex_timed_out_calls_total``; it may have been billed: its bound is kept, ``possibly_billed``). The
standard call has a body of its own, so an Idempotency-Key of its own: under the flex call's key, a server that
honours keys would answer the refusal again. A provider that does not take the tier (a wire-format-only server)
gets the call standard, billed standard (``_as_call``).
"""

from __future__ import annotations

from actors._dispatch_jobs import CallSlot
from actors._types import BatchJob, Job
from actors.metrics import retry_reason
from engine.core._logkeys import get_logger
from engine.core.latency import flex_timeout_s, sync_latency_median
from engine.runtime.outcomes import call_mode, throttled_verdict, throttled_wait, verdict

log = get_logger("smartbatch.dispatcher")

__all__ = ["QUOTA_PROBE_S", "QuotaStop", "SyncCalls"]

QUOTA_PROBE_S = 60.0  # engine seconds between the calls that look whether a billing refusal was lifted


class QuotaStop:
    """A provider's billing refusal, held for its other requests: they would all be refused alike, each a call
    that tells nothing new. While held, a request is failed unsent with the refusal's message, but for one call
    every ``probe_s`` engine seconds; a success of a call started after the refusal (someone added credit) lifts
    it. A call sent before it may still succeed (it was admitted before the money ran out) and lifts nothing.

    A probe's own retries (a rate limit's 429, a 5xx) are the probe still, sent until its request ends
    (``ended``): taken for new work, one that came back within ``probe_s`` failed unsent with the billing
    message, never retried nor failed with its own error (a review)."""

    __slots__ = ("at", "next_probe", "probe_s", "probes", "refused", "why")

    def __init__(self, probe_s: float = QUOTA_PROBE_S):
        self.probe_s, self.why, self.at, self.next_probe, self.refused = probe_s, None, 0.0, 0.0, 0
        self.probes: set[str] = set()  # requests let through as probes, until they end (or the stop is lifted)

    def __repr__(self) -> str:
        held = "lifted" if self.why is None else f"held since {self.at:g} s"
        return f"QuotaStop({held}, refused_unsent={self.refused})"

    def trip(self, now: float, why: str) -> None:
        if self.why is None:
            self.at = now
        self.why, self.next_probe = why, now + self.probe_s

    def lift(self, started: float) -> bool:
        """A call started at ``started`` succeeded; True if that lifted the stop."""
        if self.why is None or started < self.at:
            return False
        self.why = None
        self.probes.clear()
        return True

    def ended(self, uid: str) -> None:
        """Request ``uid`` has its answer: a retry of it is no probe any more."""
        self.probes.discard(uid)

    def refuses(self, now: float, uid: str, n: int = 1) -> str | None:
        """The error to fail request ``uid`` with unsent, or None to send it (no stop, or it is a probe). A batch
        create asks under its own key, for its ``n`` members."""
        if self.why is None or uid in self.probes:
            return None
        if now >= self.next_probe:
            self.next_probe = now + self.probe_s
            self.probes.add(uid)
            return None
        self.refused += n
        return (f"not sent: an earlier call was refused for billing at engine time {self.at:.0f} s and every call "
                f"to this provider would be refused alike (one is tried every {self.probe_s:g} s; a success lifts "
                f"this): {self.why}")


class SyncCalls:
    """Sync-call methods of ``Dispatcher``."""

    _flex_probe: str | None = None  # the one reserved flex call under way at a server not yet seen serving flex

    def _as_call(self, b: BatchJob, j: Job) -> tuple[str, BatchJob]:
        """The work kind ``j`` of ``b`` is queued as, and ``b`` as its call reads it: a flex dispatch goes at the
        flex tier where the provider takes it for this model, else standard (``b`` then says sync: billed so).
        Standard too, where a budget reserved it at the flex price, when its body names another tier or the server
        answered a flex call at another tier (billed standard): it reserves the standard price first."""
        if b.mode != "flex":
            return "sync", b
        if self.provider.takes_flex and self.sim.spec.supports_flex(j.req.model) and (j.claim is None or (
                (j.req.body or {}).get("service_tier") in (None, "auto")
                and not getattr(self.provider, "flex_unserved", False))):
            return "flex", b
        return "sync", b._replace(mode="sync")

    def _queue_call(self, b: BatchJob, j: Job, first: bool = False) -> None:
        """Queue ``j`` of ``b`` as ``_as_call`` reads it (a dispatch, a try's retry); a reserved flex call that
        would go standard goes back for the standard price instead (``_back_standard``): a retry queued standard on
        its flex claim, once the server had answered a flex call at another tier, was billed up to twice it."""
        kind, call = self._as_call(b, j)
        if not (kind == "sync" and b.mode == "flex" and self._back_standard(b, j)):
            self._enqueue(kind, call, [j], first=first)

    def _start_flex(self, e, b: BatchJob, jobs: list[Job]) -> None:
        self._start_sync(e, b, jobs)  # ``_run_sync`` reads the tier from ``b.mode``, as a journaled record keeps it

    def _to_standard(self, b: BatchJob, j: Job, a=None) -> BatchJob:
        """``j``'s flex call was not served (``a``: its outcome; None, no room left for one): the standard call's
        body replaces its record under the same key when it is made (a restart in between sends the flex call
        again: a refusal billed nothing). Kept until then, so a request that leaves first (withdrawn, rerouted)
        takes it from the journal: dropped here, it stayed, and a restart made the flex call of a request its
        fallback answered (a hunt)."""
        uid = j.req.uid
        if a is not None:
            if a.maybe_billed:
                self.flex_timed_out += 1
                self._counts.flex_timed_out += 1
                self._flex_unanswered[uid] += 1
            else:
                self.flex_refused += 1
                self._counts.flex_refused += 1
        # Its earlier flex tries that got no answer (a 504, a cut connection) were under the flex call's key, which
        # the standard call's answer does not find: their bound stays, at flex prices (taken as answered by it, a
        # lost flex call's bound was dropped where the server honours keys; a hunt).
        # Under one key, a server that honours it bills them once.
        if (lost := self._unanswered.pop(uid, 0)) and not self.provider.honours_keys:
            self._flex_unanswered[uid] += lost
        elif lost and not self._flex_unanswered[uid]:
            self._flex_unanswered[uid] = 1
        return b._replace(mode="sync")

    def _start_to_standard(self, e, b: BatchJob, jobs: list[Job]) -> None:
        """The gate would start these flex calls standard (``SimProvider.pump``): their claims hold the flex price."""
        for j in jobs:
            self._back_or_end(b, j)

    def _back_or_end(self, b: BatchJob, j: Job) -> None:
        """``j``, not called, goes back for the standard price (``_back_standard``), or ends here unsent when it
        was withdrawn or the engine cancelled meanwhile (as at the rate gate, ``_to_start``)."""
        if not self._back_standard(b, j):
            self._final(b, j, False, 0.0, b.mode, error=self._not_sent(j))

    def _back_standard(self, b: BatchJob, j: Job, a=None) -> bool:
        """``j``'s flex dispatch goes standard (``a``: the flex call's outcome, refused or given up; None, not
        made). Where a budget reserved it, at the flex price, it goes back to its grouper (True), which reserves
        the standard price and sends it sync as decided, or holds it as held work while its budget cannot
        (``Job.standard``): sent on the flex claim, the standard call could bill twice what it held. An unbilled
        refusal's claim goes back with it, released in the call that reserves the standard one; a flex call given
        up at its timeout (maybe billed, under a key the standard call does not answer) settles its claim at its
        bound at flex prices now, and the standard call reserves on its own. False: no claim, or withdrawn or
        cancelled meanwhile (queued standard, it ends unsent at its start, ``_to_start``, its error saying what a
        flex call that got no answer may have billed)."""
        if j.claim is None or self._not_sent(j) is not None:
            return False
        self._to_standard(b, j, a)
        uid = j.req.uid
        claim, usd = j.claim, 0.0
        if n := self._flex_unanswered.pop(uid, 0):
            usd = n * self._flex_lost_bound(j.req)
            self.possibly_billed += n
            self.possibly_billed_usd += usd
            self._settle.append((claim, usd))
            claim = None
        self.in_flight -= 1
        self._known.discard(uid)
        self._body_done(j)
        # (``billed_usd``: settled here, said on its result should the standard call fail: ``Job.billed_usd``)
        self._readmit.append(j._replace(claim=claim, standard=(b.cache_write, b.recommendation, b.reason),
                                        billed_usd=j.billed_usd + usd, called=j.called or a is not None))
        self._kick()
        return True

    # The sync calls sent and not yet answered, by key: (dispatch, job). A record of ``_sync_calls`` not in it is not
    # at the provider (its body being journaled, or waiting for a next try), and a stop ends it unsent; a simulated
    # provider's call has no record there, and is settled from here (``_settle_cut_short``), as is a simulated GPU
    # batch's member under way (``Dispatcher._start_gpu_batch``).
    _calling: dict[str, tuple] | None = None

    async def _run_sync(self, b: BatchJob, j: Job, cache_write: bool, start: float) -> None:
        r = j.req
        flex = b.mode == "flex"
        # Waited past the room for a flex call first; or a journaled flex call resumed where the tier is gone (a
        # restart with the endpoint's ``flex_tier`` off: it failed as an engine error, a hunt).
        if flex and (self._as_call(b, j)[0] != "flex" or flex_timeout_s(self.sim.spec, r, start) <= 0):
            if j.claim is not None:  # its gate slot given back: it reserves the standard price first
                self.sim.finish_sync(r.model, start, 0)
                self._back_or_end(b, j)
                self._pump()
                return
            b, flex = self._to_standard(b, j), False
        mode = "flex" if flex else call_mode(self.sim.spec.models[r.model])
        if (unsent := self._quota.refuses(start, r.uid)) is not None:
            self.sim.finish_sync(r.model, start)  # its gate slot, taken when it started
            self._final(b, j, False, 0.0, mode, error=unsent)
            self._pump()
            return
        cj = self._call_job(j, start, cache_write)._replace(flex=flex)
        slot = CallSlot(self.sim, r.model)  # freed when the call ends, or a video's once its create is answered
        if self.provider.real:
            # One body per idempotency key, journaled before the first try: a retry (here, or after this
            # dispatcher restarted) must send what the provider may already have billed under that key.
            rec = self._sync_calls.get(cj.key)
            if rec is None or (rec[0].mode == "flex" and not flex):  # a flex body the tier did not serve
                rec = self._sync_calls[cj.key] = (b._replace(jobs=[]), j, cache_write, self.provider.sync_body(cj))
                await self._sync_journal.put(cj.key, rec)
            cj = cj._replace(body=rec[3], made=self._made_hook(cj.key, slot), ikey=self._ikey_of(cj.key, rec[3]))
            # Withdrawn, or the engine cancelled, during the write (it may wait behind others), or before a restart
            # made the call again (the rewire tells the withdrawals first): not sent, as at the rate gate
            # (``_to_start``). Before, sent and billed (again, for a call made before the restart).
            if (why := self._not_sent(j)) is not None:
                self.sim.finish_sync(r.model, self.clock.now(), 0)
                self._final(b, j, False, 0.0, mode, error=why)
                self._pump()
                return
            if self._cut:  # the stop's word came during the write: sent now, billed, its answer read by nobody
                self.sim.finish_sync(r.model, self.clock.now(), 0)  # (not named: the stop's list is out, the 502)
                self._end_unnamed([j])
                self._pump()
                return
        if flex and j.claim is not None and not getattr(self.provider, "flex_served", True):
            # A server named ``flex_tier: true`` not yet seen serving the tier may ignore it and bill each flex
            # call under way standard, up to twice its claim: one reserved flex call at a time until it answers
            # one at flex (``flex_served``); meanwhile the others go back for the standard price.
            if self._flex_probe is not None:
                self.sim.finish_sync(r.model, self.clock.now(), 0)
                self._back_or_end(b, j)
                self._pump()
                return
            self._flex_probe = r.uid
        calling = self._calling = self._calling or {}  # at the provider from here: the stop settles it at its bound
        calling[cj.key] = (b, j)
        try:
            a = await self.provider.call(cj)
        finally:  # a call cancelled (the dispatcher stopping) frees it too: held, every later one went standard
            calling.pop(cj.key, None)
            if self._flex_probe == r.uid:
                self._flex_probe = None
        # A give-up of its last try kept the job, which this try polled again: this outcome is that job's.
        self._kept.discard(r.uid)
        self._note_warm(r, a, start)
        extra = (max(a.usage.input_tokens + a.usage.output_tokens - r.input_tokens - r.output_tokens, 0)
                 if a.usage is not None else 0)
        slot.free(a.at, extra)
        if flex and a.refused:  # not a try: sent at the standard tier at once (its standard price reserved first)
            if not self._back_standard(b, j, a):
                self._enqueue("sync", self._to_standard(b, j, a), [j])
            self._pump()
            return
        if flex and a.ok and not a.flex:  # served at another tier (the provider said so), billed at its prices
            mode = "sync"
        v = verdict(a.ok, j.attempts + 1, self.max_att, a.retryable)
        wait, why, free = 0.0, None, False
        if a.rate_limited and not a.ok:
            wait = throttled_wait(a.retry_after_s, j.throttled, self.sim.backoff, self.sim.backoff_max)
            room = sync_latency_median(self.sim.spec, self.sim.spec.models[r.model], r)
            free, why = throttled_verdict(a.at + wait, room, r.arrival_s + r.deadline_s, j.throttled)
            free = free == "retry"
            # Past the room its deadline leaves, the 429 is one of its tries, as before: failed at once instead,
            # a request with a 30 s deadline behind a minute's window went unanswered (a review).
            v = "retry" if free else v
        if a.ok:
            self.sim.success(r.model, self.clock.now())
            if self._quota.lift(start):
                log.warning("dispatcher %s: a call succeeded after a billing refusal: requests are sent again",
                            self.name)
        else:
            if a.maybe_billed and a.job_kept:  # one bound, whatever the number of tries that give up on it
                self._kept.add(r.uid)
            elif a.maybe_billed:
                self._unanswered[r.uid] += 1
            if a.quota:
                if self._quota.why is None:
                    log.error("dispatcher %s: %s", self.name, a.error)
                self._quota.trip(a.at, a.error)
            self._breaker_failure(r.model)
            # A billing refusal's 429 is no rate limit (the 429s metric's help says so): never retried, "other".
            self._counts.failed("other" if a.quota else retry_reason(a.retry_after_s, a.error), v == "retry")
            if a.key_reused:  # billed by the provider, failed here: never silent (docs/reliability.md)
                self.key_conflicts += 1
                log.error("dispatcher %s: %s failed: %s", self.name, r.uid, a.error)
        if v != "retry":  # a replay of a call another run made and counted is not billed again (a helper's tour)
            self._quota.ended(r.uid)
            paid = a.ok and (not a.replayed or self._unanswered[r.uid])
            if a.ok and not paid:
                self.replayed += 1
                self.replayed_usd += a.cost
            if why is not None:
                a = a._replace(error=f"{a.error} (after {j.throttled} rate limit(s) waited out, not tries; {why})")
            self._final(b, j, a.ok, a.cost if paid else 0.0, mode, a)
        elif free:  # not a try: it billed nothing, and the provider said when to come back
            self._retry_later(a.at + wait, b, j._replace(throttled=j.throttled + 1))
        elif a.rate_limited:  # a try, still after the provider's wait
            self._retry_later(a.at + wait, b, j._replace(attempts=j.attempts + 1))
        else:
            self._retry_later(self.sim.retry_at(j.seq, j.attempts, a), b, j._replace(attempts=j.attempts + 1))
        self._pump()
