"""The cache against a real redis-server: keys and TTLs, expiry, eviction to Redis, restart warm-up, tenant
isolation, corrupt values, and Redis slow, down and back."""

import asyncio
import itertools
import logging

from actors import ResultCache, ResultHub
from actors._types import Job
from actors.cache_layers import SCHEMA, Entry, RedisLayer, encode
from engine.core.clock import ManualClock
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings

REUSE = ReuseSettings(exact=True, in_flight=True, near=True, near_threshold=0.92)
_prefixes = itertools.count()


def run(coro):
    return asyncio.run(coro)


def job(i, prompt, *, tenant="acme", reuse="near", share=False):
    r = Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-image-1", "prompt": prompt,
                                "tenant": tenant, "reuse": reuse})
    return Job(i, r, fingerprint(r, share_across_tenants=share))


def ok(j, done_s=1.0):
    return (j.fp, Result(id=j.req.id, tenant=j.req.tenant, status="ok", output=f"img://{j.req.id}", cost_usd=0.04, mode="sync",
                         provider=j.req.provider, model=j.req.model, done_s=done_s))


class Caches:
    """Cache instances of one test, sharing one Redis namespace (a fresh instance = a restarted actor)."""

    def __init__(self, url, tmp_path, **cfg):
        self.url = url
        self.prefix = f"sbtest{next(_prefixes)}"
        # A 5 s bound on a Redis answer: at the default 0.25 s, one slow reply on a loaded machine counts Redis
        # as down and the lookup misses (test_journal raised it for that reason). The down path has its own
        # tests (test_redis_faults.py).
        cfg.setdefault("redis_timeout_s", 5.0)
        self.cfg = CacheSettings(redis_url=url, redis_prefix=self.prefix, blob_dir=tmp_path / "blobs", **cfg)
        self.clock = ManualClock(0.0)

    def new(self, redis_layer=None):
        hub = ResultHub()
        cache = ResultCache(REUSE, hub, self.clock, settings=Settings(cache=self.cfg), redis=redis_layer)
        return hub, cache


async def generate(cache, hub, *jobs):
    assert await cache.lookup(list(jobs)) == list(range(len(jobs)))
    await cache.complete([ok(j) for j in jobs])
    await hub.pull(0.01)


def test_entries_are_namespaced_versioned_and_carry_their_ttl(redis_server, tmp_path):
    cs = Caches(redis_server.url, tmp_path, ttl_s=3600)

    async def go():
        hub, cache = cs.new()
        j = job(0, "A koi pond at dawn")
        await generate(cache, hub, j)
        r = redis_server.client()
        key = f"{cs.prefix}:v{SCHEMA}:acme:{j.fp}"
        assert r.exists(key) and 3_590_000 < r.pttl(key) <= 3_600_000
        hub2, fresh = cs.new()  # a restarted actor: empty memory, same Redis
        assert await fresh.lookup([job(1, "A koi pond at dawn")]) == []
        assert (await hub2.pull(0.01))[0].output == "img://r0"
        assert fresh.cache_stats()["exact_redis"] == 1
        await cache.close()
        await fresh.close()
    run(go())


def test_expired_entries_are_not_served(redis_server, tmp_path):
    cs = Caches(redis_server.url, tmp_path, ttl_s=0.3)

    async def go():
        hub, cache = cs.new()
        j = job(0, "A paper crane on a desk")
        await generate(cache, hub, j)
        key = f"{cs.prefix}:v{SCHEMA}:acme:{j.fp}"
        r = redis_server.client()
        # Wait on Redis itself: its keyspace notification says when the key expired.
        r.config_set("notify-keyspace-events", "Ex")
        sub = r.pubsub()
        sub.subscribe("__keyevent@0__:expired")
        deadline = asyncio.get_running_loop().time() + 10
        while r.exists(key):
            sub.get_message(timeout=0.5)
            assert asyncio.get_running_loop().time() < deadline, "Redis never expired the key"
        sub.close()
        cs.clock.advance(0.3)  # the memory layer's TTL runs on the engine clock
        assert await cache.lookup([job(1, "A paper crane on a desk")]) == [0]
        await cache.close()
    run(go())


def test_an_entry_evicted_from_memory_is_still_served_from_redis(redis_server, tmp_path):
    cs = Caches(redis_server.url, tmp_path, memory_max_entries=2)

    async def go():
        hub, cache = cs.new()
        jobs = [job(k, f"Logo sketch number {w}") for k, w in enumerate(["one", "two", "three"])]
        await generate(cache, hub, *jobs)
        assert len(cache.memory) == 2 and cache.memory.evicted == 1
        assert await cache.lookup([job(9, "Logo sketch number one")]) == []
        assert cache.cache_stats()["exact_redis"] == 1
        await cache.close()
    run(go())


def test_a_restarted_cache_warms_its_near_duplicate_index_from_redis(redis_server, tmp_path):
    cs = Caches(redis_server.url, tmp_path)

    async def go():
        hub, cache = cs.new()
        await generate(cache, hub, job(0, "Draw a red car parked on a wet street at night"),
                       job(1, "A bowl of ramen, studio lighting", tenant="globex"))
        await cache.close()
        hub2, fresh = cs.new()
        assert await fresh.warm_from_redis() == 2 and fresh.cache_stats()["near_entries"] == 2  # queued; featurised at a near ask
        fresh.memory = type(fresh.memory)(10, 10**6, cs.clock.now)  # empty memory: the hit must come via Redis
        near = job(2, "draw a red car parked on a wet street at night.")
        other_tenant = job(3, "Draw a red car parked on a wet street at night.", tenant="globex")
        assert await fresh.lookup([near, other_tenant]) == [1]
        (res,) = await hub2.pull(0.01)
        assert res.id == "r2" and res.hit == "near" and res.output == "img://r0"
        await fresh.close()
    run(go())


async def _stored_with_ten_minutes_left(cs, r, text: str):
    """A result of ``text`` stored by one cache actor whose Redis key has 10 minutes left (stored 50 minutes
    ago under a 1 h TTL), and a restarted actor: (its job, its key, the new cache)."""
    hub, cache = cs.new()
    src = job(0, text)
    await generate(cache, hub, src)
    await cache.close()
    (key,) = r.keys(f"{cs.prefix}:*")
    r.pexpire(key, 600_000)
    return src, key, cs.new()[1]


def test_a_row_warmed_from_redis_keeps_the_life_its_key_had_left_not_a_new_ttl(redis_server, tmp_path):
    """A warmed row took a whole TTL from the restart, in memory and in the near index: a result stored 50
    minutes before a restart, with a 1 h TTL, was served for another hour. It expires when its Redis key does."""
    cs = Caches(redis_server.url, tmp_path, ttl_s=3600)
    r = redis_server.client()

    async def go():
        src, key, fresh = await _stored_with_ten_minutes_left(cs, r, "Draw a red car parked on a wet street at night")
        assert await fresh.warm_from_redis() == 1
        assert fresh.memory.get(src.fp) is not None and fresh.cache_stats()["near_entries"] == 1
        cs.clock.advance(601)
        r.delete(key)  # what its expiry does, 10 minutes on
        assert fresh.memory.get(src.fp) is None
        near = job(1, "draw a red car parked on a wet street at night.")
        assert await fresh.lookup([near]) == [0]  # generated: nothing is left to serve it
        assert fresh.cache_stats()["near_entries"] == 1  # its own row; the warmed one is gone
        await fresh.close()
    run(go())


def test_corrupt_and_foreign_values_are_ignored_and_counted(redis_server, tmp_path):
    cs = Caches(redis_server.url, tmp_path)

    async def go():
        hub, cache = cs.new()
        a, b = job(0, "A snowy cabin"), job(1, "A desert road")
        r = redis_server.client()
        r.set(f"{cs.prefix}:v{SCHEMA}:acme:{a.fp}", b"\x80\x81 not json")
        foreign = Entry(b.fp, Result(id="elsewhere", status="ok", output="wrong"))  # valid, but not a's
        r.set(f"{cs.prefix}:v{SCHEMA}:acme:{b.fp}", encode(foreign)[:-1] + b"")  # truncated: corrupt
        r.set(f"{cs.prefix}:v{SCHEMA}:acme:{job(2, 'A city at dusk').fp}", encode(foreign))  # another fingerprint's
        assert await cache.lookup([a, b, job(2, "A city at dusk")]) == [0, 1, 2]
        assert await hub.pull(0.01) == [] and cache.cache_stats()["corrupt"] == 3
        await cache.close()
    run(go())


def test_redis_slow_down_and_back(own_redis, tmp_path, caplog):
    cs = Caches(own_redis.url, tmp_path)
    clock = ManualClock(0.0)  # the layer's retry timer, separate from the engine clock

    async def go():
        layer = RedisLayer(own_redis.url, prefix=cs.prefix, timeout_s=0.2, retry_s=5.0, now=clock.now)
        hub, cache = cs.new(layer)
        await generate(cache, hub, job(0, "A lantern in fog"))
        # Slow: the server holds every command for 10 s; the lookup gives up after 0.2 s and serves from memory.
        admin = own_redis.client()
        admin.execute_command("CLIENT", "PAUSE", "10000", "ALL")
        assert await cache.lookup([job(1, "A lantern in fog"), job(2, "A harbour at noon")]) == [1]
        assert not layer.up and layer.errors == 1
        # Down: requests still resolve from memory, writes wait in the buffer. Stopping the server ends the
        # pause at once; a CLIENT UNPAUSE would not: Redis holds it too (it pauses every client) until the
        # pause's 10 s are over, which this test used to wait out.
        own_redis.stop()
        clock.advance(5.0)
        await generate(cache, hub, job(3, "A tram in the rain"))
        assert await cache.lookup([job(4, "A tram in the rain")]) == []
        assert not layer.up and layer.errors == 2 and len(layer._pending) == 1
        assert cache.cache_stats()["redis_up"] == 0
        # Back: after the retry interval the next operation reconnects and replays the buffered writes.
        own_redis.start()
        clock.advance(5.0)
        await generate(cache, hub, job(5, "A kite over dunes"))
        assert layer.up and layer.reconnects == 1 and len(layer._pending) == 0
        keys = {k.decode() for k in own_redis.client().keys(f"{cs.prefix}:*")}
        assert {f"{cs.prefix}:v{SCHEMA}:acme:{job(k, p).fp}" for k, p in
                [(3, "A tram in the rain"), (5, "A kite over dunes")]} <= keys
        await cache.close()

    with caplog.at_level(logging.WARNING, logger="smartbatch.cache"):
        run(go())
    assert any("unreachable" in m for m in caplog.messages) and any("is back" in m for m in caplog.messages)


def test_an_idle_cache_sees_redis_come_back_with_no_lookup_and_stops_asking_at_close(own_redis, tmp_path):
    """While Redis is down the cache PINGs it once per retry interval on its own, so the gauge goes back to 1
    when Redis answers, with no lookup or write: tried only at the next operation, an idle cache's
    smartbatch_cache_redis_up stayed 0 for minutes after Redis was back, and an operator's alert on it fired."""
    cs = Caches(own_redis.url, tmp_path)
    clock = ManualClock(0.0)  # the layer's retry timer, moved by the probe's waits below
    waits: asyncio.Queue = asyncio.Queue()  # each wait of the probe, as it starts
    ticks: asyncio.Queue = asyncio.Queue()  # one retry interval passes when the test puts one

    async def sleep(s):
        waits.put_nowait(s)
        await ticks.get()
        clock.advance(s)

    async def go():
        back = asyncio.Event()

        class Hub(ResultHub):
            async def observe_cache(self, delta, now, shard=0):
                await super().observe_cache(delta, now, shard)
                if now.get("redis_up") == 1:
                    back.set()

        hub = Hub()
        layer = RedisLayer(own_redis.url, prefix=cs.prefix, timeout_s=1.0, retry_s=5.0, now=clock.now, sleep=sleep)
        cache = ResultCache(REUSE, hub, cs.clock, settings=Settings(cache=cs.cfg), redis=layer)
        gauge = lambda: hub.metrics.registry.get_sample_value("smartbatch_cache_redis_up")  # noqa: E731
        own_redis.stop()
        assert await cache.lookup([job(0, "A heron in reeds")]) == [0]
        assert not layer.up and layer.errors == 1
        assert await asyncio.wait_for(waits.get(), 10) == 5.0  # the probe waits out the retry interval
        assert gauge() == 0.0
        ticks.put_nowait(1)  # still away: the PING fails, and the probe waits another interval
        assert await asyncio.wait_for(waits.get(), 10) == 5.0
        assert not layer.up and layer.errors == 1  # a failed PING is no failed operation
        own_redis.start()
        ticks.put_nowait(1)
        await asyncio.wait_for(back.wait(), 10)  # no lookup, no write: the probe found Redis back
        assert layer.up and layer.reconnects == 1 and gauge() == 1.0
        assert cache.cache_stats()["miss"] == 1  # the only operation is the one that found Redis away
        # Down again and closed while the probe waits: it is stopped, not left asking a Redis nobody reads.
        own_redis.stop()
        assert await cache.lookup([job(1, "A fox in snow")]) == [0]
        await asyncio.wait_for(waits.get(), 10)
        await cache.close()
        assert cache._probing.cancelled()
        probe = cache._probing
        await cache._report()  # a report still due after the close starts none
        assert cache._probing is probe
    run(go())


def test_a_result_read_from_redis_stays_in_memory_only_as_long_as_its_key_has_left(redis_server, tmp_path):
    """A hit read from Redis is kept in memory for the next: it took a whole TTL from the read, so a result
    stored 50 minutes before, with a 1 h TTL, was served from memory for another hour after Redis let it go
    (what a row warmed at a restart no longer does). It expires when its Redis key does."""
    cs = Caches(redis_server.url, tmp_path, ttl_s=3600)
    r = redis_server.client()

    async def go():
        # A restarted actor, not warmed: the first hit reads Redis.
        src, key, fresh = await _stored_with_ten_minutes_left(cs, r, "A lighthouse in a storm, oil on canvas")
        assert await fresh.lookup([job(1, "A lighthouse in a storm, oil on canvas", reuse="exact")]) == []
        assert fresh.memory.get(src.fp) is not None
        cs.clock.advance(601)
        r.delete(key)  # what its expiry does, 10 minutes on
        assert fresh.memory.get(src.fp) is None
        assert await fresh.lookup([job(2, "A lighthouse in a storm, oil on canvas", reuse="exact")]) == [0]
        await fresh.close()
    run(go())


def test_a_write_buffered_while_redis_was_away_keeps_the_life_it_had_left(redis_server, monkeypatch):
    """A result stored while the cache's Redis is away waits in the buffer, and is written once Redis answers,
    with the life its TTL has left: written with the whole TTL, its key outlived it by the outage, and was served
    after it (every engine on that Redis, and a cache warmed from it, read the key's life)."""
    import time as real_time

    import actors.cache_layers as layers

    monotonic = [1000.0]  # the layer's real clock, moved by the test rather than waited for
    monkeypatch.setattr(layers, "time", type("T", (), {"monotonic": staticmethod(lambda: monotonic[0]),
                                                       "time": staticmethod(real_time.time)}))
    retry = ManualClock(0.0)

    async def go():
        layer = RedisLayer(redis_server.url, prefix=f"sbtest-replay{next(_prefixes)}", retry_s=1.0, now=retry.now)
        made, gone = layer.key("acme", "made-at-once"), layer.key("acme", "gone-meanwhile")
        real = layer.client.pipeline

        class Away:
            def __init__(self, *a, **k) -> None:
                pass

            def set(self, *a, **k) -> None:
                pass

            async def execute(self):
                raise ConnectionError("Redis is away")

        layer.client.pipeline = Away
        await layer.put_many([(made, b"v", 60_000), (gone, b"w", 1_000)])  # both buffered
        assert not layer.up and len(layer._pending) == 2
        layer.client.pipeline = real
        monotonic[0] += 30.0  # Redis answers again 30 s later
        retry.advance(1.0)
        await layer.get_many([made])  # the first operation that reaches it replays the buffer
        admin = redis_server.client()
        assert layer.up and 29_000 <= admin.pttl(made) <= 30_000  # 60 s from when it was made, not from now
        assert admin.exists(gone) == 0  # its whole life passed while Redis was away
        await layer.close()
    run(go())


def test_a_time_compressed_engine_stores_its_ttl_in_redis_in_real_time(redis_server, tmp_path):
    """``ttl_s`` counts engine seconds, as the memory layer does; Redis expires in real ones. At 100x an entry
    of a 60 s TTL lived 60 real seconds in Redis, and was served 100 times past its TTL (a helper's hunt)."""
    import time

    from engine.core.clock import ScaledClock

    cs = Caches(redis_server.url, tmp_path, ttl_s=3600)

    async def go():
        hub = ResultHub()
        cache = ResultCache(REUSE, hub, ScaledClock(time.time(), 100.0), settings=Settings(cache=cs.cfg))
        j = job(0, "A lantern on a jetty")
        await generate(cache, hub, j)
        ttl_ms = redis_server.client().pttl(f"{cs.prefix}:v{SCHEMA}:acme:{j.fp}")
        assert 35_000 < ttl_ms <= 36_000  # 3,600 engine seconds at 100x
        await cache.close()
    run(go())
