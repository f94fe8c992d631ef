"""The cache against a real redis-server that misbehaves (a helper's hunt): what a slow or refusing Redis must not
cost a request."""

import asyncio
import itertools
import time

from actors import ResultCache, ResultHub
from actors._types import Job
from actors.cache_layers import RedisLayer
from engine.core.clock import ManualClock, ScaledClock
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings

REUSE = ReuseSettings(exact=True, in_flight=True, near=True, near_threshold=0.92)
_prefixes = itertools.count()


def job(i, prompt, *, tenant="acme", reuse="near"):
    r = Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-image-1", "prompt": prompt,
                                "tenant": tenant, "reuse": reuse})
    return Job(i, r, fingerprint(r))


def ok(j, done_s=1.0):
    return (j.fp, Result(id=j.req.id, tenant=j.req.tenant, status="ok", output=f"img://{j.req.id}", cost_usd=0.04,
                         mode="sync", provider=j.req.provider, model=j.req.model, done_s=done_s))


def new_cache(url, tmp_path, layer=None, clock=None, **cfg):
    cfg.setdefault("redis_timeout_s", 5.0)
    cfg.setdefault("redis_prefix", f"sbhunt{next(_prefixes)}")
    settings = Settings(cache=CacheSettings(redis_url=url, blob_dir=tmp_path / "blobs", **cfg))
    hub = ResultHub()
    return hub, ResultCache(REUSE, hub, clock or ManualClock(0.0), settings=settings, redis=layer)


def test_a_near_source_that_completes_while_the_lookup_reads_a_slow_redis_serves_it_not_a_second_call(
        own_redis, tmp_path):
    """A near ask whose top match is a leader in flight reads that match's entry from Redis. Held there by a slow
    Redis, it let the leader's ``complete`` run: the entry was in memory, the leader no longer in flight, and the
    ask, finding neither in what it had read, was generated and paid a second time (``stale_near``). It is
    served the stored result, as an exact ask re-reading memory after its Redis read already was."""
    layer = RedisLayer(own_redis.url, prefix=f"sbhunt{next(_prefixes)}", timeout_s=5.0)
    hub, cache = new_cache(own_redis.url, tmp_path, layer)
    src = job(0, "Draw a red car parked on a wet street at night")
    ask = job(1, "draw a red car parked on a wet street at night.")
    reading = asyncio.Event()
    real_get = layer.get_many

    async def get_many(keys):
        if layer.key("acme", src.fp) in keys:  # the top match's entry, not the ask's own exact read
            reading.set()
        return await real_get(keys)

    async def go():
        assert await cache.lookup([src]) == [0]  # leads
        await cache._materialise([cache._near_key(src)])  # its row in the index, as a near ask of its class makes it
        layer.get_many = get_many
        # Slow: the server holds every command for 0.5 s (bounded; the layer waits up to 5 s).
        own_redis.client().execute_command("CLIENT", "PAUSE", "500", "ALL")
        asking = asyncio.ensure_future(cache.lookup([ask]))
        await reading.wait()  # the ask waits on Redis for its top match's entry
        await cache.complete([ok(src)])  # the leader's result comes meanwhile
        misses = await asking
        results = await hub.pull(0.01)
        await cache.close()
        return misses, results

    misses, results = asyncio.run(go())
    assert misses == [], f"generated again although its near source's result was stored: {cache.cache_stats()}"
    (res,) = [r for r in results if r.id == "r1"]
    assert (res.hit, res.output) == ("near", "img://r0")


def test_writes_buffered_while_redis_is_down_are_bounded_by_bytes_not_only_by_count(own_redis, tmp_path):
    """While Redis is down each result's write waits in the layer's buffer, which was bounded by its count alone
    (10,000): results of long prompts (a document to summarise) held their text there, outside
    ``cache.memory_max_mb``, 10,000 at a time (100 kB prompts: a gigabyte in the cache actor). The buffer holds
    at most ``memory_max_mb`` bytes too, the oldest dropped first (counted), and the newest are written once
    Redis is back."""
    mb = 1
    hub, cache = new_cache(own_redis.url, tmp_path, memory_max_mb=mb, redis_timeout_s=1.0, redis_retry_s=3600.0)
    layer = cache.redis
    own_redis.stop()  # down: every write is buffered
    page = "word " * 20_000  # a 100 kB prompt
    jobs = [job(k, f"Summarise document {k}: {page}", reuse="exact") for k in range(40)]

    async def go():
        for j in jobs:
            assert await cache.lookup([j]) == [0]
            await cache.complete([ok(j)])
        held = sum(len(v) for _, v, _, _ in layer._pending)
        await cache.close()
        return held

    held = asyncio.run(go())
    assert not layer.up
    assert held <= mb * 2**20, f"{held / 2**20:.1f} MiB of writes buffered under a {mb} MiB memory limit"
    assert layer.dropped_writes == len(jobs) - len(layer._pending) > 0
    assert layer._pending[-1][0] == layer.key("acme", jobs[-1].fp)  # the newest kept


def test_a_cache_restarted_while_redis_is_down_warms_its_near_index_once_redis_is_back(own_redis, tmp_path):
    """A restarted cache rebuilds its near-duplicate index from Redis (``warm_from_redis``), once per incarnation.
    Restarted while Redis was down (a machine's restart brings both back), its read failed quietly and the warm
    counted as done: for that incarnation's whole life no near duplicate of a result stored before was found,
    and each was generated and paid again. The warm is tried again once Redis answers."""
    prefix = f"sbhunt{next(_prefixes)}"
    clock = ManualClock(0.0)  # the layer's retry timer

    def layer():
        return RedisLayer(own_redis.url, prefix=prefix, timeout_s=5.0, retry_s=5.0, now=clock.now)

    async def go():
        hub, cache = new_cache(own_redis.url, tmp_path, layer())
        src = job(0, "Draw a red car parked on a wet street at night")
        assert await cache.lookup([src]) == [0]
        await cache.complete([ok(src)])
        await cache.close()
        own_redis.client().save()  # a Redis with persistence: its restart keeps the entry
        own_redis.stop()
        hub, fresh = new_cache(own_redis.url, tmp_path, layer())  # restarted while Redis is down
        assert await fresh.warm_from_redis() == 0
        own_redis.start()
        clock.advance(5.0)
        assert await fresh.lookup([job(1, "A harbour at noon", reuse="exact")]) == [0]  # Redis answers again
        assert fresh._warming is not None
        await fresh._warming  # the warm that answer started, in the background
        misses = await fresh.lookup([job(2, "draw a red car parked on a wet street at night.")])
        results = await hub.pull(0.01)
        await fresh.close()
        return misses, results

    misses, results = asyncio.run(go())
    assert misses == [], "a near duplicate of a result in Redis was generated again: the index was never warmed"
    (res,) = [r for r in results if r.id == "r2"]
    assert (res.hit, res.output) == ("near", "img://r0")


def test_a_row_warmed_in_a_time_compressed_engine_keeps_the_life_its_key_has_left_in_engine_seconds(
        redis_server, tmp_path):
    """Redis counts a key's life in real time, the memory layer and the near index in engine time: an entry read
    by a lookup converts one into the other (``_fetch``), a warm did not. At 100x a warmed entry of a 1 h TTL
    (36 real seconds in Redis) lived 36 engine seconds in memory and in the index, a hundredth of its life: a
    restarted cache lost its near duplicates within a third of a real second and generated them again."""
    clock = ScaledClock(time.time(), 100.0)
    prefix = f"sbhunt{next(_prefixes)}"

    async def go():
        hub, cache = new_cache(redis_server.url, tmp_path, clock=clock, ttl_s=3600, redis_prefix=prefix)
        src = job(0, "Draw a red car parked on a wet street at night")
        assert await cache.lookup([src]) == [0]
        await cache.complete([ok(src)])
        await cache.close()
        _, fresh = new_cache(redis_server.url, tmp_path, clock=clock, ttl_s=3600, redis_prefix=prefix)
        assert await fresh.warm_from_redis() == 1
        now = clock.now()
        memory_left = fresh.memory._d[src.fp][1] - now
        row_age = now - fresh._near_rows[0][3]
        await fresh.close()
        return memory_left, row_age

    memory_left, row_age = asyncio.run(go())
    assert 3000 < memory_left <= 3600, f"a warmed entry has {memory_left:.0f} engine seconds left of 3,600"
    assert row_age < 600, f"a warmed row counts as {row_age:.0f} engine seconds old, stored a moment ago"


def test_a_redis_that_refuses_writes_still_serves_what_it_holds(own_redis, tmp_path):
    """A full Redis under ``noeviction`` (or a read-only replica) answers reads and refuses writes. A refused write
    marked the whole layer down: reads were skipped for ``redis_retry_s``, the next read marked it up, its replay
    of the refused writes marked it down again, and so on, so a result Redis held was read about once per retry
    interval, and every other ask for it was generated and paid again. A refused write is dropped and counted;
    reads go on."""
    hub, cache = new_cache(own_redis.url, tmp_path, memory_max_entries=1)  # memory holds one: the rest is in Redis
    held = job(0, "A koi pond at dawn", reuse="exact")
    admin = own_redis.client()

    async def go():
        assert await cache.lookup([held]) == [0]
        await cache.complete([ok(held)])
        # Full: no room for another key, and no eviction.
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", str(admin.info("memory")["used_memory"]))
        refused = job(1, "A desert road at noon", reuse="exact")
        assert await cache.lookup([refused]) == [0]
        await cache.complete([ok(refused)])  # its write is refused; it also pushes ``held`` out of memory
        assert cache.memory.get(held.fp) is None
        again = [job(k, "A koi pond at dawn", reuse="exact") for k in range(2, 5)]
        misses = [await cache.lookup([j]) for j in again]
        results = await hub.pull(0.01)
        admin.config_set("maxmemory", "0")
        await cache.close()
        return misses, results

    misses, results = asyncio.run(go())
    assert misses == [[], [], []], f"generated again although Redis held it: {cache.cache_stats()}"
    assert {r.id: r.output for r in results if r.id in ("r2", "r3", "r4")} == dict.fromkeys(("r2", "r3", "r4"),
                                                                                          "img://r0")
    assert cache.redis.up and cache.redis.refused_writes == 1
    assert cache.cache_stats()["redis_dropped_writes"] == 1 and cache.cache_stats()["redis_errors"] == 0


def test_an_idle_cache_restarted_while_redis_is_down_warms_once_a_ping_finds_redis_back(own_redis, tmp_path):
    """The warm tried again once Redis answers (above) waited for a lookup to reach Redis: an idle cache PINGs
    it once per retry interval from the failed warm on, and warms at the first answer, with no lookup."""
    prefix = f"sbhunt{next(_prefixes)}"
    clock = ManualClock(0.0)  # the layer's retry timer, moved by the probe's waits below
    waits: asyncio.Queue = asyncio.Queue()  # each wait of the probe, as it starts
    ticks: asyncio.Queue = asyncio.Queue()  # one retry interval passes when the test puts one

    async def sleep(s):
        waits.put_nowait(s)
        await ticks.get()
        clock.advance(s)

    def layer():
        return RedisLayer(own_redis.url, prefix=prefix, timeout_s=5.0, retry_s=5.0, now=clock.now, sleep=sleep)

    async def go():
        hub, cache = new_cache(own_redis.url, tmp_path, layer())
        src = job(0, "Draw a red car parked on a wet street at night")
        assert await cache.lookup([src]) == [0]
        await cache.complete([ok(src)])
        await cache.close()
        own_redis.client().save()  # a Redis with persistence: its restart keeps the entry
        own_redis.stop()
        hub, fresh = new_cache(own_redis.url, tmp_path, layer())  # restarted while Redis is down
        assert await fresh.warm_from_redis() == 0
        assert await asyncio.wait_for(waits.get(), 10) == 5.0  # the probe, started by the failed warm
        own_redis.start()
        ticks.put_nowait(1)
        await asyncio.wait_for(fresh._probing, 10)  # the PING answered: Redis up, the warm started
        assert fresh.redis.up and fresh._warming is not None
        await asyncio.wait_for(fresh._warming, 10)
        assert fresh.cache_stats()["miss"] == 0  # no lookup came
        misses = await fresh.lookup([job(2, "draw a red car parked on a wet street at night.")])
        await fresh.close()
        return misses

    assert asyncio.run(go()) == [], "a near duplicate of a result in Redis was generated again: never warmed"
