"""How much of smart's Mooncake gap is hindsight no online policy can have: smart against subclasses that read the
simulated world's future (its batch turnaround draws, the trace's next turns), paired seed by seed.

    .venv/bin/python benchmarks/bench_oracles.py --seeds 0 1 2 3

- ``early``: ``bench_foresight.py``'s (a conversation's group sent once the last turn that joins it before its
  flush has come);
- ``turnaround``: smart where every batch decision knows the turnaround the simulator will draw for the batch
  (``_Slots``: every 60-s slot's draw, per provider, from the seed's ``Draws`` and ``TurnaroundWorld``, as
  ``SimProvider.batch`` draws it). P(on time) becomes 1 where some submission slot from the batch's send time to
  its hedge is on time, else 0 (at arrival, alone: ``_p_alone``; at a group's decision: in place of the second
  batch's checkpoint, which it no longer needs). At the send, a batch that would be late is not submitted: it is
  held to the first slot that is on time for its hedge, else sent sync (flex where it fits, as smart sends its
  fallbacks). A gathering group whose only on-time slots come before its flush is sent at the last of them;
- ``turnaround+early``: both;
- ``turnaround-send``: ``turnaround`` at a group's decisions only; at arrival a request takes smart's lane, from
  the prior (which is why smart sends some requests to a batch lane that no slot serves in time, and some sync
  that one would have).

It assumes a batch is submitted when decided (the simulator submits later only while the provider's queue of
enqueued tokens is full): the hedged batches column counts the ones it got wrong. Prints figures; asserts nothing
(docs/benchmarks.md, "Stop 70").
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, load_real  # noqa: E402
from bench_foresight import _Foresight  # noqa: E402

import policies.smart as smart_module  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.draws import Draws, TurnaroundWorld  # noqa: E402
from engine.core.grouping import Decision  # noqa: E402
from engine.core.settings import load_settings  # noqa: E402
from engine.core.trace import with_day_origin  # noqa: E402
from engine.sim.lower_bound import lower_bound  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.smart import Smart  # noqa: E402

KINDS = ("early", "turnaround", "turnaround+early", "turnaround-send")


class _Slots:
    """Every submission slot's batch turnaround of one seed, per provider, as the simulator draws it."""

    def __init__(self, catalog, settings, seed: int, horizon_s: float):
        draws = Draws(1, settings.sim.max_attempts, seed, settings.sim.batch_slot_s)  # its own: the run's is untouched
        world = TurnaroundWorld.of(settings.sim)
        self.slot_s = settings.sim.batch_slot_s
        self.turn: dict[str, np.ndarray] = {}
        self.done: dict[str, np.ndarray] = {}  # a batch submitted at a slot's start ends then
        self.cancel: dict[str, float] = {}
        for name, p in catalog.providers.items():
            if p.batch_api is not None:
                t = draws.slot_turnarounds(name, p.batch_api, horizon_s, world)
                self.turn[name], self.done[name] = t, np.arange(t.size) * self.slot_s + t
                self.cancel[name] = p.batch_api.cancel_s

    def first(self, name: str, t0: float, hedge_at: float) -> float | None:
        """The earliest submission time at or after ``t0`` whose batch is not cancelled at ``hedge_at`` (it ends by
        ``hedge_at + cancel_s``, ``SimProvider.batch``'s rule), or None."""
        lim = hedge_at + self.cancel[name]
        k0 = int(t0 // self.slot_s)
        if t0 + self.turn[name][k0] <= lim:
            return t0
        k1 = int(lim // self.slot_s)
        ok = self.done[name][k0 + 1:k1 + 1] <= lim
        return (k0 + 1 + int(np.argmax(ok))) * self.slot_s if ok.any() else None

    def last_before(self, name: str, t0: float, t1: float, hedge_at: float) -> float | None:
        """The latest submission time in ``[t0, t1)`` whose batch is not cancelled at ``hedge_at``, or None."""
        lim = hedge_at + self.cancel[name]
        k0, k1 = int(t0 // self.slot_s), math.ceil(t1 / self.slot_s) - 1  # slot k1 starts before t1
        ok = np.flatnonzero(self.done[name][k0 + 1:k1 + 1] <= lim)
        if ok.size:
            return (k0 + 1 + int(ok[-1])) * self.slot_s
        return t0 if t0 + self.turn[name][k0] <= lim else None


class _Oracle(Smart):
    """Smart whose batch decisions know each batch's turnaround (the module's docstring)."""

    slots: _Slots | None = None
    at_arrival = True  # False (``turnaround-send``): a request's lane at arrival is smart's, from its prior

    def __init__(self, catalog, params=None):
        super().__init__(catalog, params)
        self._cut: tuple | None = None  # (group, now): a gathering group sent now, at its last on-time slot

    def _p_alone(self, provider, c, req, now):
        if not self.at_arrival:
            return super()._p_alone(provider, c, req, now)
        hedge_at = req.deadline_at - self._hedge_lead(c, req.output_tokens, 1)
        return 1.0 if self.slots.first(provider.name, now, hedge_at) is not None else 0.0

    def _plan(self, name: str, now: float, send_at: float, hedge_at: float) -> float | None:
        """When to submit a batch smart would send at ``send_at``: the first on-time slot from then on, else the last
        one before it (from ``now``), else None (no batch is on time)."""
        s = self.slots.first(name, max(send_at, now), hedge_at)
        if s is None and send_at > now:
            s = self.slots.last_before(name, now, send_at, hedge_at)
        return s

    def _flush_at(self, group, c):
        if self._cut is not None and self._cut[0] is group:
            return self._cut[1]
        return super()._flush_at(group, c)

    def _decide_batch(self, group, now):
        name = group.provider.name

        def truth(ba, send_at, hedge_at):  # in place of ``second_batch_checkpoint``: no checkpoint, P of 0 or 1
            return None, 1.0 if self._plan(name, now, send_at, hedge_at) is not None else 0.0

        kept = smart_module.second_batch_checkpoint
        smart_module.second_batch_checkpoint = truth
        try:
            d = super()._decide_batch(group, now)
        finally:
            smart_module.second_batch_checkpoint = kept
        sync = Decision("dispatch", mode="sync", take=d.take or min(len(group), group.provider.batch_api.max_requests),
                        recommendation="process_individually", reason="sync now: no batch slot on time (oracle)")
        if d.action == "wait" and d.reason == "gathering a batch" and group.memo and group.memo[2] is not None:
            hedge_at, flush_at = group.memo[2][0], d.wake_at
            s = self._plan(name, now, flush_at, hedge_at)
            if s is None:
                return sync  # its P was kept from an earlier decision, when a slot before the flush was still ahead
            if s >= flush_at:
                return d
            if s > now:
                return Decision.wait(s, "gathering a batch until its last on-time slot (oracle)")
            self._cut = (group, now)
            try:
                return self._decide_batch(group, now)
            finally:
                self._cut = None
        if d.action == "dispatch" and d.mode == "batch_api":
            s = self.slots.first(name, now, d.hedge_at)
            if s == now:
                return d
            if s is not None:
                return Decision.wait(s, "held for the next on-time batch slot (oracle)")
            return sync
        return d


def _policy(kind: str, catalog, reqs, slots: _Slots):
    if kind == "smart":
        return Smart(catalog)
    if kind == "early":
        return type("Foresight_early", (_Foresight,), {"trace": reqs, "early": True})(catalog)
    bases = (_Oracle, _Foresight) if kind == "turnaround+early" else (_Oracle,)
    return type(f"Oracle_{kind}", bases, {"slots": slots, "trace": reqs, "early": kind.endswith("early"),
                                          "at_arrival": kind != "turnaround-send"})(catalog)


def _mean_se(xs) -> tuple[float, float]:
    x = np.asarray(xs, float)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS[:3]), choices=KINDS)
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    t0 = time.perf_counter()
    raw = load_real("mooncake", a.data)
    settings = with_day_origin(load_settings(), raw)  # the trace's time of day, before the sort drops it (as bench)
    reqs = sorted(raw, key=lambda r: r.arrival_s)
    cat = default_catalog()
    horizon = max(r.deadline_at for r in reqs) + 2 * 86400.0
    kinds = ["smart", *a.kinds]
    rows: dict[str, dict[str, list[float]]] = {k: {"cost": [], "cap": [], "onl": [], "met": [], "hedged": []}
                                              for k in kinds}
    bounds, onlines, naives = [], [], []
    for seed in a.seeds:
        draws = Draws(len(reqs), settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
        lb = lower_bound(reqs, catalog=cat, settings=settings, draws=draws).total_usd
        onl = lower_bound(reqs, catalog=cat, settings=settings, draws=draws, online=True).total_usd
        naive = simulate(reqs, load_policy("naive", cat), catalog=cat, settings=settings, seed=seed,
                         trace_name="mooncake", draws=draws).total_cost
        bounds.append(lb), onlines.append(onl), naives.append(naive)
        slots = _Slots(cat, settings, seed, horizon)
        for k in kinds:
            res = simulate(reqs, _policy(k, cat, reqs, slots), catalog=cat, settings=settings, seed=seed,
                           trace_name="mooncake", draws=draws)
            row, cost = rows[k], res.total_cost
            row["cost"].append(cost)
            row["cap"].append((naive - cost) / (naive - lb))
            row["onl"].append((naive - cost) / (naive - onl))
            row["met"].append(float(res.met.mean()))
            row["hedged"].append(sum(b.mode == "batch_api" and b.outcome == "hedged" for b in res.batches))
        print(f"seed {seed}: bound ${lb:.2f} (online ${onl:.2f}), naive ${naive:.2f}; "
              + ", ".join(f"{k} ${rows[k]['cost'][-1]:.2f}" for k in kinds), flush=True)
    ref = np.array(rows["smart"]["cost"])
    print(f"\nMooncake, seeds {a.seeds}: lower bound ${np.mean(bounds):.2f} (online ${np.mean(onlines):.2f}), "
          f"naive ${np.mean(naives):.2f}")
    print("| policy | mean cost $ | vs smart $ (paired) | capture (of online) | fewest deadlines met | hedged batches "
          "a seed |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in kinds:
        row = rows[k]
        d, se = _mean_se(np.array(row["cost"]) - ref)
        cap, cap_se = _mean_se(row["cap"])
        vs = "reference" if k == "smart" else f"{d:+.2f} ± {se:.2f}"
        print(f"| {k} | {np.mean(row['cost']):.2f} | {vs} | {100 * cap:.1f} ± {100 * cap_se:.1f} % "
              f"({100 * np.mean(row['onl']):.1f} %) | {100 * min(row['met']):.2f} % | {np.mean(row['hedged']):.0f} |")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
