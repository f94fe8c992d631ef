"""Wires the actor classes to Ray: a budget controller, N groupers, one dispatcher per provider, and S shards each
of ingest, the cache and the result hub (``actors._shards``: the hub by request id; ingest, cache and groupers by
compatibility class; shard 0 of the hub also keeps the journal, the relayed logs and the engine's figures).

Every actor takes ``num_cpus=0`` (they are I/O-bound event loops; the machine has 2 cores). A dispatcher is
pinned to nodes that offer the custom resource ``provider:<name>`` when the cluster has one (cluster.yaml),
so a provider's traffic can leave from chosen machines.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time

import ray

from actors._budget_kept import take_back_kept
from actors._engine_stop import kill_engine
from actors._journal_evict import check_keeps_records
from actors._kv_journal import KvJournal
from actors._orphan import die_with_parent
from actors._peer import ClockRef, Named, publish_clock, read_layout, resolve_clock, warm_all
from actors._redis_cluster import check_cluster_modes
from actors._shards import shard_kind
from actors._wire import pack
from actors.budget import BudgetController
from actors.cache import ResultCache
from actors.dispatcher import Dispatcher
from actors.grouper import Grouper
from actors.hub import ResultHub
from actors.ingest import Ingest
from engine.core._logkeys import get_logger
from engine.core._stderrkeys import mask_process
from engine.core.errors import SmartbatchError
from engine.runtime.collector import tune_actor

__all__ = ["NAMESPACE", "actor_name", "attach_actors", "cancel_work", "check_cluster_modes", "kill_engine",
           "provider_resource", "rewire", "settle", "start_actors"]

# Supervised: Ray restarts an actor that dies (its process, not a bug in a method: those are outcomes), with
# its constructor's arguments; ``rewire`` gives it back what was set after construction, and the driver then
# re-admits its unfinished requests. Calls in flight at the death fail rather than run twice.
_OPTS = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": -1, "max_task_retries": 0}
NAMESPACE = "smartbatch"
log = get_logger("smartbatch.engine")


@functools.cache
def _actor(cls):
    """``ray.remote`` of ``_in_actor(cls)``. One per class, so shards and later engines reuse the class Ray has
    already exported."""
    return ray.remote(_in_actor(cls))


def _in_actor(cls):
    """``cls`` with its process set for the engine at each start (the collector, ``engine.runtime.collector``;
    every logger's lines and what it prints outside logging masked, ``mask_process``: the process is the
    engine's, and its stderr is a Ray worker's log file, streamed to the driver's terminal); the class itself stays plain (unit tests construct it in pytest's process, left alone)."""
    def __init__(self, *args, **kwargs):
        die_with_parent()  # (its raylet: a killed driver's actors made provider calls for 2 s more)
        tune_actor()
        mask_process(everything=True)
        cls.__init__(self, *args, **kwargs)
        if hasattr(cls, "reconstructed") and ray.get_runtime_context().was_current_actor_reconstructed:
            self.reconstructed()  # e.g. a dispatcher reads its journal before it takes work

    async def warm(self):
        out = await cls.warm(self)
        tune_actor(freeze=True)  # after the model and catalog loads: they live as long as the process
        return out

    body = {"__init__": __init__, "warm": warm, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__}
    if hasattr(cls, "pull"):  # the hub's results go back to the driver as columns too (actors._wire)
        async def pull(self, *args, **kwargs):
            return pack(await cls.pull(self, *args, **kwargs))

        body["pull"] = pull
    return type(cls.__name__, (cls,), body)


def actor_name(engine: str, kind: str) -> str:
    """The Ray name of an engine's actor, in namespace ``smartbatch``: ``<engine>.<kind>``, e.g.
    ``prod.dispatcher-openai``, found with ``ray.get_actor(name, namespace="smartbatch")``."""
    return f"{engine}.{kind}"


HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node (one unit, there alone)


def provider_resource(provider: str) -> str:
    return f"provider:{provider}"


def _ledger_ready(budget, started: list) -> tuple:
    """Wait for the budget ledger to answer (a budget on a Redis that does not answer cannot be enforced), and
    return the budgets in force (a Redis ledger's). On failure, stop the actors started so far and raise the
    actor's own error (a ``ConfigError`` naming ``budgets.redis_url``), not Ray's wrapper of it."""
    try:
        return ray.get(budget.check_ledger.remote())
    except Exception as exc:
        for h in started:
            ray.kill(h)
        cause = getattr(exc, "cause", None)  # RayTaskError carries the actor's exception
        if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, SmartbatchError):
            raise cause from None
        raise


def start_actors(policy, catalog, settings, clock, *, seed: int, num_groupers: int = 1, keys: dict | None = None,
                 engine: str = "engine", detached: bool = False, num_shards: int = 1) -> dict:
    """Create and wire the actors, named ``<engine>.<kind>``; ``clock()`` makes the engine clock once they are
    all up. ``detached``: the actors outlive the driver that started them (until ``kill_engine``).
    ``num_shards`` of each of ingest, cache and hub (kinds ``hub``, ``hub-1`` ...)."""
    from engine.core._budget_check import check_budgets
    from engine.core.resilience import check_fallbacks

    check_fallbacks(catalog, settings.resilience)
    check_budgets(catalog, settings.budgets)
    # The journal's records name this run of the engine: a later engine of the same name (on the same Redis, or
    # another Ray cluster) must never resume them. It made the calls its namesake had under way again, for a
    # request nobody in it sent, each paid twice (a helper's fault hunt). Ray restarts an actor with these.
    journal = f"{engine}@{secrets.token_hex(4)}"
    settings = check_keeps_records(settings, journal)  # (on a cluster, the node serving this journal's slot)
    life = {"lifetime": "detached"} if detached else {}

    def opts(kind: str, **more) -> dict:
        return {**_OPTS, "name": actor_name(engine, kind), "namespace": NAMESPACE, **life, **more}

    def ref(kind: str) -> Named:  # peers by name: see actors._peer.Named
        return Named(actor_name(engine, kind), NAMESPACE)

    def refs(base: str) -> list[Named]:
        return [ref(shard_kind(base, k)) for k in range(num_shards)]

    # The hub keeps the journal when no Redis does, and the budget ledger's snapshot: on a cluster, on the head
    # node, which lives as long as the cluster. Placed anywhere, it shared a worker with the dispatchers whose
    # batches it recorded, and losing that one node lost both: the restarted dispatchers sent every member again
    # (181 requests paid twice) and the ledger restarted from zero, past a hard limit (a helper's hunt).
    cluster = ray.cluster_resources()
    head = {"resources": {HEAD_RESOURCE: 0.001}} if HEAD_RESOURCE in cluster else {}
    hubs = [_actor(ResultHub).options(**opts(shard_kind("hub", k), **head)).remote(
        num_shards, settings.metrics.max_tenants) for k in range(num_shards)]
    hub_refs = refs("hub")
    budgets = settings.budgets
    later = ClockRef(engine)  # the clock is made once every actor is up; a restarted actor reads it (publish_clock)
    budget = _actor(BudgetController).options(**opts("budget")).remote(
        budgets, ref("hub"), later, 0.0, engine, settings.journal.recover_wait_s, secrets.token_hex(8),
        KvJournal(engine, journal))  # a Redis ledger's outbox, a memory ledger's snapshot: it outlives the hub
    in_force = _ledger_ready(budget, [*hubs, budget])  # the groupers start with them, not the settings
    reuse = policy.reuse
    with_cache = reuse.exact or reuse.in_flight or reuse.near
    grouper_refs = [ref(f"grouper-{k}") for k in range(num_groupers)]
    caches = [_actor(ResultCache).options(**opts(shard_kind("cache", k))).remote(
        reuse, hub_refs, later, catalog, settings, shard=(k, num_shards), groupers=grouper_refs)
        for k in range(num_shards)] if with_cache else []
    cache_ref = refs("cache") if with_cache else None
    dispatcher_refs = {name: ref(f"dispatcher-{name}") for name in catalog.providers}
    # Hours of day count from settings.sim.day_origin_s, else from the clock's start (engine.core.draws.
    # engine_day_origin): a function of the clock, so every grouper and dispatcher, restarted or not, agrees.
    groupers = [_actor(Grouper).options(**opts(f"grouper-{k}")).remote(
        policy, catalog, later, dispatcher_refs, ref("budget"), hub_refs, f"g{k}", bool(in_force),
        max_attempts=settings.sim.max_attempts, reserve_model_max=budgets.reserve_output == "model_max",
        cache=cache_ref, budget_specs=in_force, day_origin_s=settings.sim.day_origin_s)
        for k in range(num_groupers)]
    learning = getattr(policy, "turnaround_learning", None)
    learns = learning is not None and learning.enabled  # the groupers' tables learn (engine.runtime.scheduler)
    warm_readers = bool(getattr(policy, "reads_warmth", False))  # ... and read prompt-cache warmth
    dispatchers = {}
    for name in catalog.providers:
        more = {}
        if provider_resource(name) in cluster:
            more["resources"] = {provider_resource(name): 0.001}
        dispatchers[name] = _actor(Dispatcher).options(**opts(f"dispatcher-{name}", **more)).remote(
            name, catalog, settings, seed, later, grouper_refs, hub_refs, cache_ref, ref("budget"),
            policy.scheduling, (keys or {}).get(name), journal, learns, warm_readers)
    ingests = [_actor(Ingest).options(**opts(shard_kind("ingest", k))).remote(
        grouper_refs, cache_ref, settings.cache.share_across_tenants, list(dispatcher_refs.values()), hub_refs,
        settings, journal, shard=(k, num_shards)) for k in range(num_shards)]
    everything = [*ingests, *groupers, *dispatchers.values(), budget, *hubs, *caches]
    warm_all(everything)
    named = {"budget": budget}
    for base, shards in (("ingest", ingests), ("hub", hubs), ("cache", caches)):
        named.update({shard_kind(base, k): a for k, a in enumerate(shards)})
    named.update({f"grouper-{k}": g for k, g in enumerate(groupers)})
    named.update({f"dispatcher-{p}": d for p, d in dispatchers.items()})
    ray.get([a.set_logging.remote(settings.log_level, kind, ref("hub")) for kind, a in named.items()])
    ray.get([c.warm_from_redis.remote() for c in caches])  # a restarted engine finds its near duplicates again
    clock = clock()
    ray.get([a.set_clock.remote(clock) for a in [*groupers, *dispatchers.values(), *caches]])
    # At real speed, budget windows follow the calendar; a time-compressed replay budgets on trace time.
    real_time = clock.speedup == 1.0 and clock.offset == 0.0
    base = clock.epoch if real_time else 0.0
    ray.get(budget.set_clock.remote(clock, base))
    kept = take_back_kept(ray, budget, settings)  # what engines stopped on this ledger while its Redis was away left
    publish_clock(engine, clock, base)
    # (its journal's name too: what its driver's clean stop removes under journal.dir, ``_driver_resume``; the
    # kept files taken back, held until the stop has kept what their items left unsent, ``_keep_ledger``; and
    # whether the journal went to the hub's memory from a cache's Redis that may evict, which the driver's
    # settings do not say: the stop reads it there, ``actors._stop_left``)
    return {**_handles(engine, named, clock, base, settings.log_level), "journal": journal, "kept": kept,
            "journal_in_memory": settings.journal.in_memory}


def _shards(named: dict, base: str) -> list:
    out, k = [], 0
    while shard_kind(base, k) in named:
        out.append(named[shard_kind(base, k)])
        k += 1
    return out


def _handles(engine: str, named: dict, clock, base: float, log_level: str) -> dict:
    """The actor handles by role. ``ingests``/``hubs``/``caches`` list the shards in order (``ingest``, ``hub``
    and ``cache`` are shard 0; ``caches`` is empty and ``cache`` None without a cache)."""
    groupers = [named[f"grouper-{k}"] for k in range(sum(k.startswith("grouper-") for k in named))]
    dispatchers = {k.split("-", 1)[1]: a for k, a in named.items() if k.startswith("dispatcher-")}
    ingests, hubs, caches = _shards(named, "ingest"), _shards(named, "hub"), _shards(named, "cache")
    return {"clock": clock, "ingest": ingests[0], "ingests": ingests, "groupers": groupers,
            "dispatchers": dispatchers, "budget": named["budget"], "hub": hubs[0], "hubs": hubs,
            "cache": caches[0] if caches else None, "caches": caches,
            "all": [*ingests, *groupers, *dispatchers.values(), named["budget"], *hubs, *caches], "named": named,
            "budget_base": base, "engine": engine, "log_level": log_level}


def attach_actors(engine: str) -> tuple[dict, dict] | None:
    """(handles as ``start_actors`` returns them, the published layout) of the running engine ``engine``, or
    None when no engine of that name runs on this Ray cluster."""
    layout = read_layout(engine)
    if layout is None:
        return None
    clock, base = resolve_clock(ClockRef(engine))
    try:
        named = {kind: ray.get_actor(actor_name(engine, kind), namespace=NAMESPACE) for kind in layout["kinds"]}
    except ValueError:  # an actor of it is gone for good: the engine is not running
        return None
    return _handles(engine, named, clock, base or 0.0, layout["settings"].log_level), layout


def cancel_work(h: dict, timeout_s: float) -> int:
    """An engine-wide cancel (``Engine.cancel``) of the engine whose handles are ``h``: the dispatchers are told
    first (they refuse what comes after), then the groupers. Returns how many provider batches it cancelled."""
    batches = [d.cancel.remote() for d in h["dispatchers"].values()]
    ray.get([g.cancel.remote() for g in h["groupers"]], timeout=timeout_s)
    return sum(ray.get(batches, timeout=timeout_s))


SETTLE_POLL_S = 0.25  # how often ``settle`` asks the dispatchers again (real seconds)


def settle(h: dict, timeout_s: float, interrupted: threading.Event | None = None) -> int:
    """Wait until nothing is under way at the dispatchers of ``h`` (provider batches, calls) and no answer they
    gave waits at a result hub for a driver still pulling (``Dispatcher.settled``), or ``timeout_s`` real seconds
    pass, or ``interrupted`` is set. Returns what was left (0: nothing). After a cancel, everything ends within
    the providers' cancel time (up to 10 minutes at OpenAI and Anthropic)."""
    give_up = time.monotonic() + timeout_s
    stop = interrupted if interrupted is not None else threading.Event()
    while True:
        asked = {d.settled.remote(): d for d in h["dispatchers"].values()}
        ready, late = ray.wait(list(asked), num_returns=len(asked), timeout=max(1.0, give_up - time.monotonic()))
        left = len(late)  # one not answering (restarting, busy) still has its work under way
        for ref in ready:
            try:
                left += ray.get(ref)
            except ray.exceptions.RayActorError:
                if read_layout(h["engine"]) is None:  # the engine was stopped meanwhile: nothing to wait for
                    return left
                # Ray restarts it, and it follows its journaled batches again: taken for done, the stop cut them
                # short, every member they had finished paid twice at the next start (a fault hunt). It is told
                # of the cancel again (no driver's rewire may: ``smartbatch stop`` holds no supervisor).
                asked[ref].cancel.remote()
                left += 1
        if not left or time.monotonic() >= give_up or stop.wait(SETTLE_POLL_S):
            return left


def rewire(h: dict, kind: str, metrics: tuple[int, str] | None = None, timeout_s: float | None = None) -> None:
    """Give a restarted actor (``kind`` as in ``h["named"]``) what the engine set after construction, and let
    it recover its journaled state: a dispatcher re-attaches to its open batches, the budget controller takes
    its memory ledger back, a hub shard serves metrics on the same port (``metrics``) and shard 0 has the journal
    written again. Ingest needs nothing: the driver re-admits its open requests after any restart. ``timeout_s``
    bounds each wait: a peer Ray cannot restart (no node offers its resources) held the driver's recovery for
    good, and with it the sweep of overdue requests (a helper's hunt); past it the driver rewires again later."""
    clock = h["clock"]

    def get(refs):
        return ray.get(refs, timeout=timeout_s)

    def get_each(refs):  # peers that are themselves restarting are left out: their own rewiring does it
        for r in refs:
            try:
                ray.get(r, timeout=timeout_s)
            except ray.exceptions.ActorUnavailableError:
                pass

    get(h["named"][kind].set_logging.remote(h["log_level"], kind, Named(actor_name(h["engine"], "hub"),
                                                                           NAMESPACE)))
    base = kind.split("-", 1)[0]
    if base == "hub":
        if metrics is not None:  # each hub shard serves the metrics of its results, on its own port
            get(h["named"][kind].serve_metrics.remote(*metrics))
        # It checks that an id names one content: across ingest shards, and for an ingest that restarted.
        k = int(kind.split("-", 1)[1]) if "-" in kind else 0
        get([i.reregister.remote(k) for i in h["ingests"]])
        if kind == "hub":  # shard 0 keeps the journal
            get_each([d.rejournal.remote() for d in h["dispatchers"].values()] + [h["budget"].rejournal.remote()])
            # Its metrics start empty, and gauges are sent when they move: every sender sends them again.
            get_each([a.report_again.remote() for a in [*h["dispatchers"].values(), h["budget"], *h["caches"]]])
    elif kind.startswith("grouper-"):
        get(h["named"][kind].set_clock.remote(clock))
        # What it must not forget first: learning reads every dispatcher, which a lost node can hold up.
        if h.get("cancelled"):  # the engine was cancelled (Engine.cancel): a new incarnation knew nothing of it
            get(h["named"][kind].cancel.remote())
        if withdrawn := h.get("withdrawn"):  # nor of the requests withdrawn (Engine.cancel_requests)
            get(h["named"][kind].withdraw.remote(list(withdrawn)))
        get(h["named"][kind].relearn.remote())  # the batch turnarounds it had learned, from the dispatchers
        # The budgets in force (changed live, perhaps): a new incarnation has those of the settings. It asks.
        get(h["named"][kind].sync_budgets.remote())
    elif kind.startswith("dispatcher-"):
        d = h["named"][kind]
        get(d.set_clock.remote(clock))
        if withdrawn := h.get("withdrawn"):  # before its recovery: a create a restart cut is not made for them
            get(d.withdraw.remote(list(withdrawn)))
        if get(d.recover.remote()) < 0:  # the supervisor rewires it again at its next check
            raise RuntimeError(f"{kind} could not read its journal")
        if h.get("cancelled"):  # cancels the batches its journal named, which it follows again
            get(d.cancel.remote())
    elif base == "cache":
        get(h["named"][kind].set_clock.remote(clock))
        get(h["named"][kind].warm_from_redis.remote())
    elif kind == "budget":
        get(h["budget"].set_clock.remote(clock, h["budget_base"]))
        get(h["budget"].recover.remote())
