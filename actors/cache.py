"""The cache actor: exact, near-duplicate and in-flight reuse over memory -> Redis -> blob store.

It routes every request that allows reuse (``reuse`` "exact" or "near"; one with "none" is never served from
the cache, but its result feeds it for later requests of the same tenant scope, as in the simulator):

1. exact: the fingerprint (tenant scope, model, kind, normalised prompt, output-affecting parameters) in the
   in-process LRU, then in Redis (one MGET per batch);
2. in flight: an identical request already being generated takes this one along (one provider call, every
   future resolved), if it is due no later than this one;
3. near: the top-1 cosine match within the same tenant scope and compatibility class, above the policy's
   threshold (never below the engine's floor) and past every guard of the policy;
4. else a miss, which the caller generates.

Tenants never see each other's results unless ``share_across_tenants`` is set: the tenant scope is part of
the fingerprint, of the Redis key and of the near-duplicate class.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Hashable

from actors._cache_report import CacheReports
from actors._cache_writes import CacheWrites
from actors._follow import Following
from actors._near_index import FOLLOWING, LEADS, Item, NearIndex
from actors._peer import Warm, as_peer, resolve_clock
from actors._recall import Delivered
from actors._shards import Shards, by_result_uid
from actors._types import send_sharded
from actors.cache_layers import CorruptValue, Entry, LocalBlobStore, MemoryLRU, RedisLayer, decode
from engine.core._logkeys import get_logger
from engine.core.catalog import default_catalog
from engine.core.features import NEAR_DIM, near_class, near_vectors_texts
from engine.core.grouping import ReuseSettings
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings
from engine.runtime.admission import InFlight, release_lead
from engine.runtime.outcomes import list_price, reused_result
from engine.runtime.reuse import ReuseIndex

__all__ = ["ResultCache", "tenant_scope"]

log = get_logger("smartbatch.cache")

SHARED = "\x00shared"  # no tenant's name (they hold no control character): "_shared" was one (a helper's hunt)


def tenant_scope(tenant: str, share_across_tenants: bool) -> str:
    return SHARED if share_across_tenants else tenant


RECALL_KEEP = 65_536  # results of reused requests kept for ``recall``, at most (and the memory limit's bytes)


class ResultCache(CacheWrites, CacheReports, NearIndex, Following, Warm):
    def __init__(self, reuse: ReuseSettings, hub, clock, catalog=None, settings: Settings | None = None, *,
                 redis: RedisLayer | None = None, blobs=None, shard: tuple[int, int] = (0, 1), groupers=()):
        self.reuse = reuse
        # With groupers, ``lookup`` hands them its misses itself (see there); without, the caller does.
        self.groupers = [as_peer(g) for g in groupers]
        self.shard = shard  # (this shard, of how many): it owns the compatibility classes that route to it
        self.catalog = catalog or default_catalog()
        settings = settings or Settings()
        self.cfg: CacheSettings = settings.cache
        self.near_threshold = max(reuse.near_threshold, settings.sim.near_floor)
        self.hubs = Shards(hub)  # results go to their id's hub shard; figures to shard 0
        self.hub = self.hubs.first
        self.clock, _ = resolve_clock(clock)
        self.memory = MemoryLRU(self.cfg.memory_max_entries, int(self.cfg.memory_max_mb * 2**20),
                                self._now)
        if redis is None and self.cfg.redis_url:
            redis = RedisLayer(self.cfg.redis_url, prefix=self.cfg.redis_prefix,
                               timeout_s=self.cfg.redis_timeout_s, retry_s=self.cfg.redis_retry_s,
                               buffer_max_bytes=self.memory.max_bytes, cluster=self.cfg.redis_cluster)
        self.redis = redis
        self.blobs = blobs if blobs is not None else LocalBlobStore(self.cfg.blob_dir)
        self.index = ReuseIndex(NEAR_DIM)
        # Leaders being generated and who waits for each; a follower due before its leader has a release time.
        self.inflight: InFlight[Item] = InFlight(reuse, release_lead(self.catalog, reuse))
        self._releases: list[tuple[float, int, str, Item]] = []  # (release time, seq, fingerprint, follower)
        self._release_seq = itertools.count()
        self._release_timer: asyncio.TimerHandle | None = None
        self.released: list[Item] = []  # released followers, for a caller that has no groupers to send them to
        self.generating: dict[str, Item] = {}  # request id -> item, for misses whose result will feed the cache
        self.indexed: set[str] = set()  # fingerprints already in the near index (indexed when they start)
        self._pending: dict[Hashable, deque[tuple]] = {}  # rows queued for it, by class, their vectors not made yet
        # Every row of the index and of the queues, oldest first: (class, fingerprint, bytes, queued at).
        self._near_rows: deque[tuple[Hashable, str, int, float]] = deque()
        self._near_bytes = 0
        self.stats = {"exact_memory": 0, "exact_redis": 0, "near": 0, "in_flight": 0, "miss": 0,
                      "corrupt": 0, "stale_near": 0, "blobs": 0, "blob_errors": 0, "near_evicted": 0,
                      "released": 0}
        self._new_leads: list[Item] = []
        self._warm_later = False  # a warm could not read Redis: read again once it answers (``_warm_when_up``)
        self._warming: asyncio.Task | None = None
        self._reported: dict[str, int] = {}
        # Requests this cache resolved lately, with their results: a re-admission after the hub lost them gets
        # them again instead of a call (see ``recall``).
        self._delivered = Delivered(RECALL_KEEP, self.memory.max_bytes)

    async def warm(self) -> int:
        """Also load the sentence embedding now (0.1-0.2 s cold), not at the first near-duplicate ask: that
        stall would hold every lookup queued behind it."""
        if self.reuse.near:
            near_vectors_texts(["warm"], [{}])
        return await super().warm()

    async def set_clock(self, clock) -> None:
        """The engine sets the clock once every actor is up, so engine time 0 is when submitting can start."""
        self.clock = clock
        self._arm_release()

    def _now(self) -> float:
        return self.clock.now() if self.clock is not None else 0.0

    def _speedup(self) -> float:
        """Engine seconds per real one: ``ttl_s`` counts engine time, as the memory layer does, and Redis expires
        keys in real time (an entry stored at 100x outlived its TTL in Redis 100 times over; a helper's hunt)."""
        return float(getattr(self.clock, "speedup", 1.0) or 1.0)

    def __repr__(self) -> str:
        return (f"ResultCache({self.memory!r}, {self.redis!r}, {self.index!r}, in_flight={len(self.inflight)}, "
                f"followers={self.inflight.n_following()})")

    # -- keys -------------------------------------------------------------------------------------------------
    def _scope(self, item: Item) -> str:
        return tenant_scope(item.req.tenant, self.cfg.share_across_tenants)

    def _near_key(self, item: Item) -> Hashable:
        return near_class(item.req, self._scope(item))

    def _wants_near(self, item: Item) -> bool:
        return self.reuse.near and item.req.reuse == "near"

    # -- reading ----------------------------------------------------------------------------------------------
    async def _fetch(self, pairs: list[tuple[str, str]]) -> tuple[list[Entry | None], set[int]]:
        """Entries for (scope, fingerprint) pairs: memory first, then one Redis MGET for the rest; and the
        positions Redis answered. (Returned, not kept on the actor: another lookup may run during the await.)"""
        out: list[Entry | None] = [self.memory.get(fp) for _, fp in pairs]
        from_redis: set[int] = set()
        if self.redis is None:
            return out, from_redis
        todo = [k for k, e in enumerate(out) if e is None]
        if not todo:
            return out, from_redis
        raws = await self.redis.get_many([self.redis.key(*pairs[k]) for k in todo])
        for k, (raw, left_ms) in zip(todo, raws):
            if raw is None:
                continue
            try:
                e = decode(raw, pairs[k][1])
            except CorruptValue:
                self.stats["corrupt"] += 1
                continue
            out[k] = e
            from_redis.add(k)
            # Promoted: the next hit on it stays in this process, for the life its key has left (not a new TTL).
            ttl_s = self.cfg.ttl_s
            self.memory.put(e, ttl_s if left_ms < 0 else min(left_ms / 1000 * self._speedup(), ttl_s))
        return out, from_redis

    def _output(self, e: Entry) -> str | None:
        if e.blob is None:
            return e.result.output
        data = self.blobs.get(e.blob)
        return None if data is None else data.decode()

    def _reused(self, item: Item, e: Entry, hit: str, at: float, similarity: float | None = None) -> Result | None:
        output = self._output(e)
        if output is None and e.blob is not None:
            return None  # the blob is gone: a miss, never an empty answer
        return reused_result(item.req, at=at, hit=hit, source_id=e.result.id, output=output, similarity=similarity,
                             tool_calls=e.result.tool_calls, finish=e.result.finish, usage=e.result.usage)

    def _list_prices(self, results: list[Result], items: list[Item]) -> list[float]:
        """What each reused request would have cost alone, at the tokens of the answer it was given where the
        request's own model made it: its saving, for the report."""
        return [list_price(it.req, self.catalog, r.usage if (r.provider, r.model) == (it.req.provider, it.req.model)
                           else None) for r, it in zip(results, items, strict=True)]

    async def lookup(self, items: list[Item]) -> list[int]:
        """Resolve hits and attach in-flight duplicates. The misses must be generated: a cache that knows the
        groupers sends them on itself and returns none; otherwise it returns their positions (positions, not
        the items: the caller has them, and sending them back costs a pickling). Sending them from here saves
        an urgent request one actor leg (a Ray call, 1.5-4 ms on a small machine) and the wait for the hits'
        delivery and the figures below."""
        now = self._now()
        hits: list[Result] = []
        hit_items: list[Item] = []
        misses: list[int] = []
        asks = [k for k, it in enumerate(items) if it.req.reuse != "none"]
        found, from_redis = (await self._fetch([(self._scope(items[k]), items[k].fp) for k in asks])
                             if self.reuse.exact else ([None] * len(asks), set()))
        entry_of = dict(zip(asks, found))
        redis_pos = {asks[k] for k in from_redis}
        # Requests of a near-duplicate class are decided in arrival order, as if each had come alone (as the
        # simulator admits them): a near ask may follow only what led before it. The others go at once.
        near_classes = ({self._near_key(it) for it in items if self._wants_near(it)}
                        if self.reuse.near else set())
        deferred: list[int] = []
        for pos, item in enumerate(items):
            r = item.req
            if r.reuse != "none":
                e = entry_of.get(pos)
                if e is None and self.reuse.exact and self.redis is not None:
                    # Re-read memory: a leader may have completed while this batch waited on Redis, and its
                    # followers are gone with it, so only the stored entry can still spare a second call.
                    e = self.memory.get(item.fp)
                if e is not None:
                    res = self._reused(item, e, "exact", max(now, r.arrival_s))
                    if res is not None:
                        self.stats["exact_redis" if pos in redis_pos else "exact_memory"] += 1
                        hits.append(res)
                        hit_items.append(item)
                        continue
            if near_classes and self._near_key(item) in near_classes:
                deferred.append(pos)
                continue
            if r.reuse != "none" and self._attach(item):
                continue
            self._lead(item)
            misses.append(pos)
        vecs: dict = {}
        if deferred:
            decided, vecs = await self._near(items, deferred, now)
            for pos, res in zip(deferred, decided):
                if res is LEADS:
                    misses.append(pos)
                elif res is not FOLLOWING:
                    hits.append(res)
                    hit_items.append(items[pos])
            misses.sort()
        self.stats["miss"] += len(misses)
        if self.groupers:
            send_sharded(self.groupers, [items[k] for k in misses])
            misses = []
        self._index_leaders(vecs)
        self._warm_when_up()
        if hits:
            await self._deliver(hits, hit_items)
        await self._report()
        return misses

    async def _deliver(self, results: list[Result], items: list[Item], prices: list[float] | None = None) -> None:
        if prices is None:
            prices = self._held(results, items)
        await self.hubs.call("push", by_result_uid, results, prices)

    def _held(self, results: list[Result], items: list[Item]) -> list[float]:
        """Keep ``results`` for ``recall`` and return their prices: held from here on, before any await."""
        prices = self._list_prices(results, items)
        for r, p in zip(results, prices):
            self._delivered.put(r, p)
        return prices

    async def forget(self, uids: list[str]) -> None:
        for u in uids:
            self._delivered.pop(u)

    async def recall(self, uids: list[str], detach: bool = False) -> list[str]:
        """Of ``uids`` (requests re-admitted after a restart), those this cache holds: following an identical
        request in flight, or resolved here lately (their results are sent again). The rest must go on.
        ``detach`` (the driver's sweep, for requests open long past their deadline): those still following are
        taken out instead, and go on to be generated themselves. Left following, the leader's result could
        still reach them after their own call was billed: paid for a result nobody gets."""
        want = set(uids)
        if detach:
            taken = self.inflight.take(lambda f: f.req.uid in want)
            if taken:
                self.stats["detached"] = self.stats.get("detached", 0) + len(taken)
                log.warning("cache: %d request(s) long past their deadline stop following, to be generated "
                            "themselves: %s", len(taken), sorted(f.req.uid for f in taken)[:5])
        waiting = {f.req.uid for f in self.inflight.following() if f.req.uid in want}
        again = [self._delivered[u] for u in uids if u in self._delivered and u not in waiting]
        if again:
            try:
                await self.hubs.call("push", by_result_uid, [r for r, _ in again], [p for _, p in again])
            except Exception as exc:
                # The answer stands even so: these requests are resolved here, and sending them on to be
                # generated again would bill them although their result exists. The hub's own restart makes
                # the driver ask again.
                log.warning("cache: could not send %d result(s) again: %s", len(again), type(exc).__name__)
        return [u for u in uids if u in waiting or u in self._delivered]

    def _lead(self, item: Item) -> None:
        if self.inflight.lead(item.fp, item.req, item):
            self._new_leads.append(item)
        self.generating[item.req.uid] = item

    async def orphans(self, failed: list[tuple[str, str]]) -> list[Item]:
        """Followers of leaders that failed for good or were refused, as (fingerprint, request uid) pairs: each
        follows another copy in flight, or must be generated after all (returned; the first of a fingerprint
        leads it, and those after it may follow it, as in the simulator). A request that did not lead its
        fingerprint has none."""
        out: list[Item] = []
        for fp, uid in failed:
            self.generating.pop(uid, None)  # a refused request never reaches ``complete``
            for f, hit in self.inflight.orphans(fp, uid):
                # Another copy in flight: of ``fp``, or, a near copy, of its own (an identical one led it).
                if not (self._follow(fp, f, hit) or (f.fp != fp and self._follow(f.fp, f, "in_flight"))):
                    self._lead(f)
                    out.append(f)
        self._answered()
        return out

    async def close(self) -> None:
        await self._stop_probing()
        if self.redis is not None:
            await self.redis.close()

