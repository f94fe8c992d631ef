"""Ingest: admits requests in batches, drops duplicate ids, fingerprints, asks the cache, forwards misses."""

from __future__ import annotations

from actors._peer import Warm, as_peer
from actors._types import Job, send_sharded
from engine.features import fingerprint
from engine.request import Request

__all__ = ["Ingest"]


class Ingest(Warm):
    def __init__(self, groupers: list, cache=None, share_across_tenants: bool = False):
        self.groupers = [as_peer(g) for g in groupers]
        self.cache = as_peer(cache)
        self.seen: set[str] = set()
        self.next_seq = 0
        self.duplicates = 0
        self.share = share_across_tenants

    def __repr__(self) -> str:
        return f"Ingest(admitted={self.next_seq}, duplicates={self.duplicates})"

    async def forget(self, uids: list[str]) -> None:
        """Requests finished longer ago than the driver's retention window: their ids may be used again."""
        for u in uids:
            self.seen.discard(u)

    async def submit(self, requests: list[Request]) -> int:
        """Admit a batch; returns how many were new. A repeated (tenant, id) is the same request (the
        idempotency key): it is never generated twice."""
        jobs: list[Job] = []
        for r in requests:
            if r.uid in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(r.uid)
            jobs.append(Job(self.next_seq, r, fingerprint(r, share_across_tenants=self.share)))
            self.next_seq += 1
        if not jobs:
            return 0
        misses = [jobs[k] for k in await self.cache.call("lookup", jobs)] if self.cache is not None else jobs
        send_sharded(self.groupers, misses)
        return len(jobs)
