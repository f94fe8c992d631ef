"""Memory over a soak: the live engine takes N requests in waves and must not grow with them. Prints figures;
asserts nothing.

    .venv/bin/python benchmarks/bench_soak.py [--n 200000] [--wave 10000] [--retention 0]

Each wave is submitted with ``submit_many`` and awaited; the driver's futures and ingest's ids are dropped
``--retention`` seconds after a request finished (``Engine.start(retention_s=...)``), and ``max_pending`` bounds
what is accepted and unfinished. Resident memory of the driver and of every engine actor is read after the
first wave (everything warm) and after the last; a flat engine shows the same figures. Requests are unique
(no cache hits) and text-only, at a speed-up that makes provider calls instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from engine import Engine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import rss_mb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--wave", type=int, default=10_000)
    ap.add_argument("--retention", type=float, default=0.0, help="seconds a finished request is remembered")
    a = ap.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    t0 = time.perf_counter()
    with Engine.start(speedup=1e6, retention_s=a.retention, max_pending=2 * a.wave) as eng:
        h = eng._h
        named = [("ingest", h["ingest"]), ("budget", h["budget"]), ("hub", h["hub"])]
        named += [("cache", h["cache"])] if h["cache"] is not None else []
        named += [(f"grouper-{k}", g) for k, g in enumerate(h["groupers"])]
        named += [(f"dispatcher-{p}", d) for p, d in h["dispatchers"].items()]
        pid_of = dict(zip([n for n, _ in named], ray.get([a.__ray_call__.remote(lambda self: os.getpid())
                                                          for _, a in named])))
        pids = sorted(set(pid_of.values()))
        done = 0
        for w in range(a.n // a.wave):
            reqs = [{"id": f"s{w}-{k}", "model": "gpt-4o-mini", "input_tokens": 200 + k % 500,
                     "output_tokens": 100, "prompt": f"soak {w} {k}", "priority": "urgent", "deadline_s": 60,
                     "reuse": "none"} for k in range(a.wave)]
            for f in eng.submit_many(reqs):
                f.result(timeout=600)
            done += a.wave
            if w == 0 or done >= a.n:
                rows.append((done, rss_mb(os.getpid()), sum(rss_mb(p) for p in pids), len(eng._futs),
                             ray.get(eng._h["ingest"].__ray_call__.remote(lambda self: len(self.seen))),
                             {n: rss_mb(p) for n, p in pid_of.items()},
                             ray.get(h["cache"].__ray_call__.remote(lambda self: len(self.memory)))
                             if h["cache"] is not None else 0))
    wall = time.perf_counter() - t0
    print(f"{a.n:,} requests in waves of {a.wave:,}, retention {a.retention:g} s: {wall:.0f} s, "
          f"{a.n / wall:,.0f} requests/s")
    print("| after | driver RSS MB | engine actors RSS MB | driver futures kept | ingest ids kept | cache entries |")
    print("|---:|---:|---:|---:|---:|---:|")
    for done, drv, act, futs, seen, _, cached in rows:
        print(f"| {done:,} | {drv:,.0f} | {act:,.0f} | {futs:,} | {seen:,} | {cached:,} |")
    print("per actor RSS MB, first wave -> last: " + ", ".join(
        f"{n} {rows[0][5][n]:,.0f} -> {rows[-1][5][n]:,.0f}" for n in rows[0][5]))
    print("(the result cache keeps up to cache.memory_max_entries results by design; see docs/cache.md)")
    ray.shutdown()


if __name__ == "__main__":
    main()
