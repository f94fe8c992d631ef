"""The driver API: ``Engine.start()``, ``submit``/``submit_many``, ``report``, ``stop``.

Floor 4: this module starts Ray and the actors. ``submit`` returns a ``ResultFuture`` (a
``concurrent.futures.Future`` of a ``Result``, with ``object_ref()`` for a Ray ``ObjectRef``). The client
buffers ``submit`` calls into micro-batches (flushed at ``micro_batch`` requests, every ``flush_ms``, and at
once for urgent requests) because one actor call per request caps an engine near
300 requests/s; results come back the same way, in batches pulled by one background thread.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import ValidationError

from engine.app._actor_errors import actor_errors
from engine.app._driver_admit import Admitting, admission_lock
from engine.app._driver_async import AsyncSubmit
from engine.app._driver_budgets import LiveBudgeting
from engine.app._driver_lanes import IngestLanes
from engine.app._driver_owners import SharedOwners
from engine.app._driver_pull import Pulling
from engine.app._driver_reject import (
    OnInvalid,
    check_on_invalid,
    count_refused,
    listed,
    reject_taken,
    validated,
    with_rejected,
)
from engine.app._driver_report import Reporting
from engine.app._driver_resume import take_back
from engine.app._driver_shared import SharedEngine, check_not_stopping, init_ray, stale_engine
from engine.app._driver_stop import Stopping
from engine.app._future import ResultFuture
from engine.app._start_args import check_start_args, tell_unmet_near
from engine.app._supervise import Supervised, port_of
from engine.app.provider_setup import http_setup
from engine.core._budget_check import check_budget_limits
from engine.core._logkeys import get_logger
from engine.core._stderrkeys import mask_process
from engine.core.catalog import Catalog, load_catalog
from engine.core.draws import engine_day_origin
from engine.core.errors import ConfigError, RequestError
from engine.core.request import FieldProblem, Request, in_catalog, validation_context
from engine.core.response_owners import ResponseOwners
from engine.core.settings import Settings, load_settings, with_budget
from engine.core.wire_checks import check_real
from engine.runtime.collector import driver_gc

__all__ = ["Engine", "ResultFuture"]

log = get_logger("smartbatch")


class Engine(Admitting, AsyncSubmit, IngestLanes, LiveBudgeting, Pulling, Reporting, SharedEngine, SharedOwners,
             Stopping, Supervised):
    """A running smartbatch engine. Use ``Engine.start(...)``, or ``with Engine.start(...) as eng:``."""

    # Engines running in this process: Ray is process-wide, so the last one to stop shuts down the Ray that
    # one of them started, never one still in use by another.
    _running_engines: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, *, handles: dict, clock, settings: Settings, catalog: Catalog, started_ray: bool,
                 micro_batch: int, flush_ms: float, max_pending: int = 100_000, overload: str = "block",
                 submit_timeout_s: float = 60.0, retention_s: float = 3600.0, owner: bool = True, attached: bool = False,
                 kept=None):
        # Again (``start`` and ``connect`` did first) for an Engine built directly; a second call changes nothing.
        mask_process()
        import ray

        self._ray = ray
        self._h = handles
        self._owner = owner  # stop() stops the actors too (else the engine runs on for its other drivers)
        self._client = secrets.token_hex(6)  # this driver, to the result hub
        # The row of each request's simulated draws, in submission order: the simulator's row for the same trace.
        # A driver that attaches numbers from a random far point, so two drivers' requests do not share draws.
        self._next_row = 0 if owner else secrets.randbits(15) << 32
        ray.get([h.claim.remote(self._client, []) for h in handles["hubs"]])  # known before its first pull
        self.clock, self.settings, self.catalog = clock, settings, catalog
        self._ctx = validation_context(catalog, settings, live=True)
        self._started_ray = started_ray
        self._micro_batch = micro_batch
        self._flush_s = flush_ms / 1000.0
        self.metrics_port: int | None = None
        self.metrics_url: str | None = None  # where Prometheus scrapes this engine (hub shard 0)
        self.metrics_urls: list[str] = []  # every hub shard's: each counts the results of its request ids
        self._last_report: dict | None = None  # what report() answers after stop()
        # The dispatchers whose batches the stop cancelled itself (``actors._stop_left.Left`` by actor name):
        # ``kill_engine`` tells them, ``_keep_ledger`` puts them in the kept report.
        self._left_at_stop: dict[str, Any] = {}
        self._lock, self._room = admission_lock()  # the room: signalled when unfinished requests drop
        self._max_pending, self._overload, self._submit_timeout_s = max_pending, overload, submit_timeout_s
        self._retention_s = retention_s
        self._forgetting: list[tuple[Any, set[str]]] = []  # forgets out at ingest: (call, ids), see _forget
        self._pending = 0  # accepted and not finished
        self._finished: collections.deque[tuple[float, str]] = collections.deque()  # (when, uid), to forget
        self._futs: dict[str, ResultFuture] = {}  # by Request.uid: (tenant, id)
        self._buffer: list[Request] = []
        self._kept, self._kept_due = kept, []  # what a killed run of the job paid for (``take_back``)
        # Whose each provider response id is: learnt from the answers this driver gets (a killed run's kept ones
        # too) and asked of the hub (``_driver_owners``), so another tenant's previous_response_id is refused.
        self.responses = ResponseOwners()
        if kept is not None:
            for res in kept.results():
                self._learn_response(res)
            # Known to the engine's other drivers too: a kept answer reaches its future from here, never the hub.
            if len(self.responses):
                self.share_owners()
        self._cut_short = False  # left its ``with`` block on an error: the job did not end (``__exit__``)
        self._inflight_refs: dict[Any, tuple[list[str], int]] = {}  # ingest call -> (uids, tries)
        self._running = True
        self._init_supervision(attached)
        self._init_lanes()
        self._wake = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="smartbatch-flush", daemon=True)
        self._puller = threading.Thread(target=self._pull_loop, name="smartbatch-pull", daemon=True)
        # Health checks wait on every actor (seconds, when one is busy): not in the loop that delivers results.
        self._checker = threading.Thread(target=self._check_loop, name="smartbatch-check", daemon=True)
        self._flusher.start()
        self._puller.start()
        self._checker.start()
        Engine._running_engines.add(self)
        driver_gc.engine_started()

    # -- start / stop -------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, settings: Settings | None = None, *, policy: str = "smart",
              policy_params: Mapping[str, Any] | None = None, catalog: Catalog | None = None,
              address: str | None = None, speedup: float = 1.0, offset_s: float = 0.0,
              budget_usd: float | None = None, seed: int | None = None, num_groupers: int = 1,
              micro_batch: int = 1000, flush_ms: float = 2.0, metrics_port: int | None | str = "settings",
              max_pending: int = 100_000, overload: str = "block", submit_timeout_s: float = 60.0,
              retention_s: float = 3600.0, name: str | None = None, detached: bool = False,
              num_shards: int = 1) -> Engine:
        """Start the actors on Ray: an embedded local Ray when none is running and ``address`` is None, else
        attach (``address="auto"`` for a cluster started with ``ray up``). ``speedup`` runs the engine clock
        faster than the wall clock (replaying a trace time-compressed); ``offset_s`` is the clock's start.
        Prometheus metrics are served at ``engine.metrics_url``, on ``settings.metrics`` (host 127.0.0.1, a free
        port) unless ``metrics_port`` is given (0: a free port, None: not served); the address is logged.

        Backpressure: at most ``max_pending`` requests are accepted and unfinished; past that, ``submit``
        waits up to ``submit_timeout_s`` for room (``overload="block"``) or raises ``Overloaded`` at once
        (``overload="raise"``). A ``submit_many`` larger than the room is let in by parts as room frees (block:
        ``submit_timeout_s`` bounds each wait) or refused whole (raise; ``ConfigError`` for a call larger than
        ``max_pending``, which could never fit). A finished request's future and id are forgotten ``retention_s`` seconds after
        it finished: a resubmission of its (tenant, id) within that window returns the same future, never a
        second call.

        The actors are named ``<name>.<kind>`` in Ray namespace ``smartbatch`` (``name``: a random
        ``sb-xxxxxx`` unless given) and supervised: one that dies is restarted and recovers (see
        docs/reliability.md). Other drivers attach with ``Engine.connect(name)``. ``detached``: the engine
        outlives this driver (its ``stop()`` ends only this driver's session; ``shutdown()`` or
        ``Engine.stop_named(name)`` stop the engine); it needs a Ray that outlives it too (``ray start --head``,
        or ``smartbatch serve``).

        ``num_shards``: how many actors each of ingest, the cache and the result hub run as (the hub splits
        requests by id, ingest and the cache by compatibility class; docs/benchmarks.md, "Scale-out"); groupers
        default to as many. Each hub shard serves the metrics of its results (``metrics_urls``; a fixed
        ``metrics_port`` P puts shard k on P + k)."""
        # First: Ray's and the SDKs' lines in this process (a failed call's exception, a request's URL) may quote
        # a key, from the take-back's provider calls and Ray's start on, before the Engine is built (rvlogs81);
        # the user's own loggers are left as they are.
        mask_process()
        import ray

        from actors.remote import check_cluster_modes, start_actors
        from policies import load_policy

        check_start_args(speedup=speedup, offset_s=offset_s, seed=seed, micro_batch=micro_batch, flush_ms=flush_ms,
                         num_groupers=num_groupers, num_shards=num_shards, max_pending=max_pending,
                         overload=overload, submit_timeout_s=submit_timeout_s, retention_s=retention_s,
                         metrics_port=metrics_port, name=name)
        settings = settings or load_settings()
        # Decided once, here: the drivers that attach later and the endpoint refuse the same requests.
        settings = settings.model_copy(update={"providers": settings.providers.decided()})
        if budget_usd is not None:  # before any Ray starts: a bad amount left an embedded Ray running
            settings = with_budget(settings, budget_usd)
        # Before a killed run's take-back (which cancels its provider batches) and a Ray: a limit that is no limit
        # was refused only by the actors' start, after both, for a start that was never to run (``_budget_check``).
        check_budget_limits(settings.budgets)
        catalog = catalog or load_catalog(settings.catalog_path, settings.catalog_overlay)
        catalog, keys = http_setup(catalog, settings, speedup=speedup)  # the catalog it plans with
        num_groupers = max(num_groupers, num_shards)
        pol = load_policy(policy, catalog, policy_params)  # fails fast on a bad name or parameter
        tell_unmet_near(pol, settings.sim.near_floor)
        check_cluster_modes(settings)  # before Ray starts; a Redis this driver cannot reach: left to the actors
        # What an engine killed on journal.dir left is read before anything starts: its journal's locks must be
        # free, and a batch that cannot be read stops the start, not a run that would pay for it again.
        kept = None if detached else take_back(settings, catalog, keys, speedup=speedup)
        started = init_ray(address or "local")
        from actors._peer import read_layout

        if name is not None and read_layout(name) is not None and not stale_engine(name):
            raise ConfigError(f"name={name!r}: an engine of that name already runs on this Ray cluster; attach "
                              f"to it with Engine.connect({name!r}), or stop it first (smartbatch stop --name {name})")
        if name is not None:  # its layout gone, its actors may still run: a stop of it keeping the ledger
            check_not_stopping(name)
        if detached and started:
            log.warning("smartbatch: engine %r is detached but runs on the Ray this process started, which stops "
                        "with it; start Ray first (ray start --head) or use smartbatch serve", name)
        from engine.core.clock import ScaledClock

        engine = name or f"sb-{secrets.token_hex(3)}"
        try:
            with actor_errors(ray, engine, "Engine.start()"):  # its actors' start (an __init__) and first calls
                handles = start_actors(pol, catalog, settings, lambda: ScaledClock(time.time(), speedup, offset_s),
                                       seed=settings.sim.seed if seed is None else seed, num_groupers=num_groupers,
                                       keys=keys, engine=engine, detached=detached, num_shards=num_shards)
        except BaseException:
            if started and not Engine._running_engines:  # leave no Ray behind that only this start needed
                ray.shutdown()
            raise
        eng = None
        # (around the clean-up below: it meets Ray's error whole, the caller a masked one)
        with actor_errors(ray, handles["engine"], "Engine.start()"):
            try:
                eng = cls(handles=handles, clock=handles["clock"], settings=settings, catalog=catalog,
                          started_ray=started, micro_batch=micro_batch, flush_ms=flush_ms, max_pending=max_pending,
                          overload=overload, submit_timeout_s=submit_timeout_s, retention_s=retention_s,
                          owner=not detached, kept=kept)
                if kept is not None and settings.budgets.specs and settings.budgets.redis_url is None:
                    eng.count_spent(kept.charges())  # billed by the run cut off; a Redis ledger counted it there
                port = settings.metrics.port if metrics_port == "settings" else metrics_port
                if port is not None:
                    eng.metrics_urls = ray.get([h.serve_metrics.remote(port + k if port else 0, settings.metrics.host)
                                                for k, h in enumerate(handles["hubs"])])
                    eng.metrics_url = eng.metrics_urls[0]
                    eng.metrics_port = port_of(eng.metrics_url)
                    log.info("smartbatch metrics at %s", ", ".join(eng.metrics_urls))
                eng._publish_layout(policy, detached)
            except BaseException:  # e.g. the metrics port is taken: leave no engine behind (a detached one would stay)
                if eng is not None:
                    eng.shutdown()
                else:
                    from actors.remote import kill_engine

                    kill_engine(handles["engine"], handles["all"], handles["dispatchers"])
                    if started and not Engine._running_engines:
                        ray.shutdown()
                raise
        return eng

    def now(self) -> float:
        return self.clock.now()

    @property
    def day_origin_s(self) -> float:
        """The time of day at engine time 0, seconds after UTC midnight: ``settings.sim.day_origin_s`` when set
        (a replayed trace's), else the wall clock's when the engine clock started. Hours of day (the learned
        turnaround's, the simulated world's) are of engine time from it: the wall's at speedup 1."""
        return engine_day_origin(self.settings.sim.day_origin_s, self.clock)

    # -- submitting -------------------------------------------------------------------------------------------
    def _as_request(self, r: Request | Mapping, at: int | None = None, now: float | None = None) -> Request:
        if isinstance(r, Request):
            r = in_catalog(r, self.catalog, at, self.settings)
            try:
                check_real(r.provider, r.model, self.settings)
            except FieldProblem as exc:
                raise RequestError(r.id, exc.field, str(exc), at) from None
            return self._owned(r, at)
        if not isinstance(r, Mapping):
            several = "; several requests go to submit_many()" if isinstance(r, (list, tuple)) and at is None else ""
            raise RequestError(None, "request", f"a request is a dict (or a Request), got {type(r).__name__}{several}",
                               at)
        d = dict(r)
        d.setdefault("arrival_s", max(self.clock.now() if now is None else now, 0.0))
        try:
            req = Request.model_validate(d, context=self._ctx)
        except ValidationError as exc:
            from engine.core.trace import request_error

            raise request_error(exc, d, at) from None
        return self._owned(req, at)

    def _forget_finished(self) -> None:
        """Drop futures (and so requests and results) finished more than ``retention_s`` ago."""
        horizon = time.monotonic() - self._retention_s
        gone: list[Request] = []
        with self._lock:
            fin = self._finished
            while fin and fin[0][0] < horizon:
                at, uid = fin.popleft()
                f = self._futs.get(uid)
                if f is not None and f._claimed and not f.done():  # its result is being set (``_resolve``): next look
                    fin.appendleft((at, uid))
                    break
                if f is not None and f.done():
                    del self._futs[uid]
                    gone.append(f._req)
            if gone:
                # Ingest forgets them too, so neither side grows with the engine's life. Sent before the ids are
                # free here (under the lock a submit takes), so a new request under one of them reaches ingest
                # after the forget, never before it (it would be taken for the old one, answered with its result).
                self._forget(gone)
                self._room.notify_all()

    def submit(self, request: Request | Mapping) -> ResultFuture:
        """Queue one request; returns its future. The same (tenant, id) again returns the first submission's
        future (never a second call); with other content it is refused (``RequestError``). A bad request
        raises ``RequestError`` naming the field; nothing is queued and its id stays free."""
        self._ask_owners([request])  # an id another driver of the engine learnt (``_driver_owners``)
        (req,) = self._forgotten([self._as_request(request)])
        with self._lock:
            (fut,), new = self._admit([req])
            full = len(self._buffer) >= self._micro_batch
        self._give_kept()
        if full:
            self._flush()
        elif new and req.priority == "urgent":
            # Wake the flusher now rather than flushing here: urgent requests that arrive in a burst leave in
            # one batch, and each still leaves within the thread's wake-up time (microseconds).
            self._wake.set()
        return fut

    def submit_many(self, requests: Iterable[Request | Mapping], *,
                    on_invalid: OnInvalid = "raise") -> list[ResultFuture]:
        """Queue many requests, arrived at one instant (judged together). A bad one raises ``RequestError``
        before any is queued; with ``on_invalid="reject"`` its future is resolved at once with a ``rejected``
        result (``error`` "invalid_request", ``reason`` naming the field and the fix) and the others are
        queued. The futures are in the order given. More new requests than the room under ``max_pending`` are
        let in by parts, each as room frees (``overload="block"``; ``Overloaded`` when one waits
        ``submit_timeout_s`` in vain, its ``admitted`` saying how many were queued and ``futures`` theirs: they run
        on, and the same requests again give them back and go on, no request sent twice), or refused whole
        (``overload="raise"``: ``Overloaded``, nothing queued; ``ConfigError`` for more new requests than
        ``max_pending``, which could never fit)."""
        check_on_invalid(on_invalid)
        now, requests = self.clock.now(), listed(requests, "submit_many")
        self._ask_owners(requests)  # once for them all
        reqs, at, refused = validated(self._as_request, requests, now, on_invalid)
        reqs = self._forgotten(reqs)
        with self._lock:
            if on_invalid == "reject":  # (``refused`` is only ever filled then)
                reqs, at = reject_taken(reqs, at, self._futs, refused)
                count_refused(self, refused)  # for report(), which the engine's results alone made
            futs, _ = self._admit(reqs)
        self._give_kept()
        self._flush()
        return with_rejected(futs, at, refused)

    # -- reading ------------------------------------------------------------------------------------------------
    def replay(self, requests: Sequence[Request | Mapping], *, on_submit=None,
               into: list[ResultFuture] | None = None) -> list[ResultFuture]:
        """Submit ``requests`` (sorted by arrival; a dict without ``arrival_s`` arrives at 0) as the engine clock
        reaches each arrival time. The futures are appended to ``into`` (when given) as they are submitted, so a
        caller interrupted by Ctrl-C while the replay still paces arrivals keeps those already sent. A bad
        request raises ``RequestError`` before any is sent, as ``submit_many``'s call does (a helper's tour: it
        stopped the replay midway, the earlier sent and the rest never; a dict raised AttributeError)."""
        reqs = self._replay_order(requests)
        futs: list[ResultFuture] = into if into is not None else []
        k = 0
        while k < len(reqs):
            now = self.clock.now()
            j = k
            while j < len(reqs) and reqs[j].arrival_s <= now:
                j += 1
            if j > k:
                try:
                    futs.extend(self.submit_many(reqs[k:j]))
                except BaseException:
                    # A burst larger than the room is let in by parts: one that raised as it waited for the next
                    # (a Ctrl-C, Overloaded) has sent the parts before, whose futures the caller keeps as any sent
                    # (they were left out: billed, their results never written by an interrupted run).
                    futs.extend(self._let_in(reqs[k:j], futs))
                    raise
                if on_submit is not None:
                    on_submit(j - k)
                k = j
            else:
                time.sleep(min(self.clock.real_delay(reqs[k].arrival_s - now), 0.05))
        return futs

