"""A Redis client the engine closes opens no connection after its close (``actors._redis_gate``): before, a command
sent after the close (another actor call, a task the close did not end) connected again on the pool the close had
emptied, and nothing closed that connection: left for the collector, whose ResourceWarning failed whichever test was
running (CI at stops 55, 80 and 84). Each test counts the connections the server holds, the checker's aside."""

import asyncio
import itertools

import pytest

from engine.core.budgets import BudgetSettings, BudgetSpec, Claim

_prefix = itertools.count()


def _held(srv) -> int:
    """Connections ``srv`` (a redis-server fixture) holds beside the checker's own."""
    c = srv.client()
    me = c.client_id()
    return sum(int(x["id"]) != me for x in c.client_list())


def test_a_cache_layer_closed_refuses_a_read_after_and_opens_no_connection(own_redis):
    """Fails on the code before: the read after the close found the value, on a connection made then and left open."""
    from actors.cache_layers import RedisLayer

    async def go():
        layer = RedisLayer(own_redis.url, prefix=f"sbtest-close{next(_prefix)}", timeout_s=5.0)
        key = layer.key("s", "fp")
        await layer.put_many([(key, b"v", 60_000)])
        await layer.close()
        return await layer.get_many([key]), _held(own_redis)
    got, held = asyncio.run(go())
    assert got == [(None, -2)]  # a miss, as with Redis away
    assert held == 0


def test_a_budget_ledger_closed_refuses_a_claim_after_and_opens_no_connection(own_redis):
    """A grouper's claim that reaches the ledger after the engine's stop closed it (fails on the code before: the
    claim was granted, on a connection made then and left open)."""
    from actors.budget import BudgetController

    async def go():
        ctl = BudgetController(BudgetSettings(specs=(BudgetSpec(max_budget=10.0),), redis_url=own_redis.url,
                                              redis_prefix=f"sbtest-close{next(_prefix)}", redis_timeout_s=2.0))
        await ctl.check_ledger()
        assert (await ctl.reserve_many([Claim("c0", "acme", "openai", "gpt-5-mini", "urgent", 1.0)]))[0].ok
        await ctl.close()
        (v,) = await ctl.reserve_many([Claim("c1", "acme", "openai", "gpt-5-mini", "urgent", 1.0)])
        return v, _held(own_redis)
    v, held = asyncio.run(go())
    assert not v.ok and v.reason == "budget_unavailable", v
    assert held == 0


def test_a_cluster_cache_layer_closed_refuses_a_read_after(redis_cluster):
    """The same on a Redis Cluster, whose client makes its nodes' connections itself (fails on the code before: the
    read after the close initialized the client again and found the value)."""
    from actors.cache_layers import RedisLayer

    async def go():
        layer = RedisLayer(redis_cluster.url, prefix=f"sbtest-close{next(_prefix)}", timeout_s=5.0, cluster=True)
        keys = [layer.key("s", f"fp{i}") for i in range(6)]  # on more than one node
        await layer.put_many([(k, b"v", 60_000) for k in keys])
        await layer.close()
        return await layer.get_many(keys)
    assert asyncio.run(go()) == [(None, -2)] * 6


def test_a_close_waits_for_a_counted_command_and_a_connection_made_after_it_is_closed_at_once(own_redis,
                                                                                              monkeypatch):
    """The gate itself: a close waits for the command counted out (``ClientGate.use``), then refuses the next, and a
    connection that ends its connect after the close began (made while the pool was being emptied) closes itself."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import ConnectionError as RedisConnectionError

    from actors._redis_cluster import async_client
    from actors._redis_gate import close_client, gate_of

    async def go():
        client = async_client(own_redis.url, cluster=False, timeout_s=5.0, name="test")
        g = gate_of(client)
        out, go_on = asyncio.Event(), asyncio.Event()

        async def counted():
            async with g.use():
                out.set()
                await go_on.wait()
                return await client.ping()
        cmd = asyncio.create_task(counted())
        await out.wait()
        closing = asyncio.create_task(close_client(client))
        await asyncio.sleep(0)  # the close starts and waits for the command (no time passes: an event ends it)
        assert g.closed and not closing.done()
        go_on.set()
        await closing
        assert cmd.result() is True
        with pytest.raises(RedisConnectionError, match="test: its Redis client is closed"):
            await client.ping()
        # A connection whose connect ends after the close began: closed by itself, its caller refused.
        conn, g.shut = client.connection_pool.make_connection(), False
        real = Connection.connect_check_health

        async def connect_then_close(self, *a, **kw):
            await real(self, *a, **kw)
            g.shut = True
        monkeypatch.setattr(Connection, "connect_check_health", connect_then_close)
        with pytest.raises(RedisConnectionError, match="closed"):
            await conn.connect()
        return conn.is_connected, _held(own_redis)
    assert asyncio.run(go()) == (False, 0)
