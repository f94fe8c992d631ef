"""Redis faults of the budget ledger (a helper's hunt): a Redis that refuses writes mid-run (``maxmemory`` under
``noeviction``: every write answered OOM; a failover that made it a replica), which is its state, not what the
ledger sent, so an outage like any other; and a restart without persistence seen by an engine that makes no call.
Each test starts its own redis-server; no Ray."""

import asyncio
import itertools

import pytest

from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim

_prefix = itertools.count()


def budgets(url, limit: float = 10.0) -> BudgetSettings:
    return BudgetSettings(specs=(BudgetSpec(max_budget=limit),), redis_url=url, redis_prefix=f"sbtest-full{next(_prefix)}",
                          reserve_output="request", redis_timeout_s=0.3, redis_retry_s=0.3)


def window(srv, b: BudgetSettings) -> tuple[float, float]:
    h = srv.client().hgetall(f"{b.redis_prefix}:w:{b.specs[0].key(0.0)}")
    return round(float(h.get(b"spent", 0)), 9), round(float(h.get(b"reserved", 0)), 9)


def _full(r):
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)  # every write refused, reads answered


def _room(r):
    r.config_set("maxmemory", 0)  # keys deleted, or the limit raised


def _replica(r):
    r.replicaof("127.0.0.1", 1)  # a failover made it a replica (of a master it cannot reach: its data stay)


def _primary(r):
    r.replicaof("NO", "ONE")


@pytest.mark.parametrize("refuse, accept", [(_full, _room), (_replica, _primary)], ids=["full", "replica"])
def test_settlements_a_redis_refusing_writes_mid_run_refuses_wait_and_count_once_not_dropped(own_redis, refuse, accept):
    """A write inside a Lua script that Redis refuses for want of memory is answered "OOM ... on @user_script",
    which the book took for a script refusing what it was given: each settlement was dropped with an ERROR (its
    spend never counted, its reservation held two days, then released with the spend forgotten). Now it waits in
    the outbox, as for a Redis that is away, and counts once when Redis has room again. A replica (READONLY, a
    failover) went the same way."""
    from actors.budget import BudgetController

    b = budgets(own_redis.url)
    r = own_redis.client()

    async def go():
        ctl = BudgetController(b)
        await ctl.check_ledger()
        claims = [Claim(f"a{k}", "acme", "openai", "gpt-4o-mini", "urgent", 2.0) for k in range(3)]
        assert all(v.ok for v in await ctl.reserve_many(claims))
        refuse(r)
        await ctl.settle_many([("a0", 2.0), ("a1", 1.5)])  # the work finished: $3.50 spent
        await ctl.charge_many([Charge("late:m1", "acme", "openai", "gpt-4o-mini", 0.25)])
        full = window(own_redis, b), ctl.rejected_settlements, (await ctl.report())["ledger"]["unsettled"]
        accept(r)
        if ctl._flusher is not None:  # the outbox's replay, bounded
            await asyncio.wait_for(asyncio.shield(ctl._flusher), 10)
        rep = await ctl.report()
        await ctl.settle_many([("a0", 2.0)])  # sent again (a lost reply): counted once
        await ctl.close()
        return full, rep, ctl.rejected_settlements
    full, rep, rejected = asyncio.run(go())
    assert full == ((0.0, 6.0), 0, 3)  # nothing counted while full, nothing dropped: 2 settlements, 1 charge wait
    assert rejected == 0 and rep["ledger"]["unsettled"] == 0 and rep["ledger"]["up"] is True
    assert window(own_redis, b) == (pytest.approx(3.75), pytest.approx(2.0))  # a2 still open


async def decided(ctl, claim: Claim, timeout_s: float = 10.0):
    """The verdict on ``claim`` once the ledger answers (its first call after a restart may meet the connection
    the restart cut: ``budget_unavailable`` for ``redis_retry_s``), bounded."""
    t_end = asyncio.get_running_loop().time() + timeout_s
    while (v := (await ctl.reserve_many([claim]))[0]).reason == "budget_unavailable":
        assert asyncio.get_running_loop().time() < t_end, v
        await asyncio.sleep(0.05)
    return v


def test_an_idle_engine_s_claims_are_reserved_again_before_another_engine_takes_their_room(own_redis):
    """Two engines share a budget; one holds a claim for work under way (a provider batch: hours) and makes no
    ledger call meanwhile. Redis restarts without persistence: its claims were reserved again only at that engine's
    next call, its settlement, so the other engine was granted their room first, and the budget passed by them
    (before: $13 spent under a $10 limit). Now a book holding open claims reads which Redis process answers once a
    second, calls or not, and reserves them again at once."""
    from actors.budget import BudgetController

    b = budgets(own_redis.url)

    async def go():
        a, idle = BudgetController(b), BudgetController(b)
        await a.check_ledger()
        await idle.check_ledger()
        assert (await idle.reserve_many([Claim("batch1", "acme", "openai", "gpt-4o-mini", "urgent", 6.0)]))[0].ok
        assert (await a.reserve_many([Claim("a0", "acme", "openai", "gpt-4o-mini", "urgent", 1.0)]))[0].ok
        await a.settle_many([("a0", 1.0)])
        own_redis.stop()
        own_redis.start()  # no persistence: the claims and the spend are gone
        r = own_redis.client()
        t_end = asyncio.get_running_loop().time() + 10
        while not r.exists(f"{b.redis_prefix}:c:batch1"):  # the idle engine's claim, back (bounded)
            assert asyncio.get_running_loop().time() < t_end, "the idle engine's claim never reserved again"
            await asyncio.sleep(0.02)
        later = [await decided(a, Claim(f"a{k}", "acme", "openai", "gpt-4o-mini", "urgent", 3.0)) for k in (1, 2)]
        await idle.settle_many([("batch1", 6.0)])  # the batch ends
        await a.close()
        await idle.close()
        return [v.ok for v in later]
    granted = asyncio.run(go())
    spent, reserved = window(own_redis, b)
    assert granted == [True, False]  # $1 (a0, sent again) + $6 + $3 = $10: the second $3 does not fit
    assert spent + reserved <= 10.0 + 1e-9, (spent, reserved)
