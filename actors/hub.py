"""The result hub: collects finished results for the driver (long-poll) and keeps the running report."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from actors._peer import Warm
from actors.journal import MemoryJournalStore
from actors.metrics import EngineMetrics
from engine.core.result import Result

__all__ = ["ResultHub"]

# Results kept after delivery so that an ObjectRef asked for just as its result was pulled still resolves;
# the window between the driver's check and the hub's answer is milliseconds, far below this many results.
RECENT = 16_384


class ResultHub(Warm, MemoryJournalStore):
    def __init__(self) -> None:
        self.metrics = EngineMetrics()
        self._ready: list[Result] = []
        self._event = asyncio.Event()
        self._recent: OrderedDict[str, Result] = OrderedDict()
        self._waiters: dict[str, asyncio.Future] = {}
        self._cache: dict = {}
        self._stats: dict = {"requests": 0, "cost_usd": 0.0, "list_price_usd": 0.0, "by_status": {},
                             "by_mode": {}, "hits": {}, "deadline_met": 0, "deadline_known": 0, "by_provider": {}}

    def __repr__(self) -> str:
        return f"ResultHub(waiting={len(self._ready)}, seen={self._stats['requests']})"

    async def push(self, results: list[Result], list_prices: list[float] | None = None) -> None:
        recent = self._recent
        if any(r.uid in recent for r in results):
            # A result sent again (a dispatcher answering a re-admitted request it had already finished): the
            # driver has it or will, and the report must not count it twice.
            keep = [k for k, r in enumerate(results) if r.uid not in recent]
            results = [results[k] for k in keep]
            list_prices = [list_prices[k] for k in keep] if list_prices else None
            if not results:
                return
        s = self._stats
        for k, r in enumerate(results):
            s["requests"] += 1
            s["cost_usd"] += r.cost_usd
            s["list_price_usd"] += list_prices[k] if list_prices else 0.0
            s["by_status"][r.status] = s["by_status"].get(r.status, 0) + 1
            if r.mode:
                s["by_mode"][r.mode] = s["by_mode"].get(r.mode, 0) + 1
            if r.hit:
                s["hits"][r.hit] = s["hits"].get(r.hit, 0) + 1
            if r.deadline_met is not None:
                s["deadline_known"] += 1
                s["deadline_met"] += bool(r.deadline_met)
            if r.provider:
                p = s["by_provider"].setdefault(r.provider, {"requests": 0, "cost_usd": 0.0})
                p["requests"] += 1
                p["cost_usd"] += r.cost_usd
        self.metrics.observe_results(results, list_prices)
        self._ready.extend(results)
        self._event.set()
        for r in results:
            recent[r.uid] = r
            w = self._waiters.pop(r.uid, None)
            if w is not None and not w.done():
                w.set_result(r)
        while len(recent) > RECENT:
            recent.popitem(last=False)

    async def forget(self, uids: list[str]) -> None:
        for u in uids:
            self._recent.pop(u, None)

    async def recall(self, uids: list[str]) -> list[str]:
        """Of ``uids`` (re-admitted after a restart), those whose result is here (the driver has it or will)."""
        return [u for u in uids if u in self._recent]

    async def result_of(self, request_id: str) -> Result:
        """The result of one request (its ``Request.uid``), as soon as it exists: what
        ``ResultFuture.object_ref()`` resolves to."""
        r = self._recent.get(request_id)
        if r is not None:
            return r
        w = self._waiters.get(request_id)
        if w is None:
            w = self._waiters[request_id] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(w)

    async def observe_dispatches(self, provider: str, observed: list[tuple[str, list[float], int]],
                                 counts: dict | None = None) -> None:
        """A dispatcher's batched observations: dispatch waits, and (``DispatchCounts.as_dict()``) its retries,
        429s, circuit states, hedges, turnarounds and rate-limit waits since its last flush."""
        for mode, waits, in_flight in observed:
            self.metrics.observe_dispatch(provider, mode, waits, in_flight)
        if counts:
            self.metrics.observe_counts(provider, counts)

    async def observe_budget(self, rows: list[dict], refusals: dict[str, int]) -> None:
        self.metrics.observe_budget(rows, refusals)

    async def observe_cache(self, delta: dict, now: dict) -> None:
        self.metrics.observe_cache(delta, now)
        self._cache = now

    async def serve_metrics(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve /metrics on ``host:port`` (port 0: a free one); returns the URL to scrape. A wildcard bind is
        reported with this node's address, so a driver on another machine can reach it."""
        port = self.metrics.serve(port, host)
        shown = host
        if host in ("0.0.0.0", "::", ""):
            import ray

            shown = ray.util.get_node_ip_address()
        return f"http://{shown}:{port}/metrics"

    async def pull(self, max_wait_s: float = 0.25) -> list[Result]:
        """Everything finished since the last pull; waits up to ``max_wait_s`` when nothing is ready."""
        if not self._ready:
            try:
                await asyncio.wait_for(self._event.wait(), timeout=max_wait_s)
            except asyncio.TimeoutError:
                return []
        out, self._ready = self._ready, []
        self._event.clear()
        return out

    async def report(self) -> dict:
        s = self._stats
        saving = s["list_price_usd"] - s["cost_usd"]
        return {
            "requests": s["requests"],
            "spend_usd": round(s["cost_usd"], 6),
            "list_price_usd": round(s["list_price_usd"], 6),
            "saving_usd": round(saving, 6),
            "saving_frac": round(saving / s["list_price_usd"], 6) if s["list_price_usd"] > 0 else 0.0,
            "by_status": dict(s["by_status"]),
            "by_mode": dict(s["by_mode"]),
            "hits": dict(s["hits"]),
            "deadline_met_frac": (s["deadline_met"] / s["deadline_known"]) if s["deadline_known"] else None,
            "by_provider": {k: {"requests": v["requests"], "cost_usd": round(v["cost_usd"], 6)}
                            for k, v in s["by_provider"].items()},
            "cache": dict(self._cache),
        }
