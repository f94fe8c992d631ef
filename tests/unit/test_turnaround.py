"""Learning the batch turnaround online (engine.runtime.turnaround): the estimator, how both runtimes feed it,
and that it pays in a world whose turnaround is not the catalog's."""

import asyncio
import math
import random

import numpy as np
import pytest

from actors import BudgetController, Dispatcher, Grouper, ResultHub
from actors._types import BatchJob, Job
from engine.core.budgets import BudgetSettings
from engine.core.catalog import default_catalog, load_catalog
from engine.core.clock import ManualClock, ScaledClock
from engine.core.draws import Draws, TurnaroundWorld, engine_day_origin, hour_of_day
from engine.core.errors import ConfigError
from engine.core.request import Request
from engine.core.settings import Settings, SimSettings, TurnaroundLearning, load_settings
from engine.core.trace import TraceRequests, with_day_origin
from engine.core.tracegen import from_azure
from engine.runtime import turnaround as T
from engine.runtime.scheduler import GroupTable
from engine.runtime.turnaround import Turnaround, TurnaroundEstimator, mean_above
from engine.sim.lower_bound import lower_bound
from engine.sim.simulator import simulate
from policies import load_policy
from tests.unit.helpers import Recorder, kind_trace

CAT = default_catalog()
BA = CAT.provider("openai").batch_api  # median 900 s, p95 5400 s
LEARN = TurnaroundLearning()  # epochs of 300 s, guard 60 s
FIT = LEARN.model_copy(update={"doubt_z": 0.0})  # the plain fit, no benefit of the doubt for the catalog


def batch_smart(params: dict | None = None):
    """Smart with the flex tier off: gpt-5-mini takes OpenAI's flex tier, where smart would send these requests
    at once, and the case here is its batches' turnaround."""
    return load_policy("smart", CAT, {"flex": False, **(params or {})})


def lognormal(n, median, seed=0):
    rng = np.random.default_rng(seed)
    t = median * np.exp(BA.turnaround_sigma * rng.standard_normal(n))
    return np.clip(t, BA.turnaround_min_s, BA.completion_window_s)


def told(est, obs, now):
    est.observe(obs)
    est.advance(now)
    return est.median("openai", "gpt-5-mini", now)


def test_the_estimate_converges_to_the_true_median_from_finished_batches():
    obs = [Turnaround("openai", "gpt-5-mini", float(s), float(s + t))
           for s, t in zip(range(0, 24_000, 60), lognormal(400, 2700.0))]
    est = TurnaroundEstimator(CAT, FIT.model_copy(update={"by_hour": False}))
    assert told(est, obs, 40_000.0) == pytest.approx(2700.0, rel=0.1)
    # With the catalog given the benefit of the doubt, most of the way there.
    assert 0.75 * 2700 < told(TurnaroundEstimator(CAT, LEARN), obs, 40_000.0) < 2700
    # With nothing told, the catalog's.
    assert TurnaroundEstimator(CAT, LEARN).median("openai", "gpt-5-mini", 0.0) == BA.turnaround_median_s


def test_a_cancelled_late_batch_raises_the_estimate_and_completions_alone_would_be_biased_fast():
    """A 3x slow world hedged at 1,000 s: only the fast batches finish. Counted as censored, the late ones put
    the estimate near the truth; dropped, the estimate stays near the fast ones (and below the catalog's)."""
    cfg = FIT.model_copy(update={"by_hour": False})
    starts = np.arange(0, 40_000, 100.0)
    ts = lognormal(starts.size, 2700.0, seed=1)
    both, done_only = TurnaroundEstimator(CAT, cfg), TurnaroundEstimator(CAT, cfg)
    obs = [Turnaround("openai", "gpt-5-mini", s, s + min(t, 1000.0), t > 1000.0) for s, t in zip(starts, ts)]
    end = 45_000.0
    with_censored = told(both, obs, end)
    finished = told(done_only, [o for o in obs if not o.censored], end)
    assert finished < 800 < 2000 < with_censored < 3600
    # A batch still running at the cut counts too: it has run that long.
    running = TurnaroundEstimator(CAT, cfg)
    assert told(running, [Turnaround("openai", "gpt-5-mini", 0.0)], 3 * 3600.0) > BA.turnaround_median_s
    # A bound under the catalog's floor says nothing.
    floor = TurnaroundEstimator(CAT, cfg)
    assert told(floor, [Turnaround("openai", "gpt-5-mini", 0.0, 60.0, True)], 900.0) == BA.turnaround_median_s


def test_mean_above_is_the_truncated_normal_mean():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(400_000) * 1.5 + 2.0
    for a in (0.0, 2.0, 5.0):
        assert mean_above(2.0, 1.5, a) == pytest.approx(x[x > a].mean(), abs=0.02)
    assert mean_above(0.0, 1.0, 80.0) > 80.0  # far in the tail: finite, above the bound


def test_a_right_catalog_stays_exactly_as_it_is_and_a_wrong_one_moves():
    for true, lo, hi in ((900.0, 900.0, 900.0), (2700.0, 1800.0, 2700.0), (300.0, 300.0, 500.0)):
        est = TurnaroundEstimator(CAT, LEARN)
        obs = [Turnaround("openai", "gpt-5-mini", float(s), float(s + t))
               for s, t in zip(range(0, 7200, 60), lognormal(120, true, seed=11))]
        assert lo <= told(est, obs, 7200 + 3 * 3600.0) <= hi
        prov = CAT.provider("openai")
        assert (est.provider(prov, "gpt-5-mini", 7200 + 3 * 3600.0) is prov) == (true == 900.0)


def test_an_observation_counts_only_from_the_first_epoch_past_its_end_plus_the_guard():
    est = TurnaroundEstimator(CAT, FIT)
    o = Turnaround("openai", "gpt-5-mini", 0.0, 3000.0)  # ended at 3,000: counts from the epoch at 3,300
    assert told(est, [o], 3299.0) != told(TurnaroundEstimator(CAT, FIT), [o], 3300.0)
    # Before that, exactly as if it ran still (which is what a grouper that has not heard of it yet knows).
    live = TurnaroundEstimator(CAT, FIT)
    assert told(live, [o._replace(end=None)], 3299.0) == told(TurnaroundEstimator(CAT, FIT), [o], 3299.0)
    # Between epochs, a batch started after the cut changes nothing in force ...
    est2 = TurnaroundEstimator(CAT, FIT)
    before = told(est2, [], 3300.0)  # the epoch's first decision
    assert told(est2, [Turnaround("openai", "gpt-5-mini", 3250.0, 3260.0)], 3599.0) == before
    # ... but one its cut covers, told late (a poll, a busy grouper), counts from the next decision on: the
    # estimate then is the one told in time (the simulator's), not the catalog's for the rest of the epoch.
    early = Turnaround("openai", "gpt-5-mini", 3000.0, 3100.0)
    late = told(est2, [early], 3599.0)
    assert late != before
    assert late == told(TurnaroundEstimator(CAT, FIT), [early, Turnaround("openai", "gpt-5-mini", 3250.0, 3260.0)],
                        3300.0)


def test_the_estimate_does_not_depend_on_the_order_or_the_messages_it_was_told_in():
    """The simulator tells each batch once, ended, when it starts; a live grouper is told its start, then its
    end, by several dispatchers in any order. Same batches, same estimate at every epoch, to the last bit."""
    rng = random.Random(5)
    batches = [Turnaround(p, m, s, s + t, t > 1500.0) for p, m in (("openai", "gpt-5-mini"), ("anthropic",
               "claude-haiku-4-5")) for s, t in zip(np.arange(0, 20_000, 37.0), lognormal(541, 1500.0, seed=7))]
    sim, live = TurnaroundEstimator(CAT, LEARN), TurnaroundEstimator(CAT, LEARN)
    messages = [(b.start, [b._replace(end=None, censored=False)]) for b in batches] + [(b.end, [b]) for b in batches]
    sim.observe(batches)
    for epoch in range(1, 80):
        now = epoch * LEARN.epoch_s
        due = [m for m in messages if m[0] <= now - LEARN.guard_s]
        rng.shuffle(due)
        for _, part in due:
            live.observe(part)
        messages = [m for m in messages if m[0] > now - LEARN.guard_s]
        for est in (sim, live):
            est.advance(now + 1.0)
        for p, m in (("openai", "gpt-5-mini"), ("anthropic", "claude-haiku-4-5")):
            assert sim.batch_api(p, m, now + 1.0) == live.batch_api(p, m, now + 1.0)


def test_a_late_timer_decides_with_the_estimate_of_the_time_it_was_set_for():
    est = TurnaroundEstimator(CAT, FIT)
    est.observe([Turnaround("openai", "gpt-5-mini", 0.0, 2000.0)])
    est.advance(2700.0)
    old = est.median("openai", "gpt-5-mini", 2700.0)
    est.advance(3000.0)  # another decision moved to the next epoch first
    assert est.median("openai", "gpt-5-mini", 2999.0) == old != est.median("openai", "gpt-5-mini", 3000.0)


def test_memory_stays_bounded_however_many_batches_it_is_told():
    est = TurnaroundEstimator(CAT, LEARN)
    for day in range(4):
        est.observe([Turnaround("openai", "gpt-5-mini", day * 86400.0 + s, day * 86400.0 + s + 600.0)
                     for s in np.arange(0, 86400.0, 10.0)])
        est.advance((day + 1) * 86400.0)
        # The latest MAX_BATCHES started by the cut, and those started since (one every 10 s of the guard)
        assert est.batches <= T.MAX_BATCHES + LEARN.guard_s / 10 + 1


def test_the_policy_reads_the_learned_turnaround_and_a_setting_turns_it_off():
    on, off = (GroupTable(batch_smart(p), CAT) for p in ({}, {"turnaround": {"enabled": False}}))
    assert on.turnarounds is not None and off.turnarounds is None
    assert GroupTable(load_policy("naive", CAT), CAT).turnarounds is None  # it reads no turnaround
    # Urgent text that the catalog's turnaround gives a fair chance rides a batch; learned 10x slower, not.
    on.observe([Turnaround("openai", "gpt-5-mini", s, s + 9000.0) for s in range(0, 3000, 30)])
    r = Request.model_validate({"id": "a", "model": "gpt-5-mini", "arrival_s": 20_000.0, "deadline_s": 300.0,
                                "input_tokens": 2000, "output_tokens": 50})
    keys = [t.policy.group_key(r, (), 20_000.0, provider=t._view(r, 20_000.0))[0] for t in (on, off)]
    assert keys == ["sync", "batch"]


def test_the_world_can_differ_from_the_catalog_and_the_bound_follows_it():
    d = Draws(0, 4, 0, 60.0)
    base = [d.turnaround("openai", BA, t) for t in range(0, 36_000, 600)]
    slow = [d.turnaround("openai", BA, t, TurnaroundWorld(3.0)) for t in range(0, 36_000, 600)]
    assert all(s == pytest.approx(min(max(3 * b, BA.turnaround_min_s), 86400)) or b == BA.turnaround_min_s
               for b, s in zip(base, slow))
    day = TurnaroundWorld(1.0, tuple([1.0] * 12 + [4.0] * 12))
    assert day.factor(11 * 3600.0) == 1.0 and day.factor(12 * 3600.0) == 4.0 == day.factor(36 * 3600.0)
    arr = d.slot_turnarounds("openai", BA, 36_000.0, TurnaroundWorld(3.0))
    assert arr[10] == d.turnaround("openai", BA, 600.0, TurnaroundWorld(3.0))
    with pytest.raises(ConfigError, match="24 multipliers"):
        load_settings(sim={"turnaround_scale_by_hour": [1.0, 2.0]})


def _slow_world_run(learn: bool):
    reqs = [r for k in ("text-batch-api-auto-cache", "text-batch-api-explicit-cache")
            for r in kind_trace(k, n=900, seed=4, span_s=3 * 3600.0)]
    reqs.sort(key=lambda r: r.arrival_s)
    settings = Settings(sim=SimSettings(turnaround_scale=3.0))
    pol = batch_smart({"turnaround": {"enabled": learn}})
    return simulate(reqs, pol, catalog=CAT, settings=settings, seed=0)


def test_in_a_3x_slow_world_learning_meets_at_least_as_many_deadlines_and_waits_less_in_vain():
    on, off = _slow_world_run(True), _slow_world_run(False)
    assert on.met.sum() >= off.met.sum()
    hedged = [sum(b.outcome == "hedged" for b in r.batches) for r in (on, off)]
    assert hedged[0] < hedged[1]  # fewer batches tried that the slow world cannot finish in time


def _job(i, model="gpt-5-mini"):
    r = Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": model, "input_tokens": 100 + i,
                                "output_tokens": 10})
    return Job(i, r, f"fp{i}")


@pytest.mark.parametrize("told_by", ["run_many", "constructor"])
def test_the_dispatcher_tells_every_grouper_of_its_batches_once_a_grouper_learns(told_by):
    """``constructor``: as the engine builds it, and as Ray restarts it, so batches a restarted dispatcher
    re-attaches (their starts told by its previous incarnation) are told when they end."""
    async def go():
        clock = ManualClock(0.0)
        g0, g1, hub = Recorder(), Recorder(), ResultHub()
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [g0, g1], hub, None, Recorder(),
                       learners=told_by == "constructor")
        await d.run_many([BatchJob("b1", "batch_api", None, False, "x", "y", [_job(1), _job(2)]),
                          BatchJob("b2", "batch_api", 30.0, False, "x", "y", [_job(3)])],
                         *((True,) if told_by == "run_many" else ()))
        for _ in range(20):
            clock.advance(10_000.0)
            await asyncio.sleep(0.01)
        told = [[o for name, (obs, *_) in g.calls if name == "observe_turnarounds" for o in obs] for g in (g0, g1)]
        assert told[0] == told[1]
        started = [o for o in told[0] if o.end is None]
        ended = {o.censored: o for o in told[0] if o.end is not None}
        assert len(started) == 2 and set(ended) == {False, True}
        # The finished batch tells when the draws ended it; the hedged one, its hedge time: as the simulator.
        sim = Draws(0, 4, 0, 60.0)
        assert ended[False].end - ended[False].start == pytest.approx(sim.turnaround("openai", BA, 0.0))
        assert ended[True].end == 30.0
    asyncio.run(go())


def test_the_grouper_asks_for_turnarounds_and_learns_from_what_it_is_told():
    async def go():
        disp = Recorder()
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        g = Grouper(load_policy("smart", CAT), CAT, ManualClock(0.0), {"openai": disp}, budget, ResultHub())
        await g.observe_turnarounds([Turnaround("openai", "gpt-5-mini", s, s + 150.0) for s in range(0, 300, 10)])
        assert g.table.turnarounds.batches == 30
        g.table.turnarounds.advance(600.0)
        assert g.table.turnarounds.median("openai", "gpt-5-mini", 600.0) < BA.turnaround_median_s
        await g.add([_job(0)._replace(req=_job(0).req.model_copy(update={"deadline_s": 60.0}))])
        await asyncio.sleep(0.01)
        (name, (batches, learns)), = [c for c in disp.calls if c[0] == "run_many"]
        assert learns is True
    asyncio.run(go())


def test_turnaround_learning_settings_are_checked():
    with pytest.raises(ConfigError, match="turnaround"):
        load_policy("smart", CAT, {"turnaround": {"epoch_s": 0}})
    assert math.isclose(LEARN.epoch_s, 300.0)


def test_a_restarted_grouper_learns_again_what_the_dispatchers_told_it_each_batch_once():
    """Ray rebuilds a grouper empty; ``relearn`` (called by ``rewire``) takes the dispatchers' kept messages. A
    message that comes before or while they answer is counted once, not twice."""
    msgs = [(k, [Turnaround("openai", "gpt-5-mini", float(s), float(s) + 2400.0) for s in range(100 * k, 100 * k + 50, 10)])
            for k in range(1, 7)]

    class _Dispatcher:
        def __init__(self, grouper=None):
            self.grouper = grouper

        async def turnarounds_told(self):
            if self.grouper is not None:  # message 6 arrives while the dispatcher answers
                await self.grouper.observe_turnarounds(msgs[5][1], "openai", 6)
            return msgs

    def grouper(disp):
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        return Grouper(load_policy("smart", CAT), CAT, ManualClock(0.0), {"openai": disp}, budget, ResultHub())

    async def go():
        steady = grouper(Recorder())  # never restarted: told every message once
        for seq, obs in msgs:
            await steady.observe_turnarounds(obs, "openai", seq)
        await steady.observe_turnarounds(msgs[2][1], "openai", 3)  # a repeat is skipped
        disp = _Dispatcher()
        again = grouper(disp)  # restarted: message 5 came before the relearn, 6 during it
        disp.grouper = again
        await again.observe_turnarounds(msgs[4][1], "openai", 5)
        # Two drivers rewire it at once: one relearn, which both wait for (two at once failed, or learned twice)
        assert await asyncio.gather(again.relearn(), again.relearn()) == [5, 5]  # messages 1-5 from the kept
        # ones (5 again: the estimate is fresh), 6 as it came
        await again.observe_turnarounds(msgs[5][1], "openai", 6)  # a late copy: skipped
        a, b = steady.table.turnarounds, again.table.turnarounds
        assert a.batches == b.batches == 30
        a.advance(3600.0)
        b.advance(3600.0)
        assert a.median("openai", "gpt-5-mini", 3600.0) == b.median("openai", "gpt-5-mini", 3600.0) \
            > BA.turnaround_median_s
    asyncio.run(go())


# -- hour of day: from the time of day at engine time 0 (day_origin_s) ------------------------------------------

def test_an_observation_counts_in_the_hour_of_day_its_engine_time_falls_in_from_the_day_origin():
    """Engine time 0 at 23:30 UTC: a batch started at engine time t is filed under hour (o + t) // 3600 % 24, so
    batches of the first half hour (23:30-00:00, slow) and of the second (00:00-00:30, quick) learn two hours."""
    origin = 23.5 * 3600.0
    slow = [Turnaround("openai", "gpt-5-mini", float(s), s + 9000.0) for s in range(0, 1800, 30)]
    quick = [Turnaround("openai", "gpt-5-mini", float(s), s + 300.0) for s in range(1800, 3600, 30)]
    est = TurnaroundEstimator(CAT, FIT, day_origin_s=origin)
    est.observe(slow + quick)
    est.advance(20_000.0)
    at = lambda t: est.median("openai", "gpt-5-mini", t)  # noqa: E731
    assert at(1000.0) > 3 * at(2000.0)  # 23:46 learned slow, 00:03 quick
    assert at(1000.0 + 86400.0) == at(1000.0) and at(2000.0 + 86400.0) == at(2000.0)  # the same hours a day on
    assert set(est.learned()[("openai", "gpt-5-mini")][1]) == {23, 0}
    # Counted from engine time 0 instead (the old rule), both halves fall in hour 0: one estimate for both.
    plain = TurnaroundEstimator(CAT, FIT)
    plain.observe(slow + quick)
    plain.advance(20_000.0)
    assert plain.median("openai", "gpt-5-mini", 1000.0) == plain.median("openai", "gpt-5-mini", 2000.0)
    assert hour_of_day(np.array([1000.0, 2000.0]), origin).tolist() == [23, 0] == \
        [hour_of_day(1000.0, origin), hour_of_day(2000.0, origin)]


def test_a_trace_built_from_the_azure_csv_keeps_the_time_of_day_it_started(tmp_path):
    p = tmp_path / "azure.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                 "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 19:02:00.0000000,100,10\n")
    reqs = from_azure(p)
    assert [r.arrival_s for r in reqs] == [0.0, 4.314579, 2773.319410]  # arrivals still start at 0
    assert reqs.day_origin_s == 18 * 3600 + 15 * 60 + 46.68059
    # The run takes it, unless a setting says otherwise; a trace without a start time stays at midnight.
    assert with_day_origin(Settings(), reqs).sim.day_origin_s == reqs.day_origin_s
    assert with_day_origin(Settings(sim=SimSettings(day_origin_s=60.0)), reqs).sim.day_origin_s == 60.0
    assert with_day_origin(Settings(), list(reqs)).sim.day_origin_s == 0.0


def test_the_worlds_turnaround_by_hour_counts_from_the_traces_day_origin_in_the_simulator_and_the_bound(tmp_path):
    """Batches 30x as slow from noon to midnight: none finishes within half an hour. A trace that started at
    noon (as its Azure timestamps say) meets the slow hours from its first batch on, in the simulator and in
    the lower bound alike; the same requests without a start time meet the quick ones. (OpenAI's flex tier is
    left out of the catalog: with it, smart and the bound send gpt-5-mini at batch prices with no batch, and the
    hour a batch would have met changes nothing.)"""
    overlay = tmp_path / "no_flex.yaml"
    overlay.write_text("providers:\n  openai:\n    flex: null\n")
    cat = load_catalog(None, overlay)
    day = tuple([1.0] * 12 + [30.0] * 12)
    world = TurnaroundWorld.of(SimSettings(turnaround_scale_by_hour=day, day_origin_s=12 * 3600.0))
    assert world.factor(0.0) == 30.0 and world.factor(12 * 3600.0) == 1.0
    assert world.factors(np.array([0.0, 12 * 3600.0])).tolist() == [30.0, 1.0]
    reqs = [r.model_copy(update={"deadline_s": 1800.0}) for r in kind_trace("text-batch-api-auto-cache", n=120)]
    noon = TraceRequests(reqs, day_origin_s=12 * 3600.0)
    settings = Settings(sim=SimSettings(turnaround_scale_by_hour=day))
    told = settings.model_copy(update={"sim": settings.sim.model_copy(update={"day_origin_s": 12 * 3600.0})})
    pol = {"turnaround": {"enabled": False}}
    runs = [simulate(r, load_policy("smart", cat, pol), catalog=cat, settings=s, seed=0)
            for r, s in ((noon, settings), (reqs, told), (reqs, settings))]
    hedged = [sum(b.outcome == "hedged" for b in r.batches) for r in runs]
    assert runs[0].total_cost == runs[1].total_cost and hedged[0] == hedged[1] > hedged[2]
    bounds = [lower_bound(r, catalog=cat, settings=s).total_usd for r, s in ((noon, settings), (reqs, told),
                                                                            (reqs, settings))]
    assert bounds[0] == bounds[1] > bounds[2]
    # The simulator's learned estimate files those batches under the afternoon's hours too.
    learned = simulate(noon, load_policy("smart", cat, {"turnaround": {"doubt_z": 0.0}}), catalog=cat,
                       settings=settings, seed=0).extra["turnaround"]
    hours = {h for _, by_hour in learned.values() for h in by_hour}
    assert hours and hours <= set(range(12, 24))


def test_a_live_engine_counts_hours_from_its_clocks_start_in_every_grouper_and_dispatcher_restarted_or_not(
        monkeypatch):
    """Unset, the origin is the UTC time of day when the engine clock reads 0: a function of the clock, so a
    grouper built before the clock (set_clock), one Ray restarts hours later (it reads the published clock) and
    the dispatchers' simulated world all count from the same. A replayed trace's origin, when set, wins."""
    import time

    epoch = 1_700_158_546.68059  # 2023-11-16 18:15:46.68059 UTC
    clock = ScaledClock(epoch, speedup=10.0, offset=50.0)  # reads 0 five real seconds before its epoch
    want = (epoch - 5.0) % 86400.0
    settings = Settings(sim=SimSettings(turnaround_scale_by_hour=tuple(range(1, 25))))

    def grouper(clk, origin=None):
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        return Grouper(load_policy("smart", CAT), CAT, clk, {}, budget, ResultHub(), day_origin_s=origin)

    async def go():
        first = grouper(None)  # built before the engine made its clock
        await first.set_clock(clock)
        monkeypatch.setattr(time, "time", lambda: epoch + 7 * 3600.0)  # restarted seven hours on
        again = grouper(clock)
        await again.set_clock(clock)  # rewire
        d = Dispatcher("openai", CAT, settings, 0, clock, [], ResultHub(), None, Recorder())
        return first, again, d

    first, again, d = asyncio.run(go())
    assert first.table.turnarounds.day_origin_s == again.table.turnarounds.day_origin_s == pytest.approx(want)
    assert d.sim.world.day_origin_s == first.table.turnarounds.day_origin_s
    assert engine_day_origin(None, clock) == first.table.turnarounds.day_origin_s
    assert grouper(clock, 3600.0).table.turnarounds.day_origin_s == 3600.0  # a replay's
    assert engine_day_origin(None, ManualClock(5.0)) == 0.0


def test_a_restarted_grouper_learns_from_the_dispatchers_that_answer_when_one_cannot(monkeypatch):
    """A dispatcher Ray cannot restart (its node lost) held a restarted grouper's relearn, and with it the
    driver's whole recovery (a helper's hunt on a cluster). The grouper learns from the others and goes on."""
    import actors._grouper_learn as learn

    told = [(1, [Turnaround("openai", "gpt-5-mini", float(s), float(s) + 2400.0) for s in range(0, 50, 10)])]

    class _Answers:
        async def turnarounds_told(self):
            return told

    class _Gone:
        async def turnarounds_told(self):
            raise ConnectionError("the actor is unavailable: restarting")

    class _Silent:
        async def turnarounds_told(self):
            await asyncio.Event().wait()  # never answers

    async def go():
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        g = Grouper(load_policy("smart", CAT), CAT, ManualClock(0.0),
                    {"anthropic": _Gone(), "google": _Silent(), "openai": _Answers()}, budget, ResultHub())
        return await g.relearn(), g.table.turnarounds.batches

    monkeypatch.setattr(learn, "RELEARN_WAIT_S", 0.05)
    assert asyncio.run(go()) == (1, 5)
