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
import time
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


@pytest.mark.parametrize("ledger", ["redis", "redis away at the stop", "memory"])
def test_a_provider_batch_the_stop_cancels_is_settled_at_its_bound_in_the_ledger(
        ledger, ray_session, request, tmp_path, monkeypatch):
    """A provider batch under way when the engine stops is cancelled, and any member it finished before the cancel
    took effect is billed: its claim is settled at its batch bound (``possibly_billed``), in the ledger or, Redis
    away, in the file kept for the next engine. Before, the budget controller was killed with the other actors and
    the dispatchers cancelled after: the settlement reached no ledger and no file, the claim held its room until
    ``reservation_ttl_s``, then was released with nothing spent."""
    from engine import Engine
    from engine.app.live import point_at_emulator
    from engine.core.catalog import default_catalog
    from engine.core.cost import reserve_bound
    from engine.core.request import Request, validation_context
    from engine.core.settings import JournalSettings, Settings
    from engine.emulator import Emulator
    from tests.integration._catalogs import OPENAI_ONLY

    redis = request.getfixturevalue("own_redis") if ledger != "memory" else None
    budgets = _budgets(redis.url) if redis else BudgetSettings(
        specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),))
    line = {"id": "s0", "model": "gpt-4o-mini", "prompt": "summarise part 0", "input_tokens": 20_000,
            "deadline_s": 86_400}
    bound = reserve_bound(Request.model_validate({**line, "arrival_s": 0.0}, context=validation_context(
        default_catalog())), OPENAI_ONLY, "batch_api")
    # Real time at the provider: the batch takes minutes there, so it is under way at the stop.
    with Emulator(default_catalog(), speedup=1.0, seed=0, cancel_s=1.0) as emu:
        settings = point_at_emulator(Settings(budgets=budgets, journal=JournalSettings(
            ledger_dir=tmp_path / "ledgers", ledger_wait_s=0.5)), emu, providers=("openai",))
        monkeypatch.setenv(settings.providers.endpoints["openai"].api_key_env, "sk-fake-stop")
        params = {"batch_gather_s": 0.0, "min_batch_saving_usd": 0.0}
        with Engine.start(settings, catalog=OPENAI_ONLY, speedup=100, policy_params=params,
                          metrics_port=None) as eng:
            fut = eng.submit(line)
            end = time.monotonic() + 60.0
            while not emu.count("batches.create", "openai", 200):  # polling the provider, as its client does
                assert time.monotonic() < end, f"no batch reached the emulator: {emu.counters()}"
                time.sleep(0.05)
            if ledger == "redis away at the stop":
                os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            rep = eng.report()
        finally:
            if ledger == "redis away at the stop":
                os.kill(redis.proc.pid, signal.SIGCONT)
        assert fut.result(timeout=5).status == "failed"
        assert emu.count("batches.cancel", "openai", 200) == 1
        if ledger == "memory":
            (row,) = rep["budget"]["budgets"]
        else:
            if ledger == "redis away at the stop":  # kept for the next engine, its spend said
                left = rep["budget"]["ledger"]["left_at_stop"]
                assert (left["settlements"], left["unsettled_usd"]) == (1, pytest.approx(bound, abs=1e-6)), left
            # (at the same speed: a budget's window is of engine time, the first engine's is window 0 of it)
            with Engine.start(settings, catalog=OPENAI_ONLY, speedup=100, policy="naive", metrics_port=None) as again:
                (row,) = again.report()["budget"]["budgets"]
        # Counted at its bound, nothing held (before: $0 spent, the bound reserved until the claim expired).
        assert (row["spent_usd"], row["reserved_usd"]) == (pytest.approx(bound, abs=1e-6), 0.0), row
        said = rep["providers"]["openai"]  # and the stop's report says so
        assert (said["possibly_billed"], said["possibly_billed_usd"]) == (1, pytest.approx(bound, abs=1e-6)), said


@pytest.mark.parametrize("at", ["reading the report", "keeping the ledger"])
def test_a_ctrl_c_while_the_stop_reads_its_report_or_keeps_its_ledger_still_kills_every_actor(at, ray_session):
    """A Ctrl-C (a second one, the first drained) while ``stop()`` keeps its report, before ``kill_engine``:
    the stop left there and every actor of the engine ran on (on a cluster, until someone killed them; a
    provider batch under way ran on, billed and never read). Now the actors go all the same, as they do on a
    Ctrl-C inside ``kill_engine`` (its ``finally``)."""
    import ray

    from actors.remote import kill_engine
    from engine import Engine
    from engine.core.settings import Settings
    from tests.integration._catalogs import OPENAI_ONLY

    budgets = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),))
    # OpenAI alone, the one provider the test calls: every actor of the engine is still killed, four fewer started.
    eng = Engine.start(Settings(budgets=budgets), catalog=OPENAI_ONLY, speedup=100, metrics_port=None)
    handles = list(eng._h["all"])
    try:
        assert eng.submit({"id": "q", "model": "gpt-4o-mini", "prompt": "Hi", "deadline_s": 60}).result(
            timeout=60).status == "ok"

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        if at == "reading the report":
            eng._read_report = interrupted
        else:
            eng._keep_ledger = interrupted
        with pytest.raises(KeyboardInterrupt):
            eng.stop()
        alive = []
        for h in handles:
            try:
                ray.get(h.ping.remote(), timeout=30)
                alive.append(h)
            except ray.exceptions.RayActorError:
                pass
        assert alive == [], f"{len(alive)} of {len(handles)} actors still running after the stop"
        eng.stop()  # stopped already: returns at once
    finally:
        kill_engine(eng._h["engine"], handles)  # (left running on the code before: not in the next tests' way)


def test_a_detached_engine_stopped_by_name_while_redis_is_away_keeps_its_outbox_for_the_next_engine(
        own_redis, ray_session, tmp_path):
    """``Engine.stop_named`` (``smartbatch stop --name``) of a detached engine while its ledger's Redis is away:
    the stop killed the budget controller with what waited for Redis in it, kept in no file (only a driver's own
    stop kept it): a settlement's spend and a charge were counted by no ledger, the claim held its room until it
    expired, then was released with its spend forgotten."""
    import secrets

    import ray

    from engine import Engine
    from engine.core.settings import JournalSettings, Settings
    from tests.integration._catalogs import OPENAI_ONLY

    settings = Settings(budgets=_budgets(own_redis.url),
                        journal=JournalSettings(ledger_dir=tmp_path / "ledgers", ledger_wait_s=0.5))
    name = f"stopledger-{secrets.token_hex(3)}"
    eng = Engine.start(settings, catalog=OPENAI_ONLY, policy="naive", metrics_port=None, name=name, detached=True)
    try:
        budget = eng._h["named"]["budget"]
        assert all(v.ok for v in ray.get(budget.reserve_many.remote(_claims("a0", "a1", usd=2.0)), timeout=30))
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            ray.get(budget.settle_many.remote([("a0", 1.5)]), timeout=30)
            ray.get(budget.charge_many.remote([Charge("late:m1", "acme", "openai", "gpt-5-mini", 0.5)]), timeout=30)
            eng.stop()  # this driver leaves; the engine runs on
            Engine.stop_named(name)  # stopped with Redis still paused
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
    finally:
        eng.shutdown()  # (stopped already: returns at once; on a failure above, nothing left running)
    kept = list((tmp_path / "ledgers").rglob("*.outbox"))

    with Engine.start(settings, catalog=OPENAI_ONLY, policy="naive", metrics_port=None) as again:
        rep = again.report()["budget"]
    (row,) = rep["budgets"]
    # Taken back and sent: a0's $1.5 and the $0.5 charge counted once, a1 still held (before: 0 spent, 4 held,
    # and no file kept).
    assert (row["spent_usd"], row["reserved_usd"], rep["charged_usd"]) == (
        pytest.approx(2.0), pytest.approx(2.0), 0.5), rep
    assert len(kept) == 1 and not kept[0].exists(), kept  # (the start that took it back removed it)


def test_a_budget_controller_that_dies_while_the_stop_waits_for_redis_still_keeps_its_outbox(
        own_redis, ray_session, tmp_path, monkeypatch):
    """The budget controller's process dies as the stop asks it what waits for Redis (``leave``); Ray restarts it.
    The stop took the death for an answer: "not asked", nothing kept, and it had removed the controller's journal
    of its outbox from Ray's store at its start, so the restarted one had nothing to give either: the spend of
    those settlements and charges was counted by no ledger."""
    import ray

    import actors._budget_kept as budget_kept
    from engine import Engine
    from engine.core.settings import JournalSettings, Settings
    from tests.integration._catalogs import OPENAI_ONLY

    settings = Settings(budgets=_budgets(own_redis.url),
                        journal=JournalSettings(ledger_dir=tmp_path / "ledgers", ledger_wait_s=0.5))
    keep_left = budget_kept.keep_left

    def dies_in_leave(ray_, budget, *args):
        def die_at_the_next_read_back(ctl) -> None:  # (run in the controller: ``leave`` reads its outbox back first)
            async def die() -> None:
                os._exit(1)
            ctl._restored_first = die
        ray.get(budget.__ray_call__.remote(die_at_the_next_read_back), timeout=30)
        return keep_left(ray_, budget, *args)

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
        monkeypatch.setattr(budget_kept, "keep_left", dies_in_leave)
    try:  # stopped with Redis still paused
        left = eng.report()["budget"]["ledger"].get("left_at_stop")
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    monkeypatch.undo()

    with Engine.start(settings, catalog=OPENAI_ONLY, policy="naive", metrics_port=None) as again:
        rep = again.report()["budget"]
    (row,) = rep["budgets"]
    # Kept by the restarted controller, taken back and sent: a0's $1.5 and the charge counted once.
    assert (row["spent_usd"], row["reserved_usd"], rep["charged_usd"]) == (
        pytest.approx(2.0), pytest.approx(2.0), 0.5), (rep, left)
    assert (left["settlements"], left["charges"], left["unsettled_usd"]) == (1, 1, 2.0), left



def test_a_start_of_the_name_while_its_stop_keeps_the_ledger_is_refused_and_leaves_the_name_free(
        ray_session, monkeypatch):
    """An engine of the same name started while a stop by name keeps the ledger (its layout gone, its budget
    controller alive for up to ``journal.ledger_wait_s`` and more): Ray refused the controller's name
    (``ActorAlreadyExistsError``) after the start had made its hub, which nothing stopped: every later start of
    the name failed on that hub's name, and ``smartbatch stop --name`` found no engine of it. Now refused at once,
    naming the stop, with nothing made."""
    import secrets
    import threading

    import engine.app._ledger_stop as ledger_stop
    from engine import Engine
    from engine.core.errors import ConfigError
    from tests.integration._catalogs import OPENAI_ONLY

    name = f"stopstart-{secrets.token_hex(3)}"
    in_ledger, go, out = threading.Event(), threading.Event(), []
    keep_named = ledger_stop.keep_named

    def held(*args):
        in_ledger.set()
        go.wait(60)
        return keep_named(*args)

    monkeypatch.setattr(ledger_stop, "keep_named", held)
    eng = Engine.start(catalog=OPENAI_ONLY, policy="naive", metrics_port=None, name=name, detached=True)
    eng.stop()  # this driver leaves; the engine runs on
    stop = threading.Thread(target=lambda: out.append(Engine.stop_named(name)))
    stop.start()
    try:
        assert in_ledger.wait(60)
        with pytest.raises(ConfigError, match="being stopped"):
            Engine.start(catalog=OPENAI_ONLY, policy="naive", metrics_port=None, name=name, detached=True)
    finally:
        go.set()
        stop.join(120)
    assert out and out[0] > 0, out
    with Engine.start(catalog=OPENAI_ONLY, policy="naive", metrics_port=None, name=name) as again:
        assert again.name == name
