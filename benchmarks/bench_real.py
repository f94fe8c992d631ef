"""Run `bench` for every policy on the real traces and print the tables (docs/benchmarks.md shows them).

    .venv/bin/python benchmarks/bench_real.py [--data ../shared/data/real] [--out out/benchmarks] [--seed 0]

Prints figures; asserts nothing. Targets (issue 2): smart captures >= 90 % of the achievable saving while
meeting >= 99 % of deadlines, and the simulator runs >= 50,000 requests/s for smart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA  # noqa: E402

from engine.app._bench_output import _markdown  # noqa: E402
from engine.app.bench import PolicySpec, run_bench, write_outputs  # noqa: E402
from engine.core.tracegen import from_azure, from_mooncake  # noqa: E402

POLICIES = ["naive", "cache-only", "fixed", "batch-all", "smart"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "benchmarks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.data / "SOURCES.md").exists():
        sys.exit(f"real data not found at {args.data}; pass --data DIR")
    traces = {
        "azure_conv": lambda: from_azure(args.data / "azure_llm_2023_conv.csv", seed=args.seed),
        "azure_code": lambda: from_azure(args.data / "azure_llm_2023_code.csv", seed=args.seed),
        "mooncake_conversation": lambda: from_mooncake(args.data / "mooncake_conversation_trace.jsonl",
                                                       seed=args.seed),
    }
    specs = [PolicySpec(name=p, policy=p) for p in POLICIES]
    for name, build in traces.items():
        t0 = time.perf_counter()
        reqs = build()
        doc = run_bench(reqs, specs, trace_name=name, seed=args.seed)
        write_outputs(doc, args.out / name)
        print(_markdown(doc))
        smart = next(r for r in doc["results"] if r["policy"] == "smart")
        onl = smart.get("capture_of_online")
        print(f"smart: capture {100 * smart['capture_of_achievable']:.1f} % (target >= 90 %; "
              f"{'n/a' if onl is None else f'{100 * onl:.1f} %'} of the online bound), deadlines met "
              f"{100 * smart['deadline_met_frac']:.2f} % (target >= 99 %), simulator "
              f"{smart['sim_requests_per_s']:,.0f} requests/s (target >= 50,000); wall {time.perf_counter() - t0:.1f} s\n")


if __name__ == "__main__":
    main()
