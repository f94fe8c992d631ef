"""Simulated providers: the catalog's behaviour of one provider, shared by the simulator and the live
dispatcher actors (which run it in compressed real time), so both runtimes bill and time calls alike.

A ``SimProvider`` answers "what happens to this dispatch started at time t": when each call starts (rate
limits, concurrency), when it ends (latency, batch turnaround, GPU runtime), whether each attempt fails
(``Draws``), and what it costs (the cost model, with this provider's prompt-cache warmth).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import NamedTuple

from engine.catalog import Catalog, ProviderSpec, RateLimits
from engine.cost import cache_split, price_alone, price_batch, price_text
from engine.draws import Draws
from engine.latency import gpu_batch_seconds, sync_latency_median
from engine.request import Request
from engine.settings import Settings

__all__ = ["Attempt", "BatchOutcome", "SimProvider", "SyncOutcome"]

FAILED_CALL_FRACTION = 0.3  # a failing call errors after this share of its latency


class SyncOutcome(NamedTuple):
    ok: bool
    at: float  # completion (ok) or the time the last attempt gave up
    cost: float
    attempts: int  # attempts used in total, including earlier ones


class Attempt(NamedTuple):
    """One member's attempt in a batch or GPU dispatch."""

    ok: bool
    at: float
    cost: float


class BatchOutcome(NamedTuple):
    hedged: bool
    at: float  # hedge time when hedged, else completion
    members: list[Attempt]


class _Gate:
    """Sync-call admission: paced requests and tokens per minute, bounded concurrency."""

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


class SimProvider:
    def __init__(self, provider: ProviderSpec, catalog: Catalog, settings: Settings, draws: Draws):
        self.spec = provider
        self.catalog = catalog
        self.draws = draws
        self.max_att = settings.sim.max_attempts
        self.backoff = settings.sim.backoff_base_s
        self.bt = settings.prefix_block_tokens
        self.gate = _Gate(provider.rate_limits)
        self.warm: dict[str, dict[int, float]] = {}  # model -> block -> warm until

    def __repr__(self) -> str:
        return (f"SimProvider({self.spec.name}, busy={len(self.gate.busy)}/{self.gate.max_conc}, "
                f"warm_blocks={sum(len(w) for w in self.warm.values())})")

    # -- sync calls ---------------------------------------------------------------------------------------
    def sync(self, i: int, r: Request, t: float, attempt: int, cache_write: bool) -> SyncOutcome:
        """Call ``r`` (draw row ``i``) from attempt ``attempt`` on, retrying with backoff until success or the
        last attempt."""
        prov = self.spec
        spec = prov.models[r.model]
        if spec.gpu_priced:
            a = self.gpu([i], [r], t, [attempt])[0]
            return SyncOutcome(a.ok, a.at, a.cost, attempt + 1)
        self.draws.ensure(i + 1)
        base = sync_latency_median(prov, spec, r)
        sigma = prov.sync_latency.sigma if spec.kind == "text" else prov.media_latency.sigma
        fail_u, lat_z = self.draws.fail_u, self.draws.lat_z
        k, tcur = attempt, t
        while k < self.max_att:
            lat = base * math.exp(sigma * lat_z[i, k])
            failed = fail_u[i, k] < prov.failure_rate
            start = self.gate.acquire(tcur, r.input_tokens + r.output_tokens,
                                      lat * FAILED_CALL_FRACTION if failed else lat)
            k += 1
            if failed:
                tcur = start + lat * FAILED_CALL_FRACTION + self.backoff * 2 ** (k - 1)
                continue
            return SyncOutcome(True, start + lat, self._sync_price(r, spec, start, cache_write), k)
        return SyncOutcome(False, tcur, 0.0, k)

    def _sync_price(self, r: Request, spec, start: float, cache_write: bool) -> float:
        prov = self.spec
        if spec.kind != "text":
            return price_alone(r, self.catalog, "sync").total
        pc = prov.prompt_cache
        blocks = r.prefix_blocks
        if pc is None or not blocks:
            return price_text(prov, spec, cache_split(prov, spec, r.input_tokens, 0, 0, 0, self.bt),
                              r.output_tokens, "sync").total
        warm = self.warm.setdefault(r.model, {})
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

    # -- GPU batches ----------------------------------------------------------------------------------------
    def gpu(self, idxs: Sequence[int], reqs: Sequence[Request], t: float, attempts: Sequence[int]) -> list[Attempt]:
        """One GPU dispatch of compatible jobs: one slot for warm-up plus the batch at its speed-up."""
        prov = self.spec
        spec = prov.models[reqs[0].model]
        self.draws.ensure(max(idxs) + 1)
        run = gpu_batch_seconds(prov, spec, list(reqs))
        run *= math.exp(prov.sync_latency.sigma * self.draws.lat_z[idxs[0], min(attempts[0], self.max_att - 1)])
        end = self.gate.acquire(t, 0, run) + run
        prices = price_batch(list(reqs), self.catalog, "gpu_batch", block_tokens=self.bt)
        fail_u = self.draws.fail_u
        return [Attempt(fail_u[i, k] >= prov.failure_rate, end, p.total) for i, k, p in zip(idxs, attempts, prices)]

    # -- batch API ------------------------------------------------------------------------------------------
    def batch(self, idxs: Sequence[int], reqs: Sequence[Request], t: float, hedge_at: float | None,
              attempts: Sequence[int]) -> BatchOutcome:
        """Submit a batch at ``t``. If it would finish after ``hedge_at`` it is cancelled then (billing nothing,
        a cancelled batch bills only finished work and none has finished)."""
        prov = self.spec
        ba = prov.batch_api
        done = t + self.draws.turnaround(prov.name, ba, t)
        if hedge_at is not None and done > hedge_at:
            return BatchOutcome(True, hedge_at, [])
        self.draws.ensure(max(idxs) + 1)
        pc = prov.prompt_cache
        stacks = pc is not None and pc.stacks_with_batch
        warm = self.warm.setdefault(reqs[0].model, {}) if stacks else {}
        # The batch runs somewhere in [t, done]: prefixes still warm at submission are read, and the batch's own
        # prefixes stay warm until done + ttl.
        warm_blocks = {b for r in reqs for b in r.prefix_blocks if warm.get(b, -1.0) >= t} if stacks else set()
        prices = price_batch(list(reqs), self.catalog, "batch_api", warm=warm_blocks, block_tokens=self.bt)
        fail_u = self.draws.fail_u
        out = []
        for i, k, r, p in zip(idxs, attempts, reqs, prices):
            ok = fail_u[i, k] >= prov.failure_rate
            out.append(Attempt(ok, done, p.total))
            if ok and stacks and (p.cached_input or p.cache_write):
                until = done + pc.ttl_s
                for b in r.prefix_blocks:
                    if warm.get(b, -1.0) < until:
                        warm[b] = until
        return BatchOutcome(False, done, out)
