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
    would not."""
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
        cache_ties,
        closest_call,
        closest_cut,
        differences,
        learning_trace,
        parity_catalog,
    )

    reqs = learning_trace()
    # The trace's providers alone (Anthropic): each dispatcher is a process to start, and one that the trace never
    # calls changes no decision (the simulator decides alike with the whole catalog).
    cat = only(*sorted({r.provider for r in reqs}), catalog=parity_catalog())
    settings = with_day_origin(Settings(sim=SimSettings(turnaround_scale=LEARNING_WORLD)), reqs)
    # What the live engine plans with at SPEEDUP / 2: every hedge its own real-time lag earlier (``with_hedge_lag``).
    planned = with_hedge_lag(cat, settings.hedge_lag_s, SPEEDUP / 2)
    sim = simulate(reqs, load_policy("smart", planned, LEARNING), catalog=planned, settings=settings)
    learn = LEARNING["turnaround"]
    assert closest_call(sim) >= MIN_GAP_S and closest_cut(sim, learn["epoch_s"], learn["guard_s"]) >= MIN_GAP_S
    assert cache_ties(sim, cat) == 0
    learned = sim.extra["turnaround"]  # what moved off the catalog: medians overall and by hour of day
    assert {h for _, hours in learned.values() for h in hours} == {23, 0}
    prior = {key: cat.providers[key[0]].batch_api.turnaround_median_s for key in learned}
    assert learned and all(med != prior[key] for key, (med, _) in learned.items())
    # Half the one-node speed: its batch starts come 1.8 s from a learning cut, 180 ms of real time at 10x, and in
    # one clean-clone CI run of stop 34 a live haiku batch went sync where the simulator's was on time.
    with Engine.start(settings, catalog=cat, policy_params=LEARNING, speedup=SPEEDUP / 2, metrics_port=None) as eng:
        assert eng.day_origin_s == reqs.day_origin_s
        live = {r.id: r for r in (f.result(timeout=120) for f in eng.replay(reqs))}
        got = ray_session.get([g.__ray_call__.remote(lambda self: self.table.turnarounds.learned())
                               for g in eng._h["groupers"]])
    assert differences(sim, live) == []
    assert sum(r.cost_usd for r in live.values()) == pytest.approx(sim.total_cost, abs=1e-9)
    # A live batch starts milliseconds after the simulator's: one running at a cut counts as a bound a few
    # milliseconds shorter, which moves a median in the 5th digit.
    for g in got:
        assert g.keys() == learned.keys()
        for key, (med, hours) in learned.items():
            assert g[key][0] == pytest.approx(med, rel=1e-3) and g[key][1] == pytest.approx(hours, rel=1e-3)
