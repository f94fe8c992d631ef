"""A live engine (local Ray) whose budget ledger, cache and journal are on a real local Redis Cluster: refused at
start without ``redis_cluster``, and with it every dollar the results cost counted once in the shared ledger. The
same engine through a failover of its ledger's master is in test_redis_cluster_failover.py, on that module's cluster
with replicas (one such cluster for both: six redis-servers and their joining fewer)."""

import random

import pytest

from engine.core.budgets import BudgetSettings, BudgetSpec
from engine.core.errors import ConfigError
from tests.integration._catalogs import OPENAI_ONLY

SPEEDUP = 100.0


def _workload(n: int = 60):
    from engine.core.request import Request

    rng = random.Random(5)
    return [Request.model_validate({
        "id": f"c{k}", "arrival_s": round(120.0 * k / n, 3), "tenant": rng.choice(["acme", "globex"]),
        "model": rng.choice(["gpt-4o-mini", "gpt-5-mini"]), "prompt": f"Summarise report number {k % 20}.",
        "output_tokens": 200, "max_output_tokens": 300, "deadline_s": 900.0}) for k in range(n)]


def _limit(reqs) -> float:
    """Half what the naive policy pays for ``reqs``: a budget that binds."""
    from engine.core.catalog import default_catalog
    from engine.sim.simulator import simulate
    from policies import load_policy

    cat = default_catalog()
    return simulate(reqs, load_policy("naive", cat), catalog=cat).total_cost / 2


def _settings(cluster, tmp_path, prefix: str, on: bool, limit: float = 1.0):
    from engine.core.settings import CacheSettings, Settings

    b = BudgetSettings(specs=(BudgetSpec(max_budget=limit),), redis_url=cluster.url, redis_prefix=prefix,
                       redis_cluster=on, reserve_output="request")
    cache = CacheSettings(redis_url=cluster.urls[1], redis_prefix=f"{prefix}-cache", redis_cluster=on,
                          blob_dir=tmp_path / "blobs")
    return Settings(budgets=b, cache=cache)


def test_an_engine_on_a_cluster_counts_every_result_once_and_is_refused_without_the_setting(ray_session,
                                                                                            redis_cluster, tmp_path):
    from engine import Engine

    with pytest.raises(ConfigError, match=r"budgets\.redis_cluster.*SMARTBATCH_BUDGETS__REDIS_CLUSTER=true"):
        Engine.start(_settings(redis_cluster, tmp_path, "sbtest-cl-eng0", False), catalog=OPENAI_ONLY,
                     speedup=SPEEDUP, metrics_port=None)
    reqs = _workload()
    limit = _limit(reqs)
    with Engine.start(_settings(redis_cluster, tmp_path, "sbtest-cl-eng1", True, limit), catalog=OPENAI_ONLY,
                      policy="cache-only", speedup=SPEEDUP, metrics_port=None) as eng:
        results = [f.result(timeout=120) for f in eng.replay(reqs)]
        rep = eng.report()
    cost = sum(r.cost_usd for r in results)
    window = rep["budget"]["budgets"][0]
    assert {r.status for r in results} >= {"ok", "reused"}  # the cache served repeats through the cluster
    assert any(r.error == "budget_exhausted" for r in results)  # the budget bound
    assert window["spent_usd"] == pytest.approx(cost, abs=1e-6) and cost <= limit + 1e-9
    assert window["reserved_usd"] == pytest.approx(0.0, abs=1e-9)
    led = rep["budget"]["ledger"]
    assert led["up"] and led["unsettled"] == 0 and led["rejected_settlements"] == 0 and led["lost_records"] == 0
    assert rep["cache"]["redis_up"] == 1 and not rep["cache"].get("redis_errors")
