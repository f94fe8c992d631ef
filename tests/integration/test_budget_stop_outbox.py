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


def _fill_outbox(eng, redis, ids: tuple[str, str], charge: str) -> None:
    """Two claims of $2 granted, Redis paused (left paused: the caller's stop meets it), then the first settled at
    $1.5 and a $0.5 charge: both wait for Redis in the budget controller's outbox."""
    import ray

    budget = eng._h["named"]["budget"]
    assert all(v.ok for v in ray.get(budget.reserve_many.remote(_claims(*ids, usd=2.0)), timeout=30))
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        ray.get(budget.settle_many.remote([(ids[0], 1.5)]), timeout=30)
        ray.get(budget.charge_many.remote([Charge(charge, "acme", "openai", "gpt-5-mini", 0.5)]), timeout=30)
    except BaseException:
        os.kill(redis.proc.pid, signal.SIGCONT)
        raise


def test_engines_stopped_while_redis_is_away_keep_their_outboxes_for_the_next_engine_on_the_ledger(
        own_redis, ray_session, tmp_path, monkeypatch):
    """Three stops with Redis paused, each engine's outbox (a settlement of $1.5, a $0.5 charge; its other claim of
    $2 held) taken back by the next engine on the same ledger: a driver's own stop (A); ``Engine.stop_named``
    (``smartbatch stop --name``) of a detached engine (B): the stop killed the budget controller with what waited
    for Redis in it, kept in no file (only a driver's own stop kept it); a budget controller whose process dies as
    the stop asks it what waits for Redis (``leave``), which Ray restarts (C): the stop took the death for an
    answer, "not asked", nothing kept, and it had removed the controller's journal of its outbox from Ray's store at
    its start, so the restarted one had nothing to give either. Before, in B and C, the spend of those settlements
    and charges was counted by no ledger and the claims held their room until they expired. Each next engine's
    start reads what the one before left: one start serves as the first's next and the next's first, and the ledger's
    figures add up, $2 spent and $2 held more per stop. B's stop by name also checks that a start of the name during
    it is refused, and C's start that the name is free after it: four starts for what three tests checked in eight."""
    import secrets
    import threading

    import ray

    import actors._budget_kept as budget_kept
    import engine.app._ledger_stop as ledger_stop
    from engine import Engine
    from engine.core.errors import ConfigError
    from engine.core.settings import JournalSettings, Settings
    from tests.integration._catalogs import OPENAI_ONLY

    # Room for the three stops' claims ($12 of spend and holds) on one ledger.
    budgets = _budgets(own_redis.url).model_copy(update={"specs": (BudgetSpec(max_budget=100.0,
                                                                              budget_duration="1d"),)})
    settings = Settings(budgets=budgets, journal=JournalSettings(ledger_dir=tmp_path / "ledgers", ledger_wait_s=0.5))

    def start(**kw):
        return Engine.start(settings, catalog=OPENAI_ONLY, policy="naive", metrics_port=None, **kw)

    def taken_back(eng, spent: float, held: float) -> dict:
        """The next engine's ledger, its start having taken back and sent the last stop's outbox."""
        rep = eng.report()["budget"]
        (row,) = rep["budgets"]
        assert (row["spent_usd"], row["reserved_usd"], rep["charged_usd"]) == (
            pytest.approx(spent), pytest.approx(held), 0.5), rep
        return rep

    # A: a driver's own stop.
    with start() as a:
        _fill_outbox(a, own_redis, ("a0", "a1"), "late:a")
    try:  # stopped with Redis still paused
        left = a.report()["budget"]["ledger"].get("left_at_stop")
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    # The stop said what it left, with the spend unsettled, and where it kept it.
    assert (left["settlements"], left["charges"], left["unsettled_usd"]) == (1, 1, 2.0), left
    assert left["kept_in"].startswith(str(tmp_path / "ledgers"))

    # B: a detached engine, stopped by name. While that stop keeps the ledger (its layout gone, its budget
    # controller alive for up to ``journal.ledger_wait_s`` and more), a start of its name is refused: Ray refused
    # the controller's name (``ActorAlreadyExistsError``) after the start had made its hub, which nothing stopped:
    # every later start of the name failed on that hub's name, and ``smartbatch stop --name`` found no engine of
    # it. Now refused at once, naming the stop, with nothing made (C, started with the name, finds it free).
    name = f"stopledger-{secrets.token_hex(3)}"
    in_ledger, go, out = threading.Event(), threading.Event(), []
    keep_named = ledger_stop.keep_named

    def held(*args):
        in_ledger.set()
        go.wait(60)
        return keep_named(*args)

    b = start(name=name, detached=True)
    try:
        # Taken back at the start and sent: a0's $1.5 and the $0.5 charge counted once, a1 still held (before: 0,
        # 4), and the file kept by A's stop removed.
        taken_back(b, 2.0, 2.0)
        assert not Path(left["kept_in"]).exists(), left
        _fill_outbox(b, own_redis, ("b0", "b1"), "late:b")
        try:
            b.stop()  # this driver leaves; the engine runs on
            monkeypatch.setattr(ledger_stop, "keep_named", held)
            stop = threading.Thread(target=lambda: out.append(Engine.stop_named(name)))  # with Redis still paused
            stop.start()
            try:
                assert in_ledger.wait(60)
                with pytest.raises(ConfigError, match="being stopped"):
                    start(name=name, detached=True)
            finally:
                go.set()
                stop.join(120)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
    finally:
        b.shutdown()  # (stopped already: returns at once; on a failure above, nothing left running)
    monkeypatch.undo()
    assert out and out[0] > 0, out
    kept = list((tmp_path / "ledgers").rglob("*.outbox"))
    assert len(kept) == 1, kept  # before: no file kept by the stop by name

    # C: its budget controller dies as the stop asks it what waits for Redis.
    keep_left = budget_kept.keep_left

    def dies_in_leave(ray_, budget, *args):
        def die_at_the_next_read_back(ctl) -> None:  # (run in the controller: ``leave`` reads its outbox back first)
            async def die() -> None:
                os._exit(1)
            ctl._restored_first = die
        ray.get(budget.__ray_call__.remote(die_at_the_next_read_back), timeout=30)
        return keep_left(ray_, budget, *args)

    with start(name=name) as c:
        assert c.name == name
        # B's outbox taken back and sent (before: 2 spent, 6 held), its file removed by the start that took it.
        taken_back(c, 4.0, 4.0)
        assert not kept[0].exists(), kept
        _fill_outbox(c, own_redis, ("c0", "c1"), "late:c")
        monkeypatch.setattr(budget_kept, "keep_left", dies_in_leave)
    try:  # stopped with Redis still paused
        left = c.report()["budget"]["ledger"].get("left_at_stop")
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    monkeypatch.undo()

    with start() as again:
        # Kept by C's restarted controller, taken back and sent: c0's $1.5 and the charge counted once.
        rep = taken_back(again, 6.0, 6.0)
    assert (left["settlements"], left["charges"], left["unsettled_usd"]) == (1, 1, 2.0), (left, rep)
    # Nothing left by a stop with Redis up.
    assert "left_at_stop" not in again.report()["budget"]["ledger"]


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


# The smart policy without reuse: these tests never send a request twice, and no cache actor is started for it.
_NO_REUSE = {"reuse_exact": False, "reuse_in_flight": False, "reuse_near": False}


@pytest.mark.parametrize("ledger", ["redis: up, then away at the stop", "memory"])
def test_a_provider_batch_the_stop_cancels_is_settled_at_its_bound_in_the_ledger(
        ledger, ray_session, request, tmp_path, monkeypatch):
    """A provider batch under way when the engine stops is cancelled, and any member it finished before the cancel
    took effect is billed: its claim is settled at its batch bound (``possibly_billed``), in the ledger or, Redis
    away, in the file kept for the next engine. Before, the budget controller was killed with the other actors and
    the dispatchers cancelled after: the settlement reached no ledger and no file, the claim held its room until
    ``reservation_ttl_s``, then was released with nothing spent. On Redis, two stops on one ledger: Redis up at the
    first, away at the second, whose engine's start reads what the first settled (three starts, not four)."""
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
        params = {"batch_gather_s": 0.0, "min_batch_saving_usd": 0.0, **_NO_REUSE}

        def stopped_under_a_batch(k: int, *, redis_away: bool, before: float = 0.0) -> dict:
            """The k-th engine: its ledger as it starts (``before`` spent, nothing held), a batch of one request
            under way at its stop, cancelled; its stop's report."""
            with Engine.start(settings, catalog=OPENAI_ONLY, speedup=100, policy_params=params,
                              metrics_port=None) as eng:
                if k:  # the last engine's batch, counted at its bound, nothing held
                    (row,) = eng.report()["budget"]["budgets"]
                    assert (row["spent_usd"], row["reserved_usd"]) == (pytest.approx(before, abs=1e-6), 0.0), row
                fut = eng.submit({**line, "id": f"s{k}"})
                end = time.monotonic() + 60.0
                while emu.count("batches.create", "openai", 200) <= k:  # polling the provider, as its client does
                    assert time.monotonic() < end, f"no batch reached the emulator: {emu.counters()}"
                    time.sleep(0.05)
                if redis_away:
                    os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                rep = eng.report()
            finally:
                if redis_away:
                    os.kill(redis.proc.pid, signal.SIGCONT)
            assert fut.result(timeout=5).status == "failed"
            assert emu.count("batches.cancel", "openai", 200) == k + 1
            said = rep["providers"]["openai"]  # and the stop's report says so
            assert (said["possibly_billed"], said["possibly_billed_usd"]) == (1, pytest.approx(bound, abs=1e-6)), said
            return rep

        if ledger == "memory":
            (row,) = stopped_under_a_batch(0, redis_away=False)["budget"]["budgets"]
        else:
            # (each at the same speed: a budget's window is of engine time, the first engine's is window 0 of it)
            stopped_under_a_batch(0, redis_away=False)
            rep = stopped_under_a_batch(1, redis_away=True, before=bound)
            # Kept for the next engine, its spend said.
            left = rep["budget"]["ledger"]["left_at_stop"]
            assert (left["settlements"], left["unsettled_usd"]) == (1, pytest.approx(bound, abs=1e-6)), left
            with Engine.start(settings, catalog=OPENAI_ONLY, speedup=100, policy="naive", metrics_port=None) as again:
                (row,) = again.report()["budget"]["budgets"]
            bound *= 2  # the two batches' bounds
        # Counted at its bound, nothing held (before: $0 spent, the bound reserved until the claim expired).
        assert (row["spent_usd"], row["reserved_usd"]) == (pytest.approx(bound, abs=1e-6), 0.0), row


def _not_dead(handles: list, within_s: float = 30.0) -> list[tuple[str, str]]:
    """The actors of ``handles`` (name, state) that Ray's GCS has not marked DEAD within ``within_s``. ``ray.kill``
    sends the kill to the GCS and returns; the process dies after. A ping sent right after the stop could be
    answered by an actor about to die: a clean-clone rehearsal's "1 of 5 actors still running after the stop"
    (Ray's own race: 1 ping of 75 answered right after ``ray.kill`` on a quiet machine, dead at the next). The
    kill's outcome is the GCS's word, read until every actor is DEAD; the bound is a safety net: an actor the stop
    did not kill stays ALIVE past it, and the test fails naming it."""
    from ray._private import state

    ids = {h._actor_id.hex(): h for h in handles}
    end = time.monotonic() + within_s
    while True:
        rows = {a: state.actors(actor_id=a) for a in ids}
        alive = [(r.get("Name", a), r.get("State", "unknown")) for a, r in rows.items() if r.get("State") != "DEAD"]
        if not alive or time.monotonic() >= end:
            return alive
        time.sleep(0.02)  # (the GCS publishes the death, but to a subscriber of Ray's internals alone)


@pytest.mark.parametrize("at", ["reading the report", "keeping the ledger"])
def test_a_ctrl_c_while_the_stop_reads_its_report_or_keeps_its_ledger_still_kills_every_actor(at, ray_session):
    """A Ctrl-C (a second one, the first drained) while ``stop()`` keeps its report, before ``kill_engine``:
    the stop left there and every actor of the engine ran on (on a cluster, until someone killed them; a
    provider batch under way ran on, billed and never read). Now the actors go all the same, as they do on a
    Ctrl-C inside ``kill_engine`` (its ``finally``). Each actor's death is read from Ray's GCS (``_not_dead``)."""
    from actors.remote import kill_engine
    from engine import Engine
    from engine.core.settings import Settings
    from tests.integration._catalogs import OPENAI_ONLY

    budgets = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),))
    # OpenAI alone, the one provider the test calls, and a policy without reuse: every actor of the engine is
    # still killed, five fewer started (four dispatchers, the cache).
    eng = Engine.start(Settings(budgets=budgets), catalog=OPENAI_ONLY, speedup=100, policy="naive", metrics_port=None)
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
        alive = _not_dead(handles)
        assert alive == [], f"{len(alive)} of {len(handles)} actors still running after the stop: {alive}"
        eng.stop()  # stopped already: returns at once
    finally:
        kill_engine(eng._h["engine"], handles)  # (left running on the code before: not in the next tests' way)
