"""The budget ledger, the cache and the journal on a real local Redis Cluster (three masters, ``redis_cluster``
fixture), and a cluster node named as a single Redis refused at start (docs/budgets.md, Redis Cluster). No Ray."""

import asyncio
import itertools
import random

import pytest
from redis.crc import key_slot

from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim
from engine.core.errors import ConfigError

_prefix = itertools.count()


def _local_prefix(cluster, port: int, stem: str = "sbtest-cl") -> str:
    """A ledger prefix whose start-check keys (the probe, the sweep's) the node at ``port`` serves itself: the old
    check passed there, and the ledger failed mid-run."""
    for n in itertools.count():
        p = f"{stem}{n}"
        if all(cluster.node_of(f"{p}:{k}") == port for k in ("probe", "exp")):
            return p
    raise AssertionError("unreachable")


def test_a_cluster_node_named_as_a_single_redis_is_refused_at_start_naming_the_setting(redis_cluster):
    """Before, with a prefix whose first keys the node served, the start passed and then every claim met another
    node's key: each budgeted request waited out its deadline, a settlement was counted twice and its reservation
    released twice; with another prefix, the start said to point at a primary with room to write."""
    from actors.budget import BudgetController

    prefix = _local_prefix(redis_cluster, redis_cluster.ports[0])

    async def go():
        ctl = BudgetController(BudgetSettings(specs=(BudgetSpec(max_budget=10.0),), redis_url=redis_cluster.url,
                                              redis_prefix=prefix))
        try:
            with pytest.raises(ConfigError) as err:
                await ctl.check_ledger()
            return str(err.value)
        finally:
            await ctl.close()
    msg = asyncio.run(go())
    assert "budgets.redis_cluster" in msg and "SMARTBATCH_BUDGETS__REDIS_CLUSTER=true" in msg
    assert "cluster_enabled:1" in msg and f"127.0.0.1:{redis_cluster.ports[0]}" in msg


def test_the_settings_of_each_part_are_checked_against_the_redis_they_name(redis_cluster, redis_server):
    """At the engine's start (``Engine.start``), before Ray starts: the cache and the journal named a cluster node
    as a single Redis met MOVED or CROSSSLOT one key in three, mid-run (the cache went to memory, the journal lost
    its records); and a single Redis said to be a cluster is refused too."""
    from actors._redis_cluster import check_cluster_modes
    from engine.core.settings import Settings

    with pytest.raises(ConfigError, match=r"cache\.redis_cluster.*SMARTBATCH_CACHE__REDIS_CLUSTER=true"):
        check_cluster_modes(Settings(cache={"redis_url": redis_cluster.url}))
    # The journal falls back to the cache's Redis, and to its setting: the two agree, nothing to say.
    check_cluster_modes(Settings(cache={"redis_url": redis_cluster.url, "redis_cluster": True}))
    with pytest.raises(ConfigError, match=r"journal\.redis_cluster.*SMARTBATCH_JOURNAL__REDIS_CLUSTER=true"):
        check_cluster_modes(Settings(journal={"redis_url": redis_cluster.urls[1]}))
    with pytest.raises(ConfigError, match=r"budgets\.redis_cluster: it is true.*cluster_enabled:0"):
        check_cluster_modes(Settings(budgets={"redis_url": redis_server.url, "redis_cluster": True}))
    check_cluster_modes(Settings(budgets={"redis_url": redis_server.url}))  # a single Redis, as before
    # A cluster has database 0 only: redis-py's cluster client refused /2 inside the cache actor, at its start.
    with pytest.raises(ConfigError, match=r"cache\.redis_url: .* names database 2.* database 0 only"):
        check_cluster_modes(Settings(cache={"redis_url": redis_cluster.url[:-1] + "2", "redis_cluster": True}))


def test_a_start_against_a_mismatched_cluster_setting_is_refused_before_ray_starts(redis_cluster, redis_server,
                                                                                  monkeypatch):
    """The settings' check runs first in ``Engine.start``: before, it ran once an embedded Ray was up (5-6 s in on 2
    cores, a Ray started and stopped for a refusal of the settings). A Redis this driver cannot reach is not
    refused here: the actors may reach it where the driver does not, and their own checks say what they find."""
    from engine import Engine
    from engine.app import driver
    from engine.core.settings import Settings
    from tests.integration._catalogs import OPENAI_ONLY

    class RayStarted(Exception):
        pass

    def no_ray(*a, **k):
        raise RayStarted

    monkeypatch.setattr(driver, "init_ray", no_ray)
    for settings, said in (
            (Settings(budgets={"redis_url": redis_cluster.url}), r"budgets\.redis_cluster.*cluster_enabled:1"),
            (Settings(budgets={"redis_url": redis_server.url, "redis_cluster": True}), r"cluster_enabled:0"),
            (Settings(cache={"redis_url": redis_cluster.url[:-1] + "3", "redis_cluster": True}), r"database 3"),
            (Settings(journal={"redis_url": redis_cluster.urls[2]}), r"journal\.redis_cluster")):
        with pytest.raises(ConfigError, match=said):
            Engine.start(settings, catalog=OPENAI_ONLY, metrics_port=None)
    with pytest.raises(RayStarted):  # nobody answers there: the start goes on
        Engine.start(Settings(budgets={"redis_url": "redis://127.0.0.1:1/0", "redis_cluster": True}),
                     catalog=OPENAI_ONLY, metrics_port=None)


def test_engines_on_a_cluster_share_a_budget_atomically_and_count_each_dollar_once(redis_cluster):
    """Two budget controllers, each given another node of the cluster, reserve at once against one $5 budget,
    then settle, charge and settle again (a replay): never past the limit, every dollar counted once, and every
    key of the ledger in one slot (its scripts stay atomic)."""
    from actors.budget import BudgetController

    prefix = f"sbtest-cl-shared{next(_prefix)}"
    spec = BudgetSpec(tenant="acme", max_budget=5.0, budget_duration="1d")
    rng = random.Random(11)

    def settings(url):
        return BudgetSettings(specs=(spec,), redis_url=url, redis_prefix=prefix, redis_cluster=True,
                              reserve_output="request")

    async def engines(a, b):
        # Both engines' claims are in flight together, round by round: run as two free loops, a loaded CI machine
        # ran ten of a's before b's first, and b found the budget full (stop 73's CI). Round 0 asks at most $3.20.
        got = {"a": [], "b": []}
        for k in range(40):
            batches = {name: [Claim(f"{name}-{k}-{j}", "acme", "openai", "gpt-5", "urgent",
                                    round(rng.uniform(0.01, 0.4), 4)) for j in range(rng.randint(1, 4))]
                       for name in got}
            verdicts = await asyncio.gather(a.reserve_many(batches["a"]), b.reserve_many(batches["b"]))
            for name, vs in zip(got, verdicts):
                got[name] += [c for c, v in zip(batches[name], vs) if v.ok]
        return got["a"], got["b"]

    async def go():
        a, b = BudgetController(settings(redis_cluster.urls[0])), BudgetController(settings(redis_cluster.urls[2]))
        try:
            await a.check_ledger()
            await b.check_ledger()
            got_a, got_b = await engines(a, b)
            reserved = sum(c.amount for c in got_a + got_b)
            assert got_a and got_b and spec.max_budget * 0.9 < reserved <= spec.max_budget + 1e-9
            settle = [(c.rid, round(c.amount * rng.random(), 4)) for c in got_a + got_b]
            await asyncio.gather(a.settle_many(settle[:len(got_a)]), b.settle_many(settle[len(got_a):]))
            await a.settle_many(settle[:5])  # a replay (a lost reply): counted once
            await b.charge_many([Charge("ch-1", "acme", "openai", "gpt-5", 0.25)] * 2)  # one charge id: once
            rep = await a.report()
            window = rep["budgets"][0]
            assert window["reserved_usd"] == pytest.approx(0.0, abs=1e-9)
            assert window["spent_usd"] == pytest.approx(sum(x for _, x in settle) + 0.25, abs=1e-6)
            assert rep["ledger"]["up"] and rep["ledger"]["unsettled"] == 0 and rep["ledger"]["lost_records"] == 0
        finally:
            await a.close()
            await b.close()
    asyncio.run(go())
    keys = redis_cluster.keys(f"*{prefix}*")
    slots = {key_slot(k.encode()) for ks in keys.values() for k in ks}
    assert len(slots) == 1 and all(k.startswith("{" + prefix + "}:") for ks in keys.values() for k in ks)


def test_a_live_budget_change_on_a_cluster_ledger_reaches_the_other_engine(redis_cluster):
    """The budgets' hash (``{prefix}:specs``) lives in the ledger's slot too: a change made on one engine is the
    other's once it follows the ledger."""
    from actors.budget import BudgetController

    prefix = f"sbtest-cl-live{next(_prefix)}"
    first = BudgetSpec(tenant="acme", max_budget=5.0)

    async def go():
        a, b = (BudgetController(BudgetSettings(specs=(first,), redis_url=u, redis_prefix=prefix, redis_cluster=True))
                for u in redis_cluster.urls[:2])
        try:
            await a.check_ledger()
            await b.check_ledger()
            assert await a.change_budgets(put=[BudgetSpec(tenant="acme", max_budget=1.0)]) is not None
            await b.follow_ledger()  # as the groupers' asks make it do, once a second
            assert (await b.budget_specs())[1][0].max_budget == 1.0
            (v,) = await b.reserve_many([Claim("x1", "acme", "openai", "gpt-5", "urgent", 2.0)])
            assert not v.ok and v.reason == "budget_exhausted"  # the $1 limit made on a, in force on b
        finally:
            await a.close()
            await b.close()
    asyncio.run(go())


def test_the_cache_on_a_cluster_reads_and_writes_keys_of_every_node(redis_cluster):
    """A cache's keys are spread over the nodes (no hash tag: any node serves its share); one read of many keys
    of several slots, which an MGET cannot make on a cluster, reads them all."""
    from actors.cache_layers import RedisLayer

    prefix = f"sbtest-cl-cache{next(_prefix)}"

    async def go():
        layer = RedisLayer(redis_cluster.url, prefix=prefix, timeout_s=2.0, cluster=True)
        try:
            keys = [layer.key("t", f"fp{i}") for i in range(30)]
            await layer.put_many([(k, f"v{i}".encode(), 60_000) for i, k in enumerate(keys)])
            got = await layer.get_many(keys + [layer.key("t", "absent")])
            scanned = await layer.scan_values(100)
            return keys, got, scanned, layer.errors, layer.up
        finally:
            await layer.close()
    keys, got, scanned, errors, up = asyncio.run(go())
    assert errors == 0 and up
    assert [v for v, _ in got] == [f"v{i}".encode() for i in range(30)] + [None]
    assert all(0 < ms <= 60_000 for _, ms in got[:-1])
    assert sorted(k for k, _, _ in scanned) == sorted(keys)
    assert len({redis_cluster.node_of(k) for k in keys}) == 3  # the test did read every node


def test_the_journal_on_a_cluster_keeps_an_engine_s_spaces_on_one_node_and_watches_it(redis_cluster):
    """An engine's journal spaces live under one hash tag: on one node, whose ``run_id`` the watch reads. The
    dispatcher's seal (``actors._journal_seal``) too: written in the records' transaction, in another slot it would
    fail every write with CROSSSLOT (a review's check)."""
    from actors._journal_seal import JournalSeal
    from actors.hub import ResultHub
    from actors.journal import RedisJournal

    rewrites = []

    async def rewrite():  # the holder's records written again: at the first check, as on one Redis
        rewrites.append(1)

    async def go():
        j = RedisJournal(redis_cluster.urls[1], f"sbtest-cl-journal{next(_prefix)}", "eng@1", timeout_s=2.0,
                         rewrite=rewrite, cluster=True, seal=JournalSeal(ResultHub(), "dispatcher:openai"))
        try:
            for space in ("batches:openai", "calls:anthropic", "tally:openai"):
                await j.put_many(space, {"k1": {"space": space}, "k2": [1, 2]})
            await j.delete("calls:anthropic", ["k2"])
            items = await j.items("calls:anthropic"), await j.items("batches:openai")
            await j.refresh()
            sid = await j.check_server()
            assert not await j.lost_records()  # sealed: no loss read
            return j._base, items, sid
        finally:
            await j.close()
    base, (calls, batches), sid = asyncio.run(go())
    assert calls == {"k1": {"space": "calls:anthropic"}} and batches == {"k1": {"space": "batches:openai"}, "k2": [1, 2]}
    keys = [k for ks in redis_cluster.keys(base + "*").values() for k in ks]
    assert {base + s for s in ("batches:openai", "calls:anthropic", "tally:openai", "~seal")} <= set(keys)
    assert rewrites == [1] and base.startswith("{") and len({key_slot(k.encode()) for k in keys}) == 1
    import redis

    with redis.Redis(port=redis_cluster.node_of(keys[0])) as c:
        assert sid == c.info("server")["run_id"]  # the node that holds them, not the one the URL names


def test_the_journal_s_eviction_check_reads_the_node_that_serves_its_slot(redis_cluster):
    """The start reads ``maxmemory-policy`` where the engine's journal lives: before, it read the node the URL
    names, so a journal whose slot an evicting node served passed (its records dropped unsaid, the calls they
    named paid again after a restart), and an evicting URL node refused a journal kept elsewhere."""
    import redis

    from actors._journal_evict import check_keeps_records
    from actors._redis_cluster import namespace
    from engine.core.settings import Settings

    settings = Settings(journal={"redis_url": redis_cluster.urls[0], "redis_cluster": True})
    url_node = redis_cluster.ports[0]

    def node(journal: str) -> int:
        return redis_cluster.node_of(namespace(f"{settings.cache.redis_prefix}:journal:{journal}", True) + ":")

    journal = next(j for n in itertools.count() if node(j := f"eng@{n:08x}") != url_node)

    def evicting(port: int, on: bool) -> None:
        with redis.Redis(port=port) as c:
            c.config_set("maxmemory", "100mb" if on else "0")
            c.config_set("maxmemory-policy", "allkeys-lru" if on else "noeviction")

    try:
        evicting(node(journal), True)
        with pytest.raises(ConfigError, match=r"journal\.redis_url: the journal's Redis may evict keys"):
            check_keeps_records(settings, journal)
        with pytest.raises(ConfigError, match="may evict"):  # no journal named: every master is read
            check_keeps_records(settings)
        evicting(node(journal), False)
        evicting(url_node, True)
        assert check_keeps_records(settings, journal) is settings  # the journal's node keeps what it is given
    finally:
        for port in {node(journal), url_node}:
            evicting(port, False)


def test_a_single_redis_ledger_keeps_its_key_names(redis_server):
    """``redis_cluster`` off (the default): the ledger's keys are named as before, with no hash tag, so an engine
    upgraded on its single Redis finds the spend it counted."""
    from actors.budget import BudgetController

    prefix = f"sbtest-cl-single{next(_prefix)}"

    async def go():
        ctl = BudgetController(BudgetSettings(specs=(BudgetSpec(max_budget=3.0),), redis_url=redis_server.url,
                                              redis_prefix=prefix))
        try:
            await ctl.check_ledger()
            await ctl.reserve_many([Claim("s1", "acme", "openai", "gpt-5", "urgent", 1.0)])
            await ctl.settle_many([("s1", 0.5)])
        finally:
            await ctl.close()
    asyncio.run(go())
    c = redis_server.client()
    assert float(c.hget(f"{prefix}:w:global@0", "spent")) == pytest.approx(0.5)
    assert not list(c.scan_iter(match="{" + prefix + "}*"))


def test_a_paused_ledger_node_is_an_outage_whose_settlements_count_once_when_it_answers(redis_cluster):
    """The node holding the ledger's slot paused (SIGSTOP) mid-run: claims are answered ``budget_unavailable`` at
    once, settlements and a charge wait in the outbox, and once it answers each counts once (the cluster client
    finds the node again; no other node holds a key of the ledger)."""
    import os
    import signal

    from actors.budget import BudgetController

    prefix = f"sbtest-cl-pause{next(_prefix)}"
    b = BudgetSettings(specs=(BudgetSpec(max_budget=10.0),), redis_url=redis_cluster.url, redis_prefix=prefix,
                       redis_cluster=True, redis_timeout_s=0.3, redis_retry_s=0.3)
    node = redis_cluster.procs[redis_cluster.ports.index(redis_cluster.node_of("{" + prefix + "}:exp"))]

    async def go():
        ctl = BudgetController(b)
        try:
            await ctl.check_ledger()
            claims = [Claim(f"p{i}", "acme", "openai", "gpt-5", "urgent", 2.0) for i in range(3)]
            assert all(v.ok for v in await ctl.reserve_many(claims))
            os.kill(node.pid, signal.SIGSTOP)
            try:
                await ctl.settle_many([("p0", 1.5), ("p1", 2.0)])
                await ctl.charge_many([Charge("late-1", "acme", "openai", "gpt-5", 0.5)])
                (v,) = await ctl.reserve_many([Claim("p9", "acme", "openai", "gpt-5", "urgent", 1.0)])
                assert not v.ok and v.reason == "budget_unavailable"
                assert (await ctl.report())["ledger"]["unsettled"] == 3
            finally:
                os.kill(node.pid, signal.SIGCONT)
            await asyncio.wait_for(ctl._flusher, timeout=15)  # the outbox replayed once the node answers
            await ctl.settle_many([("p0", 1.5)])  # sent again (a lost reply): counted once
            rep = await ctl.report()
            assert rep["ledger"]["unsettled"] == 0 and rep["ledger"]["rejected_settlements"] == 0
            window = rep["budgets"][0]
            assert window["spent_usd"] == pytest.approx(4.0) and window["reserved_usd"] == pytest.approx(2.0)
        finally:
            await ctl.close()
    asyncio.run(go())
