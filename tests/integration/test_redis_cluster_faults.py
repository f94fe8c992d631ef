"""Faults of the budget ledger and the cache on a real local Redis Cluster (``redis_cluster`` fixture) found by a
review of the cluster support: each fails on the code before (docs/budgets.md, Redis Cluster). No Ray."""

import asyncio
import itertools

import pytest

from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.errors import ConfigError
from tests.integration.test_redis_cluster import _local_prefix

_prefix = itertools.count()


def _slots_down(cluster, port: int):
    """Take one slot of the node at ``port`` out of every node's view: the cluster is down (a slot no node
    serves), as a master lost before its failover is. Returns how to give it back."""
    import redis

    (lo, *_), = [s for s in _slot_ranges(cluster) if s[1] == port]
    for p in cluster.ports:
        with redis.Redis(port=p, socket_timeout=2.0) as c:
            c.execute_command("CLUSTER", "DELSLOTS", lo)

    def back():
        with redis.Redis(port=port, socket_timeout=2.0) as c:
            c.execute_command("CLUSTER", "ADDSLOTS", lo)
        cluster.wait_agreed()
    return back


def _slot_ranges(cluster) -> list[tuple[int, int]]:
    """(first slot, port) of each range the cluster serves."""
    import redis

    with redis.Redis(port=cluster.ports[0], socket_timeout=2.0) as c:
        return [(int(lo), int(port)) for lo, _, (_, port, *_), *_ in c.execute_command("CLUSTER", "SLOTS")]


def test_a_cluster_down_that_serves_reads_is_an_outage_whose_settlement_counts_once_when_it_is_back(redis_cluster):
    """With ``cluster-allow-reads-when-down yes`` a down cluster runs the ledger's script (EVALSHA is no write
    command) and stops it at its first write: "Script attempted to execute a write command while the cluster is
    down and readonly". Before, that read as a refusal: the settlement was dropped (``rejected_settlements``), its
    spend never counted. Nothing was written before the refusal, so the outbox's replay counts it once."""
    import time

    import redis

    from actors.budget import BudgetController

    prefix = f"sbtest-clf-down{next(_prefix)}"
    ledger = redis_cluster.node_of("{" + prefix + "}:exp")
    other = next(p for p in redis_cluster.ports if p != ledger)
    b = BudgetSettings(specs=(BudgetSpec(max_budget=10.0),), redis_url=redis_cluster.url, redis_prefix=prefix,
                       redis_cluster=True, redis_timeout_s=0.5, redis_retry_s=0.2)
    node = redis.Redis(port=ledger, socket_timeout=2.0)

    def down_seen() -> None:  # the node's own state, polled within a bound: nothing to wait on instead
        end = time.monotonic() + 10
        while "cluster_state:fail" not in node.execute_command("CLUSTER", "INFO").decode():
            assert time.monotonic() < end, "the cluster never went down"
            time.sleep(0.02)

    async def go():
        ctl = BudgetController(b)
        try:
            await ctl.check_ledger()
            assert all(v.ok for v in await ctl.reserve_many([Claim("d1", "acme", "openai", "gpt-5", "urgent", 2.0)]))
            node.config_set("cluster-allow-reads-when-down", "yes")
            back = _slots_down(redis_cluster, other)
            try:
                down_seen()
                await ctl.settle_many([("d1", 1.5)])
                rep = await ctl.report()
                assert rep["ledger"]["rejected_settlements"] == 0 and rep["ledger"]["unsettled"] == 1
            finally:
                back()
                node.config_set("cluster-allow-reads-when-down", "no")
            await asyncio.wait_for(ctl._flusher, timeout=15)  # the outbox replayed once the cluster is up
            rep = await ctl.report()
            assert rep["ledger"]["unsettled"] == 0 and rep["ledger"]["rejected_settlements"] == 0
            window = rep["budgets"][0]
            assert window["spent_usd"] == pytest.approx(1.5) and window["reserved_usd"] == pytest.approx(0.0)
        finally:
            await ctl.close()
    try:
        asyncio.run(go())
    finally:
        node.close()


def test_a_resume_s_settlement_on_a_cluster_node_named_as_a_single_redis_is_refused_before_any_script(redis_cluster):
    """A resume settles the claims of a run cut off (``settle_claims``) before the engine starts, so before its
    check of the cluster setting: before, a cluster node named as a single Redis answered MOVED, said as "run again
    once it answers", which it never would (and a script the node did run met keys of other nodes after its first
    writes, counted again by that run again). Now refused first, naming the setting, nothing written."""
    from engine.app._rescue_settle import settle_claims
    from engine.core.settings import Settings

    prefix = _local_prefix(redis_cluster, redis_cluster.ports[0], "sbtest-clf-resume")  # its first keys on the node named: it runs
    s = Settings(budgets={"redis_url": redis_cluster.url, "redis_prefix": prefix,
                          "specs": [BudgetSpec(max_budget=5.0)]})
    with pytest.raises(ConfigError, match=r"budgets\.redis_cluster.*SMARTBATCH_BUDGETS__REDIS_CLUSTER=true"):
        asyncio.run(settle_claims(s, {f"r{k}": 0.5 for k in range(20)}))
    assert not any(redis_cluster.keys(f"{prefix}:*").values())


def test_more_claims_at_once_than_a_cluster_client_s_default_pool_are_all_answered(redis_cluster):
    """The ledger's node is one node, and the budget actor answers hundreds of calls at once (max_concurrency
    1000). redis-py's cluster client holds 100 connections per node by default and raises ``MaxConnectionsError``
    past them, at once, where a single Redis's pool has no bound: before (a review), 300 claims at once had 200
    answered ``budget_unavailable`` and the ledger marked down, on a ledger that was up."""
    from actors.budget import BudgetController

    prefix = f"sbtest-clf-many{next(_prefix)}"

    async def go():
        ctl = BudgetController(BudgetSettings(specs=(BudgetSpec(max_budget=1000.0),), redis_url=redis_cluster.url,
                                              redis_prefix=prefix, redis_cluster=True))
        try:
            await ctl.check_ledger()
            verdicts = await asyncio.gather(*(ctl.reserve_many([Claim(f"m{k}", "acme", "openai", "gpt-5", "urgent",
                                                                      0.1)]) for k in range(300)))
            rep = await ctl.report()
            return [v.reason for (v,) in verdicts if not v.ok], rep
        finally:
            await ctl.close()
    refused, rep = asyncio.run(go())
    assert refused == [] and rep["ledger"]["up"] and rep["ledger"]["error"] is None
    assert rep["budgets"][0]["reserved_usd"] == pytest.approx(30.0)


def test_the_cache_s_writes_to_a_cluster_node_that_does_not_answer_are_kept_and_written_when_it_does(redis_cluster):
    """A cluster pipeline answers a node that timed out with an error per command, where a single Redis's raises:
    before (a review), the writes to a paused node were taken for the server's refusals ("refuses writes"), dropped
    and never written, and their results generated again at the next ask. Now kept, as a single Redis away has
    them, and written once the layer tries again (its clock injected: no wait)."""
    import os
    import signal

    from actors.cache_layers import RedisLayer

    prefix, t = f"sbtest-clf-cachedown{next(_prefix)}", [0.0]

    async def go():
        layer = RedisLayer(redis_cluster.url, prefix=prefix, timeout_s=0.5, retry_s=5.0, cluster=True,
                           now=lambda: t[0])
        try:
            keys = [layer.key("t", f"fp{i}") for i in range(30)]
            await layer.get_many(keys[:1])  # the slots map read while every node answers
            node = redis_cluster.procs[redis_cluster.ports.index(redis_cluster.node_of(keys[0]))]
            os.kill(node.pid, signal.SIGSTOP)
            try:
                await layer.put_many([(k, f"v{i}".encode(), 60_000) for i, k in enumerate(keys)])
            finally:
                os.kill(node.pid, signal.SIGCONT)
            dropped = layer.dropped_writes
            t[0] += layer.retry_s
            await layer.get_many(keys[:1])  # tried again: up, what it kept written
            return dropped, await layer.get_many(keys)
        finally:
            await layer.close()
    dropped, got = asyncio.run(go())
    assert dropped == 0 and [v for v, _ in got] == [f"v{i}".encode() for i in range(30)]
