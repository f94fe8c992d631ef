"""A Redis budget ledger kept across the upgrade of stop 74, whose budget names quote a value holding one of the
name's separators (tenant "alice@example.com" is ``tenant='alice@example.com'``): the spend the version before kept
under the unquoted name still counts, and a claim it left open releases and settles on the new window."""

import asyncio
import calendar
import time

import pytest

from engine.core.budgets import BudgetSpec, Claim
from tests.integration._redis_clients import redis_books

T0 = float(calendar.timegm((2026, 12, 6, 10, 30, 0)))


def _open_until() -> float:
    """An open claim's expiry score: a day past now. Redis's own clock (``TIME``) judges expiry, not the books'
    ``T0``: at ``T0`` + a day the claims these tests hold open expired mid-test, and three tests failed from
    2026-12-07 10:30 UTC on (a rehearsal of stop 80)."""
    return time.time() + 86_400


def test_a_budget_quoted_since_stop_74_keeps_the_spend_redis_holds_under_its_old_name(redis_server):
    # A review of stop 74: the quoting renamed the Redis key of every budget whose tenant, provider or model holds
    # "," "=" "/" "@" or a quote (an email as tenant, a model "org/name"). After the upgrade such a budget began at
    # $0: a tenant's lifetime budget, $0.9 of $1 spent, was granted $1 again.

    life = BudgetSpec(tenant="alice@example.com", max_budget=1.0)
    day = BudgetSpec(model="org/model-x", budget_duration="1d", max_budget=1.0)
    plain = BudgetSpec(tenant="bob", max_budget=1.0)  # named as before: nothing to move

    async def go():
        async with redis_books(redis_server.url) as (c, new_book):
            p = "sbtest-upgrade74"
            day_start = f"{T0 - T0 % 86400:.0f}"
            # As the version before left them: windows under unquoted names, and a claim open on one of them.
            await c.hset(f"{p}:w:tenant=alice@example.com@0", mapping={"spent": 0.5, "reserved": 0.3})
            await c.hset(f"{p}:w:model=org/model-x/1d@{day_start}", mapping={"spent": 0.8})
            await c.hset(f"{p}:w:tenant=bob@0", mapping={"spent": 0.6})
            await c.hset(f"{p}:c:old-1", mapping={"_who": "alice@example.com\x1fopenai\x1fgpt-5",
                                                  "tenant=alice@example.com@0": 0.3})
            await c.zadd(f"{p}:exp", {"old-1": _open_until()})
            book = new_book([life, day, plain], prefix=p)
            assert await book.window(life, T0) == pytest.approx((0.5, 0.3))  # the old window, under the new name
            (v,) = await book.reserve_many([Claim("new-1", "alice@example.com", "openai", "gpt-5", "urgent", 0.4)], T0)
            assert not v.ok  # $0.5 spent + $0.3 held: $0.2 left
            (v,) = await book.reserve_many([Claim("new-2", "carol", "openai", "org/model-x", "urgent", 0.3)], T0)
            assert not v.ok  # $0.8 of the day spent
            (v,) = await book.reserve_many([Claim("new-3", "bob", "openai", "gpt-5", "urgent", 0.5)], T0)
            assert not v.ok
            await book.settle_many([("old-1", 0.25)])  # the old engine's claim settles on the new window
            assert await book.window(life, T0) == pytest.approx((0.75, 0.0))
            assert not await c.exists(f"{p}:w:tenant=alice@example.com@0")
    asyncio.run(go())


def test_a_window_another_budget_holds_under_that_name_today_is_not_moved(redis_server):
    # Tenant "a,provider=x" was named as tenant a on provider x is now: that window is the latter's own.

    odd = BudgetSpec(tenant="a,provider=x", max_budget=1.0)
    plain = BudgetSpec(tenant="a", provider="x", max_budget=1.0)

    async def go():
        async with redis_books(redis_server.url) as (c, new_book):
            p = "sbtest-upgrade74-kept"
            await c.hset(f"{p}:w:tenant=a,provider=x@0", mapping={"spent": 0.7})
            book = new_book([odd, plain], prefix=p)
            assert await book.window(odd, T0) == (0.0, 0.0)
            assert await book.window(plain, T0) == pytest.approx((0.7, 0.0))
    asyncio.run(go())


def test_a_claim_kept_on_disk_by_the_version_before_settles_on_the_budgets_window_of_today(redis_server):
    # A settlement kept at a stop (``actors._budget_kept``) names the windows its claim held; one kept by the
    # version before stop 74 named them unquoted, and counted there when Redis had lost the claim's record.

    life = BudgetSpec(tenant="alice@example.com", max_budget=1.0)

    async def go():
        async with redis_books(redis_server.url) as (c, new_book):
            book = new_book([life], prefix="sbtest-upgrade74-copy")
            assert await book.window(life, T0) == (0.0, 0.0)  # looked for under the old name already: nothing there
            kept = ("alice@example.com\x1fopenai\x1fgpt-5", [("tenant=alice@example.com@0", 0)], 0.3)
            book.restore_copy("old-2", kept)
            assert await book.settle_many([("old-2", 0.2)]) == 1  # its record gone: counted from the copy
            assert await book.window(life, T0) == pytest.approx((0.2, 0.0))
    asyncio.run(go())


def test_the_upgrade_reads_each_open_claim_once_for_all_the_budgets_a_call_moves(redis_server):
    # A review of stop 74: the upgrade ran one script per quoted budget, each reading every open claim of the
    # ledger (budgets x claims reads, Redis blocked meanwhile): 1,000 budgets and 10,000 open claims held the first
    # reservation 7.5 s, 100 budgets and 100,000 claims 13 s, each script blocking every engine's Redis ~150 ms.

    n, claims = 20, 200
    specs = [BudgetSpec(tenant=f"u{i}@example.com", max_budget=100.0) for i in range(n)]

    async def reads(c) -> int:
        stats = await c.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{k}", {}).get("calls", 0)) for k in ("hget", "hgetall"))

    async def go():
        async with redis_books(redis_server.url) as (c, new_book):
            p = "sbtest-upgrade74-cost"
            for i in range(n):
                await c.hset(f"{p}:w:tenant=u{i}@example.com@0", mapping={"spent": 1.0, "reserved": 0.5})
            for j in range(claims):
                i = j % n
                await c.hset(f"{p}:c:old-{j}", mapping={"_who": f"u{i}@example.com\x1fopenai\x1fgpt-5",
                                                         f"tenant=u{i}@example.com@0": 0.2})
                await c.zadd(f"{p}:exp", {f"old-{j}": _open_until()})
            book = new_book(specs, prefix=p)
            before = await reads(c)
            verdicts = await book.reserve_many(
                [Claim(f"new-{i}", f"u{i}@example.com", "openai", "gpt-5", "urgent", 0.1) for i in range(n)], T0)
            used = await reads(c) - before
            assert all(v.ok for v in verdicts)
            # Each claim's record read once, each window a few times (checked, moved, reserved in): not budgets x
            # claims.
            assert used <= claims + 10 * n
            assert await book.window(specs[1], T0) == pytest.approx((1.0, 0.5 + 0.1))
            assert await c.hget(f"{p}:c:old-1", "tenant='u1@example.com'@0") == b"0.2"
            assert not await c.hexists(f"{p}:c:old-1", "tenant=u1@example.com@0")
            assert not await c.exists(f"{p}:w:tenant=u1@example.com@0")
    asyncio.run(go())


def test_a_key_of_another_type_among_the_open_claims_neither_stops_the_upgrade_nor_moves_a_window_twice(redis_server):
    # A review of stop 74: the upgrade moved the window's spend, then met a claim id whose key another program had
    # written as a string (WRONGTYPE) and stopped before deleting the old window: the reservation failed, and each
    # call after moved the old spend again ($0.5 counted once per try: $1.0 after two).

    life = BudgetSpec(tenant="alice@example.com", max_budget=10.0)

    async def go():
        async with redis_books(redis_server.url) as (c, new_book):
            p = "sbtest-upgrade74-wrongtype"
            await c.hset(f"{p}:w:tenant=alice@example.com@0", mapping={"spent": 0.5, "reserved": 0.3})
            await c.hset(f"{p}:c:old-1", mapping={"_who": "alice@example.com\x1fopenai\x1fgpt-5",
                                                  "tenant=alice@example.com@0": 0.3})
            await c.set(f"{p}:c:not-a-claim", "x")
            await c.zadd(f"{p}:exp", {"not-a-claim": _open_until(), "old-1": _open_until()})
            for rid in ("new-1", "new-2"):  # the second as a call after a failed one would
                book = new_book([life], prefix=p)
                (v,) = await book.reserve_many([Claim(rid, "alice@example.com", "openai", "gpt-5", "urgent", 0.1)], T0)
                assert v.ok
            assert await book.window(life, T0) == pytest.approx((0.5, 0.3 + 0.2))
            assert await c.hget(f"{p}:c:old-1", "tenant='alice@example.com'@0") == b"0.3"
            assert await c.get(f"{p}:c:not-a-claim") == b"x"  # not the ledger's: left as it is
    asyncio.run(go())
