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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.catalog import Catalog, RateLimits, default_catalog
from engine.cost import cache_split, mode_allowed, price_alone, price_batch, price_text
from engine.draws import Draws
from engine.errors import PolicyError
from engine.features import compat_key, featurize, fingerprint
from engine.grouping import Decision, Group
from engine.latency import gpu_batch_seconds, sync_latency_median
from engine.request import Request
from engine.reuse import ReuseIndex
from engine.settings import Settings

__all__ = ["BatchRecord", "SimResult", "simulate"]

# Codes of SimResult.mode, .status (pending/ok/reused/failed) and .hit (none/exact/in_flight/near).
MODES = ("sync", "batch_api", "gpu_batch", "reuse")
_SYNC, _BATCH, _GPU, _REUSE = range(4)
_PENDING, _OK, _REUSED, _FAILED = range(4)
_FAILED_CALL_FRACTION = 0.3  # a failing call errors after this share of its latency


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
                   for p in ("urgent", "normal", "background")}
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
            "rejected": 0,
            "exact_hits": int((self.hit == 1).sum()),
            "in_flight_hits": int((self.hit == 2).sum()),
            "near_hits": int((self.hit == 3).sum()),
            "requests_by_mode": by_mode,
            "cost_by_provider": by_provider,
            "batches": len(self.batches),
            "recommendations": recs,
            "sim_requests_per_s": round(n / self.wall_s, 1) if self.wall_s > 0 else None,
        }


class _Gate:
    """Sync-call admission of one provider: paced requests and tokens per minute, bounded concurrency."""

    __slots__ = ("busy", "max_conc", "req_gap", "tat_req", "tat_tok", "tok_gap")

    def __init__(self, rl: RateLimits):
        self.req_gap = 60.0 / rl.rpm
        self.tok_gap = 60.0 / rl.tpm
        self.tat_req = 0.0
        self.tat_tok = 0.0
        self.busy: list[float] = []
        self.max_conc = rl.max_concurrency

    def acquire(self, t: float, tokens: int, duration: float) -> float:
        """Start time of a call ready at ``t``; books its slot until start + duration."""
        s = max(t, self.tat_req, self.tat_tok)
        if len(self.busy) >= self.max_conc:
            s = max(s, heapq.heappop(self.busy))
        heapq.heappush(self.busy, s + duration)
        self.tat_req = s + self.req_gap
        self.tat_tok = s + tokens * self.tok_gap
        return s


class _Sim:
    def __init__(self, reqs: Sequence[Request], policy, catalog: Catalog, settings: Settings, draws: Draws):
        self.reqs = reqs
        self.policy = policy
        self.catalog = catalog
        self.settings = settings
        self.draws = draws
        self.max_att = settings.sim.max_attempts
        self.bt = settings.prefix_block_tokens
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
                mat = featurize([reqs[i] for i in need])
                self.index = ReuseIndex(dim=mat.shape[1])
                self.vecs = dict(zip(need, mat))
        self.pending_leader: dict[str, int] = {}
        self.followers: dict[int, list[int]] = {}
        self.groups: dict[Hashable, Group] = {}
        self.gates = {name: _Gate(p.rate_limits) for name, p in catalog.providers.items()}
        self.warm: dict[tuple[str, str], dict[int, float]] = {}
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
                    g, version = payload
                    if self.groups.get(g.key) is g and g.version == version:
                        self.decide(g)
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
                if done > now and reuse.in_flight and done <= r.deadline_at:
                    self.resolve_reused(i, done, 2)
                    return
            leader = self.pending_leader.get(fp)
            if reuse.in_flight and leader is not None and self.reqs[leader].deadline_at <= r.deadline_at:
                self.followers.setdefault(leader, []).append(i)
                return
            if reuse.near and r.reuse == "near" and i in self.vecs:
                h = self.index.near((r.tenant, self.compat[i]), self.vecs[i], r.prompt, self.near_threshold)
                if h is not None and h.done_at <= r.deadline_at:
                    self.resolve_reused(i, max(now, h.done_at), 3)
                    return
        if fps is not None:
            self.pending_leader.setdefault(fps[i], i)
        key = self.policy.group_key(r, self.compat[i], now)
        g = self.groups.get(key)
        if g is None:
            prov = self.catalog.provider(r.provider)
            g = self.groups[key] = Group(key, prov, prov.models[r.model])
        g.add(r)
        self.decide(g)

    def decide(self, g: Group) -> None:
        now = self.now
        while g.members:
            d: Decision = self.policy.decide(g, now)
            if d.action == "wait":
                if d.wake_at is not None:
                    if not d.wake_at > now:
                        raise PolicyError(f"{self.policy.name}: wait until {d.wake_at} is not after now={now}; "
                                          "return a later wake_at or dispatch")
                    self.push(d.wake_at, "wake", (g, g.version))
                return
            self.dispatch(g, d)
        del self.groups[g.key]

    # -- dispatch ------------------------------------------------------------------------------------------
    def dispatch(self, g: Group, d: Decision) -> None:
        mode = d.mode
        if mode not in ("sync", "batch_api", "gpu_batch") or not mode_allowed(g.provider, g.spec, mode):
            raise PolicyError(f"{self.policy.name}: mode {mode!r} is not available for "
                              f"{g.provider.name}/{g.members[0].model}")
        take = d.take if d.take > 0 else len(g.members)
        if mode == "sync":
            limit = None
        elif mode == "batch_api":
            limit = g.provider.batch_api.max_requests
        else:
            limit = g.provider.gpu_batching.max_batch
        if limit is not None and take > limit:
            raise PolicyError(f"{self.policy.name}: a {mode} dispatch of {take} exceeds the provider limit {limit}")
        members = g.take(take)
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

    def settle(self, i: int, at: float, cost: float, mode: int, bid: int, failure_rate: float) -> bool:
        """One attempt of a batch member ends at ``at``: complete it, or hand it back to the policy as a retry
        (or fail it for good after the last attempt). Returns whether it succeeded."""
        k = int(self.attempts[i])
        self.attempts[i] = k + 1
        if self.draws.fail_u[i, k] >= failure_rate:
            self.complete(i, at, cost, mode, bid)
            return True
        if k + 1 >= self.max_att:
            self.fail_final(i, at)
        else:
            self.push(at, "retry", i)
        return False

    def sync_call(self, i: int, t: float, cache_write: bool, bid: int) -> None:
        r = self.reqs[i]
        prov = self.catalog.providers[r.provider]
        spec = prov.models[r.model]
        if spec.gpu_priced:
            self.gpu_run([i], t, bid)
            return
        gate = self.gates[r.provider]
        base = sync_latency_median(prov, spec, r)
        sigma = prov.sync_latency.sigma if spec.kind == "text" else prov.media_latency.sigma
        fail_u, lat_z = self.draws.fail_u, self.draws.lat_z
        k, tcur = int(self.attempts[i]), t
        while k < self.max_att:
            lat = base * math.exp(sigma * lat_z[i, k])
            failed = fail_u[i, k] < prov.failure_rate
            start = gate.acquire(tcur, r.input_tokens + r.output_tokens,
                                 lat * _FAILED_CALL_FRACTION if failed else lat)
            k += 1
            if failed:
                tcur = start + lat * _FAILED_CALL_FRACTION + self.settings.sim.backoff_base_s * 2 ** (k - 1)
                continue
            self.attempts[i] = k
            self.complete(i, start + lat, self.sync_price(r, prov, spec, start, cache_write), _SYNC, bid)
            return
        self.attempts[i] = k
        self.fail_final(i, tcur)

    def sync_price(self, r: Request, prov, spec, start: float, cache_write: bool) -> float:
        if spec.kind != "text":
            return price_alone(r, self.catalog, "sync").total
        pc = prov.prompt_cache
        blocks = r.prefix_blocks
        if pc is None or not blocks:
            return price_text(prov, spec, cache_split(prov, spec, r.input_tokens, 0, 0, 0, self.bt),
                              r.output_tokens, "sync").total
        warm = self.warm.setdefault((r.provider, r.model), {})
        n_warm = 0
        for b in blocks:
            if warm.get(b, -1.0) < start:
                break
            n_warm += 1
        split = cache_split(prov, spec, r.input_tokens, len(blocks), n_warm, len(blocks) if cache_write else 0,
                            self.bt)
        cached = split.read + split.write
        if cached:
            expiry = start + pc.ttl_s
            for b in blocks[: math.ceil(cached / self.bt)]:
                warm[b] = expiry
        return price_text(prov, spec, split, r.output_tokens, "sync").total

    def gpu_run(self, idxs: list[int], t: float, bid: int) -> None:
        members = [self.reqs[i] for i in idxs]
        prov = self.catalog.providers[members[0].provider]
        spec = prov.models[members[0].model]
        run = gpu_batch_seconds(prov, spec, members)
        run *= math.exp(prov.sync_latency.sigma * self.draws.lat_z[idxs[0], min(self.attempts[idxs[0]],
                                                                                 self.max_att - 1)])
        start = self.gates[members[0].provider].acquire(t, 0, run)
        end = start + run
        prices = price_batch(members, self.catalog, "gpu_batch", block_tokens=self.bt)
        for i, p in zip(idxs, prices):
            self.settle(i, end, p.total, _GPU, bid, prov.failure_rate)

    def batch_api(self, idxs: list[int], t: float, hedge_at: float | None, bid: int) -> None:
        members = [self.reqs[i] for i in idxs]
        first = members[0]
        prov = self.catalog.providers[first.provider]
        if hedge_at is not None and hedge_at <= t:
            # Hedged before it starts: that is a sync dispatch.
            for i in idxs:
                self.sync_call(i, t, False, bid)
            return
        done = t + self.draws.turnaround(prov.name, prov.batch_api, t)
        if hedge_at is not None and done > hedge_at:
            # Cancelled at the hedge: a cancelled batch bills only finished work, and none has finished.
            rec = self.batches[-1]
            self.batches[-1] = BatchRecord(rec.id, rec.t, rec.provider, rec.model, rec.mode, rec.size,
                                           rec.recommendation, rec.reason, outcome="hedged")
            self.batch_of[idxs] = bid
            self.push(hedge_at, "hedge", idxs)
            return
        pc = prov.prompt_cache
        warm_blocks: set[int] = set()
        if pc is not None and pc.stacks_with_batch:
            # The batch runs somewhere in [t, done]; prefixes another call wrote and that are still warm at
            # submission are read, and this batch's own prefixes stay warm until done + ttl.
            warm = self.warm.setdefault((first.provider, first.model), {})
            for r in members:
                for b in r.prefix_blocks:
                    if warm.get(b, -1.0) >= t:
                        warm_blocks.add(b)
        prices = price_batch(members, self.catalog, "batch_api", warm=warm_blocks, block_tokens=self.bt)
        for i, r, p in zip(idxs, members, prices):
            if self.settle(i, done, p.total, _BATCH, bid, prov.failure_rate):
                if pc is not None and pc.stacks_with_batch and (p.cached_input or p.cache_write):
                    until = done + pc.ttl_s
                    for b in r.prefix_blocks:
                        if warm.get(b, -1.0) < until:
                            warm[b] = until


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
