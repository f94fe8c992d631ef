"""A Redis budget ledger's outbox at the engine's stop (``actors._budget_stop``, ``actors._budget_kept``): an
engine stopped while its Redis was away dropped the settlements and charges waiting for it (Ray's key-value store,
where they were journaled, went with the engine), their spend never counted and their claims held until they
expired. Now the stop waits a bounded time for Redis, and keeps what is left on disk for the next engine on the
same ledger, saying how much spend is unsettled."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from pathlib import Path

import pytest

from actors.budget import BudgetController
from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim
from engine.core.clock import ManualClock

_prefix = itertools.count()


def _budgets(url: str) -> BudgetSettings:
    return BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),), redis_url=url,
                          redis_prefix=f"sbtest-stop{next(_prefix)}", redis_timeout_s=0.3, redis_retry_s=0.05)


def _claims(*ids: str, usd: float) -> list[Claim]:
    return [Claim(i, "acme", "openai", "gpt-5-mini", "urgent", usd) for i in ids]


def test_an_engine_stopped_while_redis_is_away_keeps_its_outbox_for_the_next_engine_on_the_ledger(
        own_redis, ray_session, tmp_path):
    import ray

    from engine import Engine
    from engine.core.settings import JournalSettings, Settings
    from tests.integration._catalogs import OPENAI_ONLY

    settings = Settings(budgets=_budgets(own_redis.url),
                        journal=JournalSettings(ledger_dir=tmp_path / "ledgers", ledger_wait_s=0.5))
    with Engine.start(settings, catalog=OPENAI_ONLY, policy="naive", metrics_port=None) as eng:
        budget = eng._h["named"]["budget"]
        assert all(v.ok for v in ray.get(budget.reserve_many.remote(_claims("a0", "a1", usd=2.0)), timeout=30))
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            ray.get(budget.settle_many.remote([("a0", 1.5)]), timeout=30)
            ray.get(budget.charge_many.remote([Charge("late:m1", "acme", "openai", "gpt-5-mini", 0.5)]), timeout=30)
        except BaseException:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
            raise
    try:  # stopped with Redis still paused
        left = eng.report()["budget"]["ledger"].get("left_at_stop")
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)

    with Engine.start(settings, catalog=OPENAI_ONLY, policy="naive", metrics_port=None) as again:
        rep = again.report()["budget"]
    (row,) = rep["budgets"]
    # Taken back at the start and sent: a0's $1.5 and the $0.5 charge counted once, a1 still held (before: 0, 4).
    assert (row["spent_usd"], row["reserved_usd"]) == (pytest.approx(2.0), pytest.approx(2.0)), rep
    assert rep["charged_usd"] == 0.5 and "left_at_stop" not in rep["ledger"]  # (nothing left by this one)
    # The stop said what it left, with the spend unsettled, and where it kept it, which the next start removed.
    assert (left["settlements"], left["charges"], left["unsettled_usd"]) == (1, 1, 2.0), left
    assert left["kept_in"].startswith(str(tmp_path / "ledgers")) and not Path(left["kept_in"]).exists()


def test_a_stop_waits_for_redis_to_come_back_and_keeps_nothing_once_it_took_the_outbox(own_redis):
    b = _budgets(own_redis.url)

    async def go():
        ctl = BudgetController(b, None, ManualClock(100.0))
        await ctl.check_ledger()
        assert all(v.ok for v in await ctl.reserve_many(_claims("a0", usd=2.0)))
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        tried = asyncio.Event()
        failed = ctl._failed

        def said_down(exc: BaseException) -> None:
            failed(exc)
            tried.set()
        try:
            await ctl.settle_many([("a0", 1.5)])
            assert (await ctl.report())["ledger"]["unsettled"] == 1
            tried.clear()
            ctl._failed = said_down
            stopping = asyncio.ensure_future(ctl.leave(30.0))
            await asyncio.wait_for(tried.wait(), 30)  # the stop tried Redis, still away, and waits on
            assert not stopping.done()
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert await asyncio.wait_for(stopping, 30) == {}  # Redis back within the wait: taken, nothing left
        rep = await ctl.report()
        assert rep["ledger"]["unsettled"] == 0 and rep["spent_usd"] == 1.5
        await ctl.close()
    asyncio.run(go())
