"""What a message between two actors costs as records and as columns (actors._wire): one call to an idle actor
carrying a list of jobs (a request and its bookkeeping, as ingest, the cache and the grouper pass them), waited
for, per call. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_wire.py [--calls 40]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from actors._types import BatchJob, Job  # noqa: E402
from actors._wire import pack  # noqa: E402
from engine.core.tracegen import synth  # noqa: E402


@ray.remote(num_cpus=0)
class _Idle:
    def take(self, x) -> int:
        return len(x)


def _per_call_us(actor, make, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ray.get([actor.take.remote(make(k)) for k in range(calls)])
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=40, help="calls per figure (x25 for the small messages)")
    a = ap.parse_args()
    reqs = list(synth(2000, seed=1))[:2000]
    jobs = [Job(k, r, f"{k:032x}") for k, r in enumerate(reqs)]
    shapes = {
        "1,000 jobs": (lambda k: jobs[(k % 2) * 1000:(k % 2) * 1000 + 1000], a.calls),
        "10 jobs": (lambda k: jobs[k * 10 % 1990:k * 10 % 1990 + 10], a.calls * 25),
        "1 batch of 1 job (a sync dispatch)": (
            lambda k: [BatchJob("b", "sync", None, False, "process_individually", "", [jobs[k % 2000]])],
            a.calls * 25),
        "50 batches of 1 job": (
            lambda k: [BatchJob(f"b{i}", "sync", None, False, "process_individually", "", [jobs[(k * 50 + i) % 2000]])
                       for i in range(50)], a.calls * 5),
    }
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        actor = _Idle.remote()
        ray.get(actor.take.remote([]))
        one = jobs[:1000]
        print(f"pickle alone, 1,000 jobs: records {len(pickle.dumps(one, protocol=5)):,} bytes, "
              f"columns {len(pickle.dumps(pack(one), protocol=5)):,} bytes")
        print("| message | records, us per call | columns, us per call |")
        print("|---|---:|---:|")
        for name, (make, calls) in shapes.items():
            plain = _per_call_us(actor, make, calls)
            packed = _per_call_us(actor, lambda k, make=make: pack(make(k)), calls)
            print(f"| {name} | {plain:,.0f} | {packed:,.0f} |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
