"""Running a trace through the live engine and reporting it like ``bench`` does (floor 4: starts Ray)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.bench import document, result_row
from engine.catalog import Catalog
from engine.draws import Draws
from engine.lower_bound import lower_bound
from engine.request import Request
from engine.result import Result
from engine.settings import Settings
from engine.simulator import MODES, BatchRecord, SimResult, simulate

__all__ = ["as_sim_result", "run_live"]

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


def run_live(requests: Sequence[Request], *, trace_name: str, policy: str = "smart",
             params: dict | None = None, speedup: float = 100.0, address: str | None = None,
             seed: int | None = None, catalog: Catalog | None = None, settings: Settings | None = None,
             on_done: Callable[[int], None] | None = None) -> dict:
    """Replay ``requests`` through a live engine; return the results document of ``bench`` for one policy
    (plus ``engine_report``), judged against the simulated naive cost and the offline lower bound."""
    from engine.driver import Engine
    from policies import load_policy

    settings = settings or Settings()
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    offset = reqs[0].arrival_s if reqs else 0.0
    seed = settings.sim.seed if seed is None else seed
    t0 = time.perf_counter()
    with Engine.start(settings, policy=policy, policy_params=params, catalog=catalog, address=address,
                      speedup=speedup, offset_s=offset, seed=seed) as eng:
        futs = eng.replay(reqs)
        if on_done is not None:
            for f in futs:
                f.add_done_callback(lambda _f: on_done(1))
        results = [f.result() for f in futs]
        report = eng.report()
    wall = time.perf_counter() - t0
    catalog = eng.catalog
    draws = Draws(len(reqs), settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
    free = settings.model_copy(update={"budgets": type(settings.budgets)()})  # the bill nothing held back
    naive = simulate(reqs, load_policy("naive", catalog), catalog=catalog, settings=free, seed=seed,
                     draws=draws).total_cost
    lb = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws)
    live = as_sim_result(policy, trace_name, reqs, results, wall)
    relaxed = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws, relax=~live.met).total_usd
    row = result_row(f"{policy} (live)", policy, params or {}, live, naive, lb.total_usd, relaxed)
    row.update(live_wall_s=round(wall, 2), speedup=speedup)
    b = report.get("budget") or {}
    if "overrun_usd" in b:
        row["budget_overrun_usd"] = b["overrun_usd"]
    doc = document(trace_name, len(reqs), seed, lb, [row],
                   [b.model_dump() for b in settings.budgets.specs] if settings.budgets.specs else None)
    doc["engine_report"] = report
    return doc
