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
from engine.core.catalog import default_catalog, load_catalog  # noqa: E402
from engine.core.errors import SmartbatchError  # noqa: E402
from policies import load_policy  # noqa: E402


def variant(text: str) -> PolicySpec:
    params = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected key=value[,key=value], e.g. gather_p_loss=0.01")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"--variant {text!r}: {value!r} is not a JSON value (a number, true, null, "
                             '"text")') from None
    return PolicySpec(name=f"smart {text}", policy="smart", params=params)


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give 1 or more")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", choices=sorted(FILES))
    ap.add_argument("--seeds", type=_at_least_one, default=30)
    ap.add_argument("--first", type=int, default=0, help="the first seed")
    ap.add_argument("--jobs", type=_at_least_one, default=2)
    ap.add_argument("--variant", action="append", default=[], help="smart with these parameters (repeatable)")
    ap.add_argument("--naive", action="store_true", help="list naive too")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--catalog-overlay", type=Path, help="a YAML merged over the packaged catalog (another price, "
                    "cache or turnaround of a provider): smart and the bounds are run against it")
    a = ap.parse_args()
    if a.first < 0:
        ap.error(f"--first {a.first}: seeds are 0 or more")
    specs = [PolicySpec(name="smart", policy="smart"), *map(variant, a.variant)]
    if a.naive:
        specs.append(PolicySpec(name="naive", policy="naive"))
    t0 = time.perf_counter()
    try:  # the parameters and the catalog are checked before the trace is read
        catalog = load_catalog(None, a.catalog_overlay) if a.catalog_overlay else None
        for spec in specs:
            load_policy(spec.policy, catalog or default_catalog(), spec.params)
        reqs = load_real(a.trace, a.data)
        doc = run_seeds(reqs, specs, list(range(a.first, a.first + a.seeds)), trace_name=a.trace, jobs=a.jobs,
                        catalog=catalog)
    except SmartbatchError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(seeds_markdown(doc))
    per = {s["policy"]: [next(r for r in run["results"] if r["policy"] == s["policy"])["cost_usd"]
                         for run in doc["by_seed"]] for s in doc["summary"]}
    for name, costs in per.items():
        print(f"{name}: cheapest seed ${min(costs):.2f}, dearest ${max(costs):.2f}")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
