"""The order in which ready work leaves for a provider whose rate limits are the bottleneck.

Three rules, in this order:

1. **Deadline protection**: a unit whose slack (deadline - now - its expected service time) is at most
   ``promote_s`` goes first, earliest deadline first. Its batch was already flushed by the policy; here it
   also jumps the provider queue.
2. **Fair share** across tenants: start-time fair queuing. Each tenant has a virtual time, the work it was
   served (tokens, or one per call) divided by its weight; the tenant furthest behind is served next, and a
   tenant that becomes active starts at the floor (the current minimum), so idling earns no credit. A tenant
   flooding the engine with background work then gets its share, not the whole provider. An idle tenant's
   virtual time is kept only while it is above the floor (it would restart there, behind the others); once
   the floor passes it, or the queue empties (every tenant then restarts even, as SFQ does when the server
   idles), it is forgotten: restarting at the floor is what it would have got anyway.
3. **Score** within a tenant: ``w_priority * priority + w_risk * (attempts/max) - w_cost * cost/(cost+ref)
   - (w_urgency * deadline + w_wait * arrival) / time_scale_s``. Urgency and waiting both grow with ``now``
   at the same rate for every unit, so they enter as the deadline and the arrival: the order never changes
   while units wait, and a heap keeps it (a score recomputed per pop would cost O(n) per call).

``order="fifo"`` with ``fair_share=False`` is the plain arrival-order queue, kept for comparison in
``bench``. Pure: time is a parameter.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FairQueue", "Scheduling", "Unit"]

# Idle tenants whose virtual time is still above the floor, at most. Past it the ones nearest the floor are
# forgotten first (each gains its lead over the floor, the least of any): a provider kept busy for days by
# one-shot tenants (one per end user) never empties its queue, and then the floor need not move.
IDLE_KEPT = 10_000

_PRIORITY = {"urgent": 1.0, "normal": 0.5, "background": 0.0}


class Scheduling(BaseModel):
    """How a provider queue orders ready work (a policy parameter, so ``bench`` can compare settings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    order: Literal["score", "fifo"] = "score"
    fair_share: bool = True
    promote_s: float = Field(default=30.0, ge=0, description="slack at or below which a unit goes first")
    w_priority: float = Field(default=4.0, ge=0, description="weight of the request's priority")
    w_urgency: float = Field(default=1.0, ge=0, description="weight of an earlier deadline")
    w_wait: float = Field(default=0.5, ge=0, description="weight of time waited (an earlier arrival)")
    w_cost: float = Field(default=0.2, ge=0, description="weight against expensive units")
    w_risk: float = Field(default=0.5, ge=0, description="weight of attempts already failed (less retry slack)")
    time_scale_s: float = Field(default=600.0, gt=0, description="seconds that weigh as much as 1 unit of score")
    cost_ref_usd: float = Field(default=0.01, gt=0, description="cost at which the cost term is half its weight")
    tenant_weights: dict[str, float] = Field(default_factory=dict, description="share per tenant (default 1)")


class Unit(NamedTuple):
    """One thing to start at a provider: a call, a GPU batch or a batch-API batch. ``item`` is the runtime's."""

    item: Any
    tenant: str
    priority: str
    deadline_at: float
    arrival_s: float
    tokens: int
    cost_usd: float
    attempts: int
    lead_s: float  # expected seconds from start to result, for the slack
    input_tokens: int = 0  # of ``tokens``: what a batch queue's learnt limit counts (``EnqueuedTokens.learn``)


class FairQueue:
    def __init__(self, sched: Scheduling, max_attempts: int = 4):
        self.s = sched
        self.max_attempts = max_attempts
        self._seq = itertools.count()
        # Tenants with units waiting only: a heap of (key, seq, unit) and how many. A tenant leaves both when its
        # last unit is taken, so a peek scans the active tenants, not every tenant ever seen (one per end user:
        # a pop took 2.3 ms after 60,000 of them).
        self._tenants: dict[str, list] = {}
        self._count: dict[str, int] = {}
        # Virtual time of the active tenants, and of the idle ones still above the floor (it decides where they
        # restart). The floor never exceeds an active tenant's virtual time: it is their minimum when last
        # looked at, or, after the queue emptied, the largest virtual time served.
        self._vt: dict[str, float] = {}
        self._floor = 0.0
        self._idle: list[tuple[float, str]] = []  # heap of (virtual time, tenant) kept idle; stale rows skipped
        self._deadlines: list = []  # (deadline_at - lead, seq, tenant, unit)
        # A unit sits in two heaps (its tenant's and the deadline heap) and leaves through one; the other
        # skips it when it reaches the top.
        self._gone: set[int] = set()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"FairQueue(order={self.s.order}, fair={self.s.fair_share}, waiting={self._n}, "
                f"tenants={ {t: n for t, n in self._count.items() if n} })")

    def _key(self, u: Unit, seq: int) -> float:
        s = self.s
        if s.order == "fifo":
            return float(seq)
        score = (s.w_priority * _PRIORITY.get(u.priority, 0.5) + s.w_risk * u.attempts / self.max_attempts
                 - s.w_cost * u.cost_usd / (u.cost_usd + s.cost_ref_usd)
                 - (s.w_urgency * u.deadline_at + s.w_wait * u.arrival_s) / s.time_scale_s)
        return -score

    def push(self, u: Unit) -> None:
        seq = next(self._seq)
        tenant = u.tenant if self.s.fair_share else ""
        if not self._count.get(tenant):  # (re)activated: no credit for the time it was idle
            active = [self._vt[t] for t in self._count]
            if active:
                self._floor = max(self._floor, min(active))
            start = max(self._vt.get(tenant, self._floor), self._floor)
            self._forget_idle()  # before it is set: its own idle row may be forgotten, not its new time
            self._vt[tenant] = start
        heapq.heappush(self._tenants.setdefault(tenant, []), (self._key(u, seq), seq, u))
        self._count[tenant] = self._count.get(tenant, 0) + 1
        if self.s.order == "score":
            heapq.heappush(self._deadlines, (u.deadline_at - u.lead_s, seq, tenant, u))
        self._n += 1

    def _clean(self, h: list) -> None:
        gone = self._gone
        while h and h[0][1] in gone:
            gone.discard(heapq.heappop(h)[1])

    def peek(self, now: float) -> tuple[str, int, Unit] | None:
        """The next unit, without taking it: (tenant, seq, unit)."""
        if not self._n:
            return None
        d = self._deadlines
        self._clean(d)
        if d and d[0][0] - now <= self.s.promote_s:
            _, seq, tenant, u = d[0]
            return tenant, seq, u
        best = None
        for tenant in self._count:
            h = self._tenants[tenant]
            self._clean(h)
            top = h[0]
            rank = (self._vt.get(tenant, 0.0), top[0], top[1])
            if best is None or rank < best[0]:
                best = (rank, tenant, top)
        assert best is not None  # _n > 0
        return best[1], best[2][1], best[2][2]

    def take(self, picked: tuple[str, int, Unit], served: bool = True) -> Unit:
        """Remove the unit ``peek`` returned (nothing may be pushed in between); ``served``: charge its tokens to
        its tenant's share (not for a unit given back unsent, a batch whose hedge came while it waited)."""
        tenant, seq, u = picked
        h = self._tenants[tenant]
        self._clean(h)
        if h and h[0][1] == seq:
            heapq.heappop(h)
            if self.s.order == "score":
                self._gone.add(seq)
        else:  # promoted: it is on top of the deadline heap
            heapq.heappop(self._deadlines)
            self._gone.add(seq)
        if served:
            w = self.s.tenant_weights.get(tenant, 1.0) if tenant else 1.0
            self._vt[tenant] = self._vt.get(tenant, 0.0) + max(u.tokens, 1) / max(w, 1e-9)
        self._count[tenant] -= 1
        if not self._count[tenant]:
            del self._count[tenant]
            for _, left, _ in self._tenants.pop(tenant):  # each one promoted ahead of its turn: marked gone
                self._gone.discard(left)
            heapq.heappush(self._idle, (self._vt[tenant], tenant))
        self._n -= 1
        if not self._n:  # nobody waits: every tenant restarts even, past all that was served
            self._floor = max(self._floor, *self._vt.values())
            self._vt.clear()
            self._idle.clear()
        return u

    def _forget_idle(self) -> None:
        """Drop the idle tenants the floor has passed (they restart at it anyway), then the nearest to it while
        more than ``IDLE_KEPT`` are kept."""
        idle, vt, count = self._idle, self._vt, self._count
        if len(idle) > 2 * IDLE_KEPT:  # rows of tenants active again or idle since at a later time
            idle[:] = [(v, t) for t, v in vt.items() if t not in count]
            heapq.heapify(idle)
        while idle and (idle[0][0] <= self._floor or len(vt) - len(count) > IDLE_KEPT):
            v, t = heapq.heappop(idle)
            if t not in count and vt.get(t) == v:
                del vt[t]

    def pop(self, now: float) -> Unit | None:
        picked = self.peek(now)
        return None if picked is None else self.take(picked)
