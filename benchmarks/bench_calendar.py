"""What the fallback calendar (``engine.core.fallbacks``) costs and changes, against smart with its ``latest``
answering the hedge as asked (``off``): the time it adds on one busy lane, and smart's bill on a real trace.

    .venv/bin/python benchmarks/bench_calendar.py busy [--n 15000] [--rate 50]
    .venv/bin/python benchmarks/bench_calendar.py mooncake --seeds 0 1 2 3 4 5

Prints figures; asserts nothing (docs/benchmarks.md, "Stop 57").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, FILES, load_real  # noqa: E402

from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.fallbacks import FallbackCalendar  # noqa: E402
from engine.core.request import Request, validation_context  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

_LATEST = FallbackCalendar.latest


def _run(reqs, seed: int, on: bool) -> tuple[float, float, int, float, float]:
    """(wall s, s in ``latest``, its calls, cost $, share of deadlines met)."""
    spent = [0.0, 0]

    def timed(self, provider, start, *rest):
        t0 = time.perf_counter()
        out = _LATEST(self, provider, start, *rest) if on else start
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return out
    FallbackCalendar.latest = timed
    try:
        t0 = time.perf_counter()
        res = simulate(reqs, load_policy("smart", default_catalog()), seed=seed)
        return time.perf_counter() - t0, spent[0], spent[1], res.total_cost, float(res.met.mean())
    finally:
        FallbackCalendar.latest = _LATEST


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", choices=["busy", *sorted(FILES)])
    ap.add_argument("--n", type=int, default=15_000, help="busy: requests, one model, distinct")
    ap.add_argument("--rate", type=float, default=50.0, help="busy: arrivals per second")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    if a.trace == "busy":
        ctx = validation_context(default_catalog())
        reqs = [Request.model_validate({"id": f"q{i}", "arrival_s": i / a.rate, "model": "gpt-5-mini",
                                        "input_tokens": 2000 + i % 997, "output_tokens": 500, "deadline_s": 3600.0,
                                        "reuse": "none"}, context=ctx) for i in range(a.n)]
    else:
        reqs = load_real(a.trace, a.data)
    for seed in a.seeds:
        for on in (True, False):
            wall, in_latest, calls, cost, met = _run(reqs, seed, on)
            print(f"{a.trace} seed {seed} calendar {'on ' if on else 'off'}: ${cost:.3f}, met {met:.2%}, wall "
                  f"{wall:.1f} s, {calls:,} asks of the calendar ({in_latest:.2f} s)")


if __name__ == "__main__":
    main()
