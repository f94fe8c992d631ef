"""Budget waits, the runtime kernel's rule for work a budget holds back; one copy, used by the simulator and by
the grouper actor.

A dispatch's members are reserved one by one (``reservation``). A member the budget holds back (``wait`` for
reservations to settle, ``retry`` when the ledger did not answer, ``defer`` to a later window) is held here with
the dispatch it belongs to, and tried again *as decided* (the policy is not run again over held work: re-running
it over every held job at every try loaded a 2-core machine enough to make urgent work late):

- one try per ``step_s`` engine seconds at most, a deferred member not before its window opens; engine seconds
  at any speed-up (a floor of 50 ms of real time between tries made it 10 engine seconds at 200x, so held urgent
  work with a 60 s deadline was tried a handful of times and the live engine decided otherwise than the
  simulator);
- most urgent first (priority, then deadline), and only ``share`` of them per try: the share doubles while tries
  get through and halves when one is held back again, so a crowd held back together is not retried as a crowd;
- no overtaking: while more urgent work waits on a budget, less urgent work under that budget waits behind it
  instead of taking the room the next settlement frees. This holds within one reservation too: the members of a
  try (or of one decision) reserve a priority at a time, most urgent first (``tiers``), so a less urgent member
  waits behind a more urgent one held back in the same call (one call for all let a small normal claim take the
  room a larger urgent one was waiting for, and hold it past the urgent one's deadline); and in the grouper the
  members a try takes count as held until their reservation answers (``asking``), so work that comes meanwhile
  does not pass them;
- a member still held when it can no longer finish by its deadline (its deadline less ``lead_s``, the runtime's
  median of a sync call for it) is rejected: the budget it would take buys a late answer, and work that can
  still be on time needs it.

The runtimes only apply this: the simulator on virtual time (a ``budget_tick`` event at ``next_try``), the
grouper with a timer.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple

from engine.core.budgets import BudgetSpec, Verdict
from engine.core.catalog import Catalog
from engine.core.latency import sync_latency_median
from engine.core.request import PRIORITY_RANK, Request
from engine.runtime.reservation import Triage

__all__ = ["STEP_S", "BudgetWaits", "Held", "held_too_long", "sync_lead", "tiers"]

STEP_S = 1.0  # engine seconds between tries of held work
MIN_SHARE, MAX_SHARE, FIRST_SHARE = 1, 4096, 32


def sync_lead(catalog: Catalog) -> Callable[[Request], float]:
    """``BudgetWaits.lead_s`` from ``catalog``: the median seconds of a sync call for the request. Sent later
    than its deadline less this, it comes back late more likely than not."""
    def lead(req: Request) -> float:
        prov = catalog.providers[req.provider]
        return sync_latency_median(prov, prov.models[req.model], req)

    return lead


def held_too_long(h: Held) -> str:
    """The reason of a rejection ``BudgetWaits.take`` calls late, the same in both runtimes: what held it when it
    was last tried, and the ways on. Said as the first sentence alone, it named a budget with $1.73 of $2 left and
    no more (a tour, stop 64)."""
    said = f"budget {h.budget} held it back until it could no longer finish by its deadline: "
    if h.verdict is None:  # held behind more urgent work, not asked (no overtaking)
        return (said + "more urgent work that this budget holds back goes first (no overtaking); send it at a "
                "higher priority, give it a later deadline or raise the budget (docs/budgets.md)")
    return said + h.verdict.held(h.claim_usd)


def tiers(items: Iterable[Any], req_of: Callable[[Any], Request]) -> list[list[Any]]:
    """``items`` split by priority, most urgent first, each in its order: a reservation asks the ledger a tier at a
    time, and a member held back in one tier holds the less urgent members of the next behind it (no overtaking
    within a call)."""
    by: dict[int, list[Any]] = {}
    for x in items:
        by.setdefault(PRIORITY_RANK[req_of(x).priority], []).append(x)
    return [by[k] for k in sorted(by)]


class Held(NamedTuple):
    key: Hashable
    req: Request
    due: float  # tried again from then
    budget: str  # the budget that held it back (or the ledger's name, when it did not answer)
    payload: Any  # what the runtime re-sends: the member and the dispatch it belongs to
    seq: int = 0  # which holding of ``key`` this is (heap entries of an earlier one are stale)
    verdict: Verdict | None = None  # the ledger's, when it was last asked (None: held behind more urgent work)
    claim_usd: float | None = None  # what it reserved then


class BudgetWaits:
    """Three heaps with lazy deletion keep a try at O(share log n) however much work is held (the simulator
    tries once per engine second over traces of hours): by due time, by deadline, and the due ones by urgency."""

    def __init__(self, step_s: float = STEP_S, lead_s: Callable[[Request], float] | None = None):
        self.step_s = step_s
        self.lead_s = lead_s  # seconds before its deadline a member must go to finish by it (None: 0)
        self.held: dict[Hashable, Held] = {}
        self.share = FIRST_SHARE
        self._ranks: dict[str, list[int]] = {}  # budget -> held (or asking) members per priority rank
        self._asking: dict[Hashable, tuple[str, int]] = {}  # taken by a try, no verdict yet: (budget, rank)
        self._seq = itertools.count()
        self._by_due: list[tuple[float, int, Hashable]] = []
        self._by_deadline: list[tuple[float, int, Hashable]] = []
        self._ready: list[tuple[int, float, int, Hashable]] = []  # due: (rank, deadline, seq, key)

    def __len__(self) -> int:
        return len(self.held)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.held

    def __repr__(self) -> str:
        return f"BudgetWaits(held={len(self.held)}, asking={len(self._asking)}, share={self.share})"

    def hold(self, key: Hashable, req: Request, due: float, budget: str, payload: Any,
             verdict: Verdict | None = None, claim_usd: float | None = None) -> None:
        self.drop(key)
        self.answered((key,))
        if len(self._by_deadline) > 2 * len(self.held) + 1024:
            self._compact()  # entries of members sent or dropped since: a deadline may be a day away
        h = self.held[key] = Held(key, req, due, budget, payload, next(self._seq), verdict, claim_usd)
        self._ranks.setdefault(budget, [0, 0, 0])[PRIORITY_RANK[req.priority]] += 1
        heapq.heappush(self._by_due, (due, h.seq, key))
        heapq.heappush(self._by_deadline, (self._last_start(req), h.seq, key))

    def drop(self, key: Hashable) -> Held | None:
        h = self.held.pop(key, None)
        if h is not None:
            self._ranks[h.budget][PRIORITY_RANK[h.req.priority]] -= 1
        return h

    def ask(self, taken: Iterable[Held]) -> None:
        """Members a try took, whose reservation is under way: until ``answered`` (or held again) they still hold
        less urgent work under their budget behind them, as while they were held. Without this, work that came
        while the ledger answered a try was judged against a budget holding nothing back, and took the room the
        try's urgent members were refused for (a live engine's reservation can take tens of engine seconds under
        a speed-up)."""
        for h in taken:
            if h.key not in self._asking and h.key not in self.held:
                rank = PRIORITY_RANK[h.req.priority]
                self._asking[h.key] = (h.budget, rank)
                self._ranks.setdefault(h.budget, [0, 0, 0])[rank] += 1

    def answered(self, keys: Iterable[Hashable]) -> None:
        """The reservation of these members answered (or they went elsewhere): they no longer count as asking. A
        key not asking is let be, so a runtime may say it twice."""
        for k in keys:
            entry = self._asking.pop(k, None)
            if entry is not None:
                self._ranks[entry[0]][entry[1]] -= 1

    def _compact(self) -> None:
        """Rebuild the heaps from what is held (dropping the stale entries); the due ones stay ready."""
        held = self.held.values()
        ready = {(seq, key) for *_, seq, key in self._ready}
        self._by_due = [(h.due, h.seq, h.key) for h in held if (h.seq, h.key) not in ready]
        self._by_deadline = [(self._last_start(h.req), h.seq, h.key) for h in held]
        self._ready = [(PRIORITY_RANK[h.req.priority], h.req.deadline_at, h.seq, h.key) for h in held
                       if (h.seq, h.key) in ready]
        for q in (self._by_due, self._by_deadline, self._ready):
            heapq.heapify(q)

    def _last_start(self, req: Request) -> float:
        return req.deadline_at - (self.lead_s(req) if self.lead_s is not None else 0.0)

    def _live(self, seq: int, key: Hashable) -> Held | None:
        h = self.held.get(key)
        return h if h is not None and h.seq == seq else None

    def due_after(self, t: Triage, v: Verdict, now: float) -> float:
        """When a member held back with triage ``t`` (wait, retry or defer) is tried again."""
        nxt = now + self.step_s
        return max(v.retry_at, nxt) if t == "defer" and v.retry_at is not None else nxt

    def overtaken(self, specs: Iterable[BudgetSpec]) -> list[tuple[BudgetSpec, int]]:
        """(budget, the most urgent rank it holds back) for each budget with held (or asking) work: a member of a
        less urgent rank that the budget covers waits behind it (``blocker``)."""
        tops = {name: next(k for k, n in enumerate(ranks) if n) for name, ranks in self._ranks.items() if any(ranks)}
        return [(s, tops[s.name]) for s in specs if s.name in tops]

    def holding(self, specs: Iterable[BudgetSpec]) -> tuple[BudgetSpec, ...]:
        """The budgets that hold work back (``BudgetPressure.holding``, which the runtime sets after each
        reservation and each try)."""
        return tuple(s for s, _ in self.overtaken(specs))

    @staticmethod
    def blocker(req: Request, overtaken: list[tuple[BudgetSpec, int]]) -> str | None:
        """The budget ``req`` must wait behind (no overtaking), or None."""
        rank = PRIORITY_RANK[req.priority]
        return next((s.name for s, top in overtaken if top < rank and s.covers(req.tenant, req.provider, req.model)),
                    None)

    def wake(self, now: float) -> int:
        """Make every held member due now, deferred ones too (the budgets changed: a raised limit, a budget
        removed), and let the next try take them all; returns how many were held. Held again if still refused,
        each as its new verdict says."""
        for key, h in list(self.held.items()):
            if h.due > now:
                self.held[key] = h._replace(due=now)
                heapq.heappush(self._by_due, (now, h.seq, key))
        self.share = MAX_SHARE  # halved again by the next try if the change let few through (``adapt``)
        return len(self.held)

    def adapt(self, verdicts: Iterable[Verdict]) -> None:
        """After a reservation: halve the share of a try if any member was held back again (to wait, or to a
        pacing line that has not reached it), else double it."""
        held = any(v.reason in ("wait", "deferred") for v in verdicts)
        self.share = max(MIN_SHARE, self.share // 2) if held else min(self.share * 2, MAX_SHARE)

    def take(self, now: float) -> tuple[list[Held], list[Held]]:
        """The members to reject (held until they can no longer finish by their deadline) and those to try now
        (due, most urgent first, at most ``share``), both no longer held."""
        late: list[Held] = []
        q = self._by_deadline
        while q and q[0][0] <= now:
            _, seq, key = heapq.heappop(q)
            h = self._live(seq, key)
            if h is not None:
                late.append(self.drop(key))
        q = self._by_due
        while q and q[0][0] <= now + 1e-9:
            _, seq, key = heapq.heappop(q)
            h = self._live(seq, key)
            if h is not None:
                heapq.heappush(self._ready, (PRIORITY_RANK[h.req.priority], h.req.deadline_at, seq, key))
        ready: list[Held] = []
        q = self._ready
        while q and len(ready) < self.share:
            _, _, seq, key = heapq.heappop(q)
            if self._live(seq, key) is not None:
                ready.append(self.drop(key))
        return late, ready

    def next_try(self, now: float) -> float | None:
        """When to try next (None: nothing held): the first due time or deadline, at most one try per half
        step (members left over by the last try are due already, and a try at their due time would come at
        once, again and again)."""
        if not self.held:
            return None
        for q in (self._by_due, self._by_deadline, self._ready):  # drop stale tops
            while q and self._live(q[0][-2], q[0][-1]) is None:
                heapq.heappop(q)
        first = min(self._by_due[0][0] if self._by_due else math.inf,
                    self._by_deadline[0][0] if self._by_deadline else math.inf,
                    now if self._ready else math.inf)
        return max(first, now + self.step_s / 2)
