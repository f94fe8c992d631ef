"""A policy hunt's findings (stop 61): cases where ``smart`` met fewer deadlines than naive, each failing on the code
before its fix.

The hedge's lead left time for the waves of ``max_concurrency`` fallback calls, not for the provider's requests and
tokens per minute: at a gate of 30,000 tokens a minute (a low usage tier), three 20k-token requests batched
together fell back at one hedge and two of them started 60 and 120 s later, 44 and 103 s past their deadlines,
where naive, sending each on arrival, met all three."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

from engine.core.catalog import Catalog, RateLimits
from engine.core.request import Request, validation_context
from engine.core.settings import Settings, SimSettings
from engine.sim.simulator import simulate
from policies import load_policy


def gated_catalog(**limits) -> Catalog:
    """The default catalog with no failures, OpenAI's calls of a fixed 2 s and its rate limits overridden."""
    raw = copy.deepcopy(yaml.safe_load((Path(__file__).parents[2] / "engine/data/catalog.yaml").read_text()))
    for p in raw["providers"].values():
        p["failure_rate"] = 0.0
    raw["providers"]["openai"]["rate_limits"].update(limits)
    raw["providers"]["openai"]["sync_latency"] = {"base_s": 2.0, "per_output_token_s": 0.0, "sigma": 0.0}
    return Catalog.model_validate(raw)


def late_where_naive_is_not(cat: Catalog, n: int) -> list[tuple[str, float]]:
    """``n`` gpt-5 requests of 20,500 tokens a second apart, due in 30 minutes, in a world whose batches are 50x
    slower than the catalog says (every batch hedges)."""
    ctx = validation_context(cat)
    reqs = [Request.model_validate({"id": f"q{i}", "arrival_s": float(i), "model": "gpt-5", "input_tokens": 20_000,
                                    "output_tokens": 500, "deadline_s": 1_800.0, "prompt": f"task {i}"}, context=ctx)
            for i in range(n)]
    s = Settings(sim=SimSettings(turnaround_scale=50.0))
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat, settings=s, seed=0)
    # The flex tier off: gpt-5 takes it, where smart would send these at once; the case is the batches' fallbacks.
    smart = simulate(reqs, load_policy("smart", cat, {"flex": False}), catalog=cat, settings=s, seed=0)
    assert naive.met.all()
    assert any(b.outcome == "hedged" for b in smart.batches)  # the fallbacks' case, not a lucky draw
    return [(r.id, round(float(smart.done_at[k] - r.deadline_at), 1)) for k, r in enumerate(smart.requests)
            if not smart.met[k]]


@pytest.mark.parametrize(("limits", "n"), [({"tpm": 30_000}, 3), ({"tpm": 100_000}, 12), ({"rpm": 10}, 12),
                                           ({"rpm": 5}, 30)])
def test_a_hedge_leaves_the_rate_limits_time_to_start_every_fallback(limits, n):
    """Before: tpm 30,000 and 3 requests, 2 late (44, 103 s); tpm 100,000 and 12, 10 late; rpm 10 and 12, 3 late
    (6-35 s); rpm 5 and 30, 28 late."""
    assert late_where_naive_is_not(gated_catalog(**limits), n) == []


def test_the_spread_of_starts_is_the_gates_own_for_equal_calls():
    """``start_spread_s`` (the policy's estimate) against the rate gate (the runtimes' rule), calls sent at once."""
    from engine.core.rates import start_spread_s
    from engine.runtime.ratelimit import RateGate

    rng = random.Random(61)
    for _ in range(500):
        limits = RateLimits(rpm=rng.choice([1, 2, 5, 10, 30, 100, 10_000]), max_concurrency=10**6,
                            tpm=rng.choice([1_000, 30_000, 100_000, 4_000_000]))
        n, tokens = rng.randint(1, 60), rng.choice([10, 500, 5_000, 20_000, 50_000])
        gate, last = RateGate(limits), 0.0
        for _ in range(n):
            last = gate.earliest(0.0, tokens)
            gate.take(last, tokens, 1.0)
        assert start_spread_s(limits, n, n * tokens) == pytest.approx(last), (limits, n, tokens)
