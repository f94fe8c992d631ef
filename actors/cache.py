"""The cache actor (in-memory exact reuse in this version; near-duplicate and Redis layers are issue 4).

It routes every request that allows reuse: an exact hit resolves at once; an identical request already in
flight attaches to it (one provider call, every future resolved); a miss becomes the in-flight leader.
"""

from __future__ import annotations

from actors._peer import Warm, as_peer
from actors._types import Job
from engine.catalog import default_catalog
from engine.cost import price_alone
from engine.grouping import ReuseSettings
from engine.result import Result

__all__ = ["ResultCache"]

Item = Job


class ResultCache(Warm):
    def __init__(self, reuse: ReuseSettings, hub, clock, catalog=None, max_entries: int = 1_000_000):
        self.reuse = reuse
        self.catalog = catalog or default_catalog()
        self.hub = as_peer(hub)
        self.clock = clock
        self.max_entries = max_entries
        self.done: dict[str, Result] = {}
        self.leaders: dict[str, Item] = {}
        self.followers: dict[str, list[Item]] = {}
        self._resolved: list[Item] = []

    async def set_clock(self, clock) -> None:
        """The engine sets the clock once every actor is up, so engine time 0 is when submitting can start."""
        self.clock = clock

    def __repr__(self) -> str:
        return (f"ResultCache(entries={len(self.done)}, in_flight={len(self.leaders)}, "
                f"followers={sum(len(v) for v in self.followers.values())})")

    def _reused(self, item: Item, src: Result, hit: str, at: float) -> Result:
        r = item.req
        return Result(id=r.id, status="reused", output=src.output, cost_usd=0.0, mode="reuse", hit=hit,
                      provider=r.provider, model=r.model, arrival_s=r.arrival_s, done_s=at,
                      deadline_met=at <= r.deadline_at + 1e-9, reason=f"reused {hit} result of {src.id}")

    def _list_prices(self, results: list[Result], items: list[Item]) -> list[float]:
        """What each reused request would have cost alone: its saving, for the report."""
        by_id = {it.req.id: it.req for it in items}
        return [price_alone(by_id[r.id], self.catalog, "sync").total for r in results]

    async def lookup(self, items: list[Item]) -> list[int]:
        """Resolve hits and attach in-flight duplicates; return the positions of the misses, which must be
        generated (positions, not the items: the caller has them, and sending them back costs a pickling)."""
        now = self.clock.now()
        hits: list[Result] = []
        misses: list[int] = []
        for pos, item in enumerate(items):
            r, fp = item.req, item.fp
            if r.reuse != "none":
                src = self.done.get(fp) if self.reuse.exact else None
                if src is not None:
                    hits.append(self._reused(item, src, "exact", max(now, r.arrival_s)))
                    continue
                lead = self.leaders.get(fp)
                if self.reuse.in_flight and lead is not None and lead.req.deadline_at <= r.deadline_at:
                    self.followers.setdefault(fp, []).append(item)
                    continue
            self.leaders.setdefault(fp, item)
            misses.append(pos)
        if hits:
            await self.hub.call("push", hits, self._list_prices(hits, items))
        return misses

    async def complete(self, done: list[tuple[str, Result]]) -> None:
        """Leaders finished: store their results and resolve the requests attached to them."""
        out: list[Result] = []
        for fp, res in done:
            lead = self.leaders.get(fp)
            if lead is not None and lead.req.id == res.id:
                del self.leaders[fp]
            if res.status != "ok":
                continue
            if len(self.done) >= self.max_entries:
                self.done.pop(next(iter(self.done)))  # oldest first: dicts keep insertion order
            self.done[fp] = res
            for item in self.followers.pop(fp, ()):
                out.append(self._reused(item, res, "in_flight", res.done_s or self.clock.now()))
                self._resolved.append(item)
        if out:
            await self.hub.call("push", out, self._list_prices(out, self._resolved))
        self._resolved = []

    async def orphans(self, fps: list[str]) -> list[Item]:
        """Followers whose leader failed for good: they must be generated after all."""
        out: list[Item] = []
        for fp in fps:
            out.extend(self.followers.pop(fp, ()))
            self.leaders.pop(fp, None)
        return out
