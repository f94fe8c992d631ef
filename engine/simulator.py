"""Discrete-event simulator: replays a trace through a policy against simulated providers.

The providers follow the catalog: sync latency (lognormal), failures with retries and exponential backoff,
rate limits (requests and tokens per minute, max concurrency), batch-API turnaround per submission slot,
prompt-cache warmth with TTL, and GPU batch runtimes. All randomness comes from ``Draws`` (one seed), so a
run is deterministic and every policy faces the same world. Rules are in docs/cost-model.md and
docs/simulator.md.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.catalog import Catalog, default_catalog
from engine.draws import Draws
from engine.errors import PolicyError
from engine.features import NEAR_DIM, compat_key, featurize, fingerprint
from engine.grouping import Decision
from engine.providers import Attempt, SimProvider
from engine.request import PRIORITIES, Request
from engine.reuse import ReuseIndex
from engine.scheduler import Dispatch, GroupTable, Wake
from engine.settings import Settings

__all__ = ["BatchRecord", "SimResult", "simulate"]

# Codes of SimResult.mode, .status (pending/ok/reused/failed) and .hit (none/exact/in_flight/near).
MODES = ("sync", "batch_api", "gpu_batch", "reuse")
_SYNC, _BATCH, _GPU, _REUSE = range(4)
_PENDING, _OK, _REUSED, _FAILED = range(4)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One dispatch decision, with the seed's recommendation and its reason."""

    id: int
    t: float
    provider: str
    model: str
    mode: str
    size: int
    recommendation: str
    reason: str
    outcome: str = "sent"


@dataclass
class SimResult:
    policy: str
    trace: str
    requests: list[Request]
    cost: np.ndarray
    done_at: np.ndarray
    status: np.ndarray
    mode: np.ndarray
    hit: np.ndarray
    batch_of: np.ndarray
    batches: list[BatchRecord]
    wall_s: float
    extra: dict = field(default_factory=dict)

    @property
    def total_cost(self) -> float:
        return float(self.cost.sum())

    @property
    def deadline_at(self) -> np.ndarray:
        return np.fromiter((r.deadline_at for r in self.requests), dtype=np.float64, count=len(self.requests))

    @property
    def met(self) -> np.ndarray:
        done = (self.status == _OK) | (self.status == _REUSED)
        return done & (self.done_at <= self.deadline_at + 1e-9)

    def summary(self) -> dict:
        n = len(self.requests)
        met = self.met
        prios = np.array([r.priority for r in self.requests])
        by_prio = {p: (float(met[prios == p].mean()) if (prios == p).any() else None)
                   for p in PRIORITIES}
        by_mode = {m: int((self.mode == k).sum()) for k, m in enumerate(MODES)}
        providers = np.array([r.provider for r in self.requests])
        by_provider = {p: round(float(self.cost[providers == p].sum()), 6) for p in sorted(set(providers))}
        recs: dict[str, int] = {}
        for b in self.batches:
            recs[b.recommendation] = recs.get(b.recommendation, 0) + 1
        return {
            "policy": self.policy,
            "cost_usd": round(self.total_cost, 6),
            "deadline_met_frac": float(met.mean()) if n else 1.0,
            "deadline_met_by_priority": by_prio,
            "completed": int(((self.status == _OK) | (self.status == _REUSED)).sum()),
            "failed": int((self.status == _FAILED).sum()),
            "rejected": int(self.extra.get("rejected", 0)),
            "exact_hits": int((self.hit == 1).sum()),
            "in_flight_hits": int((self.hit == 2).sum()),
            "near_hits": int((self.hit == 3).sum()),
            "requests_by_mode": by_mode,
            "cost_by_provider": by_provider,
            "batches": len(self.batches),
            "recommendations": recs,
            # A live run is not a simulation: its speed is reported as live_wall_s instead.
            "sim_requests_per_s": (round(n / self.wall_s, 1) if self.wall_s > 0 and not self.extra.get("live")
                                   else None),
        }


class _Sim:
    def __init__(self, reqs: Sequence[Request], policy, catalog: Catalog, settings: Settings, draws: Draws):
        self.reqs = reqs
        self.policy = policy
        self.catalog = catalog
        self.settings = settings
        self.draws = draws
        self.max_att = settings.sim.max_attempts
        n = len(reqs)
        self.cost = np.zeros(n)
        self.done_at = np.full(n, np.nan)
        self.status = np.zeros(n, dtype=np.int8)
        self.mode = np.full(n, -1, dtype=np.int8)
        self.hit = np.zeros(n, dtype=np.int8)
        self.batch_of = np.full(n, -1, dtype=np.int64)
        self.attempts = np.zeros(n, dtype=np.int64)
        self.hedges = np.zeros(n, dtype=np.int64)
        self.idx_of = {r.id: i for i, r in enumerate(reqs)}
        self.compat = [compat_key(r) for r in reqs]
        self.reuse = policy.reuse
        any_reuse = self.reuse.exact or self.reuse.in_flight or self.reuse.near
        self.fps = [fingerprint(r) for r in reqs] if any_reuse else None
        self.index = ReuseIndex(dim=1)
        self.vecs: dict[int, np.ndarray] = {}
        self.near_threshold = max(self.reuse.near_threshold, settings.sim.near_floor)
        if self.reuse.near:
            classes = {(r.tenant, self.compat[i]) for i, r in enumerate(reqs) if r.reuse == "near"}
            need = [i for i, r in enumerate(reqs) if (r.tenant, self.compat[i]) in classes]
            if need:
                mat = featurize([reqs[i] for i in need], dim=NEAR_DIM)
                self.index = ReuseIndex(dim=mat.shape[1])
                self.vecs = dict(zip(need, mat))
        self.pending_leader: dict[str, int] = {}
        self.followers: dict[int, list[int]] = {}
        self.table = GroupTable(policy, catalog)
        self.providers = {name: SimProvider(p, catalog, settings, draws) for name, p in catalog.providers.items()}
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        self.batch_ids = itertools.count()
        self.batches: list[BatchRecord] = []
        self.now = 0.0

    # -- event loop ----------------------------------------------------------------------------------------
    def push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload))

    def run(self) -> None:
        reqs, heap = self.reqs, self.heap
        n, i = len(reqs), 0
        while True:
            t_arr = reqs[i].arrival_s if i < n else math.inf
            if heap and heap[0][0] <= t_arr:
                t, _, kind, payload = heapq.heappop(heap)
                self.now = t
                if kind == "wake":
                    self.apply(*self.table.wake(payload, t))
                elif kind == "retry":
                    self.admit(payload, fresh=False)
                elif kind == "hedge":
                    # Back to the policy, not straight to sync: the member whose deadline set the hedge now
                    # has no time for a batch and goes sync, while members with later deadlines may ride
                    # another batch.
                    for j in payload:
                        self.hedges[j] += 1
                        if self.hedges[j] >= self.max_att:  # progress guard against a policy that re-batches forever
                            self.sync_call(j, t, False, int(self.batch_of[j]))
                        else:
                            self.admit(j, fresh=False)
            elif i < n:
                self.now = t_arr
                self.admit(i, fresh=True)
                i += 1
            else:
                break

    # -- admission and reuse -------------------------------------------------------------------------------
    def resolve_reused(self, i: int, at: float, hit: int) -> None:
        self.status[i], self.mode[i], self.hit[i], self.done_at[i] = _REUSED, _REUSE, hit, at

    def admit(self, i: int, fresh: bool) -> None:
        r, now, reuse = self.reqs[i], self.now, self.reuse
        if self.attempts[i] >= self.max_att:
            self.fail_final(i, now)
            return
        fps = self.fps
        if fresh and fps is not None and r.reuse != "none":
            fp = fps[i]
            found = self.index.exact(fp)
            if found is not None:
                _, done = found
                if done <= now and reuse.exact:
                    self.resolve_reused(i, now, 1)
                    return
                # In flight: attach when the leader's deadline is no later than ours. A live engine cannot
                # know when a call will finish, so the simulator does not use that either.
                if done > now and reuse.in_flight and self.reqs[found[0]].deadline_at <= r.deadline_at:
                    self.resolve_reused(i, done, 2)
                    return
            leader = self.pending_leader.get(fp)
            if reuse.in_flight and leader is not None and self.reqs[leader].deadline_at <= r.deadline_at:
                self.followers.setdefault(leader, []).append(i)
                return
            if reuse.near and r.reuse == "near" and i in self.vecs:
                h = self.index.near((r.tenant, self.compat[i]), self.vecs[i], r.prompt, self.near_threshold,
                                   reuse.guards)
                # A source still in flight is followed only under the rule for identical ones (due no
                # later than this request): its completion time is not known to a live engine.
                if h is not None and (h.done_at <= now or (
                        reuse.in_flight and self.reqs[h.source].deadline_at <= r.deadline_at)):
                    self.resolve_reused(i, max(now, h.done_at), 3)
                    return
        if fps is not None:
            self.pending_leader.setdefault(fps[i], i)
        self.apply(*self.table.add(r, self.compat[i], now))

    def apply(self, dispatches: list[Dispatch], wake: Wake | None) -> None:
        for d in dispatches:
            self.dispatch(d.decision, d.members)
        if wake is not None:
            self.push(wake.at, "wake", wake)

    # -- dispatch ------------------------------------------------------------------------------------------
    def dispatch(self, d: Decision, members: list[Request]) -> None:
        mode = d.mode
        bid = next(self.batch_ids)
        first = members[0]
        self.batches.append(BatchRecord(bid, self.now, first.provider, first.model, mode, len(members),
                                        d.recommendation, d.reason))
        idxs = [self.idx_of[r.id] for r in members]
        if mode == "sync":
            for i in idxs:
                self.sync_call(i, self.now, d.cache_write, bid)
        elif mode == "gpu_batch":
            self.gpu_run(idxs, self.now, bid)
        else:
            self.batch_api(idxs, self.now, d.hedge_at, bid)

    def complete(self, i: int, at: float, cost: float, mode: int, bid: int) -> None:
        self.status[i], self.mode[i], self.cost[i], self.done_at[i], self.batch_of[i] = _OK, mode, cost, at, bid
        fps = self.fps
        if fps is not None:
            r = self.reqs[i]
            fp = fps[i]
            vec = self.vecs.get(i)
            self.index.add(fp, i, at, near_key=(r.tenant, self.compat[i]) if vec is not None else None, vec=vec,
                           text=r.prompt)
            if self.pending_leader.get(fp) == i:
                del self.pending_leader[fp]
        for f in self.followers.pop(i, ()):
            self.resolve_reused(f, at, 2)

    def fail_final(self, i: int, at: float) -> None:
        self.status[i], self.done_at[i] = _FAILED, at
        if self.fps is not None and self.pending_leader.get(self.fps[i]) == i:
            del self.pending_leader[self.fps[i]]
        for f in self.followers.pop(i, ()):
            self.admit(f, fresh=False)

    def settle(self, i: int, a: Attempt, mode: int, bid: int) -> None:
        """One attempt of a batch or GPU member ended: complete it, or hand it back to the policy as a retry
        (or fail it for good after the last attempt)."""
        self.attempts[i] += 1
        if a.ok:
            self.complete(i, a.at, a.cost, mode, bid)
        elif self.attempts[i] >= self.max_att:
            self.fail_final(i, a.at)
        else:
            self.push(a.at, "retry", i)

    def sync_call(self, i: int, t: float, cache_write: bool, bid: int) -> None:
        r = self.reqs[i]
        out = self.providers[r.provider].sync(i, r, t, int(self.attempts[i]), cache_write)
        self.attempts[i] = out.attempts
        if out.ok:
            self.complete(i, out.at, out.cost, _GPU if self.gpu_priced(r) else _SYNC, bid)
        else:
            self.fail_final(i, out.at)

    def gpu_priced(self, r: Request) -> bool:
        return self.catalog.providers[r.provider].models[r.model].gpu_priced

    def gpu_run(self, idxs: list[int], t: float, bid: int) -> None:
        members = [self.reqs[i] for i in idxs]
        attempts = [int(self.attempts[i]) for i in idxs]
        for i, a in zip(idxs, self.providers[members[0].provider].gpu(idxs, members, t, attempts)):
            self.settle(i, a, _GPU, bid)

    def batch_api(self, idxs: list[int], t: float, hedge_at: float | None, bid: int) -> None:
        members = [self.reqs[i] for i in idxs]
        if hedge_at is not None and hedge_at <= t:
            # Hedged before it starts: that is a sync dispatch.
            for i in idxs:
                self.sync_call(i, t, False, bid)
            return
        attempts = [int(self.attempts[i]) for i in idxs]
        out = self.providers[members[0].provider].batch(idxs, members, t, hedge_at, attempts)
        if out.hedged:
            rec = self.batches[-1]
            self.batches[-1] = BatchRecord(rec.id, rec.t, rec.provider, rec.model, rec.mode, rec.size,
                                           rec.recommendation, rec.reason, outcome="hedged")
            self.batch_of[idxs] = bid
            self.push(out.at, "hedge", idxs)
            return
        for i, a in zip(idxs, out.members):
            self.settle(i, a, _BATCH, bid)


def simulate(requests: Sequence[Request], policy, *, catalog: Catalog | None = None,
             settings: Settings | None = None, seed: int | None = None, trace_name: str = "trace",
             draws: Draws | None = None) -> SimResult:
    """Replay ``requests`` (in arrival order) through ``policy``; deterministic for a given seed."""
    settings = settings or Settings()
    catalog = catalog or default_catalog()
    seed = settings.sim.seed if seed is None else seed
    reqs = list(requests)
    if any(a.arrival_s > b.arrival_s for a, b in zip(reqs, reqs[1:])):
        reqs.sort(key=lambda r: r.arrival_s)
    draws = draws or Draws(len(reqs), settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
    t0 = time.perf_counter()
    sim = _Sim(reqs, policy, catalog, settings, draws)
    sim.run()
    wall = time.perf_counter() - t0
    pending = int((sim.status == _PENDING).sum())
    if pending:
        raise PolicyError(f"{policy.name}: {pending} request(s) were never dispatched; a policy must dispatch "
                          "or set wake_at for every group it keeps waiting")
    return SimResult(getattr(policy, "name", type(policy).__name__), trace_name, reqs, sim.cost, sim.done_at,
                     sim.status, sim.mode, sim.hit, sim.batch_of, sim.batches, wall)
