"""Redis faults under a live engine whose budget ledger and cache are on Redis (issue 11, part 4): an unreachable
Redis at start is a ConfigError; a pause (SIGSTOP) or a restart mid-run hangs no request, overruns no budget and
leaks no reservation. Each test starts its own redis-server."""

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import signal
import threading
import time

import pytest

from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim
from engine.core.errors import ConfigError
from tests.integration._catalogs import OPENAI_ONLY
from tests.integration._redis_clients import redis_books

_prefix = itertools.count()
SPEEDUP = 100.0
ENDS = {"ok", "reused", "rejected", "failed", "expired"}


@contextlib.contextmanager
def paused(srv):
    """redis-server stopped by SIGSTOP: connections open, nothing answered, until SIGCONT."""
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)


def budgets(url, limit=None, **kw):
    n = next(_prefix)
    return BudgetSettings(specs=(BudgetSpec(max_budget=limit if limit is not None else 10.0),), redis_url=url,
                          redis_prefix=f"sbtest-faults{n}", reserve_output="request", redis_timeout_s=0.3,
                          redis_retry_s=0.3, **kw)


def ledger(srv, b: BudgetSettings) -> tuple[float, float]:
    """(spent, reserved) of the one budget's window, after releasing what expired."""


    async def read():
        async with redis_books(srv.url) as (client, new_book):
            book = new_book(list(b.specs), prefix=b.redis_prefix, reservation_ttl_s=b.reservation_ttl_s)
            await book.sweep()
            out = await book.window(b.specs[0], 0.0)
        return out
    return asyncio.run(read())


def test_unreachable_redis_at_start_is_a_config_error_naming_the_setting(ray_session, own_redis):
    from engine import Engine
    from engine.core.settings import Settings

    own_redis.stop()  # nothing listens on its port now
    url = f"redis://:s3cret-pw@127.0.0.1:{own_redis.port}/0"
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        Engine.start(Settings(budgets=budgets(url)), speedup=SPEEDUP, metrics_port=None)
    msg = str(err.value)
    assert "budgets.redis_url" in msg and f"127.0.0.1:{own_redis.port}" in msg and "cannot be enforced" in msg
    assert "s3cret-pw" not in msg
    assert time.monotonic() - t0 < 30


def test_without_budgets_an_unreachable_ledger_redis_does_not_stop_the_start(own_redis):
    from actors.budget import BudgetController

    own_redis.stop()

    async def go():
        ctl = BudgetController(BudgetSettings(redis_url=own_redis.url))
        try:
            await ctl.check_ledger()  # nothing to enforce: no error
            with pytest.raises(ConfigError, match="budgets.redis_url"):
                await BudgetController(budgets(own_redis.url)).check_ledger()
            assert (await ctl.report())["ledger"]["up"] is False  # the report says so, and does not fail
        finally:
            await ctl.close()
    asyncio.run(go())


@pytest.mark.parametrize("fault", ["replica", "full", "evicting"])
def test_a_ledger_redis_that_refuses_writes_or_may_evict_is_refused_at_start(own_redis, fault):
    """A read-only replica or a full Redis under noeviction answers the reads but refuses every reservation: the
    start passed, and each budgeted request waited out its deadline. One that evicts under a memory limit drops a
    budget's window hash (it has a TTL) beside cache keys, and the limit is passed unsaid (a helper's hunt: $70-100
    under a $10 limit). Each is a ConfigError naming the setting and the fix."""
    from actors.budget import BudgetController

    c = own_redis.client()
    if fault == "replica":
        c.replicaof("127.0.0.1", own_redis.port + 1)  # nothing there: a replica is read-only, linked or not
    elif fault == "full":
        c.config_set("maxmemory-policy", "noeviction")
        c.set("filler", "x" * 2_000_000)
        c.config_set("maxmemory", "1mb")
    else:
        c.config_set("maxmemory-policy", "volatile-lru")
        c.config_set("maxmemory", "64mb")

    async def go():
        ctl = BudgetController(budgets(own_redis.url))
        try:
            with pytest.raises(ConfigError) as err:
                await ctl.check_ledger()
            return str(err.value)
        finally:
            await ctl.close()
    msg = asyncio.run(go())
    assert "budgets.redis_url" in msg and ("cannot be enforced" in msg or "may evict" in msg)
    want = {"replica": "ReadOnlyError", "full": "OutOfMemoryError", "evicting": "maxmemory-policy volatile-lru"}
    assert want[fault] in msg and "SMARTBATCH_BUDGETS__REDIS_URL" in msg
    if fault != "evicting":  # what the check saves the user from: no reservation can be made there
        async def reserve():
            ctl = BudgetController(budgets(own_redis.url))
            try:
                return await ctl.reserve_many([Claim("c1", "acme", "openai", "gpt-4o-mini", "normal", 1.0)])
            finally:
                await ctl.close()
        assert [v.reason for v in asyncio.run(reserve())] == ["budget_unavailable"]
    c.replicaof("NO", "ONE")
    c.config_set("maxmemory", "0")
    c.close()


def test_a_ledger_redis_with_room_and_noeviction_passes_the_start_check(own_redis):
    from actors.budget import BudgetController

    c = own_redis.client()
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", "64mb")  # a limit, but nothing is dropped: writes are refused instead, and seen
    c.close()

    async def go():
        ctl = BudgetController(budgets(own_redis.url))
        try:
            await ctl.check_ledger()
            v = await ctl.reserve_many([Claim("c1", "acme", "openai", "gpt-4o-mini", "normal", 1.0)])
        finally:
            await ctl.close()
        return v
    assert [x.ok for x in asyncio.run(go())] == [True]


def test_a_ledger_redis_that_keeps_nothing_on_disk_is_said_at_start(own_redis, caplog):
    """A restart of such a Redis forgets the budgets' spend older than what the engines send again (two hours):
    not refused, but said, where the start said nothing (a helper's hunt)."""
    from actors.budget import BudgetController

    async def start() -> list[str]:
        caplog.clear()
        ctl = BudgetController(budgets(own_redis.url))
        try:
            await ctl.check_ledger()
        finally:
            await ctl.close()
        return [r.getMessage() for r in caplog.records if "keeps nothing on disk" in r.getMessage()]

    with caplog.at_level("WARNING", logger="smartbatch.budget"):
        said = asyncio.run(start())  # the fixture's Redis: --save "" --appendonly no
        assert len(said) == 1 and "budgets.redis_url" in said[0] and "appendonly yes" in said[0], said
        own_redis.client().config_set("save", "3600 1")  # a snapshot point: kept on disk
        assert asyncio.run(start()) == []


@pytest.mark.solo  # answers within a fraction of the Redis timeout, in real time
def test_the_budget_controller_answers_at_once_while_redis_is_paused_and_settles_after(own_redis):
    """No Ray: the controller itself. Paused, a claim is answered ``budget_unavailable`` within the timeout and
    a settlement waits in the outbox; back, the outbox is replayed and the reservations whose replies were lost
    are released."""
    from actors.budget import BudgetController

    b = budgets(own_redis.url)

    async def go():
        ctl = BudgetController(b)
        try:
            await ctl.check_ledger()
            c = [Claim(f"c{k}", "acme", "openai", "gpt-4o-mini", "normal", 1.0) for k in range(4)]
            assert all(v.ok for v in await ctl.reserve_many(c[:2]))
            with paused(own_redis):
                t0 = time.monotonic()
                v = await ctl.reserve_many(c[2:], [c[0].rid])  # a hedge's release and two claims: the release
                # times out, so the claims are not sent at all
                assert time.monotonic() - t0 < 2 * b.redis_timeout_s + 0.5
                assert [x.reason for x in v] == ["budget_unavailable"] * 2
                assert "Redis at redis://127.0.0.1" in v[0].why()
                t0 = time.monotonic()
                await ctl.settle_many([(c[1].rid, 0.7)])
                await ctl.charge_many([Charge("late:m1", "acme", "openai", "gpt-4o-mini", 0.2)])  # kept, as settlements
                assert await ctl.reserve_many(c[2:3]) == v[:1]  # down: answered without asking Redis
                assert time.monotonic() - t0 < b.redis_timeout_s  # one ask of the paused Redis takes that long
                rep = await ctl.report()
                assert rep["ledger"]["up"] is False and rep["ledger"]["unsettled"] == 3  # 2 settlements, 1 charge
            # Back: the outbox flushes by itself (no other call needed); its task ends when it is empty.
            await asyncio.wait_for(ctl._flusher, timeout=5)
            assert ctl._outbox == ctl._charges == [] and ledger_now(own_redis, b) == (0.9, 0.0)
            await ctl.charge_many([Charge("late:m1", "acme", "openai", "gpt-4o-mini", 0.2)])  # again: counted once
            assert ledger_now(own_redis, b) == (0.9, 0.0) and (await ctl.report())["charged_usd"] == 0.2
            assert (await ctl.reserve_many(c[3:]))[0].ok
            assert (await ctl.report())["ledger"]["up"] is True
            assert ctl.refusals["budget_unavailable"] == 3
        finally:
            await ctl.close()

    def ledger_now(srv, b):
        r = srv.client()
        h = r.hgetall(f"{b.redis_prefix}:w:{b.specs[0].key(0.0)}")
        return round(float(h.get(b"spent", 0)), 9), round(float(h.get(b"reserved", 0)), 9)
    asyncio.run(go())


def test_the_reservations_of_an_engine_that_crashed_expire_after_the_ttl(own_redis):
    from actors.budget import BudgetController

    b = budgets(own_redis.url, 10.0, reservation_ttl_s=2.0)
    claims = [Claim(f"c{k}", "acme", "openai", "gpt-4o-mini", "urgent", 3.0) for k in range(3)]

    async def crash():
        ctl = BudgetController(b)
        try:
            assert all(v.ok for v in await ctl.reserve_many(claims))
        finally:
            await ctl.close()  # gone without settling: the engine crashed

    async def survivor():
        ctl = BudgetController(b)
        try:
            v = await ctl.reserve_many([Claim("after", "acme", "openai", "gpt-4o-mini", "urgent", 10.0)])
        finally:
            await ctl.close()
        return v[0].ok

    t0 = time.monotonic()
    asyncio.run(crash())
    assert ledger(own_redis, b) == (0.0, 9.0) or time.monotonic() - t0 >= b.reservation_ttl_s
    while ledger(own_redis, b)[1] > 1e-9 and time.monotonic() - t0 < b.reservation_ttl_s + 10:
        time.sleep(0.1)  # bounded wait for the TTL to pass, reading the ledger
    assert ledger(own_redis, b) == (0.0, 0.0) and time.monotonic() - t0 >= b.reservation_ttl_s
    assert asyncio.run(survivor())  # the whole budget is free again


def workload(n=240, seed=1):
    """Text requests over 600 s of engine time (6 s real), half with deadlines a pause can pass, some repeats
    (cache hits through Redis)."""
    import random

    from engine.core.request import Request

    rng = random.Random(seed)
    return [Request.model_validate({
        "id": f"r{k}", "arrival_s": round(600.0 * k / n, 3), "tenant": rng.choice(["acme", "globex"]),
        "model": rng.choice(["gpt-4o-mini", "gpt-5-mini"]), "prompt": f"Summarise report number {k % 90}.",
        "output_tokens": 300, "max_output_tokens": 400, "priority": "urgent" if k % 10 == 0 else "normal",
        "deadline_s": 120.0 if k % 2 else 1500.0}) for k in range(n)]


def run_through_fault(srv, tmp_path, fault, *, ttl_s=8.0):
    """Replay the workload with budget and cache on ``srv``; ``fault()`` runs once a third is submitted.
    Returns the results, the budget limit, its settings, and the engine time the fault ended."""
    from engine import Engine
    from engine.core.catalog import default_catalog
    from engine.core.settings import CacheSettings, Settings
    from engine.sim.simulator import simulate
    from policies import load_policy

    reqs = workload()
    cat = default_catalog()
    limit = simulate(reqs, load_policy("naive", cat), catalog=cat).total_cost / 2  # the budget binds
    b = budgets(srv.url, limit, reservation_ttl_s=ttl_s)
    cache = CacheSettings(redis_url=srv.url, redis_prefix=f"{b.redis_prefix}-cache", blob_dir=tmp_path / "blobs",
                          redis_retry_s=0.5)
    third = threading.Event()
    submitted = [0]

    def on_submit(n):
        submitted[0] += n
        if submitted[0] >= len(reqs) // 3:
            third.set()

    with Engine.start(Settings(budgets=b, cache=cache), catalog=OPENAI_ONLY, policy="cache-only", speedup=SPEEDUP,
                      metrics_port=None) as eng:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            replay = pool.submit(eng.replay, reqs, on_submit=on_submit)
            assert third.wait(30)
            fault()
            fault_end = eng.now()
            # Work that surely arrives after the fault: the replay's own arrivals end at engine time 600, and a
            # slow stop and start of Redis can outlast them.
            probes = eng.submit_many([{"id": f"probe{k}", "tenant": ("acme", "globex")[k % 2], "model": "gpt-4o-mini",
                                       "prompt": f"Summarise the probe report {k}.", "output_tokens": 300,
                                       "max_output_tokens": 400, "deadline_s": 1500.0} for k in range(6)])
            futs = replay.result(timeout=60) + probes
        done, open_ = concurrent.futures.wait(futs, timeout=60)
        assert not open_, f"{len(open_)} of {len(futs)} futures never resolved"
        results = [f.result() for f in futs]
        rep = eng.report()
    return results, limit, b, fault_end, rep


def check(results, limit, b, srv, fault_end):
    assert {r.status for r in results} <= ENDS
    for r in results:
        if r.status == "rejected":
            assert r.error in ("budget_exhausted", "budget_unavailable") and r.reason, r
            if r.error == "budget_unavailable":
                assert "Redis at redis://127.0.0.1" in r.reason and "deadline" in r.reason, r.reason
        elif r.status == "failed":
            assert r.error and "died" not in r.error, r  # a provider's failure, never the engine's
    # The ledger answered again after the fault: work that arrived after it was reserved for and billed, or
    # refused by the budget (not by the outage).
    assert any(r.arrival_s >= fault_end and ((r.status == "ok" and r.cost_usd > 0) or r.error == "budget_exhausted")
               for r in results)
    spent = sum(r.cost_usd for r in results)
    assert 0 < spent <= limit + 1e-9  # no overrun
    assert any(r.error == "budget_exhausted" for r in results)  # the budget did bind
    # Nothing stays reserved: settlements kept through the fault were replayed, lost replies released, and
    # what the stopped engine still held expires after the TTL (bounded wait on the ledger, not a sleep).
    until = time.monotonic() + b.reservation_ttl_s + 15
    while True:
        led_spent, led_reserved = ledger(srv, b)
        if abs(led_reserved) < 1e-9 or time.monotonic() > until:
            break
        time.sleep(0.25)
    assert abs(led_reserved) < 1e-9, led_reserved
    assert led_spent <= limit + 1e-9 and led_spent <= spent + 1e-9


def test_a_pause_mid_run_hangs_nothing_overruns_nothing_and_leaks_no_reservation(ray_session, own_redis, tmp_path):
    def fault():
        with paused(own_redis):
            time.sleep(3.0)  # the outage's length (300 s of engine time), not a synchronisation

    results, limit, b, fault_end, rep = run_through_fault(own_redis, tmp_path, fault)
    check(results, limit, b, own_redis, fault_end)
    # Requests that needed a reservation during the pause were held, and those whose deadline passed first
    # were rejected with the reason.
    assert rep["budget"]["refusals"]["budget_unavailable"] > 0
    assert any(r.error == "budget_unavailable" for r in results)
    # The cache met the pause too (its lookups timed out and served from memory) and is back.
    assert rep["cache"]["redis_errors"] > 0 and rep["cache"]["redis_reconnects"] > 0
    assert rep["budget"]["ledger"]["up"] and rep["budget"]["ledger"]["unsettled"] == 0


def test_a_restart_mid_run_hangs_nothing_overruns_nothing_and_leaks_no_reservation(ray_session, own_redis, tmp_path):
    def fault():
        # A Redis that keeps its data across a restart (as a budget ledger's must: docs/budgets.md): with a
        # save point set, SIGTERM writes a snapshot that the restarted server loads.
        own_redis.client().config_set("save", "3600 1")
        own_redis.stop()
        time.sleep(2.0)  # the outage's length, not a synchronisation
        own_redis.start()

    results, limit, b, fault_end, rep = run_through_fault(own_redis, tmp_path, fault)
    check(results, limit, b, own_redis, fault_end)
    assert rep["budget"]["refusals"]["budget_unavailable"] > 0 and rep["cache"]["redis_errors"] > 0


def test_a_charge_kept_while_redis_is_away_counts_in_the_window_it_was_made_in(own_redis):
    """A charge that waited in the outbox was counted in the window open when Redis came back: an hour's
    budget charged at 00:59 during an outage ending at 01:01 billed the next hour (settlements keep theirs)."""
    from actors.budget import BudgetController
    from engine.core.clock import ManualClock

    b = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1h"),), redis_url=own_redis.url,
                       redis_prefix=f"sbtest-faults{next(_prefix)}", redis_timeout_s=0.3, redis_retry_s=0.3)

    async def go():
        clock = ManualClock(100.0)
        ctl = BudgetController(b, None, clock)
        try:
            await ctl.check_ledger()
            with paused(own_redis):
                await ctl.charge_many([Charge("late:m1", "acme", "openai", "gpt-4o-mini", 0.2)])
                assert ctl._charges  # kept
                clock.advance(3600.0)  # the hour ends while Redis is away
            await asyncio.wait_for(ctl._flusher, timeout=5)
            r = own_redis.client()
            spent = [float(r.hget(f"{b.redis_prefix}:w:{b.specs[0].key(t)}", "spent") or 0) for t in (100.0, 3700.0)]
            assert spent == [0.2, 0.0], spent
        finally:
            await ctl.close()
    asyncio.run(go())


def test_spend_settled_after_a_restart_that_lost_the_claims_is_counted_once(own_redis):
    """A Redis restarted without persistence forgets the spend so far (docs/budgets.md), and it forgot the claims
    under way too: their settlements counted nothing, so what was in flight was spent past the limit unsaid (a
    helper's hunt: $16 after the restart under a $10 limit). Now the book sends what it kept of each claim with
    its first settlement, and a replay of one whose reply was lost counts nothing more. Since stop 77 its first
    settlement finds the book's sequence gone (``BOOK_SEQ``): the three claims are reserved again first and settled
    through their records, where before each was counted as a lost record; $6 counted once either way (a book that
    did not grant them, a controller restarted, still counts them from its copy: ``test_budget_faults_hunt.py``)."""
    from redis.exceptions import ConnectionError as RedisConnectionError


    spec = BudgetSpec(max_budget=10.0, budget_duration="1d")

    async def go():
        async with redis_books(own_redis.url) as (client, new_book):
            book = new_book([spec], prefix=f"sbtest-lost{next(_prefix)}")
            claims = [Claim(f"a{k}", "acme", "openai", "gpt-4o-mini", "urgent", 2.0) for k in range(3)]
            assert all(v.ok for v in await book.reserve_many(claims, 0.0))
            own_redis.stop()
            own_redis.start()  # no persistence: the ledger is empty
            with contextlib.suppress(RedisConnectionError):
                await client.ping()  # the connection the restart cut fails once, then a new one is made
            real = book._settle

            async def reply_lost(*a, **kw):  # Redis runs it; its answer never comes back
                await real(*a, **kw)
                raise RedisConnectionError("reply lost")
            book._settle = reply_lost
            with pytest.raises(RedisConnectionError):
                await book.settle_many([(c.rid, 2.0) for c in claims[:1]])
            book._settle = real
            lost = await book.settle_many([(c.rid, 2.0) for c in claims])  # the first again (a replay), two more
            spent, reserved = await book.window(spec, 0.0)
            spend = await book.spend_report()
            later = await book.reserve_many([Claim(f"b{k}", "acme", "openai", "gpt-4o-mini", "urgent", 2.0)
                                             for k in range(5)], 0.0)
        return lost, spent, reserved, spend, [v.ok for v in later], book.reopened
    lost, spent, reserved, spend, later, reopened = asyncio.run(go())
    assert (lost, reopened) == (0, 3) and spent == pytest.approx(6.0) and reserved == 0.0
    assert [round(r["spent_usd"], 6) for r in spend] == [6.0] and spend[0]["tenant"] == "acme"
    assert later == [True, True, False, False, False]  # $4 left under the limit, not $10


def test_spend_of_claims_a_restart_lost_is_counted_once_through_the_controllers_replay(own_redis):
    """The first call after a restart meets the connection the restart cut: the controller keeps the settlements
    in its outbox and sends them again once Redis answers. The book kept what it knew of each claim until Redis
    took the settlement (a review: it dropped that before the first call, and the replay counted nothing). Since a
    review of failover, the replay reads first which Redis process answers (a call failed): the claims the restart
    lost are reserved again from that copy and settled through their records, where before, within the watch's
    second, each was settled as a lost record; $6 counted once either way."""
    from actors.budget import BudgetController

    b = budgets(own_redis.url)

    async def go():
        ctl = BudgetController(b)
        try:
            await ctl.check_ledger()
            assert all(v.ok for v in await ctl.reserve_many([Claim(f"a{k}", "acme", "openai", "gpt-4o-mini", "urgent",
                                                                   2.0) for k in range(3)]))
            own_redis.stop()
            own_redis.start()  # no persistence: the claims and the spend so far are gone
            await ctl.settle_many([(f"a{k}", 2.0) for k in range(3)])  # the work finished: $6 spent
            if ctl._flusher is not None:  # the outbox's replay, once Redis answers again (bounded)
                await asyncio.wait_for(asyncio.shield(ctl._flusher), 10)
            led = (await ctl.report())["ledger"]
            out = len(ctl._outbox), led["lost_records"], led["reopened_after_restart"]
        finally:
            await ctl.close()
        return out
    left, lost, reopened = asyncio.run(go())
    spent, reserved = ledger(own_redis, b)
    assert (left, lost, reopened) == (0, 0, 3)
    assert spent == pytest.approx(6.0) and reserved == 0.0
