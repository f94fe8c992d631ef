"""The driver API: ``Engine.start()``, ``submit``/``submit_many``, ``report``, ``stop``.

Floor 4: this module starts Ray and the actors. ``submit`` returns a ``ResultFuture`` (a
``concurrent.futures.Future`` of a ``Result``, with ``object_ref()`` for a Ray ``ObjectRef``). The client
buffers ``submit`` calls into micro-batches (flushed at ``micro_batch`` requests, every ``flush_ms``, and at
once for urgent requests) because one actor call per request caps an engine near
300 requests/s; results come back the same way, in batches pulled by one background thread.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from engine.catalog import Catalog, load_catalog
from engine.errors import ConfigError, TraceError
from engine.provider_api import Secret
from engine.request import Request, validation_context
from engine.result import Result
from engine.settings import Settings, with_budget

__all__ = ["Engine", "ResultFuture", "http_setup"]

HEALTH_EVERY_S = 1.0  # how often the driver checks that every engine actor is alive
HEALTH_TIMEOUT_S = 2.0  # a busy actor may answer late; only an actor that errors is counted dead


def http_setup(catalog: Catalog, settings: Settings, *, need_keys: bool = True) -> tuple[Catalog, dict[str, Secret]]:
    """The catalog the engine plans with when some providers are called over HTTP, and their keys.

    A real batch takes up to ``cancel_s`` to cancel, so for those providers the catalog's ``batch_api.cancel_s``
    becomes the endpoint's and every hedge falls back that much earlier. Keys are read here, from the
    driver's environment, and travel to the dispatchers inside a ``Secret`` (a cluster's workers need not have
    them); a missing key is a start-up error, not a run of 401s."""
    import os

    keys: dict[str, Secret] = {}
    providers = dict(catalog.providers)
    for name in settings.providers.http_providers(catalog.providers):
        ep = settings.providers.endpoints[name]
        value = os.environ.get(ep.api_key_env) if need_keys else "unread"
        if not value:
            raise ConfigError(f"providers.endpoints.{name}: the environment variable {ep.api_key_env} holding the "
                              f"API key is not set; export it, or name another variable with "
                              f"SMARTBATCH_PROVIDERS__ENDPOINTS (api_key_env), or run with providers.mode=sim")
        keys[name] = Secret(value)
        spec = providers[name]
        if spec.batch_api is not None and spec.batch_api.cancel_s != ep.cancel_s:
            providers[name] = spec.model_copy(update={"batch_api": spec.batch_api.model_copy(
                update={"cancel_s": ep.cancel_s})})
    if providers != catalog.providers:
        catalog = Catalog.model_validate({"schema_version": catalog.schema_version,
                                          "providers": {k: v.model_dump() for k, v in providers.items()}})
    return catalog, (keys if need_keys else {})


class ResultFuture(concurrent.futures.Future):
    """The future of one request: ``result()`` blocks for its ``Result``; ``object_ref()`` gives a Ray
    ``ObjectRef[Result]`` to pass to Ray tasks or ``ray.get``/``ray.wait``.

    Why not an ObjectRef from the start: a Ray ref exists only as the return of a task or actor call, so one
    ref per request would cost one actor call per request (about 300 requests/s through an actor chain here)
    or tie a micro-batch's results together (``num_returns`` resolves all at once, so an urgent result would
    wait for a background one). The ref is made on demand, by one call to the result hub for this request.
    """

    def __init__(self, request_id: str, engine: Engine):
        super().__init__()
        self.request_id = request_id
        self._engine = engine
        self._ref = None

    def object_ref(self):
        """An ``ObjectRef`` that resolves to this request's ``Result`` (the same one each call)."""
        if self._ref is None:
            ray = self._engine._ray
            if self.done():
                self._ref = ray.put(self.result())
            else:
                self._ref = self._engine._h["hub"].result_of.remote(self.request_id)
        return self._ref


class Engine:
    """A running smartbatch engine. Use ``Engine.start(...)``, or ``with Engine.start(...) as eng:``."""

    def __init__(self, *, handles: dict, clock, settings: Settings, catalog: Catalog, started_ray: bool,
                 micro_batch: int, flush_ms: float):
        import ray

        self._ray = ray
        self._h = handles
        self.clock = clock
        self.settings = settings
        self.catalog = catalog
        self._ctx = validation_context(catalog, settings)
        self._started_ray = started_ray
        self._micro_batch = micro_batch
        self._flush_s = flush_ms / 1000.0
        self.metrics_port: int | None = None
        self._lock = threading.Lock()
        self._futs: dict[str, ResultFuture] = {}
        self._buffer: list[Request] = []
        self._inflight_refs: dict[Any, list[str]] = {}
        self._running = True
        self._wake = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="smartbatch-flush", daemon=True)
        self._puller = threading.Thread(target=self._pull_loop, name="smartbatch-pull", daemon=True)
        self._flusher.start()
        self._puller.start()

    # -- start / stop -------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, settings: Settings | None = None, *, policy: str = "smart",
              policy_params: Mapping[str, Any] | None = None, catalog: Catalog | None = None,
              address: str | None = None, speedup: float = 1.0, offset_s: float = 0.0,
              budget_usd: float | None = None, seed: int | None = None, num_groupers: int = 1,
              micro_batch: int = 1000, flush_ms: float = 2.0, metrics_port: int | None = 0) -> Engine:
        """Start the actors on Ray: an embedded local Ray when none is running and ``address`` is None, else
        attach (``address="auto"`` for a cluster started with ``ray up``). ``speedup`` runs the engine clock
        faster than the wall clock (replaying a trace time-compressed); ``offset_s`` is the clock's start.
        Prometheus metrics are served on ``metrics_port`` (0: a free port, None: not served); the port is
        ``engine.metrics_port``."""
        import ray

        from actors.remote import start_actors
        from policies import load_policy

        settings = settings or Settings()
        catalog = catalog or load_catalog(settings.catalog_path, settings.catalog_overlay)
        catalog, keys = http_setup(catalog, settings)
        if micro_batch < 1 or flush_ms <= 0 or num_groupers < 1:
            raise ConfigError("micro_batch and num_groupers must be >= 1 and flush_ms > 0; got "
                              f"micro_batch={micro_batch}, flush_ms={flush_ms}, num_groupers={num_groupers}")
        pol = load_policy(policy, catalog, policy_params)  # fails fast on a bad name or parameter
        started = False
        if not ray.is_initialized():
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            started = True
        from engine.clock import ScaledClock

        if budget_usd is not None:
            settings = with_budget(settings, budget_usd)
        handles = start_actors(pol, catalog, settings, lambda: ScaledClock(time.time(), speedup, offset_s),
                               seed=settings.sim.seed if seed is None else seed, num_groupers=num_groupers,
                               keys=keys)
        eng = cls(handles=handles, clock=handles["clock"], settings=settings, catalog=catalog,
                  started_ray=started, micro_batch=micro_batch, flush_ms=flush_ms)
        if metrics_port is not None:
            eng.metrics_port = ray.get(handles["hub"].serve_metrics.remote(metrics_port))
        return eng

    def stop(self, timeout_s: float = 5.0) -> None:
        """Flush, stop the threads and the actors; any future still open resolves as failed ("engine
        stopped"), so none hangs."""
        if not self._running:
            return
        self._flush()
        self._running = False
        self._wake.set()
        self._flusher.join(timeout_s)
        self._puller.join(timeout_s)
        with self._lock:
            open_futs = [(k, f) for k, f in self._futs.items() if not f.done()]
        for rid, f in open_futs:
            f.set_result(Result(id=rid, status="failed", error="engine stopped before the request finished"))
        for h in self._h["all"]:
            try:
                self._ray.kill(h)
            except Exception:  # already gone: nothing to stop
                pass
        if self._started_ray:
            self._ray.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def now(self) -> float:
        return self.clock.now()

    # -- submitting -------------------------------------------------------------------------------------------
    def _as_request(self, r: Request | Mapping) -> Request:
        if isinstance(r, Request):
            return r
        d = dict(r)
        d.setdefault("arrival_s", max(self.clock.now(), 0.0))
        try:
            return Request.model_validate(d, context=self._ctx)
        except ValidationError as exc:
            from engine.trace import _problems_of

            raise TraceError([("submit", 0, f, m) for f, m in _problems_of(exc)]) from exc

    def submit(self, request: Request | Mapping) -> ResultFuture:
        """Queue one request; returns its future. A repeated id returns the first submission's future."""
        req = self._as_request(request)
        with self._lock:
            fut = self._futs.get(req.id)
            if fut is not None:
                return fut
            fut = self._futs[req.id] = ResultFuture(req.id, self)
            self._buffer.append(req)
            full = len(self._buffer) >= self._micro_batch
        if full:
            self._flush()
        elif req.priority == "urgent":
            # Wake the flusher now rather than flushing here: urgent requests that arrive in a burst leave in
            # one batch, and each still leaves within the thread's wake-up time (microseconds).
            self._wake.set()
        return fut

    def submit_many(self, requests: Iterable[Request | Mapping]) -> list[ResultFuture]:
        """Queue many requests; validation errors are raised before any is queued."""
        reqs = [self._as_request(r) for r in requests]
        futs: list[ResultFuture] = []
        with self._lock:
            for r in reqs:
                fut = self._futs.get(r.id)
                if fut is None:
                    fut = self._futs[r.id] = ResultFuture(r.id, self)
                    self._buffer.append(r)
                futs.append(fut)
        self._flush()
        return futs

    def _flush(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
        for k in range(0, len(batch), self._micro_batch):
            part = batch[k:k + self._micro_batch]
            ref = self._h["ingest"].submit.remote(part)
            with self._lock:
                self._inflight_refs[ref] = [r.id for r in part]

    def _flush_loop(self) -> None:
        while self._running:
            self._wake.wait(self._flush_s)
            self._wake.clear()
            if self._buffer:
                self._flush()

    def _pull_loop(self) -> None:
        ray = self._ray
        hub = self._h["hub"]
        last_check = time.monotonic()
        while self._running:
            try:
                results: list[Result] = ray.get(hub.pull.remote(0.2))
            except Exception as exc:  # the hub is gone: fail everything open rather than hang
                self._fail_open(f"engine failure: the result hub died ({type(exc).__name__})")
                return
            for res in results:
                with self._lock:
                    fut = self._futs.get(res.id)
                if fut is not None and not fut.done():
                    fut.set_result(res)
            self._check_ingest()
            if time.monotonic() - last_check > HEALTH_EVERY_S:
                last_check = time.monotonic()
                dead = self._dead_actors()
                if dead:
                    # Requests may sit in the dead actor's groups or timers; nothing can resolve them now,
                    # so every open future fails with the reason instead of hanging.
                    self._fail_open(f"engine failure: actor(s) died: {', '.join(dead)}")

    def _dead_actors(self) -> list[str]:
        ray = self._ray
        named = [("ingest", self._h["ingest"]), ("budget", self._h["budget"])]
        named += [(f"grouper-{k}", g) for k, g in enumerate(self._h["groupers"])]
        named += [(f"dispatcher-{p}", d) for p, d in self._h["dispatchers"].items()]
        if self._h["cache"] is not None:
            named.append(("cache", self._h["cache"]))
        refs = {a.ping.remote(): name for name, a in named}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=HEALTH_TIMEOUT_S)
        dead = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:  # RayActorError and kin: the actor is gone
                dead.append(refs[ref])
        return sorted(dead)

    def _check_ingest(self) -> None:
        with self._lock:
            refs = list(self._inflight_refs)
        if not refs:
            return
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            with self._lock:
                ids = self._inflight_refs.pop(ref, [])
            try:
                self._ray.get(ref)
            except Exception as exc:
                self._fail_ids(ids, f"ingest failed: {exc}")

    def _fail_ids(self, ids: Sequence[str], error: str) -> None:
        for rid in ids:
            with self._lock:
                fut = self._futs.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(Result(id=rid, status="failed", error=error))

    def _fail_open(self, error: str) -> None:
        with self._lock:
            ids = [k for k, f in self._futs.items() if not f.done()]
        self._fail_ids(ids, error)

    # -- reading ------------------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Spend, saving against each request's list price, hits, deadlines, per provider, and the budgets
        (``budget``: each budget's window, spend per tenant/provider/model, refusals by reason)."""
        ray = self._ray
        rep = ray.get(self._h["hub"].report.remote())
        rep["budget"] = ray.get(self._h["budget"].report.remote())
        # Per provider: were its calls real (http) or simulated, and what its batches did.
        rep["providers"] = {s["provider"]: {k: v for k, v in s.items() if k != "provider"}
                            for s in ray.get([d.stats.remote() for d in self._h["dispatchers"].values()])}
        if self._h["cache"] is not None:  # read from the cache itself: the hub's copy is pushed every 0.5 s
            rep["cache"] = ray.get(self._h["cache"].stats_now.remote())
        return rep

    def replay(self, requests: Sequence[Request], *, on_submit=None) -> list[ResultFuture]:
        """Submit ``requests`` (sorted by arrival) as the engine clock reaches each arrival time."""
        reqs = sorted(requests, key=lambda r: r.arrival_s)
        futs: list[ResultFuture] = []
        k = 0
        while k < len(reqs):
            now = self.clock.now()
            j = k
            while j < len(reqs) and reqs[j].arrival_s <= now:
                j += 1
            if j > k:
                futs.extend(self.submit_many(reqs[k:j]))
                if on_submit is not None:
                    on_submit(j - k)
                k = j
            else:
                time.sleep(min(self.clock.real_delay(reqs[k].arrival_s - now), 0.05))
        return futs
