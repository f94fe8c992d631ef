"""What one engine start costs this machine, in CPU as well as wall time, beside the floor of the same number of
bare Ray actors: the figures behind docs/testing.md's "Stop 53" (an integration test's time is mostly engine
starts). CPU is the whole machine's busy time from /proc/stat (Linux), so run it on an idle machine. Prints
figures; asserts nothing.

    .venv/bin/python benchmarks/bench_engine_start.py [--runs 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every mode but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    a = ap.parse_args()
    import ray

    from engine import Engine
    from engine.core.settings import MetricsSettings, Settings

    ray.init(address="local", include_dashboard=False, num_cpus=2)

    @ray.remote(num_cpus=0)
    class Bare:
        def ping(self) -> int:
            return 1

    time.sleep(3)  # Ray's own start-up settles
    for _ in range(a.runs):
        c0, t0 = busy_s(), time.perf_counter()
        eng = Engine.start(Settings(metrics=MetricsSettings(port=None)), speedup=100)
        c1, t1 = busy_s(), time.perf_counter()
        n = len(eng._h["all"])
        eng.stop()
        time.sleep(2)
        c2, t2 = busy_s(), time.perf_counter()
        actors = [Bare.remote() for _ in range(n)]
        ray.get([x.ping.remote() for x in actors])
        c3, t3 = busy_s(), time.perf_counter()
        for x in actors:
            ray.kill(x)
        time.sleep(2)
        print(f"Engine.start, default catalog ({n} actors): {t1 - t0:.1f} s wall, {c1 - c0:.1f} CPU-s; "
              f"{n} bare actors: {t3 - t2:.1f} s wall, {c3 - c2:.1f} CPU-s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
