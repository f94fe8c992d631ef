"""Deadlines met under a budget that binds, with model-max reservations: the table of docs/budgets.md, "Held
work at OpenAI's flex tier (stop 72)". The Azure conversation trace's first 3,000 and 6,000 requests and all of
it, each under naive's cost / 3 and / 1.5 (paced over the trace, as ``tests/unit/test_budget_policy.py``).

    .venv/bin/python benchmarks/bench_budget_held.py [--sizes 3000 6000 0] [--shares 3 1.5]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._real import DATA, FILES  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.settings import Settings, with_budget  # noqa: E402
from engine.core.tracegen import from_azure  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3000, 6000, 0], help="first N requests (0: all)")
    ap.add_argument("--shares", type=float, nargs="+", default=[3.0, 1.5], help="budget = naive's cost / share")
    args = ap.parse_args()
    cat = default_catalog()
    print("| requests | budget | naive met (served) | smart met (served) | overrun naive / smart |")
    print("|---:|---|---:|---:|---:|")
    for n in args.sizes:
        reqs = from_azure(DATA / FILES["azure_conv"], limit=n or None)
        naive_cost = simulate(reqs, load_policy("naive", cat)).total_cost
        for share in args.shares:
            settings = with_budget(Settings(), naive_cost / share, horizon_s=max(r.arrival_s for r in reqs))
            runs = [simulate(reqs, load_policy(p, cat), settings=settings) for p in ("naive", "smart")]
            cells = [f"{r.met.mean():.2%} ({int(r.served.sum()):,})" for r in runs]
            over = " / ".join(f"{r.extra['budget']['overrun_usd']:.2f}" for r in runs)
            print(f"| {len(reqs):,} | / {share:g} | {cells[0]} | {cells[1]} | {over} |", flush=True)


if __name__ == "__main__":
    main()
