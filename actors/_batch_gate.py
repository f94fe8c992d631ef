"""The dispatcher's gate for the provider's batch queue (``engine.runtime.batch_queue``) and a batch's way from it
to its create, as a withdrawal and a restart see them. A mixin of ``Dispatcher``.

A batch waits at the gate for room (the end of another batch of its model, hours away at a provider) until its
hedge. A withdrawal (``Engine.cancel_requests``, an endpoint batch's cancel) takes its withdrawn members out of it
at once: they end, billed nothing, and what is left waits on, or starts now if it fits. Left in, they ended only
when the gate let the batch start, and an endpoint's cancel stayed ``cancelling`` all that time. A restarted
dispatcher counts the batches it re-attaches to on the gate, as the process that made them did."""

from __future__ import annotations

import math

from actors._cancel import _WITHDRAWN, _WITHDRAWN_AFTER_TRY
from actors._types import Job

__all__ = ["BatchGate"]


class BatchGate:
    """Needs the dispatcher's ``sim``, ``clock``, ``_withdrawn``, ``_queued_at``, ``_unanswered``, ``_final``,
    ``_kick`` and ``_enqueue``."""

    def _withdraw_at_gate(self) -> bool:
        """End the withdrawn members of the batches waiting at the gate; the rest of each waits again, under
        its hedge, since it joined. True if any batch changed (the gate is then asked again)."""
        w = self._withdrawn
        if not w:
            return False
        taken = self.sim.batch_queue.take_where(lambda u: any(j.req.uid in w for j in u.item.item[1]))
        for u in taken:
            item = u.item.item
            since = self._queued_at.pop(id(item), None)
            b, jobs = item
            for j in jobs:
                if j.req.uid in w:
                    self._final(b, j, False, 0.0, b.mode, error=self._why_withdrawn(j))
            if keep := [j for j in jobs if j.req.uid not in w]:
                self._enqueue("batch_api", b._replace(jobs=keep), keep, since)
        return bool(taken)

    def _left_in(self, b, jobs: list[Job], cjobs: list) -> tuple[list[Job], list]:
        """Of a batch about to be created, its members not withdrawn, and their call jobs; the withdrawn end here.
        A batch waits for its create's slot (Anthropic's: one create of its size at a time) after the gate let it
        start: a member withdrawn meanwhile was sent in it, and billed (all withdrawn, it is not created)."""
        w = self._withdrawn
        if not any(j.req.uid in w for j in jobs):
            return jobs, cjobs
        kept = [(j, cj) for j, cj in zip(jobs, cjobs, strict=True) if j.req.uid not in w]
        for j in jobs:
            if j.req.uid in w:
                self._final(b, j, False, 0.0, b.mode, error=self._why_withdrawn(j))
        self._kick()
        return [j for j, _ in kept], [cj for _, cj in kept]

    def _why_withdrawn(self, j: Job) -> str:
        return _WITHDRAWN_AFTER_TRY if self._unanswered[j.req.uid] else _WITHDRAWN

    def _count_reattached(self, tokens: int, jobs: list[Job]) -> None:
        """A dispatch a restarted dispatcher re-attaches to (or whose cut create it resumes; ``jobs``: its members
        still open, in all its parts) holds its ``tokens`` on the gate until it ends (``finish_batch``), as in the
        process that made it, and its members' input tokens on its model's count (``EnqueuedTokens.learn``)."""
        if self.sim.enqueued is not None and jobs:
            self.sim.enqueued.take(self.clock.now(), tokens, math.inf, jobs[0].req.model,
                                   sum(j.req.input_tokens for j in jobs))
