"""The rules that let several drivers share one engine, on the plain actor classes (no Ray): the hub hands each
driver the results it claimed, whichever came first; ingest claims only matching content, refuses an id reused
with other content, finds the result of a repeated id the hub no longer holds, and forgets an id only when
the last driver that submitted it forgets it."""

import asyncio

from actors import Ingest, ResultHub
from actors import hub as hub_module
from engine.core.request import Request
from engine.core.result import Result


def req(i, prompt="same", **kw):
    return Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": prompt,
                                   "output_tokens": 10, **kw})


def res(i, **kw):
    return Result(id=f"r{i}", status="ok", output=f"out {i}", **kw)


def run(coro):
    return asyncio.run(coro)


class Groupers:
    """Stands in for a grouper: records what it was sent."""

    def __init__(self):
        self.jobs = []

    async def add(self, jobs):
        self.jobs.extend(jobs)


class Finisher:
    """Stands in for a dispatcher that finished some requests: ``recall`` sends their results again."""

    def __init__(self, hub, done):
        self.hub, self.done, self.forgotten = hub, done, []

    async def recall(self, uids):
        again = [self.done[u] for u in uids if u in self.done]
        if again:
            await self.hub.push(again)
        return [r.uid for r in again]

    async def forget(self, uids):
        self.forgotten.extend(uids)


async def settle():
    for _ in range(5):  # let the tasks that Peer.send started run
        await asyncio.sleep(0)


def test_a_result_reaches_the_driver_that_claimed_it_whichever_came_first():
    async def go():
        hub = ResultHub()
        assert await hub.claim("A", ["1:x/r1"]) == ["1:x/r1"]  # not here yet
        await hub.claim("B", [])
        await hub.push([res(1, tenant="x"), res(2, tenant="x")])
        assert [r.id for r in await hub.pull(0, "A")] == ["r1"]
        assert await hub.pull(0, "B") == []  # r2 was claimed by nobody: kept, handed to no one
        assert await hub.claim("B", ["1:x/r2", "1:x/r1"]) == []  # both here: handed over at the claim
        assert sorted(r.id for r in await hub.pull(0, "B")) == ["r1", "r2"]
    run(go())


def test_a_hub_that_lost_a_driver_says_so_and_a_refusal_is_never_dropped():
    async def go():
        hub = ResultHub()  # as after a restart: nobody has claimed yet
        await hub.refuse("B", [res(7, tenant="x")])
        assert [r.id for r in await hub.pull(0, "B")] == ["r7"]
        assert await hub.pull(0, "C") is None  # unknown: C must claim its open requests again
        assert await hub.pull(0, "C") == []  # known from now on
    run(go())


def test_an_idle_driver_is_dropped_and_told_at_its_next_pull(monkeypatch):
    async def go():
        now = [1000.0]
        monkeypatch.setattr(hub_module.time, "monotonic", lambda: now[0])
        hub = ResultHub()
        await hub.claim("A", ["1:x/r1"])
        await hub.claim("B", ["1:x/r2"])
        now[0] += hub_module.CLIENT_IDLE_S + 20
        await hub.pull(0, "B")  # B is alive
        await hub.push([res(1, tenant="x"), res(2, tenant="x")])  # A has not pulled for too long: dropped
        assert [r.id for r in await hub.pull(0, "B")] == ["r2"]
        assert await hub.pull(0, "A") is None
        assert await hub.claim("A", ["1:x/r1"]) == [] and [r.id for r in await hub.pull(0, "A")] == ["r1"]
    run(go())


def test_ingest_refuses_an_id_reused_with_other_content_and_claims_only_matching_content():
    async def go():
        hub, g = ResultHub(), Groupers()
        ing = Ingest([g], hub=hub)
        assert await ing.submit([req(1)], "A") == 1
        assert await ing.submit([req(1)], "B") == 0  # the same request: not generated twice
        assert await ing.submit([req(1, prompt="other")], "C") == 0
        await settle()
        (refusal,) = await hub.pull(0, "C")
        assert refusal.status == "failed" and "field 'id'" in refusal.error
        await hub.push([res(1)])
        assert [r.output for r in await hub.pull(0, "A")] == ["out 1"]
        assert [r.output for r in await hub.pull(0, "B")] == ["out 1"]
        assert await hub.pull(0, "C") == []  # other content never gets this id's result
        # Re-admission checks content too: a driver cannot claim another content's result that way.
        assert await ing.readmit([req(1, prompt="other")], "C") == 0
        await settle()
        assert [r.status for r in await hub.pull(0, "C")] == ["failed"]
        assert len(g.jobs) == 1
    run(go())


def test_a_repeated_id_whose_result_the_hub_no_longer_holds_is_sent_again_not_generated_again(monkeypatch):
    async def go():
        monkeypatch.setattr(hub_module, "RECENT", 2)
        hub, g = ResultHub(), Groupers()
        done = {req(1).uid: res(1)}
        disp = Finisher(hub, done)
        ing = Ingest([g], hub=hub, dispatchers=[disp])
        await ing.submit([req(1)], "A")
        await settle()
        await hub.push([res(1)])
        await hub.push([res(k) for k in (2, 3, 4)])  # r1 falls out of the hub's recent results
        await hub.pull(0, "A")
        assert await ing.submit([req(1)], "B") == 0
        await settle()
        assert [r.output for r in await hub.pull(0, "B")] == ["out 1"]  # sent again by who finished it
        assert len(g.jobs) == 1  # and never generated a second time
    run(go())


def test_an_id_is_forgotten_when_the_last_driver_that_submitted_it_forgets_it():
    async def go():
        hub, g = ResultHub(), Groupers()
        disp = Finisher(hub, {})
        ing = Ingest([g], hub=hub, dispatchers=[disp])
        await ing.submit([req(1)], "A")
        await ing.submit([req(1)], "B")
        await ing.forget([req(1).uid], "A")
        await settle()
        assert req(1).uid in ing.seen and disp.forgotten == []  # B still holds it
        assert await ing.submit([req(1, prompt="other")], "C") == 0  # still refused
        await ing.forget([req(1).uid], "B")
        await settle()
        assert req(1).uid not in ing.seen and disp.forgotten == [req(1).uid]
        assert await ing.submit([req(1, prompt="other")], "C") == 1  # the id is free again
    run(go())


class Holding:
    """Stands in for a grouper: holds some requests (still waiting to be sent)."""

    def __init__(self, held):
        self.held, self.jobs = set(held), []

    async def add(self, jobs):
        self.jobs.extend(jobs)

    async def recall(self, uids):
        return [u for u in uids if u in self.held]


def test_a_repeated_id_nobody_holds_any_more_is_refused_after_a_second_look(monkeypatch):
    async def go():
        from actors import ingest as ingest_module

        monkeypatch.setattr(ingest_module, "REPEAT_LOOK_S", 0.0)
        monkeypatch.setattr(hub_module, "RECENT", 1)
        hub, g = ResultHub(), Holding(held=[req(2).uid])  # r2 still waits in the grouper
        ing = Ingest([g], hub=hub, dispatchers=[Finisher(hub, {})])  # the dispatcher forgot r1 long ago
        await ing.submit([req(1), req(2)], "A")
        await hub.push([res(1)])
        await hub.push([res(9)])  # r1 falls out of the hub's recent results
        await hub.pull(0, "A")
        assert await ing.submit([req(1), req(2)], "B") == 0
        for _ in range(20):
            await asyncio.sleep(0)  # the second look
        (gone,) = await hub.pull(0, "B")  # r1: told so, not left waiting; r2: comes when it is done
        assert gone.id == "r1" and gone.status == "failed" and "no longer held" in gone.error
        assert len(g.jobs) == 2  # nothing generated a second time
        await hub.push([res(2)])
        assert [r.id for r in await hub.pull(0, "B")] == ["r2"]
    run(go())


def test_a_driver_that_leaves_releases_its_ids_after_its_retention_window():
    async def go():
        hub, g = ResultHub(), Groupers()
        disp = Finisher(hub, {})
        ing = Ingest([g], hub=hub, dispatchers=[disp])
        await ing.submit([req(1), req(2)], "A")
        await ing.submit([req(2)], "B")
        assert ing.holders[req(1).uid] == "A"  # one driver: a string, not a set
        assert await ing.leave("A", 0.0) == 2
        for _ in range(20):
            await asyncio.sleep(0)
        assert req(1).uid not in ing.seen and req(2).uid in ing.seen  # B still holds r2
        assert disp.forgotten == [req(1).uid]
    run(go())


def test_a_dropped_driver_is_told_even_when_a_claim_came_first(monkeypatch):
    async def go():
        now = [1000.0]
        monkeypatch.setattr(hub_module.time, "monotonic", lambda: now[0])
        hub = ResultHub()
        await hub.claim("A", [])
        now[0] += hub_module.CLIENT_IDLE_S + 20
        await hub.claim("B", [])
        await hub.push([res(1)])  # the idle check drops A
        await hub.claim("A", ["1:x/r5"])  # ingest claims for A before A pulls again
        assert await hub.pull(0, "A") is None  # A still learns that it was dropped
    run(go())


def test_a_result_sent_twice_in_one_push_is_counted_once():
    async def go():
        hub = ResultHub()
        await hub.push([res(1), res(1)], [1.0, 1.0])
        rep = await hub.report()
        assert rep["requests"] == 1 and rep["list_price_usd"] == 1.0
    run(go())


class Following:
    """Stands in for a cache where every request follows an identical one in flight, until it is let go."""

    def __init__(self):
        self.let_go: list[str] = []

    async def recall(self, uids, detach=False):
        if detach:
            self.let_go += uids
            return []
        return list(uids)

    async def lookup(self, jobs):
        return list(range(len(jobs)))

    async def forget(self, uids):
        pass


def test_the_sweeps_last_readmission_goes_past_a_cache_that_still_says_it_follows():
    async def go():
        hub, g, cache = ResultHub(), Groupers(), Following()
        ing = Ingest([g], cache=cache, hub=hub)
        assert await ing.readmit([req(1)], "A") == 0  # the cache says it follows: nothing sent
        assert cache.let_go == []
        assert await ing.readmit([req(1)], "A", force=True) == 1  # the sweep's last word: generated itself
        await settle()
        assert [j.req.id for j in g.jobs] == ["r1"]
        assert cache.let_go == [req(1).uid]  # and no longer following there
    run(go())


def test_a_failed_or_refused_result_counts_no_list_price_so_no_saving():
    """A run at an unreachable provider read "saving 89.8 %": each failed request's list price was counted as
    if it had been saved (a helper's tour)."""
    async def go():
        hub = ResultHub()
        failed = res(2).model_copy(update={"status": "failed", "error": "openai: connection refused"})
        rejected = res(3).model_copy(update={"status": "rejected", "error": "budget"})
        await hub.push([res(1), failed, rejected], [1.0, 1.0, 1.0])
        rep = await hub.report()
        assert rep["requests"] == 3 and rep["list_price_usd"] == 1.0
    run(go())


def test_a_restarted_ingest_still_refuses_an_id_reused_with_other_content():
    """Ingest's memory of which content each id names died with it: after a restart, another driver's request
    under a used id with other content got the first content's result, and its own was never generated (a hunt).
    Each claim leaves the hub the content's fingerprint, and a restarted ingest admits through it."""
    async def go():
        hub, g = ResultHub(), Groupers()
        first = Ingest([g], hub=hub)
        assert await first.submit([req(1), req(2)], "A") == 2
        await settle()
        await hub.push([res(1), res(2)])
        assert sorted(r.id for r in await hub.pull(0, "A")) == ["r1", "r2"]
        again = Ingest([g], hub=hub)  # Ray restarted it: built again from its arguments
        again.reconstructed()
        await again.submit([req(1, prompt="other"), req(2)], "B")
        await settle()
        got = {r.id: r for r in await hub.pull(0, "B")}
        assert got["r1"].status == "failed" and "field 'id'" in got["r1"].error  # never the other content's result
        assert got["r2"].output == "out 2"  # the same content: its result
        # Re-admitted by its driver (its submit died with the ingest): checked at the hub as well (a review).
        assert await again.readmit([req(1, prompt="other")], "C") == 0
        await settle()
        (refusal,) = await hub.pull(0, "C")
        assert refusal.status == "failed" and "field 'id'" in refusal.error
    run(go())


def test_a_restarted_ingest_takes_a_repeat_of_a_finished_request_for_a_repeat_and_never_generates_it_again(
        monkeypatch):
    """A restarted ingest had lost which ids it admitted, so a repeat of a request finished minutes before (same
    id, same content, another driver) went on as a new request: generated and paid a second time (a review). The
    hub knows the id with that content: the repeat claims the result, or is told it is gone, as before."""
    async def go():
        from actors import ingest as ingest_module

        monkeypatch.setattr(ingest_module, "REPEAT_LOOK_S", 0.0)
        monkeypatch.setattr(hub_module, "RECENT", 1)
        hub, g = ResultHub(), Holding(held=[req(3).uid])  # r3 still waits in the grouper
        first = Ingest([g], hub=hub, dispatchers=[Finisher(hub, {})])
        assert await first.submit([req(1), req(2), req(3)], "A") == 3
        await settle()
        await hub.push([res(1)])
        await hub.push([res(2)])  # r1 falls out of the hub's recent results
        assert sorted(r.id for r in await hub.pull(0, "A")) == ["r1", "r2"]
        again = Ingest([g], hub=hub, dispatchers=[Finisher(hub, {})])  # Ray restarted it
        again.reconstructed()
        # r3 is awaited by its driver: under way, or lost in transit with the old ingest (its driver re-admits
        # it). Taken for a finished one, B was told it was gone while A's re-admission generated it (a review):
        # it goes on as before, and the grouper (or the cache's in-flight table) keeps one copy.
        assert await again.submit([req(1), req(2), req(3), req(4)], "B") == 2  # r3 and r4
        for _ in range(20):
            await asyncio.sleep(0)  # the second look for r1
        got = {r.id: r for r in await hub.pull(0, "B")}
        assert got["r2"].output == "out 2"  # still at the hub: its result
        assert got["r1"].status == "failed" and "no longer held" in got["r1"].error  # gone: told so
        assert "r3" not in got and [j.req.id for j in g.jobs] == ["r1", "r2", "r3", "r3", "r4"]  # r1, r2: once
        await hub.push([res(3)])
        assert [r.id for r in await hub.pull(0, "B")] == ["r3"]  # comes when it is done
    run(go())
