"""Messages between actors: plain, picklable, batch-shaped."""

from __future__ import annotations

from typing import NamedTuple

from actors._shards import class_shard
from engine.core.request import Request

__all__ = ["OWN_ROWS", "BatchJob", "Held", "Job", "send_sharded"]


OWN_ROWS = 1 << 48  # where ingest's own draw rows start (re-admissions): beyond any driver's


class Held:
    """Ids marked as under way by several holders at once, each letting go of its own mark only: an id is held while
    any holder holds it. A set let one holder's end clear another's mark (a reservation call that ended while a
    rejection of one of its members was still asking the dispatchers: a copy re-admitted then was sent and billed
    beside the rejection its driver got)."""

    __slots__ = ("_n",)

    def __init__(self):
        self._n: dict[str, int] = {}

    def __contains__(self, uid: object) -> bool:
        return uid in self._n

    def __len__(self) -> int:
        return len(self._n)

    def update(self, uids) -> None:
        n = self._n
        for u in uids:
            n[u] = n.get(u, 0) + 1

    def difference_update(self, uids) -> None:
        """Let go of one mark of each of ``uids``, which the same holder set with ``update``."""
        n = self._n
        for u in uids:
            k = n.get(u, 0)
            if k > 1:
                n[u] = k - 1
            elif k:
                del n[u]


class Job(NamedTuple):
    seq: int  # engine-wide sequence number: the row of this request's simulated draws
    req: Request
    fp: str
    attempts: int = 0
    hedges: int = 0
    claim: str | None = None  # the budget reservation this dispatch holds, settled when it ends
    # The cache shard that looked it up (its class's when admitted): where its result and its followers are,
    # even after a reroute to a fallback model of another class.
    cache_shard: int = 0
    # (provider, model) its driver asked, when rerouted to a fallback (``req`` then names the fallback): what a
    # driver's take-back after a kill matches the request submitted again against (``engine.app._driver_resume``).
    asked: tuple[str, str] | None = None
    # Rate limits' 429s its sync calls met: not tries (``max_attempts``), bounded by its deadline.
    throttled: int = 0
    # (cache_write, recommendation, reason) of a flex dispatch reserved at the flex price that goes standard (the
    # tier did not serve it, or it would start standard): its grouper reserves the standard price and sends it
    # sync as decided, no new decision (``SyncCalls._back_standard``).
    standard: tuple[bool, str, str] | None = None
    # The bound of earlier calls of it that may be billed and were settled with a claim it no longer holds (a call
    # timed out on the model it was rerouted from; a flex call given up before it went standard): not settled
    # again, but said on its result should it fail (``Result.possibly_billed_usd``), or ``batch --resume`` sent
    # it again, maybe paid twice.
    billed_usd: float = 0.0
    # A call of it was made and it came back with no try counted (a flex call refused, gone standard): whatever
    # its other fields say, a stop never names it unsent (``actors._stop_cut.never_called``).
    called: bool = False


class BatchJob(NamedTuple):
    bid: str
    mode: str
    hedge_at: float | None
    cache_write: bool | tuple[int, ...]  # ``Decision.cache_write``
    recommendation: str
    reason: str
    jobs: list[Job]


def send_sharded(groupers: list, jobs: list[Job]) -> None:
    """Send each job to the grouper that owns it: one call per grouper, none for an empty share."""
    shards: list[list[Job]] = [[] for _ in groupers]
    for j in jobs:
        shards[class_shard(j.req, len(shards))].append(j)
    for g, part in zip(groupers, shards):
        if part:
            g.send("add", part)
