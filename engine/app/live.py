"""Running a trace through the live engine and reporting it like ``bench`` does (floor 4: starts Ray)."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.app._driver_shared import MAX_PENDING
from engine.app._ray_stop import Terminated, own_ray_processes, stop_or_lose_ray, terminate_as_interrupt
from engine.app.bench import document, result_row
from engine.app.provider_setup import (
    check_simulated,
    http_setup,
    key_problems,
    speedup_problem,
    with_hedge_lag,
)
from engine.core.catalog import Catalog
from engine.core.cost import MODES
from engine.core.draws import Draws
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import Settings, load_settings
from engine.core.trace import with_day_origin
from engine.sim.lower_bound import lower_bound
from engine.sim.simulator import BatchRecord, SimResult, simulate

__all__ = ["as_emulated", "as_sim_result", "dry_run", "follow_engine", "point_at_emulator", "run_live", "samples"]

EMULATOR_KEY_ENV = "SMARTBATCH_EMULATOR_KEY"

_STATUS = {"ok": 1, "reused": 2, "failed": 3, "rejected": 4, "expired": 3}
_HITS = {None: 0, "exact": 1, "in_flight": 2, "near": 3}


def as_sim_result(policy: str, trace: str, requests: Sequence[Request], results: Sequence[Result],
                  wall_s: float) -> SimResult:
    """Live results in the simulator's result shape, so one summary and one report format serve both."""
    by_id = {r.id: r for r in results}
    rs = [by_id[q.id] for q in requests]
    mode_code = {m: k for k, m in enumerate(MODES)}
    batches: dict[str, BatchRecord] = {}
    for r in rs:
        if r.batch_id and r.recommendation:
            b = batches.get(r.batch_id)
            size = 1 if b is None else b.size + 1
            batches[r.batch_id] = BatchRecord(len(batches) if b is None else b.id, r.arrival_s, r.provider or "",
                                              r.model or "", r.mode or "", size, r.recommendation, r.reason)
    return SimResult(
        policy, trace, list(requests),
        cost=np.array([r.cost_usd for r in rs]),
        done_at=np.array([r.done_s if r.done_s is not None else np.inf for r in rs]),
        status=np.array([_STATUS[r.status] for r in rs], dtype=np.int8),
        mode=np.array([mode_code.get(r.mode, -1) for r in rs], dtype=np.int8),
        hit=np.array([_HITS.get(r.hit, 0) for r in rs], dtype=np.int8),
        batch_of=np.full(len(rs), -1), batches=list(batches.values()), wall_s=wall_s,
        extra={"rejected": dict(collections.Counter(r.error or "unknown" for r in rs if r.status == "rejected")),
               "live": True})


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_live``: the results that had finished, the engine's report, how many were sent."""

    def __init__(self, results: list, report: dict, sent: int, ray_gone: bool = False, stopped: bool = False):
        super().__init__()
        self.results, self.report, self.sent, self.ray_gone = results, report, sent, ray_gone
        self.stopped = stopped  # the engine's stop ran to its end (and so cancelled its provider batches)


def run_live(requests: Sequence[Request], *, trace_name: str, policy: str = "smart",
             params: dict | None = None, speedup: float = 100.0, address: str | None = None,
             seed: int | None = None, catalog: Catalog | None = None, settings: Settings | None = None,
             on_done: Callable[[int], None] | None = None, results: list | None = None,
             on_start: Callable | None = None, label: str | None = None, num_shards: int = 1) -> dict:
    """Replay ``requests`` through a live engine; return the results document of ``bench`` for one policy
    (plus ``engine_report``), judged against the simulated naive cost and the offline lower bound. ``label``
    names its row (a variant's name; default: the policy's). ``num_shards``: as ``Engine.start`` takes it.
    The engine counts hours of day from the trace's origin, as the simulator does (``with_day_origin``), not
    from the wall clock: a replay decides as the simulator does at any hour it is run."""
    from engine.app.driver import Engine
    from policies import load_policy

    settings = with_day_origin(settings or load_settings(), requests)
    check_simulated(requests, settings)  # before the engine starts: its replay would refuse them one by one
    if settings.providers.mode == "http" and not settings.providers.replay:
        # A trace line is sent at its recorded size, so the bill from real usage compares with the simulator's.
        settings = settings.model_copy(update={"providers": settings.providers.model_copy(update={"replay": True})})
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    offset = reqs[0].arrival_s if reqs else 0.0
    seed = settings.sim.seed if seed is None else seed
    t0 = time.perf_counter()
    # Room for the whole trace, as ``batch`` gives its file's lines: a look of the replay past the room is let in
    # by parts (stop 78), and requests riding batch windows free their places only as batches end, so its parts
    # past the first waited in vain and the run failed Overloaded. The largest burst of one instant (a batch file
    # made a trace: all at 0) was not room enough: a look takes every arrival the clock has passed, of several
    # instants once the engine's start or the part before took a speed-up's seconds (a review, stop 78).
    eng = Engine.start(settings, policy=policy, policy_params=params, catalog=catalog, address=address,
                       speedup=speedup, offset_s=offset, seed=seed, num_shards=num_shards,
                       max_pending=max(MAX_PENDING, len(reqs)))
    ray_procs = [p for p in own_ray_processes() if p.poll() is None]  # if one exits, Ray is going down
    futs: list = []
    stopped = False
    try:
        if on_start is not None:
            on_start(eng)
        # Ctrl-C may come while the replay still paces arrivals (a whole trace's span at speed-up 1): what was
        # sent by then is in ``futs``. SIGTERM too, once Ray's driver (which installs a handler of its own that
        # dumps a stack and exits) is up: nothing was kept.
        with terminate_as_interrupt():
            eng.replay(reqs, into=futs)
            if on_done is not None:
                for f in futs:
                    f.add_done_callback(lambda _f: on_done(1))
            got = [f.result() for f in futs]
        report = eng.report()
    except KeyboardInterrupt as exc:
        if not isinstance(exc, Terminated):  # Ctrl-C: what the cancelled provider batches finish is answered
            # (a SIGTERM is followed by a kill: it waits for nothing; a second Ctrl-C ends the wait, not the run's record)
            with contextlib.suppress(KeyboardInterrupt), terminate_as_interrupt():
                eng._drain_before_stop(settings.stop_drain_s)
        # What finished was paid for: hand it and the spend so far to the caller, which keeps a record. A SIGTERM
        # to the whole process group stops Ray too: the report and the stop then waited a minute for its GCS.
        done = [f.result() for f in futs if f.done() and not f.cancelled() and f.exception() is None]
        kept: dict = {}

        def steps() -> None:
            with contextlib.suppress(Exception):  # an actor gone: the spend is unknown, the results are kept
                kept.update(eng.report())
            eng.stop()
        stopped = True
        try:
            outcome = stop_or_lose_ray(steps, ray_procs)
        except Exception:  # the stop failed: what finished is still handed over
            outcome = "failed"
        raise Interrupted(done, kept, len(futs), ray_gone=outcome == "ray-gone", stopped=outcome == "done") from None
    finally:
        if not stopped:  # (a stop that Ray's end left waiting must not be waited for here)
            eng.stop()
    if results is not None:
        results.extend(got)
    results = got
    wall = time.perf_counter() - t0
    # The world the run is judged in: the engine's catalog less its hedge lag (an allowance for its own timing,
    # which would lift the online bound at a high speed-up, and which ``bench`` does not have).
    catalog = with_hedge_lag(eng.catalog, -settings.hedge_lag_s, speedup)
    draws = Draws(len(reqs), settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
    free = settings.model_copy(update={"budgets": type(settings.budgets)()})  # the bill nothing held back
    naive = simulate(reqs, load_policy("naive", catalog), catalog=catalog, settings=free, seed=seed,
                     draws=draws)
    lb = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws)
    live = as_sim_result(policy, trace_name, reqs, results, wall)
    relaxed = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws, relax=~live.met,
                          unserved=~live.served).total_usd
    online = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws, online=True).total_usd
    row = result_row(f"{label or policy} (live)", policy, params or {}, live, naive, lb.total_usd, relaxed, online)
    row["online_bound_usd"] = round(online, 6)
    row.update(live_wall_s=round(wall, 2), speedup=speedup)
    b = report.get("budget") or {}
    if "overrun_usd" in b:
        row["budget_overrun_usd"] = b["overrun_usd"]
    doc = document(trace_name, len(reqs), seed, lb, [row],
                   [b.model_dump() for b in settings.budgets.specs] if settings.budgets.specs else None)
    doc["engine_report"] = report
    doc["samples"] = samples(results, reqs)
    return doc


def samples(results: Sequence[Result], requests: Sequence[Request]) -> list[dict]:
    """A few outputs, to show what came back (real text when the providers were called over HTTP): one per
    provider, model and mode, real calls first. A text's first 72 characters; a media result's whole address (cut
    short, a video's URL in results.json could not be fetched: a helper's tour)."""
    shown, seen, media = [], set(), {q.id for q in requests if q.kind != "text"}
    for r in sorted(results, key=lambda r: not r.real):
        if r.status == "ok" and (r.provider, r.model, r.mode) not in seen and len(shown) < 4:
            seen.add((r.provider, r.model, r.mode))
            shown.append(r)
    return [{"id": r.id, "provider": r.provider, "model": r.model, "mode": r.mode, "cost_usd": r.cost_usd,
             "output": (r.output or "") if r.id in media else (r.output or "")[:72], "real": r.real} for r in shown]


def follow_engine(emu, settings: Settings, seed: int) -> Callable:
    """An ``on_start`` for ``run_live``: the emulator runs on the engine's clock with the simulator's turnaround
    draws, so the HTTP run and the simulated one face the same batch turnarounds (by hour, from the engine's
    ``day_origin_s``)."""
    from engine.core.draws import TurnaroundWorld

    return lambda eng: emu.follow(eng.clock, seed=seed, slot_s=settings.sim.batch_slot_s,
                                  world=TurnaroundWorld.of(settings.sim, eng.day_origin_s))


def as_emulated(catalog: Catalog, providers: Sequence[str] = ("openai", "anthropic")) -> Catalog:
    """``catalog`` as the loopback emulator plays ``providers``: it fails none of their calls (a fault plan
    aside), so a simulator run set beside an emulated live run draws no failures for them either. With the
    catalog's failure rates the simulator retries members the emulator ran at once: a retried member runs
    later, when other calls have warmed its prefix, and a retry sets off a dispatch at another time, in a batch
    of another turnaround. On the first 1,500 Mooncake requests that was $0.46 of a $0.61 Anthropic gap."""
    provs = dict(catalog.providers)
    for name in providers:
        if name in provs:
            provs[name] = provs[name].model_copy(update={"failure_rate": 0.0})
    return catalog.model_copy(update={"providers": provs})


def point_at_emulator(settings: Settings, emu, providers: Sequence[str] = ("openai", "anthropic")) -> Settings:
    """``settings`` with ``providers`` called over HTTP at the loopback emulator ``emu``, with a test key (never a
    real one) and the emulator's cancel time, so the hedge leaves room for its ``cancelling`` state."""
    import os

    from engine.core.settings import ProviderEndpoint, ProvidersSettings

    os.environ.setdefault(EMULATOR_KEY_ENV, "emulator-test-key")
    endpoints = dict(settings.providers.endpoints)
    for name in providers:
        api = "anthropic" if name == "anthropic" else "openai"
        url = emu.anthropic_base_url(name) if api == "anthropic" else emu.base_url(name)
        endpoints[name] = ProviderEndpoint(api=api, base_url=url, api_key_env=EMULATOR_KEY_ENV, timeout_s=60.0,
                                           cancel_s=emu.cancel_s, poll_min_s=10.0, poll_max_s=60.0,
                                           honours_idempotency_key=emu.honour_keys, flex_tier=api == "openai",
                                           strict_fields=api == "openai")
    # (simulate_others kept: None is decided by where the endpoints are, the emulator's all on 127.0.0.1)
    return settings.model_copy(update={"providers": ProvidersSettings(
        mode="http", endpoints=endpoints, simulate_others=settings.providers.simulate_others)})


def planned(requests: Sequence[Request], *, policy: str, params: dict | None, catalog: Catalog, settings: Settings,
            seed: int, speedup: float) -> tuple[SimResult, Catalog]:
    """The policy's run of ``requests`` in the simulator with the catalog the live engine would plan with (its
    hedges leave room for real cancels and, at ``speedup``, its real-time lag), and that catalog. No key is
    needed to plan, so none is read."""
    from policies import load_policy

    cat, _ = http_setup(catalog, settings, need_keys=False, speedup=speedup)
    return simulate(requests, load_policy(policy, cat, params), catalog=cat, settings=settings, seed=seed), cat


def dry_run(requests: Sequence[Request], *, policy: str = "smart", params: dict | None = None,
            catalog: Catalog, settings: Settings, seed: int = 0, speedup: float = 0.0) -> dict:
    """What a live run would send, and its estimated cost, without sending anything: the policy's plan in the
    simulator, per provider, with one sample request body of each provider called over HTTP (no key). At
    ``speedup``, the run's hedges come its real-time lag earlier, as the engine plans them (``with_hedge_lag``).
    ``keys``: per provider, why the run's start would refuse its API key (unset, or unfit for a header), in the
    start's words; the plan needs none, so it is made all the same."""
    from actors.providers import make_provider
    from engine.core.clock import ManualClock
    from engine.core.cost import price_alone
    from engine.core.provider_api import CallJob, Secret, call_key
    from engine.runtime.providers import SimProvider

    http = settings.providers.http_providers(catalog.providers)
    res, cat = planned(requests, policy=policy, params=params, catalog=catalog, settings=settings, seed=seed,
                       speedup=speedup)
    rows: dict[str, dict] = {}
    list_total = 0.0
    why = res.extra.get("reject_why", {})  # the budgets' refusals: a plan of them alone read "$0.0000", unexplained
    for k, r in enumerate(res.requests):
        row = rows.setdefault(r.provider, {"calls": "http" if r.provider in http else "simulated", "requests": 0,
                                           "modes": {}, "refused": 0, "cost_usd": 0.0})
        row["requests"] += 1
        m = int(res.mode[k])
        mode = MODES[m] if 0 <= m < len(MODES) else "none"
        row["modes"][mode] = row["modes"].get(mode, 0) + 1
        row["refused"] += k in why
        row["cost_usd"] += float(res.cost[k])
        list_total += price_alone(r, cat, "sync").total
    samples = {}
    draws = Draws(0, settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
    for name in http:
        first = next((r for r in res.requests if r.provider == name), None)
        if first is None:
            continue
        sim = SimProvider(cat.provider(name), cat, settings, draws, draw=False)
        prov = make_provider(name, cat, settings, sim, ManualClock(), Secret("dry-run"))
        job = CallJob(call_key(first.tenant, first.id, first.model), first, 0.0, 0, 0)
        body = prov.body(job)
        body = _clip(body)  # the shape, not kilobytes of a replayed prompt
        # Where the real run's SDK sends it: OPENAI_BASE_URL / ANTHROPIC_BASE_URL too (read as "the SDK's default"
        # until a new user's tour, pointed at the emulator by them).
        route, base = prov.route(job), settings.providers.endpoints[name].address()
        if base and route.startswith("/v1beta/models/"):  # Veo: under the Gemini API's root, not the layer's path
            from actors.providers._veo import native_root
            base = native_root(base)
        samples[name] = {"route": route, "base_url": base or "(the SDK's default)",
                         "body": body}
    refused = {"count": len(why), "by_reason": dict(res.extra.get("rejected", {})),
               "example": next(({"id": res.requests[k].id, "why": w} for k, w in sorted(why.items())), None)}
    return {"requests": len(res.requests), "cost_usd": float(res.total_cost), "list_price_usd": list_total,
            "providers": rows, "refused": refused, "samples": samples, "keys": key_problems(catalog, settings),
            "speedup": speedup_problem(catalog, settings, speedup)}


def _clip(value, n: int = 120):
    if isinstance(value, str):
        return value if len(value) <= n else value[:n] + f"... ({len(value)} chars)"
    if isinstance(value, list):
        return [_clip(v, n) for v in value]
    if isinstance(value, dict):
        return {k: _clip(v, n) for k, v in value.items()}
    return value
