"""Exact parity: the same trace and seed through the simulator and through the live actors give the same
decisions and the same cost, request by request, on a simulated multi-node cluster with the engine sharded
(two shards each of ingest, the cache, the result hub and the groupers).

Both runtimes share the policy and the kernel (admission, reservation, outcomes), so the only thing that may
tell them apart is time: the live clock runs while messages cross actors. The trace is built so that no
decision hangs on a few engine seconds (the premise below, checked on the simulator's run): arrivals come in
waves 10 s apart, and no batch of a lane is sent, and no source of a duplicate completes, within
``MIN_GAP_S`` of an arrival that could have changed it. At 10x, ``MIN_GAP_S`` is 100 ms of real time, well
above the actors' latency even on a 2-core machine busy with other work (at 20x, with mutation testing
running beside it, a 4.5 s gap before a flush was crossed once in four runs). The simulated cluster, four
raylets on the same 2 cores, runs at 7.5x (``_cluster_run.CLUSTER_SPEEDUP``): at 10x it crossed one once in five CI runs.
The learning trace's premise says too that no decision moves when every batch ends 2 x ``MIN_GAP_S`` later
(``_parity.LateDraws``): a live batch ends as late as it was sent, and what hangs on its end (a prompt prefix it
warms, a group that prefix pulls to sync before its own flush) had no gap of its own checked until stop 78.

The statistical test this replaces allowed 2 % on cost and 5 % on modes. Getting here took aligning two
rules the runtimes had drifted on (``engine.runtime.admission``): a near duplicate's source counts from when
it leads, and the requests of one cache lookup are admitted in arrival order.

Both runtimes count hours of day from the trace's origin (``SimSettings.day_origin_s``), never a live engine's
own start, so the same trace decides alike at whatever hour it is run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Exact parity holds while no decision comes within MIN_GAP_S of an arrival, in real time: scripts/test runs
# these with no other test beside them (the rest of the integration tests share the 2 cores two at a time).
pytestmark = pytest.mark.solo


def test_the_engine_on_a_simulated_cluster_makes_the_simulators_decisions_request_by_request():
    """Head plus one node per provider resource group (ray.cluster_utils, in a process of its own: a process
    holds one Ray connection), two shards of each sharded kind (the hub by request id; ingest, cache and
    groupers by compatibility class). Every dispatcher runs on a node with its provider's resource, the hub shards on
    the head node, every shard does part
    of the work, and every request gets the simulator's mode, cost, deadline outcome and reuse kind, in the same
    batches; the report merged from the hub shards counts every request once. _parity.py checks the trace's
    premise and coverage first."""
    # The wave trace has no start time: 0, midnight, for the live engine as for the simulator (by default a
    # live engine counts hours from the wall clock).
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE)]),
               SMARTBATCH_SIM__DAY_ORIGIN_S="0")
    proc = subprocess.run([sys.executable, str(HERE / "_cluster_run.py"), "2"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 4
    assert all(out["placement_ok"].values()) and len(out["placement_ok"]) == 4, out["placement_ok"]
    # The hub shards, which keep an in-memory journal and the budget ledger's snapshot, on the head node: on a
    # worker beside the dispatchers, one node's loss lost both, and the batches were sent again (a helper's hunt).
    assert out["hubs_on_head"] == [True, True]
    assert out["premise"] is True, out["coverage"]
    assert out["differences"] == []
    assert out["live_cost"] == pytest.approx(out["sim_cost"], abs=1e-9)
    work = out["work"]
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in work.values()), work
    assert sum(work["ingest"]) == sum(work["hub"]) == out["report_requests"]
    assert out["report_spend"] == pytest.approx(out["live_cost"], abs=1e-5)


def test_the_engine_learns_the_simulators_turnaround_hour_by_hour_from_the_traces_time_of_day(ray_session):
    """The cluster run above learns nothing (smart gives the catalog the benefit of the doubt, and the run ends
    within two epochs). Here smart fits plainly, over three epochs of 60 s, the batches of a trace that started
    at 23:59 UTC, in a world 0.3x as slow as the catalog says (some finish, some are cancelled late). The
    simulator and a live engine told the trace's origin make the same decisions, and learn the same medians,
    overall and for hours 23 and 0: a live engine that learned nothing, or counted hours from its own start,
    would not. Each live grouper learned exactly what the batches it was told teach; and what it was told is
    the simulator's batches, each started some milliseconds later: with that lag undone, the simulator's
    medians. (Compared with the simulator's medians as they were, a batch started 60 ms of real time late on
    a loaded machine moved one by 0.14 %, and the test failed on a bound of 0.1 %: stop 76.)"""
    from engine import Engine
    from engine.app.provider_setup import with_hedge_lag
    from engine.core.settings import Settings, SimSettings
    from engine.core.trace import with_day_origin
    from engine.sim.simulator import simulate
    from policies import load_policy
    from tests.integration._catalogs import only
    from tests.integration._parity import (
        LEARNING,
        LEARNING_WORLD,
        MIN_GAP_S,
        SPEEDUP,
        LateDraws,
        cache_ties,
        closest_call,
        closest_cut,
        differences,
        lags_behind,
        learning_trace,
        parity_catalog,
        refit,
        sim_differences,
    )

    reqs = learning_trace()
    # The trace's providers alone (Anthropic): each dispatcher is a process to start, and one that the trace never
    # calls changes no decision (the simulator decides alike with the whole catalog).
    cat = only(*sorted({r.provider for r in reqs}), catalog=parity_catalog())
    settings = with_day_origin(Settings(sim=SimSettings(turnaround_scale=LEARNING_WORLD)), reqs)
    # What the live engine plans with at SPEEDUP / 2: every hedge its own real-time lag earlier (``with_hedge_lag``).
    planned = with_hedge_lag(cat, settings.hedge_lag_s, SPEEDUP / 2)
    policy = load_policy("smart", planned, LEARNING)
    sim = simulate(reqs, policy, catalog=planned, settings=settings)
    learn = policy.turnaround_learning
    assert closest_call(sim) >= MIN_GAP_S and closest_cut(sim, learn.epoch_s, learn.guard_s) >= MIN_GAP_S
    assert cache_ties(sim, cat) == 0
    # No decision hangs on when a batch ends, within twice MIN_GAP_S: a live batch ends as late as it started.
    late = LateDraws(len(reqs), settings.sim.max_attempts, settings.sim.seed, settings.sim.batch_slot_s,
                     2 * MIN_GAP_S)
    assert sim_differences(sim, simulate(reqs, load_policy("smart", planned, LEARNING), catalog=planned,
                                         settings=settings, draws=late)) == []
    learned = sim.extra["turnaround"]  # what moved off the catalog: medians overall and by hour of day
    assert {h for _, hours in learned.values() for h in hours} == {23, 0}
    prior = {key: cat.providers[key[0]].batch_api.turnaround_median_s for key in learned}
    assert learned and all(med != prior[key] for key, (med, _) in learned.items())
    # Half the one-node speed: its batch starts come 1.8 s from a learning cut, 180 ms of real time at 10x, and in
    # one clean-clone CI run of stop 34 a live haiku batch went sync where the simulator's was on time.
    with Engine.start(settings, catalog=cat, policy_params=LEARNING, speedup=SPEEDUP / 2, metrics_port=None) as eng:
        assert eng.day_origin_s == reqs.day_origin_s
        live = {r.id: r for r in (f.result(timeout=120) for f in eng.replay(reqs))}

        def told(grouper):  # (run in the grouper) its epoch, what it learned, and the batches it was told
            est = grouper.table.turnarounds
            return (est._epoch, est.learned(), {k: dict(v) for k, v in est._starts.items()},
                    {k: list(v) for k, v in est._ends.items()})

        got = ray_session.get([g.__ray_call__.remote(told) for g in eng._h["groupers"]])
    assert differences(sim, live) == []
    assert sum(r.cost_usd for r in live.values()) == pytest.approx(sim.total_cost, abs=1e-9)
    for epoch, g, starts, ends in got:
        assert g.keys() == learned.keys()
        # Exactly what the batches it was told teach, by hours of the trace's day, whenever each message came.
        _same_medians(g, refit(planned, learn, reqs.day_origin_s, epoch, starts, ends), rel=1e-12)
        # A live batch starts after the simulator's: milliseconds on a quiet machine, 2.5 engine s for the first
        # one with two busy loops beside it. One running at a cut counts as a bound that much shorter (or, past
        # the cut, not yet). Undone, the simulator's medians (every batch they count ran past the cut). Never
        # before the simulator's decision (5 ms of engine time for a timer's resolution), and told within the
        # guard, the time the estimator gives a start's message to arrive.
        lags = lags_behind(sim, starts, ends, epoch * learn.epoch_s - learn.guard_s)
        assert all(-5e-3 < x < learn.guard_s for by_start in lags.values() for x in by_start.values()), lags
        _same_medians(refit(planned, learn, reqs.day_origin_s, epoch, starts, ends, lags), learned, rel=1e-9)


def _same_medians(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for key, (med, hours) in want.items():
        assert got[key][0] == pytest.approx(med, rel=rel) and got[key][1] == pytest.approx(hours, rel=rel), key
