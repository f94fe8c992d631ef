"""Smart with and without warm follow-ups (docs/policies.md), over simulation seeds: what they save and what they
cost, per trace. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/warm_followups.py [--trace mooncake|synth] [--seeds 0 1 2] [--margins none 10 30]

``mooncake`` reads ../shared/data/real (``--data``); ``synth`` is the campaign-style trace of 20,000 requests
(``benchmarks/bench_campaign.py``), whose seed is also the simulation's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA  # noqa: E402

from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.tracegen import from_mooncake, synth  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import Smart, SmartParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", choices=["mooncake", "synth"], default="mooncake")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--margins", nargs="+", default=["none", "10"], help="warm_margin_s values; none = off")
    a = ap.parse_args()
    cat = default_catalog()
    print(f"{a.trace}: smart cost, deadlines met, follow-ups sent warm (warm_margin_s per row, seeds per column)")
    print("| warm_margin_s | " + " | ".join(f"seed {s}" for s in a.seeds) + " |")
    print("|---|" + "---:|" * len(a.seeds))
    moon = from_mooncake(a.data / "mooncake_conversation_trace.jsonl") if a.trace == "mooncake" else None
    for m in a.margins:
        margin = None if m.lower() in ("none", "null", "off") else float(m)
        cells = []
        for seed in a.seeds:
            reqs = moon if moon is not None else synth(20000, seed=seed)
            res = simulate(reqs, Smart(cat, SmartParams(warm_margin_s=margin)), seed=seed)
            met = float(np.mean(res.done_at <= np.array([r.deadline_at for r in res.requests])))
            warm = sum(1 for b in res.batches if "warm at the provider" in b.reason)
            cells.append(f"${res.total_cost:,.2f} ({met:.2%}, {warm})")
        print(f"| {m} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
