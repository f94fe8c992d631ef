"""What a simulation returns: per-request arrays (cost, completion time, status, mode, reuse hit, batch) and
the batches it formed, with the summary the benchmarks print."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.core.cost import MODES
from engine.core.request import DEADLINE_SLACK_S, PRIORITIES, Request

__all__ = ["BatchRecord", "SimResult"]

# Codes of SimResult.mode (indexes of engine.core.cost.MODES), .status (pending/ok/reused/failed) and .hit
# (none/exact/in_flight/near).
_SYNC, _BATCH, _GPU, _REUSE, _FLEX = range(5)
_PENDING, _OK, _REUSED, _FAILED, _REJECTED = range(5)


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
    def served(self) -> np.ndarray:
        """Which requests got a result (generated or reused)."""
        return (self.status == _OK) | (self.status == _REUSED)

    @property
    def met(self) -> np.ndarray:
        return self.served & (self.done_at <= self.deadline_at + DEADLINE_SLACK_S)

    def latency(self) -> dict[str, float] | None:
        """p50 and p99 (engine seconds) of completion time minus arrival of every served request."""
        arrival = np.fromiter((r.arrival_s for r in self.requests), dtype=np.float64, count=len(self.requests))
        w = (self.done_at - arrival)[self.served]
        return None if w.size == 0 else {"p50": round(float(np.percentile(w, 50)), 3),
                                          "p99": round(float(np.percentile(w, 99)), 3)}

    def latency_by_priority(self) -> dict[str, dict[str, float] | None]:
        """p50 and p99 (engine seconds) of completion time minus arrival of the served requests (ok or
        reused), per priority (None where a priority has none): what waiting for a cheaper mode cost in time."""
        served = self.served
        arrival = np.fromiter((r.arrival_s for r in self.requests), dtype=np.float64, count=len(self.requests))
        prios = np.array([r.priority for r in self.requests])
        wait = self.done_at - arrival
        out: dict[str, dict[str, float] | None] = {}
        for p in PRIORITIES:
            w = wait[served & (prios == p)]
            out[p] = None if w.size == 0 else {"p50": round(float(np.percentile(w, 50)), 3),
                                                "p99": round(float(np.percentile(w, 99)), 3)}
        return out

    def summary(self) -> dict:
        n = len(self.requests)
        met = self.met
        prios = np.array([r.priority for r in self.requests])
        by_prio = {p: (float(met[prios == p].mean()) if (prios == p).any() else None)
                   for p in PRIORITIES}
        by_mode = {m: int((self.mode == k).sum()) for k, m in enumerate(MODES)}
        providers = np.array([r.provider for r in self.requests])
        by_provider = {str(p): round(float(self.cost[providers == p].sum()), 6) for p in sorted(set(providers))}
        recs: dict[str, int] = {}
        for b in self.batches:
            recs[b.recommendation] = recs.get(b.recommendation, 0) + 1
        return {
            "policy": self.policy,
            "cost_usd": round(self.total_cost, 6),
            "deadline_met_frac": float(met.mean()) if n else 1.0,
            "deadline_met_by_priority": by_prio,
            "latency_s": self.latency(),
            "latency_s_by_priority": self.latency_by_priority(),
            "completed": int(self.served.sum()),
            "failed": int((self.status == _FAILED).sum()),
            "rejected": dict(self.extra.get("rejected", {})),
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
