"""The budget ledger and the cache on a real local Redis Cluster whose masters have a replica each
(``redis_cluster_replicas``), through a failover: the master holding the ledger's slot killed (promoted by the
cluster, or taken over by its replica) and a clean manual ``CLUSTER FAILOVER`` (docs/budgets.md, Redis Cluster).
Redis replicates asynchronously: what the master acknowledged and had not sent its replica is gone from the
promoted one, as from a Redis restarted from an older snapshot. No Ray, but for the last test: a live engine through the same
failover, here to share this module's cluster (``redis_cluster_replicas`` is module-scoped: in its own module it
started six more redis-servers)."""

import asyncio
import itertools
import signal
import time

import pytest
import redis

from engine.core.budgets import BudgetSettings, BudgetSpec, Claim

_prefix = itertools.count()


def _settings(cluster, stem: str) -> BudgetSettings:
    return BudgetSettings(specs=(BudgetSpec(max_budget=10.0),), redis_url=cluster.url,
                          redis_prefix=f"sbtest-fo-{stem}{next(_prefix)}", redis_cluster=True, redis_timeout_s=0.5,
                          redis_retry_s=0.2)


def _ledger_nodes(cluster, prefix: str) -> tuple[int, int]:
    """The master serving a ledger's slot (every key under the hash tag ``{prefix}``), and its replica."""
    master = cluster.node_of("{" + prefix + "}:exp")
    return master, cluster.replica_of(master)


def _claims(*rids: str, usd: float = 1.0) -> list[Claim]:
    return [Claim(rid, "acme", "openai", "gpt-5", "urgent", usd) for rid in rids]


def _synced(master: int, replica: int) -> None:
    """Until the replica has taken everything the master wrote (its offset; bounded): what comes before this is on
    both."""
    with redis.Redis(port=master, socket_timeout=2.0) as m, redis.Redis(port=replica, socket_timeout=2.0) as r:
        want, end = m.info("replication")["master_repl_offset"], time.monotonic() + 10
        while r.info("replication").get("slave_repl_offset", -1) < want:
            assert time.monotonic() < end, "the replica never caught up"
            time.sleep(0.02)  # polling the servers' own offsets, bounded above: nothing to wait on instead


def _run_id(port: int) -> str:
    with redis.Redis(port=port, socket_timeout=2.0) as c:
        return c.info("server")["run_id"]


async def _drained(ctl) -> dict:
    """The ledger's report once its outbox is empty and it answers (bounded)."""
    end = time.monotonic() + 15
    while True:
        rep = await ctl.report()
        if rep["ledger"]["unsettled"] == 0 and rep["ledger"]["up"] and rep["budgets"]:
            return rep
        assert time.monotonic() < end, f"the ledger never drained its outbox: {rep['ledger']}"
        await asyncio.sleep(0.05)  # the outbox's own retry runs meanwhile; a report reads where it is


async def _granted_on_the_master_alone(ctl, master: int, replica: int, cut) -> None:
    """Four claims granted and one settled ($0.50) on both nodes; ``cut()`` keeps the replica from what follows:
    two $2.50 claims granted and two settlements ($0.70, $0.30) on the master alone."""
    await ctl.check_ledger()
    assert all(v.ok for v in await ctl.reserve_many(_claims("c0", "c1", "c2", "c3")))
    await ctl.settle_many([("c0", 0.5)])
    _synced(master, replica)
    cut()
    assert all(v.ok for v in await ctl.reserve_many(_claims("d0", "d1", usd=2.5)))
    await ctl.settle_many([("c1", 0.7), ("d0", 0.3)])


def _the_loss_is_real(r, prefix: str) -> None:
    """The promoted replica holds the claims of before the cut, open, and none of after: c0 settled, d0/d1 unknown."""
    left = {k.decode() for k in r.scan_iter(match="{" + prefix + "}:c:*")}
    assert left == {f"{{{prefix}}}:c:{rid}" for rid in ("c1", "c2", "c3")}


async def _the_rest_settled(ctl, verdict) -> dict:
    await ctl.settle_many([("c2", 0.2), ("c3", 0.4), ("d1", 0.6)] + [("e0", 0.0)] * verdict.ok)
    return await _drained(ctl)


def _each_dollar_once(verdict, rep) -> dict:
    """The $4.50 claim refused, every settlement counted once, nothing held; returns the ledger's report."""
    window = rep["budgets"][0]
    assert not verdict.ok, "a $4.50 claim granted under a $10 limit with $6 spent or held"
    assert window["spent_usd"] == pytest.approx(0.5 + 0.7 + 0.3 + 0.2 + 0.4 + 0.6)
    assert window["reserved_usd"] == pytest.approx(0.0)
    return rep["ledger"]


def test_writes_the_promoted_replica_never_received_are_taken_again_before_any_other_call(redis_cluster_replicas,
                                                                                         monkeypatch):
    """The replica is cut from its master (stopped, and its link closed: a stopped replica still takes the stream
    into its socket and reads it once it runs); the master grants two $2.50 claims and takes two settlements, then
    dies, and the replica takes its slots over. Those writes are gone from it: one claim settled on the master is
    open again there, its $0.70 uncounted, and the two claims are unknown, their $5 free for others. The ledger
    reads a new ``run_id`` on the node serving its slot, and reserves and sends them again before anything else
    is decided there. Before, that read waited for the watch's next second (a minute here, to make that second
    wide): the first calls after the outage were taken first, a $4.50 claim was granted under a $10 limit with $6
    spent or held ($10.50), and the run ended $1 short ($1.70 of $2.70 counted) with $1 held until its claim's
    expiry."""
    from actors import _budget_replay
    from actors.budget import BudgetController

    monkeypatch.setattr(_budget_replay, "SERVER_CHECK_S", 60.0)
    cl = redis_cluster_replicas
    b = _settings(cl, "lost")
    master, replica = _ledger_nodes(cl, b.redis_prefix)

    async def go():
        ctl = BudgetController(b)

        def cut():
            cl.signal(replica, signal.SIGSTOP)
            with redis.Redis(port=master, socket_timeout=2.0) as m:
                assert m.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
        try:
            await _granted_on_the_master_alone(ctl, master, replica, cut)
            cl.signal(master, signal.SIGKILL)
            cl.signal(replica, signal.SIGCONT)
            with redis.Redis(port=replica, socket_timeout=2.0) as r:
                r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
                cl.wait_master(replica, dead=master)
                _the_loss_is_real(r, b.redis_prefix)
            end = time.monotonic() + 10
            while (v := (await ctl.reserve_many(_claims("e0", usd=4.5)))[0]).reason == "budget_unavailable":
                assert time.monotonic() < end, "the ledger never answered after the failover"
                await asyncio.sleep(0.05)  # the ledger's own retry pause (0.2 s) runs out meanwhile
            return v, await _the_rest_settled(ctl, v), ctl.book.server
        finally:
            await ctl.close()
    try:
        verdict, rep, server = asyncio.run(go())
    finally:
        cl.revive(master)
    ledger = _each_dollar_once(verdict, rep)
    assert ledger["replayed_after_restart"] >= 3 and ledger["reopened_after_restart"] == 1
    assert ledger["rejected_settlements"] == 0
    assert server == _run_id(replica)  # the watch reads the node now serving the slot


def _demoted(port: int) -> None:
    """Until the node at ``port`` says it is a replica (bounded): a call to it then meets ``MOVED``."""
    with redis.Redis(port=port, socket_timeout=2.0) as c:
        end = time.monotonic() + 10
        while c.execute_command("ROLE")[0] not in (b"slave", "slave"):
            assert time.monotonic() < end, "the old master was never demoted"
            time.sleep(0.02)  # polling the server's own role, bounded above: nothing to wait on instead


def test_a_takeover_with_the_old_master_alive_is_seen_by_the_ledger_s_sequence_before_the_next_claim(
        redis_cluster_replicas, monkeypatch):
    """The replica is cut from its master and kept from syncing again (its link closed, its ``masterauth`` made
    wrong); the master grants two $2.50 claims and takes two settlements; the replica takes the slots over
    (``CLUSTER FAILOVER TAKEOVER``) and the old master, alive, is demoted. The ledger's next call reaches the
    promoted replica through a redirect, no call failing, so nothing made the book read its ``run_id`` first.
    Before (stop 75's scratch run; here the watch's second is made a minute), a $4.50 claim was granted there at
    once under a $10 limit with $6 spent or held. Now the reservation's script finds the book's sequence lower
    than the book saw and refuses before any write; the book reserves again and sends again what the replica
    lacks, then decides: refused, and each dollar counted once."""
    from actors import _budget_replay
    from actors.budget import BudgetController

    monkeypatch.setattr(_budget_replay, "SERVER_CHECK_S", 60.0)
    cl = redis_cluster_replicas
    b = _settings(cl, "alive")
    master, replica = _ledger_nodes(cl, b.redis_prefix)

    async def go():
        ctl = BudgetController(b)

        def cut():
            with redis.Redis(port=replica, socket_timeout=2.0) as r, redis.Redis(port=master, socket_timeout=2.0) as m:
                r.config_set("masterauth", "not-the-masters")  # its next sync stops at AUTH: it stays behind
                assert m.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
        try:
            await _granted_on_the_master_alone(ctl, master, replica, cut)
            with redis.Redis(port=replica, socket_timeout=2.0) as r:
                r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
                cl.wait_master(replica)
                _demoted(master)
                _the_loss_is_real(r, b.redis_prefix)
            (v,) = await ctl.reserve_many(_claims("e0", usd=4.5))
            return v, await _the_rest_settled(ctl, v), ctl._last_error
        finally:
            await ctl.close()
    try:
        verdict, rep, error = asyncio.run(go())
    finally:
        with redis.Redis(port=replica, socket_timeout=2.0) as r:
            r.config_set("masterauth", "")
        cl.wait_agreed()  # the old master synced as the new one's replica: the next test finds three pairs
    assert error == "" and verdict.reason != "budget_unavailable"  # no call failed: the redirect alone
    ledger = _each_dollar_once(verdict, rep)
    assert ledger["lost_writes_found"] == 1 and ledger["reopened_after_restart"] == 1
    assert ledger["replayed_after_restart"] >= 3 and ledger["rejected_settlements"] == 0


def test_a_ledger_master_killed_mid_run_is_failed_over_and_what_waited_counts_once(redis_cluster_replicas):
    """The master holding the ledger's slot dies (SIGKILL) with claims open; the cluster promotes its replica
    after ``cluster-node-timeout``. Meanwhile claims are answered ``budget_unavailable`` at once (nothing hangs),
    a settlement and a charge wait in the outbox; then the client follows the slot to the promoted replica, reads
    its ``run_id`` (another process: what the master had not replicated is sent again) and each dollar counts
    once, nothing left reserved. Passes on the code before: an outage of seconds outlasts the watch's second."""
    from actors.budget import BudgetController
    from engine.core.budgets import Charge

    cl = redis_cluster_replicas
    b = _settings(cl, "kill")
    master, replica = _ledger_nodes(cl, b.redis_prefix)

    async def go():
        ctl = BudgetController(b)
        try:
            await ctl.check_ledger()
            assert all(v.ok for v in await ctl.reserve_many(_claims("a0", "a1", "a2", "a3")))
            await ctl.settle_many([("a0", 0.5)])
            cl.signal(master, signal.SIGKILL)
            t = time.monotonic()
            await ctl.settle_many([("a1", 0.7)])
            await ctl.charge_many([Charge("k1", "acme", "openai", "gpt-5", 0.25)])
            (v,) = await ctl.reserve_many(_claims("b0"))
            assert v.reason == "budget_unavailable" and time.monotonic() - t < 2 * b.redis_timeout_s
            assert (await ctl.report())["ledger"]["unsettled"] == 2
            cl.wait_master(replica, dead=master)
            end = time.monotonic() + 10
            while (v := (await ctl.reserve_many(_claims("b0")))[0]).reason == "budget_unavailable":
                assert time.monotonic() < end, "the ledger never answered after the failover"
                await asyncio.sleep(0.05)  # the ledger's own retry pause (0.2 s) runs out meanwhile
            assert v.ok
            await ctl.settle_many([("a2", 0.2), ("a3", 0.4), ("b0", 0.6), ("a1", 0.7)])  # a1 again: a lost reply
            return await _drained(ctl), ctl.book.server
        finally:
            await ctl.close()
    try:
        rep, server = asyncio.run(go())
    finally:
        cl.revive(master)
    window, ledger = rep["budgets"][0], rep["ledger"]
    assert window["spent_usd"] == pytest.approx(0.5 + 0.7 + 0.25 + 0.2 + 0.4 + 0.6)
    assert window["reserved_usd"] == pytest.approx(0.0)
    assert ledger["rejected_settlements"] == 0 and ledger["replayed_after_restart"] >= 1
    assert server == _run_id(replica)


def test_a_manual_failover_of_the_ledger_s_master_loses_nothing_and_its_replay_counts_nothing_twice(
        redis_cluster_replicas):
    """``CLUSTER FAILOVER`` on the replica (an upgrade's, a maintenance's): the replica catches up, then takes the
    slots, and the old master follows it. No error reaches the ledger (its client follows the ``MOVED``); its
    watch then reads another ``run_id`` and sends the last two hours' settlements and charges again, which the
    promoted replica had all: each counts once."""
    from actors.budget import BudgetController

    cl = redis_cluster_replicas
    b = _settings(cl, "manual")
    master, replica = _ledger_nodes(cl, b.redis_prefix)

    async def go():
        ctl = BudgetController(b)
        try:
            await ctl.check_ledger()
            assert all(v.ok for v in await ctl.reserve_many(_claims("m0", "m1", "m2", "m3")))
            await ctl.settle_many([("m0", 0.5), ("m1", 0.7)])
            cl.manual_failover(replica)
            await ctl.settle_many([("m2", 0.2)])
            new, end = _run_id(replica), time.monotonic() + 10
            while ctl.book.server != new:  # m3 open: the watch reads the node once a second
                assert time.monotonic() < end, "the ledger never read the promoted replica's run_id"
                await asyncio.sleep(0.05)
            await ctl.settle_many([("m3", 0.4)])
            return await _drained(ctl)
        finally:
            await ctl.close()
    rep = asyncio.run(go())
    window, ledger = rep["budgets"][0], rep["ledger"]
    assert window["spent_usd"] == pytest.approx(0.5 + 0.7 + 0.2 + 0.4)
    assert window["reserved_usd"] == pytest.approx(0.0)
    # m0 and m1 are sent again; m2 too if it settled before the ledger read the new run_id, else it settled there
    # once (a call after the failover reads it once its second is up: a loaded rehearsal of stop 81 had 2). The
    # spend above, each counted once, is what must not move.
    assert ledger["replayed_after_restart"] in (2, 3) and ledger["reopened_after_restart"] == 0
    assert ledger["lost_records"] == 0 and ledger["rejected_settlements"] == 0


def test_the_cache_follows_its_keys_to_the_promoted_replica(redis_cluster_replicas):
    """A master of the cache's keys killed: the layer is down for its retry pause (lookups miss, writes kept),
    then reads what the master had replicated from the promoted replica and writes there (its clock injected)."""
    from actors.cache_layers import RedisLayer

    cl, t = redis_cluster_replicas, [0.0]

    async def go():
        layer = RedisLayer(cl.url, prefix=f"sbtest-fo-cache{next(_prefix)}", timeout_s=0.5, retry_s=5.0,
                           cluster=True, now=lambda: t[0])
        try:
            keys = [layer.key("t", f"fp{i}") for i in range(30)]
            await layer.put_many([(k, f"v{i}".encode(), 60_000) for i, k in enumerate(keys)])
            master = cl.node_of(keys[0])
            replica = cl.replica_of(master)
            _synced(master, replica)
            cl.signal(master, signal.SIGKILL)
            try:
                missed = await layer.get_many(keys)
                await layer.put_many([(keys[0], b"after", 60_000)])
                cl.wait_master(replica, dead=master)
                t[0] += layer.retry_s
                await layer.get_many(keys[:1])  # tried again: up, what it kept written
                return missed, await layer.get_many(keys), layer.dropped_writes
            finally:
                cl.revive(master)
        finally:
            await layer.close()
    missed, got, dropped = asyncio.run(go())
    assert any(v is None for v, _ in missed)  # the dead master's keys, while it is down
    assert dropped == 0 and [v for v, _ in got] == [b"after"] + [f"v{i}".encode() for i in range(1, 30)]


def test_an_engine_whose_ledger_master_is_killed_mid_run_counts_every_result_once(ray_session,
                                                                                  redis_cluster_replicas, tmp_path):
    """The master holding the ledger's slot killed (SIGKILL) once results come in; the cluster promotes its
    replica (about 2 s: ``cluster-node-timeout`` 1 s). The engine goes on on the promoted replica: its ledger
    reads there another ``run_id``, reserves again and sends again what the master had not replicated; every
    result's cost is counted once, nothing is left reserved, nothing waits past its deadline for good."""
    from engine import Engine
    from tests.integration._catalogs import OPENAI_ONLY
    from tests.integration.test_redis_cluster_engine import SPEEDUP, _limit, _workload
    from tests.integration.test_redis_cluster_engine import _settings as _engine_settings

    cl = redis_cluster_replicas
    reqs = _workload()
    limit = _limit(reqs)
    s = _engine_settings(cl, tmp_path, "sbtest-clfo-eng", True, limit)
    master, replica = _ledger_nodes(cl, s.budgets.redis_prefix)
    try:
        with Engine.start(s, catalog=OPENAI_ONLY, policy="cache-only", speedup=SPEEDUP, metrics_port=None) as eng:
            futs = eng.replay(reqs)
            futs[0].result(timeout=120)
            cl.signal(master, signal.SIGKILL)
            cl.wait_master(replica, dead=master)
            # A few more once the replica is master: the ledger's next write after the failover is what reads
            # another run_id and sends the last settlements again. On a loaded machine the whole first wave had
            # settled before the kill, no call came after it, and nothing was sent again (a rehearsal of stop 81).
            # (Prompts of their own: the cache would answer a first-wave prompt, no claim made.)
            futs += eng.replay([r.model_copy(update={"id": f"late-{r.id}", "arrival_s": 0.0,
                                                     "prompt": f"After the failover, {r.prompt.lower()}"})
                                for r in _workload(6)])
            results = [f.result(timeout=120) for f in futs]
            rep = eng.report()
    finally:
        cl.revive(master)
    cost = sum(r.cost_usd for r in results)
    window, led = rep["budget"]["budgets"][0], rep["budget"]["ledger"]
    assert window["spent_usd"] == pytest.approx(cost, abs=1e-6) and cost <= limit + 1e-9
    assert window["reserved_usd"] == pytest.approx(0.0, abs=1e-9)
    assert led["up"] and led["unsettled"] == 0 and led["rejected_settlements"] == 0
    assert led["replayed_after_restart"] >= 1  # the failover was seen as another Redis process
    assert {r.status for r in results} >= {"ok"}
