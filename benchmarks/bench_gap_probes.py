"""Two probes of the Mooncake gap that change no code of the engine (docs/benchmarks.md, "Stop 58"):

- ``bound``: the lower bound with each cache cluster's write charged as no schedule can avoid it, the first writer
  arriving before every reader's deadline (``min over writers j of write_j + the plain price of each holder whose
  deadline comes before j's arrival``), against the bound as it is;
- ``third``: what a third batch attempt (two checkpoints, each at its best point) adds to P(on time) over the
  second batch, per provider and time to the hedge;
- ``segments`` (stop 59): the bound with each cache cluster split where its rigid holders (a send window no
  longer than the TTL: urgent turns) lie more than a TTL apart and no flexible holder's window reaches into the
  gap, or too few flexible holders are left to bridge it (their positions relaxed): one holder is sent once,
  so a cluster chained through it may need more than the one write the bound charges.

    .venv/bin/python benchmarks/bench_gap_probes.py bound --seeds 0 1
    .venv/bin/python benchmarks/bench_gap_probes.py third
    .venv/bin/python benchmarks/bench_gap_probes.py segments --seeds 0 1

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, load_real  # noqa: E402

import engine.sim.lower_bound as lb  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402

GRID = 60  # checkpoints tried for the first of three batches


def _clusters(holders: list) -> list[list]:
    """The bound's clusters of one block's holders: windows ``[arrival, deadline + ttl]`` that chain."""
    holders.sort()
    clusters, cur, end = [], [], -np.inf
    for h in holders:
        if cur and h[0] > end:
            clusters.append(cur)
            cur = []
        end = h[1] if not cur else max(end, h[1])
        cur.append(h)
    if cur:
        clusters.append(cur)
    return clusters


def _first_writer_writes(ttl_s: float):
    """``_cluster_writes`` with the first writer bound to arrive before every reader's deadline. A holder tuple is
    (arrival, deadline + ttl, write extra, plain extra), as the bound builds it."""
    def writes(holders: list) -> float:
        clusters = _clusters(holders)
        total = 0.0
        for c in clusters:
            a = np.array([h[0] for h in c])
            d = np.array([h[1] for h in c]) - ttl_s
            w = np.array([h[2] for h in c])
            p = np.array([h[3] for h in c])
            order = np.argsort(d)
            plain_before = np.concatenate([[0.0], np.cumsum(p[order])])[np.searchsorted(d[order], a, side="left")]
            total += min(p.sum(), float(np.min(w + plain_before)))
        return total
    return writes


def _against_the_bound(seeds: list[int], data: Path, writes):
    """(seed, the bound, the bound with ``writes(ttl_s)`` as its ``_cluster_writes``) on Mooncake, per seed."""
    reqs = load_real("mooncake", data)
    cat = default_catalog()
    ttls = {pc.ttl_s for r in reqs if (pc := cat.providers[r.provider].cache_of(r.model)) is not None}
    if len(ttls) != 1:
        raise SystemExit(f"the probe takes one cache TTL for every model of the trace; they have {sorted(ttls)}")
    ttl_s, as_is = ttls.pop(), lb._cluster_writes
    for seed in seeds:
        before = lb.lower_bound(reqs, seed=seed)
        lb._cluster_writes = writes(ttl_s)
        try:
            after = lb.lower_bound(reqs, seed=seed)
        finally:
            lb._cluster_writes = as_is
        yield seed, before, after


def bound(seeds: list[int], data: Path) -> None:
    for seed, before, after in _against_the_bound(seeds, data, _first_writer_writes):
        print(f"seed {seed}: bound ${before.total_usd:.3f} -> ${after.total_usd:.3f} "
              f"(+${after.total_usd - before.total_usd:.3f}); cache writes ${before.cache_write_usd:.3f} -> "
              f"${after.cache_write_usd:.3f}")


def _segment_writes(ttl_s: float, seen: dict):
    """``_cluster_writes`` with at least as many segments per cluster as its rigid holders need (see the module
    docstring); each segment holds one of them at least and pays ``min(write, its plain)``, the cheapest first."""
    def writes(holders: list) -> float:
        clusters = _clusters(holders)
        total = 0.0
        for c in clusters:
            w_min, base = min(h[2] for h in c), min(min(h[2] for h in c), sum(h[3] for h in c))
            rigid = sorted((h for h in c if h[1] - ttl_s - h[0] <= ttl_s), key=lambda h: h[0])
            flex = [(h[0], h[1] - ttl_s) for h in c if h[1] - ttl_s - h[0] > ttl_s]
            needs, hard = [], 0
            for x, y in zip(rigid, rigid[1:]):
                lo, hi = x[1] - ttl_s, y[0]
                if hi - lo <= ttl_s:
                    continue
                seen["gaps"] += 1
                if any(a < hi and d > lo for a, d in flex):
                    needs.append(int(np.ceil((hi - lo) / ttl_s)) - 1)
                else:
                    hard += 1
            left, unbridged = len(flex), 0
            for n in sorted(needs):
                if n <= left:
                    left -= n
                else:
                    unbridged += 1
            k = 1 + hard + unbridged
            tight = sum(sorted(min(w_min, h[3]) for h in rigid)[:k]) if k > 1 else 0.0
            seen["split"] += tight > base
            total += max(base, tight)
        return total
    return writes


def segments(seeds: list[int], data: Path) -> None:
    seen = {"gaps": 0, "split": 0}
    for seed, before, after in _against_the_bound(seeds, data, lambda ttl_s: _segment_writes(ttl_s, seen)):
        print(f"seed {seed}: bound ${before.total_usd:.3f} -> ${after.total_usd:.3f} "
              f"(+${after.total_usd - before.total_usd:.3f}); rigid gaps over a TTL {seen['gaps']}, clusters split "
              f"{seen['split']}")
        seen.update(gaps=0, split=0)


def third() -> None:
    cat = default_catalog()
    print("| provider | s to the hedge | one batch | two | three |")
    print("|---|---:|---:|---:|---:|")
    for name, prov in cat.providers.items():
        ba = prov.batch_api
        if ba is None:
            continue
        for usable in (1200, 1800, 2400, 3000, 3300):
            p1, (_, p2), p3 = ba.turnaround_cdf(usable), ba.second_batch(usable), ba.second_batch(usable)[1]
            room = usable - ba.cancel_s - 2 * ba.turnaround_min_s
            for i in range(1, GRID):
                c = ba.turnaround_min_s + room * i / GRID
                rest = usable - c - ba.cancel_s
                if c > 0 and rest > 0:
                    f = ba.turnaround_cdf(c)
                    p3 = max(p3, f + (1 - f) * ba.second_batch(rest)[1])
            print(f"| {name} | {usable} | {p1:.3f} | {p2:.3f} | {p3:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=["bound", "third", "segments"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    {"bound": lambda: bound(a.seeds, a.data), "segments": lambda: segments(a.seeds, a.data), "third": third}[a.probe]()


if __name__ == "__main__":
    main()
