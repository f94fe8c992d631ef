"""The simulator's budget steps: reserve each member's upper bound before a dispatch, settle it at the actual
cost, let waiting work go as reservations settle or the window turns, and reject what cannot fit by its
deadline. A mixin of the simulator: it uses its state."""

from __future__ import annotations

import heapq

from engine.core.budgets import Claim
from engine.core.request import PRIORITY_RANK
from engine.runtime.reservation import claim_amount, triage
from engine.sim.results import (
    _REJECTED,
)


class SimBudget:
    """Budget methods of the simulator."""

    def reserve(self, idxs: list[int], mode: str) -> list[int]:
        """Reserve each member's upper bound; return those that may go. The others wait for reservations to
        settle, are deferred to the next window, or are rejected."""
        if self.book is None:
            return idxs
        claims = []
        for i in idxs:
            r = self.reqs[i]
            amount = claim_amount(r, self.catalog, mode, self.model_max)
            claims.append(Claim(f"{r.id}#{next(self.claim_ids)}", r.tenant, r.provider, r.model, r.priority,
                                amount))
        ok = []
        for i, c, v in zip(idxs, claims, self.book.reserve_many(claims, self.now)):
            r = self.reqs[i]
            t = triage(v, r.deadline_at)
            if t == "go":
                self.claim_of[i] = (c.rid, c.amount)
                ok.append(i)
            elif t in ("wait", "defer"):
                # Waits for reservations to settle, for the pacing line, or for the next window: in one
                # queue, tried head first, so a crowd held back together is not re-tried as a crowd.
                if t == "wait":
                    self.budget_waits += 1
                else:
                    self.deferrals += 1
                    self.tick(v.retry_at)
                heapq.heappush(self.budget_wait, (PRIORITY_RANK[r.priority], r.deadline_at, next(self.seq), i, c.amount))
                if i not in self.waiting:
                    self.waiting.add(i)
                    self.push(max(r.deadline_at, self.now), "budget_expire", i)
            else:
                self.reject(i, "budget_exhausted", v.why())
        return ok

    def settle_claim(self, i: int, actual: float, at: float) -> None:
        entry = self.claim_of.pop(i, None)
        if entry is None:
            return
        self.push(at, "settle", (entry[0], actual))

    def tick(self, at: float) -> None:
        """Try the waiting queue again at ``at`` (a pacing line or a window reset reaching its head)."""
        if at < self.tick_at:
            self.tick_at = at
            self.push(at, "budget_tick", at)

    def release_waiters(self) -> None:
        """Admit waiting requests, head first (priority, then deadline), while the budget would take them."""
        q, book, now = self.budget_wait, self.book, self.now
        released: set[int] = set()
        while q:
            _, _, _, i, amount = q[0]
            if i not in self.waiting:
                heapq.heappop(q)
                continue
            if i in released:  # admitted and back already: try again at the next change
                break
            r = self.reqs[i]
            v = book.plan(Claim("probe", r.tenant, r.provider, r.model, r.priority, amount), now)[1]
            if v.ok:
                heapq.heappop(q)
                self.waiting.discard(i)
                released.add(i)
                self.admit(i, fresh=False)  # reserves now (or joins a group): the next probe sees it
            elif v.reason == "wait":
                break
            elif v.reason == "deferred" and v.retry_at <= r.deadline_at:
                self.tick(v.retry_at)
                break
            else:
                heapq.heappop(q)
                self.waiting.discard(i)
                self.reject(i, "budget_exhausted", v.why())

    def reject(self, i: int, reason: str, why: str) -> None:
        self.status[i], self.done_at[i] = _REJECTED, self.now
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.reject_why[i] = why
        self.orphans(i)

