"""A batch the provider refused whole because its batch queue was full (OpenAI's ``failed`` batch with
``token_limit_exceeded``: "try again once some in_progress batches have been completed"). A mixin of the
dispatcher's batch-API methods.

Its members never ran. Handed back to the policy, they were batched again at once into the same full queue,
and refused again, until the progress guard sent them sync at twice the price (a helper's hunt). Instead the
dispatcher learns the limit the provider named for that model (``EnqueuedTokens.learn``) and queues the batch
again, in parts that fit it, at its own gate: each part waits there for room (the end of a batch of its model
under way) until its hedge, as a batch waits for the catalog's limit.

The limit counts input tokens alone, as OpenAI's does ("enqueued prompt tokens"; the emulator's too). Weighed
with their output, parts were cut several times smaller than the account takes and waited for one another for
hours, their members reaching their hedges and going sync at the full price (a review)."""

from __future__ import annotations

from actors._batch_parts import cut
from actors._types import BatchJob, Job
from engine.core._logkeys import get_logger

log = get_logger("smartbatch.dispatcher")

__all__ = ["QueueFull", "token_parts"]


def token_parts(jobs: list[Job], limit: float) -> list[list[Job]]:
    """``jobs`` in order, cut into parts of at most ``limit`` input tokens, what the batch queue counts (a request
    heavier alone is a part alone)."""
    return cut(jobs, lambda j: j.req.input_tokens, limit)


class QueueFull:
    """The dispatcher's handling of a batch refused for a full queue."""

    def _queue_refused(self, key: str, b: BatchJob, jobs: list[Job], handle, outs: dict) -> list[list[Job]] | None:
        """The parts in which the batch ``key`` goes again, when the provider refused it whole for its full queue
        and waiting can help: its hedge is still to come and a batch of its model under way here will free room,
        or the batch alone passes the limit (then its parts fit). None: its members go back to the policy."""
        limit = self.provider.queue_refusal(handle) if handle is not None and not outs else None
        if limit is None or self._cancelled or self._all_withdrawn(jobs) or (
                b.hedge_at is not None and self.clock.now() >= b.hedge_at):
            return None
        model, stem = jobs[0].req.model, key.rpartition("#")[0] or key
        # The input tokens of this model's other dispatches under way here (a split dispatch: its parts'). The gate
        # keeps its own count (``EnqueuedTokens``), batches taken but not yet created included; this is what
        # the provider may hold.
        others = sum(sum(j.req.input_tokens for j in rec[1]) for k, rec in self._open.items()
                     if rec[1] and rec[1][0].req.model == model and (k.rpartition("#")[0] or k) != stem)
        guess = not limit
        limit = limit or others  # named none: no more than what is under way fits
        parts = token_parts(jobs, limit) if limit > 0 else []
        if not parts or (len(parts) == 1 and not others):  # nothing here to wait for: another's batches fill it
            return None
        self.sim.enqueued.learn(model, limit, self.clock.now(), guess=guess)
        log.warning("dispatcher %s: batch %s was refused for a full batch queue (limit %d input tokens for %s); it is "
                    "sent again in %d part(s) as room frees", self.name, key, limit, model, len(parts))
        return parts
