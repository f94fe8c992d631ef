"""The soft-limit rule in the ledger shared through a real redis-server (the Lua ledger computes each claim's
allowance itself, so it is checked here as well as in tests/unit/test_rules.py): a claim between the soft and
the hard limit is admitted, the report flags the soft limit as exceeded, and the hard limit still holds."""

from __future__ import annotations

import asyncio
import calendar
import itertools

import pytest

from actors.budget_redis import RedisBudgetBook
from engine.core.budgets import BudgetSpec, Claim, Throttle

T0 = float(calendar.timegm((2026, 11, 29, 10, 30, 0)))
_prefix = itertools.count()


@pytest.mark.parametrize("priority", ["urgent", "normal", "background"])
def test_the_redis_ledger_admits_a_claim_past_the_soft_limit_and_flags_it(redis_server, priority):
    import redis.asyncio as aioredis

    spec = BudgetSpec(tenant="acme", max_budget=10.0, soft_budget=5.0, budget_duration="1d")
    throttle = Throttle(pace=False)
    hard = spec.max_budget * throttle.of(priority)
    amount = (spec.soft_budget + hard) / 2  # strictly between the soft limit and this priority's share

    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        book = RedisBudgetBook(client, [spec], throttle, prefix=f"sbtest-soft{next(_prefix)}")
        try:
            (row,) = await book.report(T0)
            assert row["soft_exceeded"] is False
            (v,) = await book.reserve_many([Claim("a", "acme", "openai", "gpt-5", priority, amount)], T0)
            assert v.ok, v
            await book.settle_many([("a", amount)])
            (row,) = await book.report(T0)
            assert row["spent_usd"] == pytest.approx(amount) and row["soft_exceeded"] is True
            (v,) = await book.reserve_many([Claim("b", "acme", "openai", "gpt-5", priority,
                                                  hard - amount + 0.01)], T0)
            assert not v.ok  # the hard limit holds
        finally:
            await client.aclose()
    asyncio.run(go())
