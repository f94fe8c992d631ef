"""Where a policy's money goes, per priority and mode, next to the lower bound's per-request part.

    .venv/bin/python benchmarks/breakdown.py mooncake [--policy smart] [--data ../shared/data/real]

Trace names: azure_conv, azure_code, mooncake. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, FILES, load_real  # noqa: E402

from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.cost import price_batch  # noqa: E402
from engine.sim.lower_bound import lower_bound  # noqa: E402
from engine.sim.simulator import MODES, simulate  # noqa: E402
from policies import load_policy  # noqa: E402


def mode_counts(mode: np.ndarray) -> dict[str, int]:
    """How many requests ended in each mode that occurs, in ``MODES``' order: every mode, so the counts add up to
    the requests (a fixed ``range(4)`` left out flex, the fifth)."""
    return {name: int((mode == k).sum()) for k, name in enumerate(MODES) if (mode == k).any()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", choices=sorted(FILES))
    ap.add_argument("--policy", default="smart")
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    reqs = load_real(a.trace, a.data)
    cat = default_catalog()
    res = simulate(reqs, load_policy(a.policy, cat))
    lb = lower_bound(reqs)
    print(f"{a.trace}: {a.policy} ${res.total_cost:.2f}, lower bound ${lb.total_usd:.2f} "
          f"(of which one-per-cluster cache writes ${lb.cache_write_usd:.2f})")
    prio = np.array([r.priority for r in res.requests])
    for p in ("urgent", "normal", "background"):
        sel = prio == p
        modes = mode_counts(res.mode[sel])
        sub = [r for r, s in zip(res.requests, sel) if s]
        one_batch = sum(sum(x.total for x in price_batch([r for r in sub if r.model == m], cat, "batch_api"))
                        for m in {r.model for r in sub})
        print(f"  {p:10s} n={sel.sum():6d} cost ${res.cost[sel].sum():8.2f}  modes {modes}  "
              f"bound of this subset alone ${lower_bound(sub).total_usd:8.2f}  all in one batch per model "
              f"${one_batch:8.2f}")
    # Per provider (no prompt cache is shared across providers, so these bounds add up to the trace's), urgent
    # work apart from the rest: the rest shares prefixes across priorities, which the subsets below keep.
    prov = np.array([r.provider for r in res.requests])
    rest_bound: dict[str, float] = {}  # normal+background work's bound per provider, read again below
    for pv in sorted(set(prov)):
        for name, prios in (("all", ("urgent", "normal", "background")), ("urgent", ("urgent",)),
                            ("normal+background", ("normal", "background"))):
            sel = (prov == pv) & np.isin(prio, prios)
            sub = [r for r, s in zip(res.requests, sel) if s]
            if sub:
                bound = lower_bound(sub).total_usd
                if name == "normal+background":
                    rest_bound[pv] = bound
                print(f"  {pv:10s} {name:17s} n={sel.sum():6d} cost ${res.cost[sel].sum():8.2f}  bound "
                      f"${bound:8.2f}  online bound ${lower_bound(sub, online=True).total_usd:8.2f}")
    # Why each provider's normal work ended where it did (its last dispatch's reason), and how long its batch
    # members waited to be submitted: the online bound submits at arrival (docs/benchmarks.md, "Stop 51").
    arrival = np.array([r.arrival_s for r in res.requests])
    by_id = {b.id: b for b in res.batches}
    for pv in sorted(set(prov)):
        last = [(i, by_id.get(int(res.batch_of[i]))) for i in np.flatnonzero((prov == pv) & (prio == "normal"))]
        last = [(i, b) for i, b in last if b is not None]
        sync = [b.reason[:70] for _, b in last if b.mode == "sync"]
        waits = [b.t - arrival[i] for i, b in last if b.mode == "batch_api"]
        if last:
            print(f"  {pv:10s} normal: {len(sync)} of {len(last)} sync; batch members submitted "
                  f"{np.median(waits) if waits else 0:.0f} s after arrival (median)")
            for why, n in collections.Counter(sync).most_common(4):
                print(f"      {n:5d}  {why}")
    # How much prefix sharing the batches got: normal and background batch members' cost against each priced
    # alone in a batch (no prefix read from another), next to the bound's share for all that work; and how many
    # urgent sync calls marked their prefix for a cache write (docs/benchmarks.md, "Stop 52").
    def alone(idx) -> float:
        return sum(price_batch([res.requests[i]], cat, "batch_api")[0].total for i in idx)

    for pv in sorted(set(prov)):
        rest = (prov == pv) & (prio != "urgent")
        members, every = np.flatnonzero(rest & (res.mode == MODES.index("batch_api"))), np.flatnonzero(rest)
        if len(members):
            print(f"  {pv:10s} normal+background batch members: ${res.cost[members].sum():.2f}, "
                  f"{res.cost[members].sum() / alone(members):.0%} of each alone in a batch (the bound: "
                  f"{rest_bound[pv] / alone(every):.0%} for all {len(every)})")
        urgent = [by_id.get(int(res.batch_of[i])) for i in np.flatnonzero((prov == pv) & (prio == "urgent"))]
        urgent_sync = [b for b in urgent if b is not None and b.mode == "sync"]
        if urgent_sync:
            print(f"  {pv:10s} urgent sync calls that marked their prefix: "
                  f"{sum('prefix marked' in b.reason for b in urgent_sync)} of {len(urgent_sync)}")
    outcomes: dict[str, int] = {}
    for b in res.batches:
        if b.mode == "batch_api":
            outcomes[b.outcome] = outcomes.get(b.outcome, 0) + 1
    print(f"  batch-API dispatches: {outcomes}")


if __name__ == "__main__":
    main()
