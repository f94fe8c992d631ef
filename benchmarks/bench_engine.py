"""Throughput and latency of the live engine on the embedded local Ray. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_engine.py [--n 20000]

1. end-to-end requests/s through every actor (ingest, cache, grouper, budget, dispatchers, hub) with
   ``submit_many`` in batches of 1,000, and with one ``submit()`` call per request, at a speed-up so high that
   simulated latencies vanish: this measures the engine, not the providers; next to the simulator on the
   same trace;
2. p50/p99 from ``submit()`` of an urgent request to its dispatcher, on an idle engine (one request at a
   time; engine speed-up 100 so provider calls are short, the wait converted back to real milliseconds);
3. resident memory of the engine's actor processes;
4. in the same run, what bounds them (``_ray_floor.py``): the limit, plain actors passing lists of 1,000
   small dicts along 5 legs and one item along the urgent path's 4 legs, with no work; and the peer, Ray
   Serve's ``@serve.batch`` behind a handle (``--no-peer`` skips it: about 10 s).
Targets (issue 12): >= 20,000/s with submit_many, >= 15,000/s per call, urgent p99 <= 15 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from engine import Engine  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.tracegen import synth  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ray_floor import chain_items_per_s, chain_latency_ms, serve_batch_per_s  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--urgent", type=int, default=200, help="urgent requests timed one at a time")
    ap.add_argument("--no-peer", action="store_true", help="skip Ray Serve's figure")
    a = ap.parse_args()
    n = a.n
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    base = synth(n, seed=2, duration_s=1.0)
    reqs = [r.model_copy(update={"arrival_s": 0.0, "deadline_s": min(r.deadline_s, 3600.0)}) for r in base]
    t = time.perf_counter()
    sim = simulate(reqs, load_policy("smart", default_catalog()))
    print(f"simulator, smart, same trace: {n / (time.perf_counter() - t):,.0f} requests/s")

    for label, per_call in (("submit_many (batches of 1,000)", False), ("submit() per request", True)):
        with Engine.start(speedup=1e6) as eng:
            t = time.perf_counter()
            if per_call:
                futs = [eng.submit(r) for r in reqs]
            else:
                futs = [f for k in range(0, n, 1000) for f in eng.submit_many(reqs[k:k + 1000])]
            t_sub = time.perf_counter() - t
            for f in futs:
                f.result(timeout=600)
            wall = time.perf_counter() - t
            if not per_call:
                pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in eng._h["all"]])
                mem = sum(rss_mb(p) for p in set(pids))
        print(f"{label}: {n:,} requests end to end in {wall:.2f} s = {n / wall:,.0f} requests/s "
              f"(submitting took {t_sub:.2f} s = {n / t_sub:,.0f}/s)")
    print(f"engine actor processes: {len(set(pids))}, resident memory {mem:,.0f} MB in total "
          f"(plus the driver and Ray's own processes); simulator cost ${sim.total_cost:.2f}")

    # Speed-up 100 so each simulated provider call takes milliseconds; waits are converted back to real time.
    with Engine.start(speedup=100.0) as eng:
        lat = []
        for k in range(a.urgent):
            f = eng.submit({"id": f"u{k}", "model": "gpt-5-mini", "prompt": f"urgent {k}", "priority": "urgent",
                            "deadline_s": 10.0})
            f.result(timeout=30)
        for d in eng._h["dispatchers"].values():
            lat.extend(ray.get(d.stats.remote(True))["waits"])
    lat_ms = np.array(lat) * 1000 / 100.0
    print(f"urgent submit() -> dispatcher on an idle engine: p50 {np.percentile(lat_ms, 50):.1f} ms, "
          f"p99 {np.percentile(lat_ms, 99):.1f} ms over {lat_ms.size} requests")

    print(f"limit, 5 idle actors in a row passing lists of 1,000 small dicts: {chain_items_per_s():,.0f} items/s")
    p50, p99 = chain_latency_ms(max(a.urgent, 200))
    print(f"limit, one item through 4 idle actors (the urgent path's legs, no work): p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms")
    if not a.no_peer:
        print(f"peer, Ray Serve @serve.batch behind a handle, no work: {serve_batch_per_s():,.0f} requests/s")
    ray.shutdown()


if __name__ == "__main__":
    main()
