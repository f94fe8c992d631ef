"""The dispatcher's gate for the provider's batch queue (``engine.runtime.batch_queue``) and a batch's way from it
to its create, as a withdrawal, a restart and a billing refusal see them. A mixin of ``Dispatcher``.

A batch waits at the gate for room (the end of another batch of its model, hours away at a provider) until its
hedge. A withdrawal (``Engine.cancel_requests``, an endpoint batch's cancel) takes its withdrawn members out of it
at once: they end, billed nothing, and what is left waits on, or starts now if it fits. Left in, they ended only
when the gate let the batch start, and an endpoint's cancel stayed ``cancelling`` all that time. A restarted
dispatcher counts the batches it re-attaches to on the gate, as the process that made them did."""

from __future__ import annotations

import math

from actors._cancel import _WITHDRAWN, _WITHDRAWN_AFTER_TRY
from actors._types import Job
from engine.core._logkeys import get_logger

__all__ = ["BatchGate"]

log = get_logger("smartbatch.dispatcher")


class BatchGate:
    """Needs the dispatcher's ``sim``, ``clock``, ``provider``, ``_quota``, ``_open``, ``_parts_left``,
    ``_withdrawn``, ``_queued_at``, ``_unanswered``, ``_kept``, ``_unjournal``, ``_final``, ``_kick``, ``_pump``,
    ``_enqueue`` and ``_journal_put``."""

    def _withdraw_at_gate(self) -> bool:
        """End the withdrawn members of the batches waiting at the gate; the rest of each waits again, under
        its hedge, since it joined. True if any batch changed (the gate is then asked again)."""
        w = self._withdrawn
        if not w:
            return False
        taken = self.sim.batch_queue.take_where(lambda u: any(j.req.uid in w for j in u.item.item[1]))
        for u in taken:
            item = u.item.item
            since, first = self._unqueued(item)
            b, jobs = item
            if keep := self._end_withdrawn(b, jobs):
                self._enqueue("batch_api", b._replace(jobs=keep), keep, since, first)
        return bool(taken)

    def _left_in(self, b, jobs: list[Job], cjobs: list) -> tuple[list[Job], list]:
        """Of a batch about to be created, its members not withdrawn, and their call jobs; the withdrawn end here.
        A batch waits for its create's slot (Anthropic's: one create of its size at a time) after the gate let it
        start: a member withdrawn meanwhile was sent in it, and billed (all withdrawn, it is not created)."""
        w = self._withdrawn
        if not any(j.req.uid in w for j in jobs):
            return jobs, cjobs
        kept = [(j, cj) for j, cj in zip(jobs, cjobs, strict=True) if j.req.uid not in w]
        self._end_withdrawn(b, jobs)
        self._kick()
        return [j for j, _ in kept], [cj for _, cj in kept]

    async def _left_in_journaled(self, key: str, b, jobs: list[Job], cjobs: list, start: float, tokens: int,
                                 body) -> tuple[list[Job], list, object]:
        """``_left_in`` for a batch whose create waits out a rate limit (``_wait_out``): its journal record says
        first what the create made after the wait sends (its members, and the body made of them where one is
        journaled), so a restart re-attaches to that batch and a create made again under its key sends that
        body; then the withdrawn members end."""
        w = self._withdrawn
        gone = [j for j in jobs if j.req.uid in w]
        kept = [(j, cj) for j, cj in zip(jobs, cjobs, strict=True) if j.req.uid not in w]
        jobs, cjobs = [j for j, _ in kept], [cj for _, cj in kept]
        if self.provider.real:
            body = self.provider.batch_body(cjobs)
            self._open[key] = (b, jobs, start, tokens, None, body)
            await self._journal_put(key)
        self._end_withdrawn(b, gone)
        self._kick()
        return jobs, cjobs, body

    def _end_withdrawn(self, b, jobs: list[Job]) -> list[Job]:
        """End the members of ``jobs`` withdrawn, billed nothing; the others, returned, go on."""
        w = self._withdrawn
        for j in jobs:
            if j.req.uid in w:
                self._final(b, j, False, 0.0, b.mode, error=self._why_withdrawn(j))
        return [j for j in jobs if j.req.uid not in w]

    def _release_dispatch(self, key: str, tokens: int, model: str) -> None:
        """Batch ``key`` ended (or was never created): out of the journal, and its dispatch's tokens off the gate
        once its last part has ended."""
        if self._open.pop(key, None) is not None:
            self._unjournal.append((self._space, key))
        stem = key.rpartition("#")[0]  # a part's dispatch; "" for a batch sent whole
        left = self._parts_left.get(stem, 1)
        if left > 1:
            self._parts_left[stem] = left - 1  # another part of the dispatch still holds its tokens
        else:
            self._parts_left.pop(stem, None)
            self.sim.finish_batch(tokens, self.clock.now(), model)

    # -- billing refusals ------------------------------------------------------------------------------------
    # A batch create refused for billing (no credit, a spend limit) ran nothing, and every create or call to the
    # provider would be refused alike. Its members handed back to the policy were batched again into the same
    # refusal, or sent sync, and the provider's other batches were created, each refused, while its sync calls
    # were held (``QuotaStop``). Now its members fail at once, naming the fix, billed nothing, and the provider's
    # batch creates are held as its sync calls are, with the same probe: one create or call a ``probe_s``.

    def _refused_for_billing(self, why: str) -> str:
        if self._quota.why is None:
            log.error("dispatcher %s: %s", self.name, why)
        self._quota.trip(self.clock.now(), why)
        return why

    def _created_after_refusal(self, asked: float) -> None:
        """A batch create asked at ``asked`` was made: one made after a billing refusal lifts its hold."""
        if self._quota.lift(asked):
            log.warning("dispatcher %s: a batch was created after a billing refusal: requests are sent again",
                        self.name)

    def _unpaid(self, key: str, b, jobs: list[Job], tokens: int, why: str) -> None:
        """Batch ``key`` is not created for billing (refused, or held unsent): its members fail, their claims
        settled at 0, and nothing of it is left on the gate or in the journal."""
        self._release_dispatch(key, tokens, jobs[0].req.model)
        for j in jobs:
            self._final(b, j, False, 0.0, b.mode, error=why)
        self._pump()

    def _why_withdrawn(self, j: Job) -> str:
        uid = j.req.uid
        return _WITHDRAWN_AFTER_TRY if self._unanswered[uid] or self._flex_unanswered[uid] or uid in self._kept \
            else _WITHDRAWN

    def _count_reattached(self, tokens: int, jobs: list[Job]) -> None:
        """A dispatch a restarted dispatcher re-attaches to (or whose cut create it resumes; ``jobs``: its members
        still open, in all its parts) holds its ``tokens`` on the gate until it ends (``finish_batch``), as in the
        process that made it, and its members' input tokens on its model's count (``EnqueuedTokens.learn``)."""
        if self.sim.enqueued is not None and jobs:
            self.sim.enqueued.take(self.clock.now(), tokens, math.inf, jobs[0].req.model,
                                   sum(j.req.input_tokens for j in jobs))
