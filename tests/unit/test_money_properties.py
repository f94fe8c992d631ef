"""The money invariants every benchmark figure rests on, as properties over small adversarial traces: every
policy ``smartbatch policies`` lists, with its defaults, through the simulator with one seed, against the lower
bound (docs/lower-bound.md), the cost model (docs/cost-model.md) and bench's capture (engine.app.bench).

The traces are 5-60 requests: text at the four providers (with and without a flex tier, automatic and explicit
caches), hosted image and video, GPU image and video; deadlines at and around the thresholds the policies and
the catalog use (a batch's 60/120 s minimum turnaround, the cache's 300 s TTL, smart's 60 s in-flight margin
and 120 s ride); exact and near duplicates, shared prefix blocks, three tenants, arrivals at one instant,
clustered or spread, some 300 s (one TTL) after a cluster. A third of the examples run in a world whose calls
fail (30 % or 70 % of attempts), so requests fail for good and retries, unserved requests and the bound's
``unserved=`` are covered too.

Not a property, by design: the offline bound below the online one. The online bound is an expectation over
turnaround draws and can fall just below one unlucky seed's offline bound (docs/lower-bound.md, "The online
bound"); a hunt here found it again on 18 requests (offline $3.1250e-06, online $3.0991e-06, one urgent Claude
call due in 60 s). Nor is capture <= 100 % for a policy that misses deadlines: it can be cheaper than any
deadline-respecting schedule (batch-all, docs/benchmarks.md); its relaxed bound is checked instead.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine.app.bench import result_row
from engine.core.catalog import Catalog, default_catalog
from engine.core.cost import MODES, price_alone, price_batch
from engine.core.request import Request
from engine.sim.lower_bound import lower_bound
from engine.sim.results import SimResult
from engine.sim.simulator import simulate
from policies import available_policies, load_policy

CAT = default_catalog()
EPS = 1e-9
MODELS = [("gpt-5-mini", {}), ("gpt-4o-mini", {}), ("claude-sonnet-4-5", {}), ("claude-haiku-4-5", {}),
          ("gemini-2.5-flash", {}), ("imagen-4", {}), ("gpt-image-1", {}),
          ("sora-2-pro", {"params": {"resolution": "1024p"}}), ("flux-1-dev", {}),
          ("wan-2.1-t2v", {"params": {"resolution": "480p", "duration_s": 4}})]
TEXT = ("gpt-", "claude-", "gemini-")
DEADLINES = [5.0, 30.0, 59.0, 60.0, 61.0, 75.0, 119.0, 120.0, 121.0, 135.0, 180.0, 240.0, 299.0, 300.0, 301.0,
             315.0, 420.0, 600.0, 1800.0, 3599.0, 3600.0, 3601.0, 7200.0, 86400.0]
PROMPTS = ["a koi pond", "a koi pond at dusk", "summarise the report", "summarise the report.", "x"]
BLOCKS = [[], [1], [1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]]
SETTINGS = hsettings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _failing(rate: float) -> Catalog:
    return CAT.model_copy(update={"providers": {n: p.model_copy(update={"failure_rate": rate})
                                                for n, p in CAT.providers.items()}})


FAULTY = [_failing(0.3), _failing(0.7)]


@st.composite
def traces(draw) -> list[Request]:
    n = draw(st.integers(5, 60))
    span = draw(st.sampled_from([0.0, 1.0, 30.0, 600.0, 7200.0]))
    centers = draw(st.lists(st.floats(0, span), min_size=1, max_size=3)) if span else [0.0]

    def at() -> float:
        c = draw(st.sampled_from(centers))
        return draw(st.sampled_from([c, c, c + draw(st.floats(0, 5)), draw(st.floats(0, span)), c + 300.0]))

    out: list[dict] = []
    for i in range(n):
        if out and draw(st.integers(0, 4)) == 0:  # an exact duplicate, maybe later, maybe a near one
            d = dict(draw(st.sampled_from(out)), id=f"r{i}")
            if draw(st.booleans()):
                d["arrival_s"] = at()
            if draw(st.booleans()):
                d["prompt"] += "!"
            out.append(d)
            continue
        model, extra = draw(st.sampled_from(MODELS))
        d = {"id": f"r{i}", "arrival_s": at(), "model": model, "tenant": draw(st.sampled_from("abc")),
             "priority": draw(st.sampled_from(["urgent", "normal", "background"])),
             "deadline_s": draw(st.sampled_from(DEADLINES)), "prompt": draw(st.sampled_from(PROMPTS)),
             "reuse": draw(st.sampled_from(["exact", "exact", "near", "none"])), **extra}
        if model.startswith(TEXT):
            d.update(input_tokens=draw(st.integers(1, 9000)), output_tokens=draw(st.integers(0, 800)),
                     prefix_blocks=draw(st.sampled_from(BLOCKS)))
        out.append(d)
    return sorted((Request.model_validate(d) for d in out), key=lambda r: r.arrival_s)


def _check_one_outcome_each(reqs: list[Request], res: SimResult, cat: Catalog) -> None:
    """Every request has exactly one outcome, billed once by the cost model; what is not served bills 0."""
    name = res.policy
    s = res.summary()
    assert s["completed"] + s["failed"] + sum(s["rejected"].values()) == len(reqs), (name, s)
    assert np.isfinite(res.cost).all() and (res.cost >= 0).all(), name
    assert (res.cost[~res.served] == 0).all(), (name, "an unserved request billed")
    ok, reused = res.status == 1, res.status == 2
    assert (res.cost[reused] == 0).all(), (name, "a reused result billed")
    assert (res.batch_of[ok] >= 0).all(), (name, "a result from no dispatch")
    assert np.isfinite(res.done_at[res.served]).all(), name
    assert s["cost_usd"] == round(res.total_cost, 6) and res.total_cost == float(res.cost.sum()), name
    assert abs(sum(s["cost_by_provider"].values()) - res.total_cost) <= 1e-5, name
    size = {b.id: b.size for b in res.batches}
    gpu: dict[int, list[int]] = {}
    for i in np.flatnonzero(ok).tolist():
        r, mode = reqs[i], MODES[res.mode[i]]
        assert res.done_at[i] >= r.arrival_s, (name, r.id)
        if mode == "gpu_batch":
            gpu.setdefault(int(res.batch_of[i]), []).append(i)
            continue
        plain = price_alone(r, cat, mode).total
        n = len(r.prefix_blocks)
        if n == 0 or cat.model(r.provider, r.model).kind != "text":  # nothing to read or write: its list price
            assert abs(res.cost[i] - plain) <= 1e-12, (name, r.id, mode, res.cost[i], plain)
        else:  # between reading all its prefix and writing it all
            lo = min(plain, price_alone(r, cat, mode, warm_blocks=n).total)
            hi = max(plain, price_alone(r, cat, mode, write=True).total)
            assert lo - 1e-12 <= res.cost[i] <= hi + 1e-12, (name, r.id, mode, res.cost[i], lo, hi)
    for bid, members in gpu.items():
        if size[bid] == len(members):  # the whole dispatch ran (none of it went back to the policy)
            want = sum(p.total for p in price_batch([reqs[i] for i in members], cat, "gpu_batch"))
            assert abs(float(res.cost[members].sum()) - want) <= EPS, (name, bid, res.cost[members].sum(), want)


def _check_money(reqs: list[Request], seed: int, cat: Catalog) -> None:
    offline = lower_bound(reqs, catalog=cat, seed=seed).total_usd
    online = lower_bound(reqs, catalog=cat, seed=seed, online=True).total_usd
    runs = {p: simulate(reqs, load_policy(p, cat), catalog=cat, seed=seed) for p in available_policies()}
    naive = runs["naive"]
    assert offline <= naive.total_cost + EPS and online <= naive.total_cost + EPS, (
        offline, online, naive.total_cost)
    for name, res in runs.items():
        assert len(res.requests) == len(reqs) and [r.uid for r in res.requests] == [r.uid for r in reqs], name
        _check_one_outcome_each(reqs, res, cat)
        # A deadline is met by one rule, and never by a result that came after it.
        assert res.met.tolist() == [bool(s) and r.met_by(t) for r, s, t in
                                    zip(reqs, res.served, res.done_at, strict=True)], name
        relaxed = lower_bound(reqs, catalog=cat, seed=seed, relax=~res.met, unserved=~res.served).total_usd
        assert res.total_cost >= relaxed - EPS, (name, res.total_cost, relaxed)
        if res.met.all():
            assert res.total_cost >= offline - EPS, (name, res.total_cost, offline)
        row = result_row(name, name, {}, res, naive, offline, relaxed, online)
        assert row["deadline_met_frac"] == float(res.met.mean()), name
        cap = row["capture_of_achievable"]
        if cap is not None and res.met.all():
            assert -1e-6 <= cap <= 1 + 1e-6, (name, cap, res.total_cost, naive.total_cost, offline)


@hsettings(SETTINGS, max_examples=50)
@given(traces(), st.integers(0, 9))
def test_money_invariants_hold_on_adversarial_traces(reqs, seed):
    _check_money(reqs, seed, CAT)


@hsettings(SETTINGS, max_examples=25)
@given(traces(), st.integers(0, 9), st.sampled_from(FAULTY))
def test_money_invariants_hold_where_calls_fail(reqs, seed, cat):
    _check_money(reqs, seed, cat)


def test_a_gpu_job_whose_every_attempt_fails_still_shares_its_batch_in_the_bound():
    """A hunt's counterexample, shrunk: two flux jobs due in 119 s where 70 % of calls fail; on seed 1 every
    attempt of one fails (billed nothing), but it rode the other's GPU batch, whose share fell to a batch of
    two's: smart paid $0.006969 against a relaxed bound of $0.013164 (a solo dispatch). The bound now counts
    such a job as a batch mate that pays nothing."""
    cat = _failing(0.7)
    reqs = [Request.model_validate({"id": f"f{i}", "arrival_s": 0.0, "model": "flux-1-dev", "prompt": prompt,
                                    "priority": "urgent", "deadline_s": 119.0})
            for i, prompt in enumerate(["a koi pond", "a koi pond!"])]
    res = simulate(reqs, load_policy("smart", cat), catalog=cat, seed=1)
    assert res.status.tolist() == [3, 1] and res.cost[0] == 0  # one failed for good, the other served
    relaxed = lower_bound(reqs, catalog=cat, seed=1, relax=~res.met, unserved=~res.served).total_usd
    assert res.total_cost >= relaxed - EPS, (res.total_cost, relaxed)
    assert lower_bound(reqs, catalog=cat, seed=1).unservable == 1
    _check_money(reqs, 1, cat)
