"""Campaign-style traces (``synth``: text, image and video campaigns with re-sent copies and near duplicates):
smart against naive and the lower bound, and against smart with in-flight followers held to the rule on
deadlines alone (``in_flight_margin_s: null``), per seed. Also request by request: deadlines the release
times lost or won against that rule (docs/cache.md, step 2). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_campaign.py [--n 20000] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.tracegen import synth  # noqa: E402
from engine.sim.lower_bound import lower_bound  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    a = ap.parse_args()
    cat = default_catalog()
    print("| seed | lower bound | naive (met) | smart, deadline rule (capture, met) | smart (capture, met) | "
          "deadlines lost / won |")
    print("|---|---:|---:|---:|---:|---:|")
    for seed in a.seeds:
        reqs = synth(a.n, seed=seed)
        bound = lower_bound(reqs, catalog=cat).total_usd
        naive = simulate(reqs, load_policy("naive", cat), catalog=cat)
        old = simulate(reqs, load_policy("smart", cat, {"in_flight_margin_s": None}), catalog=cat)
        new = simulate(reqs, load_policy("smart", cat), catalog=cat)

        def cell(r) -> str:
            capture = (naive.total_cost - r.total_cost) / (naive.total_cost - bound)
            return f"${r.total_cost:,.2f} ({capture:.1%}, {r.met.mean():.2%})"

        lost, won = int((old.met & ~new.met).sum()), int((~old.met & new.met).sum())
        print(f"| {seed} | ${bound:,.2f} | ${naive.total_cost:,.2f} ({naive.met.mean():.2%}) | {cell(old)} | "
              f"{cell(new)} | {lost} / {won} |")


if __name__ == "__main__":
    main()
