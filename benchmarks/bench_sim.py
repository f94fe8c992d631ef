"""Simulator speed alone: ``simulate()`` of one policy on a real trace, best of a few runs, and in the same run
``naive`` (every request alone, sync, at arrival): the simulator's own machinery with next to no policy, which
bounds what any policy can reach. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_sim.py [--trace ../shared/data/real/azure_llm_2023_conv.csv] [--policy smart]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _real import DATA  # noqa: E402

from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.tracegen import from_azure, from_mooncake  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

DEFAULT = DATA / "azure_llm_2023_conv.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT, help="an Azure CSV or a Mooncake JSONL trace")
    ap.add_argument("--policy", default="smart")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    if not a.trace.exists():
        sys.exit(f"error: {a.trace} not found; point --trace at a trace of ../shared/data/real/")
    reqs = list(from_mooncake(a.trace) if a.trace.suffix == ".jsonl" else from_azure(a.trace))
    cat = default_catalog()
    for policy in dict.fromkeys((a.policy, "naive")):
        best = min(_timed(reqs, policy, cat) for _ in range(a.runs))
        what = "target >= 50,000" if policy == a.policy else "the machinery alone: the bound"
        print(f"simulator, {policy}, {a.trace.name}: {len(reqs):,} requests in {best:.2f} s = "
              f"{len(reqs) / best:,.0f} requests/s (best of {a.runs}; {what})")


def _timed(reqs, policy: str, cat) -> float:
    t = time.perf_counter()
    simulate(reqs, load_policy(policy, cat), catalog=cat)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
