"""The engine's stop cancels itself the batches of a dispatcher Ray did not bring back in time
(``actors._stop_left``), reading its journal where the dispatcher kept it: in Redis, and in the hub's memory
where the engine's start moved it there from a cache's Redis that may evict keys (``check_keeps_records``).

A review of stop 81: the Redis path had no test, and the second read the cache's Redis, which the dispatcher
had never written: the stop found nothing under way, and the batch ran on, billed, its claims held until
``reservation_ttl_s``. No Ray: the dispatcher runs in this process (``tests.unit.test_http_providers.Rig``)."""

from __future__ import annotations

import asyncio

import pytest

from actors import _stop_left
from engine.core.cost import reserve_bound
from engine.core.settings import CacheSettings, JournalSettings
from tests.unit import test_stop_settles
from tests.unit.test_batch_rescue import FAR
from tests.unit.test_http_providers import KEY, Rig, jobs_of

# (a fixture: the batch in progress whatever the machine's speed). On real time its 1 s turnaround could end
# before the stop's cancel: a scratch 1.5 s pause after the create failed both tests (stop 83).
still = test_stop_settles.still


async def _left_with_a_batch(rig: Rig, layout_settings, journal: str, copy_of_hub: bool) -> tuple:
    """A batch created at the emulator and journaled with its id, its dispatcher's process gone; the stop's own
    cancel run on it with the layout's settings (the driver's). (jobs, the batch's id, the settlements the stop
    made, what it did)."""
    jobs = jobs_of("openai", claims=True)
    put, created = rig.d.journal.put, asyncio.Event()

    async def journaled(space, key, rec):  # the record that names the batch's id, written
        await put(space, key, rec)
        if space == "batches:openai" and rec[4] is not None:
            created.set()

    rig.d.journal.put = journaled
    await rig.reserve(jobs)
    await rig.run("batch_api", jobs, hedge_at=FAR)
    await asyncio.wait_for(created.wait(), 60)
    copy = await rig.hub.journal_copy() if copy_of_hub else None  # as ``_journal_copy`` takes it, before the hub goes
    (bid,) = [r[4].id for r in rig.d._open.values()]
    test_stop_settles._stop_tasks(rig)  # its process dies, and Ray does not bring it back in time
    settled: list = []
    layout = {"settings": layout_settings, "catalog": rig.catalog, "journal": journal, "kinds": [],
              "journal_in_memory": rig.settings.journal.in_memory}
    left = await asyncio.to_thread(_stop_left.cancel_left, "prod", "dispatcher-openai", layout, copy,
                                   lambda items: settled.extend(items) or True, journal)
    return jobs, bid, settled, left


def test_the_stops_own_cancel_reads_a_journal_kept_in_redis(own_redis, still, monkeypatch):
    slow_cancel_emu, clock = still
    rig = Rig(slow_cancel_emu, "openai", clock=clock, journal=JournalSettings(redis_url=own_redis.url))
    monkeypatch.setenv(rig.settings.providers.endpoints["openai"].api_key_env, KEY)

    async def go():
        try:
            return await _left_with_a_batch(rig, rig.settings, "engine", copy_of_hub=False)
        finally:
            await rig.close()
            await rig.d.journal.close()

    jobs, bid, settled, left = asyncio.run(go())
    assert (left.unread, left.cancelled, left.not_cancelled) == (None, [bid], []), left
    assert slow_cancel_emu.count("batches.cancel", "openai", 200) == 1, slow_cancel_emu.counters()
    bounds = {j.claim: reserve_bound(j.req, rig.catalog, "batch_api") for j in jobs}
    assert dict(settled) == pytest.approx(bounds, abs=1e-12)


def test_the_stops_own_cancel_reads_the_hub_journal_where_a_cache_redis_that_evicts_moved_it(own_redis, still,
                                                                                             monkeypatch):
    """The journal falls back to the cache's Redis; one that may evict keys (a cache's usual setting) has the
    engine's start keep the journal in the hub's memory instead, in the actors' settings alone: the driver's,
    published in the layout, still name the cache's Redis. The stop read that Redis, found nothing under way
    and left the batch to run on (0 cancels at the emulator, no claim settled)."""
    r = own_redis.client()
    r.config_set("maxmemory-policy", "allkeys-lru")
    r.config_set("maxmemory", "100mb")
    from actors._journal_evict import check_keeps_records

    slow_cancel_emu, clock = still
    rig = Rig(slow_cancel_emu, "openai", clock=clock, cache=CacheSettings(redis_url=own_redis.url))
    driver_settings = rig.settings
    rig.settings = check_keeps_records(driver_settings, "engine")  # what the actors were given
    assert rig.settings.journal.in_memory and not driver_settings.journal.in_memory
    from actors import Dispatcher
    from engine.core.provider_api import Secret

    monkeypatch.setenv(rig.settings.providers.endpoints["openai"].api_key_env, KEY)

    async def go():
        try:
            await rig.d.provider.close()  # (the rig's, made with the driver's settings: replaced)
            rig.d = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                               rig.budget, key=Secret(KEY))
            return await _left_with_a_batch(rig, driver_settings, "engine", copy_of_hub=True)
        finally:
            await rig.close()

    jobs, bid, settled, left = asyncio.run(go())
    assert (left.unread, left.cancelled, left.not_cancelled) == (None, [bid], []), left
    assert slow_cancel_emu.count("batches.cancel", "openai", 200) == 1, slow_cancel_emu.counters()
    bounds = {j.claim: reserve_bound(j.req, rig.catalog, "batch_api") for j in jobs}
    assert dict(settled) == pytest.approx(bounds, abs=1e-12)
