"""A driver's take-back (``journal.dir``, ``engine.app._driver_resume``) of a run killed with a video under way,
its budgets in Redis: the rescue settles the video's journaled claim in the Redis ledger (``_rescue_settle``), as
it does a batch member's. A video it reads back made is settled at what it cost; a Veo create cut before its
answer (failed, not made again: Google may bill it) at the call's bound, as the live engine keeps for one.
Before, only batch members were settled: each video's claim expired unspent after ``reservation_ttl_s``, the
video billed and counted by no ledger. The kill is the dispatcher's tasks cancelled and its journal's lock
dropped (``tests.unit.test_batch_rescue._crash``); no Ray is needed."""

from __future__ import annotations

import asyncio

import pytest

from engine.app._driver_resume import take_back
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.cost import reserve_bound
from engine.emulator import Emulator
from tests.unit.test_http_providers import CAT, SPEED
from tests.unit.test_video_durable import MADE
from tests.unit.test_video_rescue import _killed_during_a_veo_create, _killed_while_polling

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")

SPEC = BudgetSpec(max_budget=100.0)


def _ledger(redis_server, prefix: str, r, op: str):
    """The claim ``c0`` of ``r`` reserved in the Redis ledger, as the killed run's did (``op="reserve"``), or that
    ledger's (spent, reserved) of its window (``op="window"``)."""
    import redis.asyncio as aioredis

    from actors.budget_redis import RedisBudgetBook

    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            book = RedisBudgetBook(client, [SPEC], prefix=prefix, reservation_ttl_s=600)
            if op == "reserve":
                claim = Claim("c0", r.tenant, r.provider, r.model, r.priority, 5.0)
                assert all(v.ok for v in await book.reserve_many([claim], 0.0))
                return None
            return await book.window(SPEC, 0.0)
        finally:
            await client.aclose()
    return asyncio.run(go())


def _redis_settings(rig, redis_server, prefix: str):
    return rig.settings.model_copy(update={"budgets": BudgetSettings(
        specs=(SPEC,), redis_url=redis_server.url, redis_prefix=prefix, reservation_ttl_s=600)})


def test_a_driver_take_back_settles_a_video_it_read_back_at_what_it_cost(tmp_path, redis_server):
    prefix = f"sbtest-video-settle-{tmp_path.name}"
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        r = MADE["openai"]()
        _ledger(redis_server, prefix, r, "reserve")
        rig = _killed_while_polling(emu, "openai", tmp_path / "j", r)
        kept = take_back(_redis_settings(rig, redis_server, prefix), rig.catalog, {"openai": rig.d._key},
                         speedup=SPEED)
        emu._core.clock.offset += 100_000
        (item,) = emu.bill().items
        assert kept is not None and kept.take(r.model_copy(update={"arrival_s": 99.0})).status == "ok"
        assert _ledger(redis_server, prefix, r, "window") == (pytest.approx(item.cost_usd, abs=1e-9),
                                                               pytest.approx(0.0, abs=1e-9))


def test_a_driver_take_back_settles_a_cut_veo_create_at_its_bound(tmp_path, redis_server):
    prefix = f"sbtest-veo-settle-{tmp_path.name}"
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        r = MADE["google"]()
        _ledger(redis_server, prefix, r, "reserve")
        rig = _killed_during_a_veo_create(emu, tmp_path / "j", r, False)
        kept = take_back(_redis_settings(rig, redis_server, prefix), rig.catalog, {"google": rig.d._key},
                         speedup=SPEED)
        assert kept is not None and kept.take(r.model_copy(update={"arrival_s": 99.0})).status == "failed"
        bound = reserve_bound(r, rig.catalog, "sync", None)
        assert _ledger(redis_server, prefix, r, "window") == (pytest.approx(bound, abs=1e-9),
                                                               pytest.approx(0.0, abs=1e-9))
