"""The budget controller: reserve an upper-bound estimate before a dispatch, settle the actual cost after.

Reservations and settlements run on one event loop, so there is no check-then-increment race inside one
engine. (Budgets shared across engines through Redis are issue 5.)
"""

from __future__ import annotations

from actors._peer import Warm, as_peer

__all__ = ["BudgetLedger"]


class BudgetLedger(Warm):
    def __init__(self, limit_usd: float | None = None, hub=None):
        if limit_usd is not None and limit_usd < 0:
            raise ValueError(f"budget limit_usd must be >= 0 or None, got {limit_usd}")
        self.limit_usd = limit_usd
        self.spent_usd = 0.0
        self.reserved: dict[str, float] = {}
        self.refused = 0
        self.hub = as_peer(hub)  # told the spend and what remains after each settlement (for the metrics)

    def __repr__(self) -> str:
        return (f"BudgetLedger(limit={self.limit_usd}, spent={self.spent_usd:.4f}, "
                f"reserved={sum(self.reserved.values()):.4f}, open={len(self.reserved)})")

    @property
    def remaining_usd(self) -> float | None:
        if self.limit_usd is None:
            return None
        return self.limit_usd - self.spent_usd - sum(self.reserved.values())

    async def reserve_many(self, items: list[tuple[str, float]]) -> list[bool]:
        """Reserve each (batch id, estimate) in order; refuse one that would pass the limit."""
        out = []
        for bid, amount in items:
            if amount < 0:
                raise ValueError(f"reservation {bid}: amount must be >= 0, got {amount}")
            rem = self.remaining_usd
            ok = rem is None or amount <= rem + 1e-12
            if ok:
                self.reserved[bid] = self.reserved.get(bid, 0.0) + amount
            else:
                self.refused += 1
            out.append(ok)
        return out

    async def settle_many(self, items: list[tuple[str, float]]) -> None:
        """Record each finished batch's actual cost and release its reservation, in one step. (Two calls would
        race: Ray does not order calls to an async actor, and a release seen before its settlement would let
        a reservation through that the limit cannot cover.) A batch never reserved (no limit) just adds spend."""
        for bid, actual in items:
            self.spent_usd += actual
            self.reserved.pop(bid, None)
        if self.hub is not None:
            self.hub.send("observe_budget", self.spent_usd, self.remaining_usd)

    async def report(self) -> dict:
        return {"limit_usd": self.limit_usd, "spent_usd": round(self.spent_usd, 6),
                "reserved_usd": round(sum(self.reserved.values()), 6), "remaining_usd": self.remaining_usd,
                "refused_reservations": self.refused}
