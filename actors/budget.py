"""The budget controller: reserve an upper-bound estimate before a dispatch, settle the actual cost after.

The rules are ``engine.budgets``'s. With ``budgets.redis_url`` the ledger lives in Redis (``RedisBudgetBook``,
one Lua script per batch of reservations or settlements), so every engine on that Redis shares one budget;
without it, one ``BudgetBook`` in this actor, whose calls run on one event loop, so no check-then-increment
race exists inside the engine either.

Budget windows run on the calendar when the engine runs at real speed (``base`` is the wall time of engine
time 0) and on trace time when it replays a trace (``base`` 0), as the simulator does.
"""

from __future__ import annotations

import asyncio

from actors._peer import Warm, as_peer
from engine.budgets import BudgetBook, BudgetSettings, Claim, Verdict

__all__ = ["BudgetController"]

METRICS_EVERY_S = 0.5


class BudgetController(Warm):
    def __init__(self, settings: BudgetSettings, hub=None, clock=None, base: float = 0.0):
        self.settings = settings
        self.hub = as_peer(hub)
        self.clock = clock
        self.base = base
        if settings.redis_url:
            import redis.asyncio as aioredis

            from actors.budget_redis import RedisBudgetBook

            self.book = RedisBudgetBook(aioredis.Redis.from_url(settings.redis_url), list(settings.specs),
                                        settings.throttle, prefix=settings.redis_prefix)
        else:
            self.book = BudgetBook(list(settings.specs), settings.throttle)
        self.refusals = {"wait": 0, "deferred": 0, "budget_exhausted": 0}
        self._reported: asyncio.Task | None = None
        self._dirty = False

    def __repr__(self) -> str:
        return f"BudgetController({self.book!r}, refusals={self.refusals})"

    async def set_clock(self, clock, base: float = 0.0) -> None:
        self.clock, self.base = clock, base

    def now(self) -> float:
        return (self.clock.now() if self.clock is not None else 0.0) + self.base

    async def _maybe(self, out):
        return await out if asyncio.iscoroutine(out) else out

    async def reserve_many(self, claims: list[Claim], release: list[str] = ()) -> list[Verdict]:
        """One verdict per claim; a deferral's ``retry_at`` is in engine time. ``release``: claims to let go
        first (settled at 0), in the same call, so what they held goes to these claims and nobody between."""
        if release:
            await self._maybe(self.book.settle_many([(rid, 0.0) for rid in release]))
        verdicts = await self._maybe(self.book.reserve_many(claims, self.now()))
        out = []
        for v in verdicts:
            if not v.ok:
                self.refusals[v.reason] += 1
                if v.retry_at is not None:
                    v = v._replace(retry_at=v.retry_at - self.base)
            out.append(v)
        self._changed()
        return out

    async def settle_many(self, items: list[tuple[str, float]]) -> None:
        """(claim id, actual cost) of finished, failed or cancelled work, in one step: Ray does not order
        calls to an async actor, so a release sent apart from its settlement could let a reservation through
        that the limit cannot cover."""
        await self._maybe(self.book.settle_many(items))
        self._changed()

    def _changed(self) -> None:
        self._dirty = True
        if self.hub is not None and (self._reported is None or self._reported.done()):
            self._reported = asyncio.get_running_loop().create_task(self._report_soon())

    async def _report_soon(self) -> None:
        while self._dirty:
            self._dirty = False
            self.hub.send("observe_budget", await self._rows(), dict(self.refusals))
            await asyncio.sleep(METRICS_EVERY_S)

    async def _rows(self) -> list[dict]:
        return await self._maybe(self.book.report(self.now()))

    async def report(self) -> dict:
        """Each budget's current window, settled spend per tenant/provider/model, refusals by reason, and (for
        a ledger of this engine alone) every window so far and the overrun, which must be 0."""
        out = {"budgets": await self._rows(), "spend": await self._maybe(self.book.spend_report()),
               "refusals": dict(self.refusals)}
        if isinstance(self.book, BudgetBook):
            out["windows"] = self.book.windows()
            out["overrun_usd"] = round(self.book.overrun_usd(), 6)
            out["reserved_usd"] = round(sum(self.book.reserved.values()), 6)
            out["spent_usd"] = round(sum(self.book.spend.values()), 6)
        else:
            out["spent_usd"] = round(sum(r["spent_usd"] for r in out["spend"]), 6)
        return out
