"""The journal: a dispatcher that dies and comes back re-attaches to its batch and re-makes its sync call under
the same key and body; a budget controller takes its memory ledger back. In the hub's memory and in Redis.

The actors run as plain objects on one event loop (no Ray): "dying" is dropping the object with its tasks
cancelled, "restarting" is building a new one from the same arguments, as Ray does.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from actors import BudgetController, Dispatcher, ResultHub
from actors._types import BatchJob, Job
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.provider_api import CallOutcome, Usage
from engine.core.request import Request
from engine.core.settings import CacheSettings, JournalSettings, Settings

CAT = default_catalog()


def req(i: int) -> Request:
    return Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 100 + i,
                                   "output_tokens": 10, "priority": "background"})


class Peer:
    """A stand-in grouper/cache: records what it is sent."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        async def method(*args):
            self.calls.append((name, args))
            return []
        return method


def dispatcher_args(settings):
    """A hub, a clock, and the constructor arguments a dispatcher (and its restart, as Ray does) is built from."""
    hub, clock = ResultHub(), ManualClock(0.0)
    engine = f"t{secrets.token_hex(3)}"  # its own journal keys in a shared Redis
    return hub, clock, ("openai", CAT, settings, 0, clock, [Peer()], hub, None, Peer(), None, None, engine)


async def die(actor) -> None:
    tasks = list(actor._tasks)
    for t in tasks:
        t.cancel()
    # Their cancellations run to their ends before the close: a task cut inside a Redis command gave its connection
    # back after the pool had closed, and it was left open (a ResourceWarning at the test's collection, stop 84's
    # rehearsal: test_journal_redis_restart.py's record written after the loss). Bounded: a death, not a drain.
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    await actor.journal.close()  # its connections die with its process


async def until(cond, what: str, timeout_s: float = 30.0) -> None:
    """Yield to the loop until ``cond()`` holds; fail after ``timeout_s`` of real time. The actors here are
    coroutines on this loop, but what they wait for is real: Redis's answers, a thread's file writes. Bounded by
    500 polls (about a second) before, which a loaded machine could use up while Redis answered."""
    t_end = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > t_end:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.002)


async def until_async(probe, what: str, timeout_s: float = 10.0) -> None:
    """Until ``await probe()`` is truthy; fail after ``timeout_s`` of real time (Redis answers take time)."""
    t_end = asyncio.get_running_loop().time() + timeout_s
    while not await probe():
        if asyncio.get_running_loop().time() > t_end:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.002)


async def past_the_end(clock, hub, n: int, timeout_s: float = 10.0) -> list:
    """Run the clock past every batch's end (timers fire at once on a ManualClock) until the hub holds ``n``
    results, or fail after ``timeout_s`` of real time."""
    got: list = []
    t_end = asyncio.get_running_loop().time() + timeout_s
    while len(got) < n:
        if asyncio.get_running_loop().time() > t_end:
            raise AssertionError(f"{len(got)} of {n} results")
        clock.advance(3600.0)
        got += await hub.pull(0.005)
    return got


@pytest.fixture(params=["memory", "redis"])
def settings(request):
    if request.param == "memory":
        return Settings()
    url = request.getfixturevalue("redis_server").url
    # These tests check what the journal keeps, not how fast Redis answers: a connect slowed by a busy machine
    # must not count as Redis down (the default 0.25 s did once, with mutation testing running beside them).
    return Settings().model_copy(update={"journal": JournalSettings(redis_url=url),
                                         "cache": CacheSettings(redis_timeout_s=5.0)})


def test_a_restarted_dispatcher_follows_its_journaled_batch_and_never_resubmits_it(settings):
    async def go():
        hub, clock, args = dispatcher_args(settings)
        d1 = Dispatcher(*args)
        jobs = [Job(i, req(i), f"fp{i}") for i in range(3)]
        await d1.run_many([BatchJob("b1", "batch_api", None, False, "process_as_batch", "cheap", jobs)])
        await until_async(lambda: d1.journal.items(d1._space), "the batch submitted and journaled")
        await die(d1)

        d2 = Dispatcher(*args)
        submitted = []
        real_submit = d2.provider.submit_batch
        d2.provider.submit_batch = lambda *a: submitted.append(a) or real_submit(*a)
        assert await d2.recover() == 1
        assert await d2.recall(["1:t/r0", jobs[0].req.uid]) == [jobs[0].req.uid]  # it knows its members
        got = await past_the_end(clock, hub, 3)
        assert sorted(r.id for r in got) == ["r0", "r1", "r2"]
        assert {r.mode for r in got} == {"batch_api"} and {r.batch_id for r in got} == {"b1"}
        assert submitted == []  # followed by its journaled handle, never submitted again
        async def cleared():
            return not d2._open and not await d2.journal.items(d2._space)
        await until_async(cleared, "its record cleared once it ended")
        await d2.journal.close()
    asyncio.run(go())


def test_a_restarted_dispatcher_reads_its_journal_before_it_takes_work_or_answers_a_recall(settings):
    """Ray restarts a dispatcher at once; the driver rewires it a health check later. A sweep's recall and a
    grouper's dispatch of the same members (their deadline passed: sync) can reach it first. Answered from an
    empty memory, they went sync while the batch ran on at the provider: both billed (seen in the chaos run)."""
    async def go():
        hub, clock, args = dispatcher_args(settings)
        d1 = Dispatcher(*args)
        jobs = [Job(i, req(i), f"fp{i}") for i in range(3)]
        await d1.run_many([BatchJob("b1", "batch_api", None, False, "process_as_batch", "cheap", jobs)])
        await until(lambda: d1._open and all(h is not None for *_, h, _ in d1._open.values()), "batch submitted")
        await until_async(lambda: d1.journal.items(d1._space), "the batch submitted and journaled")
        await die(d1)

        d2 = Dispatcher(*args)
        d2.reconstructed()  # as actors.remote does for an actor Ray restarted
        submitted = []
        real_submit = d2.provider.submit_batch
        d2.provider.submit_batch = lambda *a: submitted.append(a) or real_submit(*a)
        uids = [j.req.uid for j in jobs]
        again = [Job(j.seq, j.req, j.fp) for j in jobs]
        held, _ = await asyncio.gather(
            d2.recall(uids), d2.run_many([BatchJob("s1", "sync", None, False, "process_individually", "now", again)]))
        assert sorted(held) == sorted(uids)
        assert await d2.recover() == 0  # the driver's rewire, later: already done
        assert d2.reattached == 1
        got = await past_the_end(clock, hub, 3)
        assert sorted(r.id for r in got) == ["r0", "r1", "r2"]
        assert {(r.mode, r.batch_id) for r in got} == {("batch_api", "b1")}  # none sent sync as well
        assert submitted == []
        await d2.journal.close()
    asyncio.run(go())


class Unreadable:
    """A journal whose reads fail ``fails`` times (a Redis restarting), then read through."""

    def __init__(self, journal, fails: int):
        self.journal, self.fails, self.reads = journal, fails, 0

    def __getattr__(self, name):
        return getattr(self.journal, name)

    async def items(self, space):
        self.reads += 1
        if self.reads <= self.fails:
            raise ConnectionError("Connection refused")
        return await self.journal.items(space)


async def restarted_with_an_open_batch(settings, fails: int):
    """A dispatcher whose batch was submitted and journaled, dead, and its restart, whose journal reads fail
    ``fails`` times first; with the members' jobs, the submits the restart makes and its constructor arguments."""
    hub, clock, args = dispatcher_args(settings)
    d1 = Dispatcher(*args)
    jobs = [Job(i, req(i), f"fp{i}") for i in range(3)]
    await d1.run_many([BatchJob("b1", "batch_api", None, False, "process_as_batch", "cheap", jobs)])
    await until(lambda: d1._open and all(h is not None for *_, h, _ in d1._open.values()), "batch submitted")
    await d1._journal_put(next(iter(d1._open)))
    await die(d1)
    d2 = Dispatcher(*args)
    d2.reconstructed()
    d2.journal = Unreadable(d2.journal, fails)
    submitted: list = []
    real_submit = d2.provider.submit_batch
    d2.provider.submit_batch = lambda *a: submitted.append(a) or real_submit(*a)
    return d2, jobs, submitted, args


def test_a_restarted_dispatcher_waits_out_a_journal_that_fails_for_a_while_and_sends_nothing_again():
    """Redis restarting when the dispatcher restarts: its reads fail for a moment. Giving up at once answered
    the recall from an empty memory: the members went again while their batch ran on, billed twice."""
    async def go():
        d2, jobs, submitted, _ = await restarted_with_an_open_batch(Settings(), fails=3)
        uids = [j.req.uid for j in jobs]
        held = await d2.recall(uids)
        assert sorted(held) == sorted(uids) and d2.journal.reads > 3
        assert d2.reattached == 1 and d2.journal_unread == 0 and submitted == []
        await d2.journal.close()
    asyncio.run(go())


def test_a_journal_unreadable_past_the_wait_is_given_up_counted_and_read_again_at_the_next_rewire():
    async def go():
        settings = Settings().model_copy(update={"journal": JournalSettings(recover_wait_s=0.2)})
        d2, jobs, submitted, args = await restarted_with_an_open_batch(settings, fails=10**6)
        uids = [j.req.uid for j in jobs]
        assert await d2.recall(uids) == []  # given up: the members are dispatched afresh (and counted)
        assert d2.journal_unread == 1 and (await d2.stats())["journal_unread"] == 1
        assert await d2.recover() == -1  # what the driver's rewire is told: it tries again at its next check
        d2.journal.fails = 0  # Redis is back: the driver's rewire reads it
        assert await d2.recover() == 1 and sorted(await d2.holds(uids)) == sorted(uids)
        await die(d2)
        # ``journal_unread`` is read in ``report()["providers"]``, as ``journal_lost`` is: kept in the dispatcher's
        # memory alone, its next restart counted 0, and the report no longer said members were sent again
        # (fails on the code before).
        d3 = Dispatcher(*args)
        d3.reconstructed()
        assert await d3.recover() == 1
        try:
            assert (await d3.stats())["journal_unread"] == 2
        finally:
            await die(d3)
    asyncio.run(go())


class HttpLike:
    """A provider that "calls over HTTP": the first dispatcher's call never returns (it dies mid-call), the
    second's answers. Bodies differ on every build, as a body that depends on cache warmth can."""

    real = True
    honours_keys = True  # the call made again under its key is answered once (the emulator's way)

    def __init__(self, hang: bool):
        self.hang, self.bodies, self.keys = hang, [], []

    def sync_body(self, job):
        return {"model": job.req.model, "nonce": secrets.token_hex(4)}

    async def call(self, job):
        self.keys.append(job.key)
        self.bodies.append(job.body)
        if self.hang:
            await asyncio.Event().wait()
        return CallOutcome(True, 0.0, 0.001, output="hi", usage=Usage(100, 10), real=True)


def test_a_restarted_dispatcher_makes_its_cut_call_again_under_the_same_key_and_body(settings):
    async def go():
        hub, clock, args = dispatcher_args(settings)
        d1 = Dispatcher(*args)
        d1.provider = first = HttpLike(hang=True)
        await d1.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", [Job(0, req(0), "fp")])])
        await until(lambda: first.keys, "the call left")
        await die(d1)

        d2 = Dispatcher(*args)
        d2.provider = second = HttpLike(hang=False)
        await d2.recover()
        await until(lambda: second.keys, "the call was made again")
        assert second.keys == first.keys and second.bodies == first.bodies
        (res,) = await hub.pull(1.0)
        assert res.id == "r0" and res.status == "ok" and res.cost_usd == pytest.approx(0.001)
        await until(lambda: not d2._sync_calls, "the call left the journal")
        # The record's delete goes from a task of its own: closed under it, the journal opened a connection again
        # and left it to the collector (a ResourceWarning that failed a later test).
        w = d2._sync_journal
        await until(lambda: w._task is None or w._task.done(), "the record's delete was sent")
        await d2.journal.close()
    asyncio.run(go())


def test_a_restarted_budget_controller_takes_its_memory_ledger_back():
    async def go():
        hub = ResultHub()
        cfg = BudgetSettings(specs=(BudgetSpec(max_budget=10.0),))
        b1 = BudgetController(cfg, hub, ManualClock(0.0))
        await b1.reserve_many([Claim(f"c{k}", "t", "openai", "gpt-5-mini", "normal", 1.0) for k in range(4)])
        await b1.settle_many([("c0", 0.7), ("c1", 0.2)])
        await until(lambda: b1._journaling is not None and b1._journaling.done(), "the snapshot was written")

        b2 = BudgetController(cfg, hub, ManualClock(0.0))
        assert await b2.recover()
        rep = await b2.report()
        assert rep["spent_usd"] == pytest.approx(0.9) and rep["reserved_usd"] == pytest.approx(2.0)
        # Its open claims settle as before; one that is never settled is released after the TTL.
        await b2.settle_many([("c2", 0.5)])
        assert (await b2.report())["spent_usd"] == pytest.approx(1.4)
        b2._expire(["c3"])
        assert (await b2.report())["reserved_usd"] == 0

        # A hub that does not answer for a moment (restarting too): the ledger still comes back, not from zero.
        await until(lambda: b2._journaling is not None and b2._journaling.done() and not b2._journal_dirty,
                    "its snapshot was written")
        b3 = BudgetController(cfg, hub, ManualClock(0.0))
        b3.journal = Unreadable(b3.journal, fails=3)
        # A reservation made while the ledger is read back waits for it: made on the empty ledger, the restore
        # overwrote it (its claim gone, its settlement later counting nothing).
        restored, (verdict,) = await asyncio.gather(
            b3.recover(), b3.reserve_many([Claim("c9", "t", "openai", "gpt-5-mini", "normal", 1.0)]))
        assert restored and verdict.ok and b3.journal.reads == 4
        rep = await b3.report()
        assert rep["spent_usd"] == pytest.approx(1.4) and rep["reserved_usd"] == pytest.approx(1.0)

        # Restarted by Ray: the first ledger call reads the ledger back, before the driver's rewire asks.
        await until(lambda: b3._journaling is not None and b3._journaling.done() and not b3._journal_dirty,
                    "its snapshot was written")
        b4 = BudgetController(cfg, hub, ManualClock(0.0))
        b4.reconstructed()
        (verdict,) = await b4.reserve_many([Claim("c10", "t", "openai", "gpt-5-mini", "normal", 1.0)])
        rep = await b4.report()
        assert verdict.ok and rep["spent_usd"] == pytest.approx(1.4) and rep["reserved_usd"] == pytest.approx(2.0)
        assert not await b4.recover()  # the rewire's ask, later: already done (a second would overwrite)
    asyncio.run(go())


def test_a_budget_controller_restarted_right_after_it_answers_loses_no_claim_settlement_or_charge():
    """A reservation, settlement or charge is answered once the journal holds it. Answered first (the snapshot
    up to 50 ms later), a restart lost the claims granted since: their settlements then counted nothing, the
    ledger fell short of the bill and a hard limit could be overrun (a hunt: 10 % short after four restarts)."""
    from engine.core.budgets import Charge

    async def go():
        hub = ResultHub()
        cfg = BudgetSettings(specs=(BudgetSpec(max_budget=10.0),))
        b1 = BudgetController(cfg, hub, ManualClock(0.0))
        await b1.reserve_many([Claim(f"c{k}", "t", "openai", "gpt-5-mini", "normal", 1.0) for k in range(3)])
        b2 = BudgetController(cfg, hub, ManualClock(0.0))  # dies at once, restarted: nothing awaited between
        assert await b2.recover()
        assert (await b2.report())["reserved_usd"] == pytest.approx(3.0)
        await b2.settle_many([("c0", 0.4)])
        await b2.charge_many([Charge("late:b1:x", "t", "openai", "gpt-5-mini", 0.25)])
        b3 = BudgetController(cfg, hub, ManualClock(0.0))
        assert await b3.recover()
        await b3.charge_many([Charge("late:b1:x", "t", "openai", "gpt-5-mini", 0.25)])  # sent again: counted once
        rep = await b3.report()
        assert rep["spent_usd"] == pytest.approx(0.65) and rep["reserved_usd"] == pytest.approx(2.0)
    asyncio.run(go())


def test_a_budget_controller_restarted_by_ray_keeps_its_ledger_id_and_reports_its_ledger_taken_back():
    """The endpoint counts what its state directory kept only against a ledger that did not see it, by the
    ledger's id. Drawn at each construction, a controller restarted by Ray reported another id, and reported it
    before its ledger was taken back: an endpoint resuming then counted kept lines a second time (a review)."""
    async def go():
        hub = ResultHub()
        cfg = BudgetSettings(specs=(BudgetSpec(max_budget=10.0),))
        b1 = BudgetController(cfg, hub, ManualClock(0.0), ledger_id="L1")
        await b1.reserve_many([Claim("c0", "t", "openai", "gpt-5-mini", "normal", 1.0)])
        await b1.settle_many([("c0", 0.5)])
        b2 = BudgetController(cfg, hub, ManualClock(0.0), ledger_id="L1")  # Ray's restart: the same arguments
        b2.reconstructed()
        rep = await b2.report()  # the first call after the restart: the ledger is taken back first
        assert rep["ledger_id"] == "L1" and rep["spent_usd"] == pytest.approx(0.5)
        assert (await BudgetController(cfg, ResultHub(), ManualClock(0.0)).report())["ledger_id"] != "L1"
    asyncio.run(go())

def test_accepted_requests_are_journaled_in_redis_until_forgotten(settings):
    """With Redis, what the engine accepted outlives the driver's memory: a rebuilt ingest (a restart, or a
    driver that lost its own record) lists it; forgetting a finished request clears it. Without Redis the
    driver's memory is the record, and ingest journals nothing."""
    from actors import Ingest

    async def go():
        engine = f"t{secrets.token_hex(3)}"
        grouper = Peer()
        ing = Ingest([grouper], settings=settings, engine=engine)
        assert await ing.submit([req(i) for i in range(3)]) == 3
        await until(lambda: grouper.calls, "the requests went on to the grouper")
        assert sorted(j.req.id for _, (jobs,) in grouper.calls for j in jobs) == ["r0", "r1", "r2"]
        again = Ingest([Peer()], settings=settings, engine=engine)
        got = await again.accepted()
        if settings.journal_redis_url() is None:
            assert got == [] and ing.journal is None
            return
        assert sorted(r.id for r in got) == ["r0", "r1", "r2"] and got[0] == req(int(got[0].id[1:]))
        await again.forget([req(1).uid])
        assert sorted(r.id for r in await ing.accepted()) == ["r0", "r2"]
        await ing.journal.delete("accepted", [req(0).uid, req(2).uid])
        await ing.journal.close()
        await again.journal.close()
    asyncio.run(go())


def test_an_unreachable_journal_does_not_stop_admission():
    from actors import Ingest

    async def go():
        down = Settings().model_copy(update={"journal": JournalSettings(redis_url="redis://127.0.0.1:1/0")})
        grouper = Peer()
        ing = Ingest([grouper], settings=down, engine="down")
        assert await ing.submit([req(0), req(1)]) == 2
        assert ing.journal_failures == 1
        # Down lately: the next submits do not wait for Redis's timeout again (for JOURNAL_RETRY_S).
        assert await ing.submit([req(2)]) == 1 and ing.journal_failures == 2
        assert ing._journal_back_at > 0
        await until(lambda: grouper.calls, "the requests went on to the grouper")
        await until(lambda: len(grouper.calls) == 2, "every request went on to the grouper")
        assert sorted(j.req.id for _, (jobs,) in grouper.calls for j in jobs) == ["r0", "r1", "r2"]
        await ing.journal.close()
    asyncio.run(go())


def test_a_dispatch_carrying_one_request_twice_makes_one_call_and_releases_the_copys_claim():
    async def go():
        hub, clock, args = dispatcher_args(Settings())
        d = Dispatcher(*args)
        d.provider = prov = HttpLike(hang=False)
        j = Job(0, req(0), "fp", claim="c0")
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now",
                                   [j, j._replace(claim="c1")])])
        await until(lambda: prov.keys, "the call left")
        (res,) = await hub.pull(1.0)
        assert res.id == "r0" and prov.keys == [prov.keys[0]] and d.in_flight == 0
        budget = args[8]
        await until(lambda: any(n == "settle_many" for n, _ in budget.calls), "the claims were settled")
        settled = [c for n, (s,) in budget.calls if n == "settle_many" for c in s]
        assert ("c1", 0.0) in settled and any(c == "c0" for c, _ in settled)
    asyncio.run(go())


def test_a_journal_space_expires_after_its_last_write_and_a_later_engine_of_the_name_reads_none_of_it(redis_server):
    """A stopped engine's records stayed in Redis for good (a helper measured 50 pickled requests per run), and
    a later engine of the same name resumed its namesake's sync calls, each paid twice: the records now name one
    run of the engine (``start_actors`` draws it) and each space expires ``JOURNAL_TTL_S`` after its last write."""
    from actors.journal import JOURNAL_TTL_S, RedisJournal

    async def go():
        first = RedisJournal(redis_server.url, "sbtest", f"prod@{secrets.token_hex(4)}")
        later = RedisJournal(redis_server.url, "sbtest", f"prod@{secrets.token_hex(4)}")
        await first.put("sync:openai", "k1", {"body": 1})
        assert await first.items("sync:openai") == {"k1": {"body": 1}} and await later.items("sync:openai") == {}
        ttl = redis_server.client().ttl(first._base + "sync:openai")
        assert JOURNAL_TTL_S - 60 <= ttl <= JOURNAL_TTL_S
        await first.close()
        await later.close()
    asyncio.run(go())


def test_a_running_journal_keeps_its_spaces_from_expiring_and_a_closed_one_stops(redis_server, monkeypatch):
    """A space expired 8 days after its last write even while its engine ran: a request accepted on an engine
    that then accepted nothing for that long lost its record (docs/reliability.md). The journal now pushes the
    expiry of the spaces it holds once a day (here every 10 ms) until it is closed."""
    from actors import journal as jmod

    monkeypatch.setattr(jmod, "JOURNAL_REFRESH_S", 0.01)

    async def go():
        j = jmod.RedisJournal(redis_server.url, "sbtest", f"idle@{secrets.token_hex(4)}")
        await j.put("accepted", "u1", {"x": 1})
        await j.items("sync:openai")  # read only (a restarted holder): held too, though nothing is there yet
        client, key = redis_server.client(), j._base + "accepted"
        client.expire(key, 30)  # as if days had passed since the last write
        await until(lambda: client.ttl(key) > 60, "the keeper pushed the expiry on")
        assert jmod.JOURNAL_TTL_S - 60 <= client.ttl(key) <= jmod.JOURNAL_TTL_S
        assert j._spaces == {"accepted", "sync:openai"} and client.exists(j._base + "sync:openai") == 0
        keeper = j._keeper
        await j.close()
        # It ends, cancelled or (the cancel landing in a Redis read, answered as the client's own error) returning.
        await asyncio.wait([keeper], timeout=30.0)
        assert keeper.done()
        assert j._keeper is None and client.hget(key, "u1") is not None  # it ends JOURNAL_TTL_S after the last push
    asyncio.run(go())


def test_a_delete_the_journal_failed_is_tried_until_it_is_done(monkeypatch):
    """A delete given up after about 50 s left the record of an answered call behind a Redis outage, and a later
    restart made the call again (a helper's fault hunt): it is now tried until the journal takes it."""
    from actors import journal as jmod

    monkeypatch.setattr(jmod, "DELETE_BASE_S", 0.001)
    monkeypatch.setattr(jmod, "DELETE_MAX_S", 0.002)

    class Flaky:
        closed = False

        def __init__(self):
            self.fails, self.deleted = jmod.DELETE_TRIES + 5, []

        async def delete(self, space, keys):
            if self.fails:
                self.fails -= 1
                raise ConnectionError("Redis is away")
            self.deleted += keys

    async def go():
        j, tasks = Flaky(), set()
        jmod.delete_later(j, "sync:openai", ["k1"], tasks)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert j.deleted == ["k1"] and j.fails == 0
    asyncio.run(go())


def test_a_journal_redis_that_may_evict_keys_is_refused_or_left_to_the_cache(own_redis):
    """A journal on a Redis run as a cache (a memory limit, allkeys-lru) lost its records to the cache's own
    writes, and a restart would then pay again for what they named (a helper's fault hunt). Named for the
    journal, such a Redis is refused; the cache's, which the journal only falls back to, keeps the cache and the
    journal goes to the hub's memory. Without a memory limit Redis evicts nothing, whatever its policy."""
    from actors._journal_evict import check_keeps_records
    from engine.core.errors import ConfigError

    by_cache = Settings().model_copy(update={"cache": CacheSettings(redis_url=own_redis.url)})
    by_journal = Settings().model_copy(update={"journal": JournalSettings(redis_url=own_redis.url)})
    r = own_redis.client()
    r.config_set("maxmemory-policy", "allkeys-lru")
    assert check_keeps_records(by_journal) is by_journal  # maxmemory 0: nothing is evicted
    r.config_set("maxmemory", "100mb")
    kept = check_keeps_records(by_cache)
    assert kept.journal.in_memory and kept.journal_redis_url() is None and kept.cache.redis_url == own_redis.url
    with pytest.raises(ConfigError, match=r"setting journal.redis_url: the journal's Redis may evict keys "
                                          r"\(maxmemory 104857600, maxmemory-policy allkeys-lru\)"):
        check_keeps_records(by_journal)
    r.config_set("maxmemory-policy", "volatile-lru")  # each journal space has an expiry
    with pytest.raises(ConfigError, match="maxmemory-policy volatile-lru"):
        check_keeps_records(by_journal)
    r.config_set("maxmemory-policy", "noeviction")
    assert check_keeps_records(by_journal) is by_journal


def test_a_late_retry_of_a_failed_delete_leaves_a_record_written_anew_under_its_key(monkeypatch):
    """Tried for as long as it takes, an old delete could remove the record of a new call under the same key
    (the same id sent again), which a restart would then not make again (a review)."""
    from actors import journal as jmod

    monkeypatch.setattr(jmod, "DELETE_BASE_S", 0.001)
    monkeypatch.setattr(jmod, "DELETE_MAX_S", 0.002)

    class Store:
        closed = False

        def __init__(self):
            self.recs, self.fails = {}, 3

        async def put_many(self, space, values):
            self.recs.update(values)

        async def delete(self, space, keys):
            await asyncio.sleep(0)  # on the wire: other work runs meanwhile
            if self.fails:
                self.fails -= 1
                raise ConnectionError("Redis is away")
            for k in keys:
                self.recs.pop(k, None)

    async def go():
        store = Store()
        w = jmod.JournalWriter(store, "sync:openai")
        await w.put("k", "old call")
        w.delete("k")  # fails: tried again later
        w._arm()
        await w._task
        await w.put("k", "new call")  # the same key, written anew before the retry gets through
        await asyncio.wait_for(asyncio.gather(*w.retries), 10)
        assert store.recs == {"k": "new call"}  # the retry left it (before, it deleted the new record)
        # The new write made while the failing delete is on the wire (a second review).
        store.fails = 3
        w.delete("k")
        put = asyncio.ensure_future(w.put("k", "newer call"))
        await put
        await asyncio.wait_for(asyncio.gather(*w.retries), 10)
        assert store.recs == {"k": "newer call"}
    asyncio.run(go())

