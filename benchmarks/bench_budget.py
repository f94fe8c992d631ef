"""Budgets, rate limits and fair scheduling in the simulator: the figures in docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_budget.py [--data ../shared/data/real] [--share 3]

1. Each trace under a budget of its naive cost / ``share`` (paced over the trace): spend against the budget,
   overrun, deadlines met per priority, urgent work served, requests completed, refusals, for naive and smart,
   with reservations at the model's maximum output (the safe default) and at the request's output_tokens.
2. A tenant flooding a rate-limited provider with background work, next to another tenant's normal work:
   deadlines of the quiet tenant under fair scheduling and under arrival order.
3. A burst of 10,000 requests against rate gates: the busiest sliding minute against each limit.
4. With ``--live``: 1,500 synthetic requests (deadlines capped at 1 h) through the live engine on a local Ray at
   ``--speedup`` (100), budget naive / 3, next to the simulator on the same trace and budget.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA  # noqa: E402

from engine.core.budgets import BudgetSettings  # noqa: E402
from engine.core.catalog import Catalog, default_catalog  # noqa: E402
from engine.core.request import Request, validation_context  # noqa: E402
from engine.core.settings import Settings, with_budget  # noqa: E402
from engine.core.tracegen import from_azure, synth  # noqa: E402
from engine.runtime.ratelimit import WINDOW_S  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402


def budget_table(name: str, reqs: list[Request], share: float) -> None:
    cat = default_catalog()
    reqs = sorted(reqs, key=lambda r: r.arrival_s)  # the order of a result's arrays
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat).total_cost
    budget = naive / share
    horizon = max(r.arrival_s for r in reqs)
    prios = np.array([r.priority for r in reqs])
    n_urgent = int((prios == "urgent").sum())
    print(f"\n### {name}: {len(reqs):,} requests, naive ${naive:.2f}, budget ${budget:.2f} (naive / {share:g}), "
          f"{n_urgent} urgent\n")
    print("| reservation | policy | spend $ | overrun $ | completed | urgent served | met urgent / normal / "
          "background | rejected | waits / deferrals |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for reserve in ("model_max", "request"):
        s = with_budget(Settings(budgets=BudgetSettings(reserve_output=reserve)), budget, horizon_s=horizon)
        for policy in ("naive", "smart"):
            res = simulate(reqs, load_policy(policy, cat), catalog=cat, settings=s)
            sm = res.summary()
            done = (res.status == 1) | (res.status == 2)
            met = sm["deadline_met_by_priority"]
            b = res.extra["budget"]
            print(f"| {reserve} | {policy} | {sm['cost_usd']:.2f} | {b['overrun_usd']:.2f} | {sm['completed']:,} | "
                  f"{int(done[prios == 'urgent'].sum())}/{n_urgent} | "
                  f"{100 * met['urgent']:.1f} / {100 * met['normal']:.1f} / {100 * met['background']:.1f} % | "
                  f"{sum(sm['rejected'].values()):,} | {b['waits']:,} / {b['deferrals']:,} |")


def tight(rpm: float, batch: bool = False) -> Catalog:
    base = default_catalog().model_dump()
    base["providers"]["openai"].update(rate_limits={"rpm": rpm, "tpm": 10_000_000, "max_concurrency": 64})
    if not batch:
        base["providers"]["openai"]["batch_api"] = None
    return Catalog.model_validate(base)


def flood_table() -> None:
    cat = tight(600)
    ctx = validation_context(cat, Settings())
    rng = np.random.default_rng(9)
    rows = [{"id": f"flood{i}", "tenant": "flood", "arrival_s": float(rng.uniform(0, 20)), "priority": "background",
             "deadline_s": 86400.0} for i in range(6000)]
    rows += [{"id": f"quiet{i}", "tenant": "quiet", "arrival_s": 5.0 + 10.0 * i, "priority": "normal",
              "deadline_s": 120.0} for i in range(60)]
    reqs = sorted((Request.model_validate({**d, "model": "gpt-5-mini", "input_tokens": 800, "output_tokens": 200,
                                           "prompt": d["id"]}, context=ctx) for d in rows), key=lambda r: r.arrival_s)
    quiet = np.array([r.tenant == "quiet" for r in reqs])
    print("\n### One tenant floods (6,000 background calls at once, 600 rpm, no batch API); another sends 60 "
          "normal calls with 2-minute deadlines\n")
    print("| scheduling | quiet tenant met | quiet p99 wait s | flood done by s |")
    print("|---|---:|---:|---:|")
    for label, params in (("fair share + score + promotion (default)", {}),
                          ("arrival order", {"scheduling": {"order": "fifo", "fair_share": False}})):
        res = simulate(reqs, load_policy("smart", cat, params), catalog=cat)
        lat = (res.done_at - np.array([r.arrival_s for r in reqs]))[quiet]
        print(f"| {label} | {100 * res.met[quiet].mean():.1f} % | {np.percentile(lat, 99):.1f} | "
              f"{np.nanmax(res.done_at[~quiet]):.0f} |")


def burst_table() -> None:
    base = default_catalog().model_dump()
    base["providers"]["openai"].update(rate_limits={"rpm": 3000, "tpm": 1_500_000, "max_concurrency": 400})
    base["providers"]["openai"]["models"]["gpt-4o-mini"]["rate_limits"] = {"rpm": 500, "tpm": 200_000,
                                                                           "max_concurrency": 100}
    cat = Catalog.model_validate(base)
    ctx = validation_context(cat, Settings())
    rng = np.random.default_rng(4)
    reqs = [Request.model_validate({
        "id": f"b{i}", "arrival_s": float(rng.uniform(0, 10)),
        "model": str(rng.choice(["gpt-5-mini", "gpt-4o-mini"], p=[0.8, 0.2])),
        "input_tokens": int(rng.integers(100, 1500)), "output_tokens": int(rng.integers(20, 400)),
        "priority": str(rng.choice(["urgent", "normal", "background"])), "deadline_s": 120.0}, context=ctx)
        for i in range(10_000)]
    print("\n### 10,000 requests within 10 s against rate gates (naive: every request a sync call)\n")
    print("| gate | limit rpm / tpm / concurrent | busiest minute: requests / tokens | peak concurrent |")
    print("|---|---|---|---:|")
    res = simulate(reqs, load_policy("naive", cat), catalog=cat, record_calls=True)
    for key, rl in ((None, cat.providers["openai"].rate_limits),
                    ("gpt-4o-mini", cat.providers["openai"].models["gpt-4o-mini"].rate_limits)):
        h = res.extra["calls"]["openai"][key]
        starts = np.array([x[0] for x in h])
        toks = np.array([x[1] for x in h], dtype=float)
        upto = np.searchsorted(starts, starts + WINDOW_S, side="left")
        csum = np.concatenate([[0.0], np.cumsum(toks)])
        idx = np.arange(len(starts))
        ev = sorted([(x[0], 1) for x in h] + [(x[2], -1) for x in h], key=lambda e: (e[0], e[1]))
        print(f"| {key or 'openai (shared)'} | {rl.rpm:g} / {rl.tpm:g} / {rl.max_concurrency} | "
              f"{(upto - idx).max()} / {(csum[upto] - csum[idx]).max():,.0f} | "
              f"{np.cumsum([d for _, d in ev]).max()} |")


def live_table(speedup: float) -> None:
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from engine import Engine

    cat = default_catalog()
    reqs = sorted((r.model_copy(update={"deadline_s": min(r.deadline_s, 3600.0)})
                   for r in synth(1500, seed=1, duration_s=600.0)), key=lambda r: r.arrival_s)
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat).total_cost
    s = with_budget(Settings(), naive / 3, horizon_s=reqs[-1].arrival_s)
    prios = np.array([r.priority for r in reqs])
    print(f"\n### The live engine under a budget: 1,500 requests, budget ${naive / 3:.2f} (naive / 3), "
          f"{speedup:g}x\n")
    print("| runtime | spend $ | overrun $ | met urgent / normal / background |")
    print("|---|---:|---:|---|")
    sim = simulate(reqs, load_policy("smart", cat), catalog=cat, settings=s)
    met = sim.summary()["deadline_met_by_priority"]
    print(f"| simulator | {sim.total_cost:.2f} | {sim.extra['budget']['overrun_usd']:.2f} | "
          f"{100 * met['urgent']:.1f} / {100 * met['normal']:.1f} / {100 * met['background']:.1f} % |")
    with Engine.start(s, speedup=speedup, offset_s=0.0, metrics_port=None) as eng:
        res = {r.id: r for r in (f.result(timeout=1800) for f in eng.replay(reqs))}
        rep = eng.report()["budget"]
    ok = np.array([bool(res[r.id].deadline_met) for r in reqs])
    print(f"| live, {speedup:g}x | {rep['spent_usd']:.2f} | {rep['overrun_usd']:.2f} | "
          + " / ".join(f"{100 * ok[prios == p].mean():.1f}" for p in ("urgent", "normal", "background")) + " % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--share", type=float, default=3.0, help="budget = naive cost / share")
    ap.add_argument("--live", action="store_true", help="also run the live engine on a local Ray (about 1 min)")
    ap.add_argument("--speedup", type=float, default=100.0)
    args = ap.parse_args()
    budget_table("synthetic (seed 1)", synth(5000, seed=1), args.share)
    conv = args.data / "azure_llm_2023_conv.csv"
    if conv.exists():
        budget_table("Azure LLM conversation trace (real arrivals and token counts)", from_azure(conv, seed=0),
                     args.share)
    else:
        print(f"\n(real data not found at {args.data}: the Azure table is skipped)")
    flood_table()
    burst_table()
    if args.live:
        live_table(args.speedup)


if __name__ == "__main__":
    main()
