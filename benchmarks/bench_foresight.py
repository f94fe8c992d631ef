"""What foresight of a conversation's next turns would be worth to smart's gather, on Mooncake: smart against
subclasses that read the trace's future arrivals (no online policy can), paired seed by seed.

    .venv/bin/python benchmarks/bench_foresight.py --seeds 0 1 2 3

- ``early``: a conversation's group is sent as soon as the last turn that would join it before its own flush
  has come (it gives up no sharing and gains chance of finishing in time), and it does not ride another
  group's batch before that turn has come;
- ``hold=E``: a group is held past its flush for its conversation's next turn when that turn comes within
  ``E`` seconds of the flush (the sharing a longer gather would buy, with none of the waits that buy nothing);
- ``quiet=Q`` (no foresight: a rule an online policy could use): a conversation's group of one turn is sent once
  it has been quiet ``Q`` seconds, if that is before its flush.

Prints figures; asserts nothing (docs/benchmarks.md, "Stop 58").
"""

from __future__ import annotations

import argparse
import bisect
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, load_real  # noqa: E402

from engine.core.catalog import default_catalog  # noqa: E402
from engine.sim.lower_bound import lower_bound  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies.smart import Smart  # noqa: E402


class _Foresight(Smart):
    """Smart that knows when each conversation's next turns of the shared band arrive (the trace's future)."""

    trace: list = []
    early = False
    hold_s = 0.0
    quiet_s = 0.0

    def __init__(self, catalog, params=None):
        super().__init__(catalog, params)
        self._arrivals: dict[tuple, list[float]] = {}
        for r in self.trace:
            provider = catalog.providers[r.provider]
            spec = provider.models.get(r.model)
            if (spec is None or not provider.supports_batch_api(r.kind, r.model) or not self._shares_prefix(r, provider, spec)
                    or r.deadline_s < self._band_cap_of(provider)):
                continue
            run = tuple(r.prefix_blocks[:self._cacheable_blocks(provider, spec)])
            self._arrivals.setdefault((r.provider, r.model, run), []).append(r.arrival_s)
        for v in self._arrivals.values():
            v.sort()

    def _turns(self, group) -> list[float]:
        key = group.key
        if not (isinstance(key, tuple) and len(key) == 4 and key[0] == "batch"):
            return []
        m = group.members[0]
        return self._arrivals.get((m.provider, m.model, tuple(key[3])), [])

    def _flush_at(self, group, c):
        kept = super()._flush_at(group, c)
        if self.quiet_s > 0:
            if len(group) != 1 or not self._turns(group):
                return kept
            new = min(kept, group.members[0].arrival_s + self.quiet_s)
            if new != kept:
                group.memo = (group.memo[0], new, None, None)
            return new
        turns = self._turns(group)
        if not turns:
            return kept
        base = group.oldest_arrival_s + self._gather_budget(group, c)  # smart's own flush, not one moved here
        new = base
        if self.early:
            i = bisect.bisect_right(turns, base)
            j = bisect.bisect_left(turns, group.oldest_arrival_s)
            # Just after that turn: at one instant the simulator wakes a group before it adds an arrival.
            new = min(base, max(group.oldest_arrival_s, turns[i - 1] if i > j else group.oldest_arrival_s) + 0.01)
        if self.hold_s > 0:
            i = bisect.bisect_right(turns, base)
            if i < len(turns) and turns[i] <= base + self.hold_s:
                new = turns[i] + 0.01
        if new != kept:
            group.memo = (group.memo[0], new, None, None)
        return new

    def riders(self, group, others, now):
        out = super().riders(group, others, now)
        if not self.early:
            return out
        keep = []
        for o in out:
            turns = self._turns(o)
            i = bisect.bisect_right(turns, now)
            c = self._text_consts(o.provider, o.spec, o.members[0].model)
            if i < len(turns) and turns[i] < self._flush_at(o, c):
                continue  # a turn of it is still to come before its own flush
            keep.append(o)
        return keep


def _policy(kind: str, catalog, reqs):
    if kind == "smart":
        return Smart(catalog)
    name, _, value = kind.partition("=")
    cls = type(f"Foresight_{name}", (_Foresight,), {"trace": reqs, "early": name == "early",
                                                    "hold_s": float(value) if name == "hold" else 0.0,
                                                    "quiet_s": float(value) if name == "quiet" else 0.0})
    return cls(catalog)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--kinds", nargs="+", default=["early", "hold=300", "hold=600"])
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    for k in a.kinds:
        name, _, value = k.partition("=")
        if k != "early" and not (name in ("hold", "quiet") and value.replace(".", "", 1).isdigit()):
            ap.error(f"--kinds {k!r}: give early, hold=SECONDS or quiet=SECONDS")
    t0 = time.perf_counter()
    reqs = list(load_real("mooncake", a.data))
    cat = default_catalog()
    kinds = ["smart", *a.kinds]
    cost = {k: [] for k in kinds}
    met = {k: [] for k in kinds}
    bounds = []
    for seed in a.seeds:
        bounds.append(lower_bound(reqs, seed=seed).total_usd)
        for k in kinds:
            res = simulate(reqs, _policy(k, cat, reqs), seed=seed, trace_name="mooncake")
            cost[k].append(res.total_cost)
            met[k].append(float(res.met.mean()))
        print(f"seed {seed}: " + ", ".join(f"{k} ${cost[k][-1]:.2f}" for k in kinds), flush=True)
    ref = np.array(cost["smart"])
    print(f"\nMooncake, seeds {a.seeds}; lower bound mean ${np.mean(bounds):.2f}")
    print("| policy | mean cost $ | vs smart $ (paired) | fewest deadlines met |")
    print("|---|---:|---:|---:|")
    for k in kinds:
        d = np.array(cost[k]) - ref
        se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
        print(f"| {k} | {np.mean(cost[k]):.2f} | {d.mean():+.2f} ± {se:.2f} | {min(met[k]) * 100:.2f} % |")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
