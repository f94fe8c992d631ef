"""Speed of featurising requests (vectors for near-duplicate search), in one vectorised call.

    .venv/bin/python benchmarks/bench_features.py [--n 10000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.core.features import featurize, fingerprint  # noqa: E402
from engine.core.tracegen import synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    n = ap.parse_args().n
    reqs = synth(n, seed=1)
    featurize(reqs[:100])  # warm imports and caches
    t = time.perf_counter()
    m = featurize(reqs)
    dt = time.perf_counter() - t
    print(f"featurize: {n:,} requests -> {m.shape} float32 in {dt * 1e3:.0f} ms ({n / dt:,.0f} requests/s)")
    t = time.perf_counter()
    for r in reqs:
        fingerprint(r)
    dt = time.perf_counter() - t
    print(f"fingerprint: {n:,} requests in {dt * 1e3:.0f} ms ({n / dt:,.0f} requests/s)")


if __name__ == "__main__":
    main()
