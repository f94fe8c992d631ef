"""A budget removed from a Redis ledger (a review of stop 82's tour): it leaves the budgets' rows at once, and its
window's spend stays under its name for the budget added again before the window ends (docs/budgets.md). No Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.core.budgets import BudgetSpec, Claim
from tests.integration._redis_clients import redis_books

# Today's first second on the wall clock: Redis's own clock (``TIME``) expires a window's key, so a fixed date
# would find its window gone once the calendar passed it (stop 80's rehearsal saw that of a fixed ``T0``).
T0 = time.time() // 86_400 * 86_400 + 1.0


def test_a_removed_budgets_window_is_listed_no_more_and_its_spend_waits_for_it_on_a_redis_ledger(redis_server):
    day = BudgetSpec(tenant="acme", max_budget=1.0, budget_duration="1d")

    async def go():
        async with redis_books(redis_server.url) as (_, new_book):
            book = new_book([day], prefix="sbtest-removed82")
            (v,) = await book.reserve_many([Claim("a", "acme", "openai", "gpt-5-mini", "urgent", 0.5)], T0)
            assert v.ok
            await book.settle_many([("a", 0.4)])
            book.set_specs([])  # removed (``change_budgets``): no row, nothing covered
            assert await book.report(T0) == []
            (v,) = await book.reserve_many([Claim("b", "acme", "openai", "gpt-5-mini", "urgent", 0.9)], T0)
            assert v.ok  # held by no budget: its spend is not the window's
            await book.settle_many([("b", 0.9)])
            book.set_specs([day])  # added again within the window: the spend from before it was removed
            (row,) = await book.report(T0)
            assert row["spent_usd"] == pytest.approx(0.4) and row["remaining_usd"] == pytest.approx(0.6)
            (row,) = await book.report(T0 + 86_400)  # the next day's window: nothing spent in it
            assert row["spent_usd"] == 0.0
    asyncio.run(go())
