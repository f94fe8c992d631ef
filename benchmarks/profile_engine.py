"""Profile the live engine's actors (cProfile inside each actor process) on a burst of requests, and print
where each actor spends its time. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/profile_engine.py [--n 20000] [--top 8]
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
from engine.core.tracegen import synth  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prompts import padded  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--prompt-chars", type=int, default=0,
                    help="pad every prompt to about this many characters (real prompts run to thousands)")
    a = ap.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    reqs = [r.model_copy(update={"arrival_s": 0.0, "deadline_s": min(r.deadline_s, 3600.0),
                                 "prompt": padded(r.prompt, a.prompt_chars)})
            for r in synth(a.n, seed=2, duration_s=1.0)]
    with Engine.start(speedup=1e6) as eng:
        actors = {"ingest": eng._h["ingest"], "cache": eng._h["cache"], "grouper": eng._h["groupers"][0],
                  "hub": eng._h["hub"], **{f"dispatcher-{k}": v for k, v in eng._h["dispatchers"].items()}}
        ray.get([h.profile.remote("start") for h in actors.values()])
        t = time.perf_counter()
        futs = [f for k in range(0, a.n, 1000) for f in eng.submit_many(reqs[k:k + 1000])]
        for f in futs:
            f.result(timeout=600)
        wall = time.perf_counter() - t
        stats = {name: ray.get(h.profile.remote("stop", a.top)) for name, h in actors.items()}
    print(f"{a.n:,} requests end to end in {wall:.2f} s ({a.n / wall:,.0f}/s); CPU seconds inside each actor's "
          f"Python, and its top functions by own time:")
    for name, (total, lines) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        print(f"\n{name}: {total:.2f} s ({1e6 * total / a.n:.0f} us per request)")
        for ln in lines:
            print("   ", ln.strip()[:150])
    ray.shutdown()


if __name__ == "__main__":
    main()
