"""Wires the actor classes to Ray: one hub, budget, cache, ingest, N groupers and one dispatcher per provider.

Every actor takes ``num_cpus=0`` (they are I/O-bound event loops; the machine has 2 cores). A dispatcher is
pinned to nodes that offer the custom resource ``provider:<name>`` when the cluster has one (cluster.yaml),
so a provider's traffic can leave from chosen machines.
"""

from __future__ import annotations

import ray

from actors._peer import ClockRef, Named, publish_clock
from actors.budget import BudgetController
from actors.cache import ResultCache
from actors.dispatcher import Dispatcher
from actors.grouper import Grouper
from actors.hub import ResultHub
from actors.ingest import Ingest
from engine.core.errors import SmartbatchError

__all__ = ["NAMESPACE", "actor_name", "provider_resource", "rewire", "start_actors"]

# Supervised: Ray restarts an actor that dies (its process, not a bug in a method: those are outcomes), with
# its constructor's arguments; ``rewire`` gives it back what was set after construction, and the driver then
# re-admits its unfinished requests. Calls in flight at the death fail rather than run twice.
_OPTS = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": -1, "max_task_retries": 0}
NAMESPACE = "smartbatch"


def actor_name(engine: str, kind: str) -> str:
    """The Ray name of an engine's actor, in namespace ``smartbatch``: ``<engine>.<kind>``, e.g.
    ``prod.dispatcher-openai``, found with ``ray.get_actor(name, namespace="smartbatch")``."""
    return f"{engine}.{kind}"


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


def start_actors(policy, catalog, settings, clock, *, seed: int, num_groupers: int = 1, keys: dict | None = None,
                 engine: str = "engine") -> dict:
    """Create and wire the actors, named ``<engine>.<kind>``; ``clock()`` makes the engine clock once they are
    all up."""
    from engine.runtime.providers import check_fallbacks

    check_fallbacks(catalog, settings.resilience)

    def opts(kind: str, **more) -> dict:
        return {**_OPTS, "name": actor_name(engine, kind), "namespace": NAMESPACE, **more}

    def ref(kind: str) -> Named:  # peers by name: see actors._peer.Named
        return Named(actor_name(engine, kind), NAMESPACE)

    hub = ray.remote(ResultHub).options(**opts("hub")).remote()
    budgets = settings.budgets
    later = ClockRef(engine)  # the clock is made once every actor is up; a restarted actor reads it (publish_clock)
    budget = ray.remote(BudgetController).options(**opts("budget")).remote(budgets, ref("hub"), later, 0.0, engine)
    _ledger_ready(budget, [hub, budget])
    reuse = policy.reuse
    with_cache = reuse.exact or reuse.in_flight or reuse.near
    cache = (ray.remote(ResultCache).options(**opts("cache")).remote(reuse, ref("hub"), later, catalog, settings)
             if with_cache else None)
    cache_ref = ref("cache") if with_cache else None
    grouper_refs = [ref(f"grouper-{k}") for k in range(num_groupers)]
    dispatcher_refs = {name: ref(f"dispatcher-{name}") for name in catalog.providers}
    groupers = [ray.remote(Grouper).options(**opts(f"grouper-{k}")).remote(
        policy, catalog, later, dispatcher_refs, ref("budget"), ref("hub"), f"g{k}", bool(budgets.specs),
        max_attempts=settings.sim.max_attempts, reserve_model_max=budgets.reserve_output == "model_max",
        cache=cache_ref, budget_specs=budgets.specs) for k in range(num_groupers)]
    cluster = ray.cluster_resources()
    dispatchers = {}
    for name in catalog.providers:
        more = {}
        if provider_resource(name) in cluster:
            more["resources"] = {provider_resource(name): 0.001}
        dispatchers[name] = ray.remote(Dispatcher).options(**opts(f"dispatcher-{name}", **more)).remote(
            name, catalog, settings, seed, later, grouper_refs, ref("hub"), cache_ref, ref("budget"),
            policy.scheduling, (keys or {}).get(name), engine)
    ingest = ray.remote(Ingest).options(**opts("ingest")).remote(grouper_refs, cache_ref,
                                                                 settings.cache.share_across_tenants,
                                                                 list(dispatcher_refs.values()), ref("hub"),
                                                                 settings, engine)
    everything = [ingest, *groupers, *dispatchers.values(), budget, hub] + ([cache] if cache else [])
    ray.get([a.warm.remote() for a in everything])
    if cache is not None:
        ray.get(cache.warm_from_redis.remote())  # a restarted engine finds its near duplicates again
    clock = clock()
    ray.get([a.set_clock.remote(clock) for a in [*groupers, *dispatchers.values()] + ([cache] if cache else [])])
    # At real speed, budget windows follow the calendar; a time-compressed replay budgets on trace time.
    real_time = clock.speedup == 1.0 and clock.offset == 0.0
    base = clock.epoch if real_time else 0.0
    ray.get(budget.set_clock.remote(clock, base))
    publish_clock(engine, clock, base)
    named = {"ingest": ingest, "budget": budget, "hub": hub}
    named.update({f"grouper-{k}": g for k, g in enumerate(groupers)})
    named.update({f"dispatcher-{p}": d for p, d in dispatchers.items()})
    if cache is not None:
        named["cache"] = cache
    return {"clock": clock, "ingest": ingest, "groupers": groupers, "dispatchers": dispatchers, "budget": budget, "hub": hub,
            "cache": cache, "all": everything, "named": named, "budget_base": base, "engine": engine}


def rewire(h: dict, kind: str, metrics: tuple[int, str] | None = None) -> None:
    """Give a restarted actor (``kind`` as in ``h["named"]``) what the engine set after construction, and let
    it recover its journaled state: a dispatcher re-attaches to its open batches, the budget controller takes
    its memory ledger back, the hub serves metrics on the same port and has the journal written again."""
    clock = h["clock"]
    if kind == "hub":
        if metrics is not None:
            ray.get(h["hub"].serve_metrics.remote(*metrics))
        ray.get([d.rejournal.remote() for d in h["dispatchers"].values()] + [h["budget"].rejournal.remote()])
    elif kind.startswith("grouper-"):
        ray.get(h["named"][kind].set_clock.remote(clock))
    elif kind.startswith("dispatcher-"):
        d = h["named"][kind]
        ray.get(d.set_clock.remote(clock))
        ray.get(d.recover.remote())
    elif kind == "cache":
        ray.get(h["cache"].set_clock.remote(clock))
        ray.get(h["cache"].warm_from_redis.remote())
    elif kind == "budget":
        ray.get(h["budget"].set_clock.remote(clock, h["budget_base"]))
        ray.get(h["budget"].recover.remote())
