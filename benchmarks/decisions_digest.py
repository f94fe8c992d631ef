"""A digest of what the simulator decides, to show that a refactor changed no decision: per trace and policy,
the total cost and a hash of every request's mode, cost and completion time, and the lower bound. Run it on two
commits and compare the output. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/decisions_digest.py [--n 5000] [--eager]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _real import DATA  # noqa: E402

from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.tracegen import from_azure, from_mooncake, synth  # noqa: E402
from engine.sim.lower_bound import lower_bound  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

REAL = DATA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="requests taken from each real trace")
    ap.add_argument("--eager", action="store_true",
                    help="also smart-eager (batch_gather_s: 0, the README's variant): every batch sent at once")
    a = ap.parse_args()
    cat = default_catalog()
    traces = {"synth-3000": synth(3000, seed=5, duration_s=3600)}
    if (REAL / "mooncake_conversation_trace.jsonl").exists():
        traces["mooncake"] = list(from_mooncake(REAL / "mooncake_conversation_trace.jsonl"))[:a.n]
        traces["azure-conv"] = list(from_azure(REAL / "azure_llm_2023_conv.csv"))[:a.n]
    else:
        print(f"(real traces not found under {REAL}: synthetic only)", file=sys.stderr)
    out = {}
    for name, reqs in traces.items():
        for policy in ("smart", "naive", "smart-eager")[: 3 if a.eager else 2]:
            params = {"batch_gather_s": 0} if policy == "smart-eager" else None
            r = simulate(reqs, load_policy(policy.removesuffix("-eager"), cat, params), catalog=cat)
            h = hashlib.sha256(r.mode.tobytes() + r.cost.tobytes() + r.done_at.tobytes()).hexdigest()[:12]
            out[f"{name}/{policy}"] = [repr(r.total_cost), h]
        out[f"{name}/lower_bound"] = repr(lower_bound(reqs, catalog=cat).total_usd)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
