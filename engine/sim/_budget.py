"""The simulator's budget steps: reserve each member's upper bound before a dispatch, settle it at the actual
cost, and apply the kernel's budget waits (``engine.runtime.waiting``, which the grouper actor applies too) on
virtual time: held work is tried again as decided, at ``budget_tick`` events. A mixin of the simulator: it
uses its state."""

from __future__ import annotations

from engine.core.budgets import Claim
from engine.core.grouping import Decision
from engine.runtime.reservation import claim_amount, triage
from engine.runtime.waiting import held_too_long, tiers
from engine.sim.results import (
    _REJECTED,
)


class SimBudget:
    """Budget methods of the simulator."""

    def reserve(self, sends: list[tuple[list[int], str, Decision]]) -> list[list[int]]:
        """Reserve the upper bound of every member of dispatches decided together (members, mode, decision), in
        one go as the grouper does; return those of each that may go. The budget waits hold the others (with
        their decision, to be sent as decided), or they are rejected."""
        if self.book is None:
            return [idxs for idxs, _, _ in sends]
        waits, now = self.waits, self.now
        ok: list[set[int]] = [set() for _ in sends]
        verdicts: list = []
        # A priority at a time, most urgent first: a member held back in one tier holds the less urgent members
        # of the next behind it (``engine.runtime.waiting.tiers``), as held work does between calls.
        for tier in tiers(((i, k) for k, (idxs, _, _) in enumerate(sends) for i in idxs), lambda ik: self.reqs[ik[0]]):
            overtaken = waits.overtaken(self.book.specs)
            go: list[tuple[int, int]] = []  # (member, which send)
            for i, k in tier:
                name = waits.blocker(self.reqs[i], overtaken) if overtaken else None
                if name is None:
                    go.append((i, k))
                else:  # no overtaking: behind more urgent work that this budget holds back
                    waits.hold(i, self.reqs[i], now + waits.step_s, name, (i, sends[k][2]))
            claims = []
            for i, k in go:
                r = self.reqs[i]
                amount = claim_amount(r, self.catalog, sends[k][1], self.model_max)
                claims.append(Claim(f"{r.id}#{next(self.claim_ids)}", r.tenant, r.provider, r.model, r.priority,
                                    amount))
            got = self.book.reserve_many(claims, now) if claims else []
            verdicts += got
            for (i, k), c, v in zip(go, claims, got):
                r, d = self.reqs[i], sends[k][2]
                t = triage(v, r.deadline_at)
                if t == "go":
                    self.claim_of[i] = (c.rid, c.amount)
                    ok[k].add(i)
                elif t in ("wait", "defer"):
                    if t == "wait":
                        self.budget_waits += 1
                    else:
                        self.deferrals += 1
                    waits.hold(i, r, waits.due_after(t, v, now), v.budget, (i, d), v, c.amount)
                else:
                    self.reject(i, "budget_exhausted", v.why(c.amount, self.model_max))
        if verdicts:  # the share of a try follows the whole try, as in one call
            waits.adapt(verdicts)
        self.table.budget.holding = waits.holding(self.book.specs)
        self.tick()
        return [[i for i in idxs if i in ok[k]] for k, (idxs, _, _) in enumerate(sends)]

    def settle_claim(self, i: int, actual: float, at: float) -> None:
        entry = self.claim_of.pop(i, None)
        if entry is None:
            return
        self.push(at, "settle", (entry[0], actual))

    def settle_claim_now(self, i: int) -> None:
        """Release ``i``'s claim now, unbilled, before it reserves again (a hedge's, a flex call gone standard):
        the room it held is its own to use."""
        entry = self.claim_of.pop(i, None)
        if entry is not None:
            self.book.settle_many([(entry[0], 0.0)])

    def tick(self) -> None:
        """Schedule the next try of held work, unless one comes sooner."""
        at = self.waits.next_try(self.now)
        if at is not None and at < self.tick_at:
            self.tick_at = at
            self.push(at, "budget_tick", at)

    def release_waiters(self) -> None:
        """A try: reject what was held to its deadline, send the due members again as decided, most urgent
        first (a dispatch's members that are due together go together)."""
        late, ready = self.waits.take(self.now)
        for h in late:
            self.reject(h.key, "budget_exhausted", held_too_long(h))
        sends: dict[int, tuple[Decision, list[int]]] = {}
        for h in ready:
            i, d = h.payload
            sends.setdefault(id(d), (d, []))[1].append(i)
        if sends:
            self.send_many(list(sends.values()))
        if not ready and self.book is not None:  # else their reservation said (``reserve``), as the grouper's
            self.table.budget.holding = self.waits.holding(self.book.specs)
        self.tick()

    def reject(self, i: int, reason: str, why: str) -> None:
        self.status[i], self.done_at[i] = _REJECTED, self.now
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.reject_why[i] = why
        self.orphans(i)
