"""Messages between actors: plain, picklable, batch-shaped."""

from __future__ import annotations

from typing import NamedTuple

from actors._shards import class_shard
from engine.core.request import Request

__all__ = ["OWN_ROWS", "BatchJob", "Job", "send_sharded"]


OWN_ROWS = 1 << 48  # where ingest's own draw rows start (re-admissions): beyond any driver's


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


class BatchJob(NamedTuple):
    bid: str
    mode: str
    hedge_at: float | None
    cache_write: bool
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
