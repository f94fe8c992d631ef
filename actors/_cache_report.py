"""What a result cache tells the hub's metrics: counter deltas and gauges, batched in time."""

from __future__ import annotations

import asyncio
import contextlib
import time

__all__ = ["REPORT_EVERY_S", "CacheReports"]

REPORT_EVERY_S = 0.5


class CacheReports:
    """Reporting methods of ``ResultCache``."""

    _reported: dict[str, int]  # set by the cache: the figures last sent
    _next_report: float = 0.0
    _reported_up: bool | None = None
    _trailing: asyncio.Task | None = None
    _probing: asyncio.Task | None = None
    _closed = False  # no probe after ``close``: a report still due then would start one

    def cache_stats(self) -> dict:
        s = dict(self.stats)
        s.update(memory_entries=len(self.memory), memory_bytes=self.memory.bytes, evicted=self.memory.evicted,
                 expired=self.memory.expired,
                 near_entries=len(self._near_rows), near_bytes=self._near_bytes)
        if self.redis is not None:
            s.update(redis_up=int(self.redis.up), redis_errors=self.redis.errors,
                     redis_reconnects=self.redis.reconnects, redis_dropped_writes=self.redis.dropped_writes)
        return s

    async def stats_now(self) -> dict:
        return self.cache_stats()

    async def report_again(self) -> None:
        """Send every gauge again, no counter: the hub restarted with none, and a gauge is sent when it moves."""
        self.hub.send("observe_cache", {}, self.cache_stats(), self.shard[0])

    async def _report(self) -> None:
        """Push counter deltas and gauges to the hub's metrics: at most every ``REPORT_EVERY_S`` (an actor
        call per lookup would sit on the urgent path), at once when Redis goes down or comes back. A report
        held back is sent when its time comes: the last of a burst was never sent, and the metrics kept what
        they had half a second before it ended (a hunt: 9 memory entries where the cache held 12)."""
        up = None if self.redis is None else self.redis.up
        self._probe_while_down()
        t = time.monotonic()
        if t < self._next_report and up == self._reported_up:
            if self._trailing is None or self._trailing.done():
                self._trailing = asyncio.get_running_loop().create_task(self._report_at(self._next_report - t))
            return
        # A change of Redis's state is reported even when no counter moved (e.g. down from the start), so
        # smartbatch_cache_redis_up exists as soon as Redis is configured, and never without it.
        up_changed = up != self._reported_up
        self._next_report, self._reported_up = t + REPORT_EVERY_S, up
        s = self.cache_stats()
        delta = {k: v - self._reported.get(k, 0) for k, v in s.items()}
        self._reported = s
        if any(delta.values()) or (up_changed and up is not None):
            self.hub.send("observe_cache", delta, s, self.shard[0])

    async def _report_at(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._report()

    def _probe_while_down(self) -> None:
        if self._closed or self.redis is None or self.redis.up:
            return
        if self._probing is None or self._probing.done():
            self._probing = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        """While Redis is down, one PING per retry interval, and the news when it answers. Tried only at the next
        lookup or write, an idle cache's ``smartbatch_cache_redis_up`` stayed 0 for minutes after Redis was back
        (an operator's alert fired falsely), and the log's "retrying every 5 s" was untrue (a walkthrough)."""
        redis = self.redis
        while not redis.up:
            await redis.sleep(redis.retry_in())
            await redis.probe()
        self._warm_when_up()
        await self._report()

    async def _stop_probing(self) -> None:
        self._closed = True
        if self._probing is not None and not self._probing.done():
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing
