"""Smart and variants of it on a real trace over many simulation seeds (``bench --seeds``): mean cost and capture
with their standard errors, and each variant's paired difference from smart as it is.

    .venv/bin/python benchmarks/bench_seeds.py mooncake --seeds 30 --jobs 2 --variant gather_p_loss=0.01

A variant is ``key=value[,key=value]`` (values in JSON) of smart's parameters. Trace names: azure_conv,
azure_code, mooncake. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, FILES, load_real  # noqa: E402

from engine.app.bench import PolicySpec  # noqa: E402
from engine.app.bench_seeds import run_seeds, seeds_markdown  # noqa: E402
from engine.core.catalog import load_catalog  # noqa: E402


def variant(text: str) -> PolicySpec:
    params = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected key=value[,key=value], e.g. gather_p_loss=0.01")
        params[key.strip()] = json.loads(value)
    return PolicySpec(name=f"smart {text}", policy="smart", params=params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", choices=sorted(FILES))
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--first", type=int, default=0, help="the first seed")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], help="smart with these parameters (repeatable)")
    ap.add_argument("--naive", action="store_true", help="list naive too")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--catalog-overlay", type=Path, help="a YAML merged over the packaged catalog (another price, "
                    "cache or turnaround of a provider): smart and the bounds are run against it")
    a = ap.parse_args()
    reqs = load_real(a.trace, a.data)
    specs = [PolicySpec(name="smart", policy="smart"), *map(variant, a.variant)]
    if a.naive:
        specs.append(PolicySpec(name="naive", policy="naive"))
    t0 = time.perf_counter()
    catalog = load_catalog(None, a.catalog_overlay) if a.catalog_overlay else None
    doc = run_seeds(reqs, specs, list(range(a.first, a.first + a.seeds)), trace_name=a.trace, jobs=a.jobs,
                    catalog=catalog)
    print(seeds_markdown(doc))
    per = {s["policy"]: [next(r for r in run["results"] if r["policy"] == s["policy"])["cost_usd"]
                         for run in doc["by_seed"]] for s in doc["summary"]}
    for name, costs in per.items():
        print(f"{name}: cheapest seed ${min(costs):.2f}, dearest ${max(costs):.2f}")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
