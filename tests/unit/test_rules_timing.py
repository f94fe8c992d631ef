"""The smart policy's timing rules, stated from the catalog's numbers and checked directly:

* a batch-API batch hedges at ``earliest deadline - sync p99 x drain - hedge_margin_s`` (less the provider's
  ``cancel_s``, 0 for simulated batches), where ``drain`` is the number of waves of ``max_concurrency`` sync
  calls its members need;
* a GPU batch starts no later than ``earliest deadline - p99 run of a full batch - gpu_margin_s``;
* on traces where smart meets every deadline today, it meets every deadline (not "as many as naive").

The p99 of a lognormal latency is its median x exp(z99 x sigma); z99 comes from the normal distribution here,
not from the module under test.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from engine.core.catalog import Catalog, default_catalog
from engine.core.grouping import Group, LaneRates
from engine.core.request import Request
from engine.core.tracegen import synth
from engine.sim.simulator import simulate
from policies import load_policy

from .helpers import kind_trace

CAT = default_catalog()
Z99 = NormalDist().inv_cdf(0.99)


def catalog_with(provider: str, **fields) -> Catalog:
    raw = CAT.model_dump()
    for path, value in fields.items():
        node = raw["providers"][provider]
        *parents, leaf = path.split("__")
        for k in parents:
            node = node[k]
        node[leaf] = value
    return Catalog.model_validate(raw)


# -- hedge time -------------------------------------------------------------------------------------------------

def text_request(i: int, arrival_s: float, deadline_s: float, output_tokens: int) -> Request:
    return Request.model_validate({"id": f"t{i}", "arrival_s": arrival_s, "model": "gpt-5-mini",
                                   "input_tokens": 1500, "output_tokens": output_tokens, "deadline_s": deadline_s})


@pytest.mark.parametrize("cancel_s", [0.0, 600.0])
@pytest.mark.parametrize("margin_s", [0.0, 15.0, 600.0])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_hedge_at_is_the_earliest_deadline_less_the_sync_p99_drain_and_margin(margin_s, n, cancel_s):
    """... and less the time a cancel takes at the provider (``batch_api.cancel_s``: 0 for simulated batches,
    up to 10 minutes for a real one), since the unfinished members are known only once the cancel ends."""
    cat = catalog_with("openai", rate_limits__max_concurrency=2,  # 5 members drain in 3 waves
                       batch_api__cancel_s=cancel_s)
    prov = cat.providers["openai"]
    # The tier off: with it, gpt-5-mini's hedge leaves room for a flex call (tests/unit/test_flex.py).
    policy = load_policy("smart", cat, {"hedge_margin_s": margin_s, "batch_gather_s": 0, "min_batch_saving_usd": 0.0,
                                        "flex": False})
    members = [text_request(k, 100.0 + k, 86_400.0 - 500.0 * k, 40 + 97 * k) for k in range(n)]
    group = Group(("batch", (), 0), prov, prov.models["gpt-5-mini"])
    for r in members:
        group.add(r)
    d = policy.decide(group, members[-1].arrival_s)
    assert (d.action, d.mode, d.take) == ("dispatch", "batch_api", n), d

    lat = prov.sync_latency
    p99 = (lat.base_s + lat.per_output_token_s * max(r.output_tokens for r in members)) * math.exp(Z99 * lat.sigma)
    drain = math.ceil(n / prov.rate_limits.max_concurrency)
    earliest = min(r.deadline_at for r in members)
    assert d.hedge_at == pytest.approx(earliest - p99 * drain - margin_s - cancel_s, abs=1e-6)


@pytest.mark.parametrize("n", [1, 5])
def test_hedge_retry_moves_the_hedge_by_one_more_sync_p99(n):
    """``hedge_retry``: the fallback also has time for a failed attempt of the slowest member and its retry."""
    cat = catalog_with("openai", rate_limits__max_concurrency=2)
    prov = cat.providers["openai"]
    members = [text_request(k, 100.0 + k, 86_400.0 - 500.0 * k, 40 + 97 * k) for k in range(n)]
    hedges = []
    for retry in (False, True):
        group = Group(("batch", (), 0), prov, prov.models["gpt-5-mini"])
        for r in members:
            group.add(r)
        policy = load_policy("smart", cat, {"hedge_retry": retry, "batch_gather_s": 0, "min_batch_saving_usd": 0.0,
                                            "flex": False})
        hedges.append(policy.decide(group, members[-1].arrival_s).hedge_at)
    lat = prov.sync_latency
    p99 = (lat.base_s + lat.per_output_token_s * max(r.output_tokens for r in members)) * math.exp(Z99 * lat.sigma)
    assert hedges[0] - hedges[1] == pytest.approx(p99, abs=1e-6)


def test_the_margin_moves_the_hedge_by_exactly_itself():
    prov = CAT.providers["openai"]
    members = [text_request(k, 0.0, 86_400.0, 300) for k in range(3)]
    hedges = []
    for margin_s in (0.0, 15.0, 100.0):
        group = Group(("batch", (), 0), prov, prov.models["gpt-5-mini"])
        for r in members:
            group.add(r)
        policy = load_policy("smart", CAT, {"hedge_margin_s": margin_s, "batch_gather_s": 0})
        hedges.append(policy.decide(group, 0.0).hedge_at)
    assert hedges[0] - hedges[1] == pytest.approx(15.0) and hedges[0] - hedges[2] == pytest.approx(100.0)


def test_a_time_compressed_engine_hedges_its_own_real_lag_earlier():
    """At speed-up k a live engine plans every batch API's cancel k x ``hedge_lag_s`` longer
    (``with_hedge_lag``), so a hedge comes exactly that much earlier in engine time: at 100x, 0.5 s of real lag
    is 50 engine seconds. No lag, or no speed-up, leaves the catalog as it is."""
    from engine.app.provider_setup import with_hedge_lag

    lagged = with_hedge_lag(CAT, 0.5, 100.0)
    for name, spec in CAT.providers.items():
        got = lagged.providers[name].batch_api
        assert (got is None) == (spec.batch_api is None)
        if got is not None:
            assert got.cancel_s == pytest.approx(spec.batch_api.cancel_s + 50.0)
            assert got.model_dump(exclude={"cancel_s"}) == spec.batch_api.model_dump(exclude={"cancel_s"})
    assert with_hedge_lag(CAT, 0.0, 100.0) is CAT and with_hedge_lag(CAT, 0.5, 0.0) is CAT
    assert with_hedge_lag(lagged, -0.5, 100.0) == CAT  # the world a live run is judged in (``run_live``)
    members = [text_request(k, 0.0, 3600.0, 300) for k in range(3)]
    hedges = []
    for cat in (CAT, lagged):
        prov = cat.providers["openai"]
        group = Group(("batch", (), 0), prov, prov.models["gpt-5-mini"])
        for r in members:
            group.add(r)
        params = {"batch_gather_s": 0, "second_batch": False, "min_batch_saving_usd": 0.0}
        hedges.append(load_policy("smart", cat, params).decide(group, 0.0).hedge_at)
    assert hedges[0] - hedges[1] == pytest.approx(50.0)


# -- GPU latest safe start --------------------------------------------------------------------------------------

LONG_VIDEO = {"model": "wan-2.1-t2v", "prompt": "a storm over the sea, slow dolly shot",
              "params": {"resolution": "720p", "duration_s": 10}}


def gpu_p99_run(cat: Catalog, n: int) -> float:
    """p99 wall seconds of one GPU dispatch of ``n`` long videos: queue hop + warm-up + the batch at its
    speed-up, at the provider's latency spread."""
    prov = cat.providers["modal-h100"]
    spec, gb = prov.models["wan-2.1-t2v"], prov.gpu_batching
    unit = spec.gpu_s_per_video_second["720p"] * LONG_VIDEO["params"]["duration_s"]
    median = prov.sync_latency.base_s + gb.setup_s + n * unit / gb.speedup_at(n)
    return median * math.exp(Z99 * prov.sync_latency.sigma)


def test_the_long_video_run_is_longer_than_the_margin():
    """What makes the GPU tests below meaningful: a sign error in the run cannot hide inside the margin."""
    margin = load_policy("smart", CAT).params.gpu_margin_s
    assert gpu_p99_run(CAT, 1) > 10 * margin


@pytest.mark.parametrize("margin_s", [0.0, 60.0, 900.0])
def test_a_gpu_batch_starts_no_later_than_the_deadline_less_the_p99_run_and_margin(margin_s):
    prov = CAT.providers["modal-h100"]
    policy = load_policy("smart", CAT, {"gpu_margin_s": margin_s})
    full = prov.gpu_batching.max_batch
    r = Request.model_validate({"id": "v0", "arrival_s": 50.0, "deadline_s": 4 * 3600.0, **LONG_VIDEO})
    # A lane whose steady arrivals promise company for the whole gather (value of time holds no job without it).
    rates = LaneRates(tau_s=1e6)
    for t in range(50):
        rates.see(("gpu", ()), float(t))
    group = Group(("gpu", ()), prov, prov.models["wan-2.1-t2v"], rates=rates)
    group.add(r)
    latest = r.deadline_at - gpu_p99_run(CAT, full) - margin_s  # a full batch may form before it starts
    assert latest > r.arrival_s  # (so the policy has something to wait for)
    d = policy.decide(group, r.arrival_s)
    assert d.action == "wait" and d.wake_at is not None
    assert r.arrival_s < d.wake_at <= latest + 1e-6, f"wakes at {d.wake_at:.1f}, latest safe start {latest:.1f}"
    # It gathers for as long as that allows, and goes at the latest safe start with what it has.
    assert d.wake_at == pytest.approx(latest, abs=1e-6)
    assert policy.decide(group, (r.arrival_s + latest) / 2).action == "wait"
    go = policy.decide(group, d.wake_at)
    assert (go.action, go.mode) == ("dispatch", "gpu_batch")


def long_video_trace(n: int = 60, seed: int = 3) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prio = str(rng.choice(["normal", "background"], p=[0.6, 0.4]))
        out.append(Request.model_validate({
            "id": f"v{i}", "arrival_s": float(np.round(rng.uniform(0, 7200), 3)), "priority": prio,
            "deadline_s": 3 * 3600.0 if prio == "normal" else 86_400.0, **LONG_VIDEO,
            "prompt": f"{LONG_VIDEO['prompt']} take {i}"}))
    return sorted(out, key=lambda r: r.arrival_s)


def test_in_the_simulator_every_gpu_batch_starts_by_its_latest_safe_start():
    """No failures (a retried job re-enters later than it arrived), so each batch is one decision: it goes when
    it is full (at its last arrival) or at the latest safe start of its earliest deadline, never later."""
    cat = catalog_with("modal-h100", failure_rate=0.0)
    policy = load_policy("smart", cat)
    reqs = long_video_trace()
    res = simulate(reqs, policy, catalog=cat)
    run_full = gpu_p99_run(cat, cat.providers["modal-h100"].gpu_batching.max_batch)
    gpu = [b for b in res.batches if b.mode == "gpu_batch"]
    assert gpu and sum(b.size for b in gpu) == len(reqs)
    for b in gpu:
        members = [r for r, k in zip(res.requests, res.batch_of) if k == b.id]
        assert len(members) == b.size
        latest = min(r.deadline_at for r in members) - run_full - policy.params.gpu_margin_s
        assert b.t <= max(max(r.arrival_s for r in members), latest) + 1e-6, (b, latest)
    assert res.met.all(), f"missed: {[r.id for r, m in zip(res.requests, res.met) if not m]}"


# -- deadlines --------------------------------------------------------------------------------------------------

TRACES = {
    "text-batch-api-auto-cache x300": lambda: kind_trace("text-batch-api-auto-cache", n=300),
    "text-batch-api-explicit-cache x300": lambda: kind_trace("text-batch-api-explicit-cache", n=300),
    "gpu-video x120": lambda: kind_trace("gpu-video"),
    "gpu-image x120": lambda: kind_trace("gpu-image"),
    "synth(1500, seed=11)": lambda: synth(1500, seed=11),
}


@pytest.mark.parametrize("name", sorted(TRACES))
def test_smart_meets_every_deadline_on_traces_that_leave_room(name):
    """Every request in these traces can be met (each alone, sent at once, finishes well within its deadline),
    so a miss is a timing bug: a hedge or a GPU start too late."""
    res = simulate(TRACES[name](), load_policy("smart", CAT))
    missed = [(r.id, r.priority, round(float(d - r.deadline_at), 1))
              for r, d, m in zip(res.requests, res.done_at, res.met) if not m]
    assert not missed, f"{len(missed)} missed (id, priority, seconds late): {missed[:10]}"
