"""Wires the actor classes to Ray: one hub, budget, cache, ingest, N groupers and one dispatcher per provider.

Every actor takes ``num_cpus=0`` (they are I/O-bound event loops; the machine has 2 cores). A dispatcher is
pinned to nodes that offer the custom resource ``provider:<name>`` when the cluster has one (cluster.yaml),
so a provider's traffic can leave from chosen machines.
"""

from __future__ import annotations

import ray

from actors.budget import BudgetController
from actors.cache import ResultCache
from actors.dispatcher import Dispatcher
from actors.grouper import Grouper
from actors.hub import ResultHub
from actors.ingest import Ingest
from engine.errors import SmartbatchError

__all__ = ["provider_resource", "start_actors"]

_OPTS = {"num_cpus": 0, "max_concurrency": 1000}


def provider_resource(provider: str) -> str:
    return f"provider:{provider}"


def _ledger_ready(budget, started: list) -> None:
    """Wait for the budget ledger to answer (a budget on a Redis that does not answer cannot be enforced).
    On failure, stop the actors started so far and raise the actor's own error (a ``ConfigError`` naming
    ``budgets.redis_url``), not Ray's wrapper of it."""
    try:
        ray.get(budget.check_ledger.remote())
    except Exception as exc:
        for h in started:
            ray.kill(h)
        cause = getattr(exc, "cause", None)  # RayTaskError carries the actor's exception
        if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, SmartbatchError):
            raise cause from None
        raise


def start_actors(policy, catalog, settings, clock, *, seed: int, num_groupers: int = 1, keys: dict | None = None) -> dict:
    """Create and wire the actors; ``clock()`` makes the engine clock once they are all up."""
    from engine.providers import check_fallbacks

    check_fallbacks(catalog, settings.resilience)
    hub = ray.remote(ResultHub).options(**_OPTS).remote()
    budgets = settings.budgets
    budget = ray.remote(BudgetController).options(**_OPTS).remote(budgets, hub)
    _ledger_ready(budget, [hub, budget])
    reuse = policy.reuse
    cache = (ray.remote(ResultCache).options(**_OPTS).remote(reuse, hub, None, catalog, settings)
             if (reuse.exact or reuse.in_flight or reuse.near) else None)
    groupers = [ray.remote(Grouper).options(**_OPTS).remote(
        policy, catalog, None, {}, budget, hub, f"g{k}", bool(budgets.specs), max_attempts=settings.sim.max_attempts,
        reserve_model_max=budgets.reserve_output == "model_max", cache=cache, budget_specs=budgets.specs)
        for k in range(num_groupers)]
    cluster = ray.cluster_resources()
    dispatchers = {}
    for name in catalog.providers:
        opts = dict(_OPTS)
        if provider_resource(name) in cluster:
            opts["resources"] = {provider_resource(name): 0.001}
        dispatchers[name] = ray.remote(Dispatcher).options(**opts).remote(
            name, catalog, settings, seed, None, groupers, hub, cache, budget, policy.scheduling,
            (keys or {}).get(name))
    ray.get([g.set_dispatchers.remote(dispatchers) for g in groupers])
    ingest = ray.remote(Ingest).options(**_OPTS).remote(groupers, cache, settings.cache.share_across_tenants)
    everything = [ingest, *groupers, *dispatchers.values(), budget, hub] + ([cache] if cache else [])
    ray.get([a.warm.remote() for a in everything])
    if cache is not None:
        ray.get(cache.warm_from_redis.remote())  # a restarted engine finds its near duplicates again
    clock = clock()
    ray.get([a.set_clock.remote(clock) for a in [*groupers, *dispatchers.values()] + ([cache] if cache else [])])
    # At real speed, budget windows follow the calendar; a time-compressed replay budgets on trace time.
    real_time = clock.speedup == 1.0 and clock.offset == 0.0
    ray.get(budget.set_clock.remote(clock, clock.epoch if real_time else 0.0))
    return {"clock": clock, "ingest": ingest, "groupers": groupers, "dispatchers": dispatchers, "budget": budget, "hub": hub,
            "cache": cache, "all": everything}
