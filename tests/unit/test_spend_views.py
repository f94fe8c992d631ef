"""What a user watching spend against budgets while a bulk job runs was shown, and misled by (a helper's tour of a
driver script, `smartbatch serve` and the endpoint against the emulator, stop 64)."""

from __future__ import annotations

import asyncio

from actors import BudgetController
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.clock import ManualClock


def _claim(rid: str, tenant: str, amount: float, priority: str = "normal") -> Claim:
    return Claim(rid, tenant, "anthropic", "claude-haiku-5-5", priority, amount)


def test_the_reports_reserved_total_counts_each_open_claim_once_however_many_budgets_cover_it():
    # A global budget and a tenant's both cover a request: the tour's report said reserved_usd 0.011783 beside a
    # global budget holding 0.00656, the sum of every budget's reservations (a claim counted once per budget),
    # where spent_usd beside it counts each request once.
    specs = (BudgetSpec(max_budget=2.0, budget_duration="1d"), BudgetSpec(tenant="acme", max_budget=0.3),
             BudgetSpec(model="claude-haiku-5-5", max_budget=1.0))

    async def go():
        ctl = BudgetController(BudgetSettings(specs=specs), None, ManualClock(0.0))
        verdicts = await ctl.reserve_many([_claim("a#0", "acme", 0.004), _claim("b#0", "beta", 0.002)])
        assert all(v.ok for v in verdicts)
        await ctl.settle_many([("b#0", 0.001)])
        return await ctl.report()

    rep = asyncio.run(go())
    held = {row["budget"]: row["reserved_usd"] for row in rep["budgets"]}
    assert held == {"global/1d": 0.004, "tenant=acme": 0.004, "model=claude-haiku-5-5": 0.004}
    assert rep["reserved_usd"] == 0.004  # the open claim, once (0.012 before: once per covering budget)
    assert rep["spent_usd"] == 0.001
