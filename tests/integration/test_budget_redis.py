"""Budgets shared through a real redis-server: two engines' ledgers reserving at once never pass the limit,
and the Lua ledger decides as the in-process reference does."""

import asyncio
import calendar
import itertools
import random

import pytest

from actors.budget_redis import RedisBudgetBook
from engine.budgets import BudgetBook, BudgetSpec, Claim

T0 = float(calendar.timegm((2026, 11, 29, 10, 30, 0)))
_prefix = itertools.count()


def book_pair(url, specs):
    import redis.asyncio as aioredis

    prefix = f"sbtest-budget{next(_prefix)}"
    clients = [aioredis.Redis.from_url(url) for _ in range(2)]
    return clients, [RedisBudgetBook(c, specs, prefix=prefix) for c in clients]


def test_two_engines_on_one_redis_never_pass_a_shared_budget(redis_server):
    spec = BudgetSpec(tenant="acme", max_budget=25.0, budget_duration="1d")
    rng = random.Random(7)

    async def engine(book, name, n):
        approved = []
        for k in range(n):  # small batches, interleaved with the other engine's on the event loop
            batch = [Claim(f"{name}-{k}-{j}", "acme", "openai", "gpt-5", rng.choice(["urgent", "normal"]),
                           round(rng.uniform(0.01, 0.6), 4)) for j in range(rng.randint(1, 5))]
            for c, v in zip(batch, await book.reserve_many(batch, T0)):
                if v.ok:
                    approved.append(c)
            await asyncio.sleep(0)
        return approved

    async def go():
        clients, (a, b) = book_pair(redis_server.url, [spec])
        got_a, got_b = await asyncio.gather(engine(a, "a", 150), engine(b, "b", 150))
        reserved = sum(c.amount for c in got_a + got_b)
        spent, held = await a.window(spec, T0)
        assert got_a and got_b  # both engines got work through
        assert reserved <= spec.max_budget + 1e-9 and held == pytest.approx(reserved)
        assert reserved > 0.95 * spec.max_budget  # and the budget was used, not refused wholesale
        # Settle every claim at most its reservation, from both sides at once: spend stays within the limit.
        settle = [(c.rid, c.amount * rng.random()) for c in got_a + got_b]
        await asyncio.gather(a.settle_many(settle[::2]), b.settle_many(settle[1::2]))
        spent, held = await b.window(spec, T0)
        assert held == pytest.approx(0.0, abs=1e-9) and spent <= spec.max_budget
        for c in clients:
            await c.aclose()
    asyncio.run(go())


def test_the_lua_ledger_decides_as_the_reference_does(redis_server):
    specs = [BudgetSpec(max_budget=8.0, budget_duration="1h"), BudgetSpec(tenant="acme", max_budget=5.0),
             BudgetSpec(model="gpt-5-mini", max_budget=3.0, budget_duration="1mo")]
    rng = random.Random(3)
    ref = BudgetBook(specs)

    async def go():
        clients, (book, _) = book_pair(redis_server.url, specs)
        open_ids = []
        for k in range(300):
            c = Claim(f"c{k}", rng.choice(["acme", "globex"]), "openai", rng.choice(["gpt-5", "gpt-5-mini"]),
                      rng.choice(["urgent", "normal", "background"]), round(rng.uniform(0, 1.2), 3))
            t = T0 + rng.uniform(0, 7200)  # crosses an hourly window
            (want,), (got,) = ref.reserve_many([c], t), await book.reserve_many([c], t)
            assert got.ok == want.ok and (got.ok or got.reason == want.reason), (k, got, want)
            if got.ok:
                open_ids.append(c.rid)
            if open_ids and rng.random() < 0.4:
                rid = open_ids.pop(rng.randrange(len(open_ids)))
                actual = round(rng.uniform(0, 1), 3)
                ref.settle_many([(rid, actual)])
                await book.settle_many([(rid, actual)])
        for c in clients:
            await c.aclose()
    asyncio.run(go())
