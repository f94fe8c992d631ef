"""A Redis that fills up mid-run (``maxmemory`` under ``noeviction``: every write answered OOM) under the budget
ledger: its state, not what the ledger sent, so an outage like any other. Each test starts its own redis-server."""

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
