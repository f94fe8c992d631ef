"""The actor classes driven directly, without Ray (peers are plain objects, time is a ManualClock)."""

import asyncio

import pytest

from actors import BudgetController, Dispatcher, Grouper, Ingest, ResultCache, ResultHub
from actors._types import BatchJob, Job
from actors.ingest import OWN_ROWS
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import Settings
from policies import load_policy
from tests.unit.helpers import Recorder

CAT = default_catalog()


def req(i, **kw):
    d = {"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 100 + i, "output_tokens": 10}
    d.update(kw)
    return Request.model_validate(d)


def run(coro):
    return asyncio.run(coro)


def batch_smart(params: dict | None = None):
    """Smart with the flex tier off, for the tests of its batch lane: gpt-5-mini takes OpenAI's flex tier, where
    smart would send these requests at once instead of to a batch."""
    return load_policy("smart", CAT, {"flex": False, **(params or {})})


def ledger(limit=None, **kw):
    specs = () if limit is None else (BudgetSpec(max_budget=limit, **kw),)
    return BudgetController(BudgetSettings(specs=specs), None, ManualClock(0.0))


class Seen(Recorder):
    """A stand-in dispatcher whose ``got`` is set once it is sent a dispatch: a test waits on it, not a sleep."""

    def __init__(self):
        super().__init__()
        self.got = asyncio.Event()

    async def run_many(self, batches, *learns):
        self.calls.append(("run_many", (batches,)))
        self.got.set()
        return True


async def ran_out(d: Dispatcher, clock: ManualClock) -> None:
    """Move engine time past every outcome of ``d`` (timers fire at once on a ManualClock) and wait on its tasks,
    new ones too, until none is left: each outcome it sends is then out."""
    for _ in range(1000):
        clock.advance(10_000.0)
        busy = [t for t in (*d._tasks, d._flusher) if t is not None and not t.done()]
        if busy:
            await asyncio.wait(busy, timeout=10.0)
        elif d._timers or d._pump_timer is not None:
            await asyncio.sleep(0)  # a timer due now (a ManualClock waits 0 s): let it fire
        else:
            return
    raise AssertionError(f"dispatcher still busy: {d._tasks}, timers {d._timers}")


async def nearly_spent(held: float):
    """A $1 budget and its controller, with an open claim ("open") holding ``held`` of it: work waits for it."""
    spec = BudgetSpec(max_budget=1.0)
    budget = BudgetController(BudgetSettings(specs=(spec,)), None, ManualClock(0.0))
    await budget.reserve_many([Claim("open", "default", "openai", "gpt-5-mini", "urgent", held)])
    return spec, budget


def test_budget_controller_refuses_past_the_limit_and_settles():
    async def go():
        b = ledger(1.0)
        c = [Claim(k, "t", "openai", "gpt-5-mini", "urgent", amt) for k, amt in (("a", 0.6), ("b", 0.5), ("c", 0.4))]
        assert [v.ok for v in await b.reserve_many(c)] == [True, False, True]
        await b.settle_many([("a", 0.2)])  # settles and releases "a" in one step
        rep = await b.report()
        assert rep["spent_usd"] == pytest.approx(0.2) and rep["budgets"][0]["remaining_usd"] == pytest.approx(0.4)
        assert rep["refusals"]["wait"] == 1 and rep["overrun_usd"] == 0.0
        assert rep["spend"] == [{"tenant": "t", "provider": "openai", "model": "gpt-5-mini", "spent_usd": 0.2}]
        with pytest.raises(ValueError, match="amount must be >= 0"):
            await b.reserve_many([Claim("d", "t", "openai", "gpt-5-mini", "urgent", -1.0)])
    run(go())


def test_budget_controller_reports_deferrals_in_engine_time():
    async def go():
        b = BudgetController(BudgetSettings(specs=(BudgetSpec(max_budget=1.0, budget_duration="1h"),)), None,
                             ManualClock(100.0), base=7200.0)
        (v,) = await b.reserve_many([Claim("a", "t", "openai", "gpt-5-mini", "background", 0.9)])
        # budget time 7,300 s is in the window [7,200, 10,800): it ends at engine time 10,800 - 7,200
        assert (v.ok, v.reason, v.retry_at) == (False, "deferred", 3600.0)
    run(go())


def test_hub_long_poll_and_report():
    async def go():
        from engine.core.result import Result

        hub = ResultHub()
        assert await hub.pull(0.01) == []
        waiter = asyncio.create_task(hub.pull(5.0))
        await asyncio.sleep(0)
        await hub.push([Result(id="x", status="ok", cost_usd=1.0, mode="sync", provider="openai",
                               deadline_met=True)], [2.0])
        assert [r.id for r in await waiter] == ["x"]
        rep = await hub.report()
        assert rep["saving_usd"] == pytest.approx(1.0) and rep["deadline_met_frac"] == 1.0
    run(go())


def test_cache_hits_attaches_in_flight_and_resolves_followers():
    async def go():
        hub = ResultHub()
        clock = ManualClock(10.0)
        cache = ResultCache(ReuseSettings(exact=True, in_flight=True), hub, clock)
        a, b = req(1), req(1, id="dup")  # same content, new id
        none = req(1, id="noreuse", reuse="none")
        misses = await cache.lookup([Job(0, a, "fp"), Job(1, b, "fp"), Job(2, none, "fp")])
        assert misses == [0, 2]  # positions of r1 and noreuse; b attached to a in flight
        from engine.core.result import Result

        await cache.complete([("fp", Result(id="r1", status="ok", cost_usd=0.1, done_s=12.0))])
        got = {r.id: r for r in await hub.pull(0.01)}
        assert got["dup"].status == "reused" and got["dup"].hit == "in_flight" and got["dup"].done_s == 12.0
        later = await cache.lookup([Job(3, req(1, id="later"), "fp")])
        assert later == [] and (await hub.pull(0.01))[0].hit == "exact"
    run(go())


def test_an_engines_cache_hands_its_misses_to_the_groupers_itself():
    # One actor leg less for every generated request: the cache sends its misses on, ingest sends nothing.
    async def go():
        hub = ResultHub()
        g0, g1 = Recorder(), Recorder()
        cache = ResultCache(ReuseSettings(exact=True, in_flight=True), hub, ManualClock(10.0), groupers=[g0, g1])
        ing = Ingest([g0, g1], cache=cache)
        models = ["gpt-5-mini", "claude-haiku-4-5", "gemini-2.5-flash"]
        reqs = [req(i, model=models[i % 3], prompt=f"p{i}") for i in range(6)]
        twin = req(0, id="twin", model=models[0], prompt="p0")  # same content as reqs[0]: follows it in flight
        assert await ing.submit([*reqs, twin]) == 7
        await asyncio.sleep(0)  # let the sends run
        sent = [j.req.id for g in (g0, g1) for _, (jobs,) in g.calls for j in jobs]
        assert sorted(sent) == sorted(r.id for r in reqs)  # each miss once (not by both); the follower not at all
        assert {j.req.model for _, (jobs,) in g0.calls for j in jobs}.isdisjoint(
            {j.req.model for _, (jobs,) in g1.calls for j in jobs})  # a class reaches one grouper
        assert cache.stats["miss"] == 6 and cache.stats["in_flight"] == 1
        g0.calls.clear(), g1.calls.clear()
        late = Job(7, req(7, prompt="new"), "fp-new")
        assert await cache.lookup([late]) == []  # handed on, not returned to the caller
        await asyncio.sleep(0)
        assert [j.req.id for g in (g0, g1) for _, (jobs,) in g.calls for j in jobs] == ["r7"]
    run(go())


def test_ingest_drops_duplicate_ids_and_shards_by_compat_key():
    async def go():
        g0, g1 = Recorder(), Recorder()
        ing = Ingest([g0, g1], cache=None)
        reqs = [req(i, model=m) for i, m in enumerate(["gpt-5-mini", "claude-haiku-4-5", "gemini-2.5-flash"] * 3)]
        assert await ing.submit(reqs, None, list(range(100, 109))) == 9  # the driver's rows
        assert await ing.submit(reqs[:4]) == 0 and ing.duplicates == 4
        await asyncio.sleep(0)
        sent = [j for g in (g0, g1) for _, (jobs,) in g.calls for j in jobs]
        assert sorted(j.req.id for j in sent) == sorted(r.id for r in reqs)
        for g in (g0, g1):  # one model never spans two groupers
            models = [{j.req.model for j in jobs} for _, (jobs,) in g.calls]
            assert all(not (m & {j.req.model for _, (js,) in (g1 if g is g0 else g0).calls for j in js})
                       for m in models)
        assert {j.req.id: j.seq for j in sent} == {r.id: 100 + k for k, r in enumerate(reqs)}
        late = req(99)
        assert await ing.submit([late]) == 1  # no row given (a re-admission): one of ingest's own
        await asyncio.sleep(0)
        (own,) = [j.seq for g in (g0, g1) for _, (jobs,) in g.calls for j in jobs if j.req.id == late.id]
        assert own >= OWN_ROWS
    run(go())


def test_grouper_waits_then_dispatches_after_a_reservation():
    async def go():
        disp, hub = Recorder(), ResultHub()
        budget = ledger(100.0)
        clock = ManualClock(0.0)
        g = Grouper(load_policy("fixed", CAT, {"max_batch_size": 2, "batch_wait_timeout_s": 100}), CAT, clock,
                    {"openai": disp}, budget, hub)
        await g.add([Job(0, req(0), "a")])
        await asyncio.sleep(0)
        assert disp.calls == [] and (await g.stats())["pending"] == 1
        await g.add([Job(1, req(1), "b")])
        await asyncio.sleep(0)
        (name, ([batch],)), = disp.calls
        assert name == "run_many" and batch.mode == "sync" and [j.req.id for j in batch.jobs] == ["r0", "r1"]
        assert batch.recommendation == "process_as_batch" and all(j.claim for j in batch.jobs)
        # Each member reserved its upper bound: the model's whole output at list price, at least its cost.
        gpt = CAT.model("openai", "gpt-5-mini")
        bound = sum((j.req.input_tokens * gpt.input_per_mtok + gpt.max_output_tokens * gpt.output_per_mtok) * 1e-6
                    for j in batch.jobs)
        assert sum(budget.book.reserved.values()) == pytest.approx(bound)
    run(go())


def test_grouper_rejects_when_the_budget_is_spent():
    async def go():
        disp, hub = Recorder(), ResultHub()
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": disp}, ledger(0.0), hub)
        await g.add([Job(0, req(0), "a")])
        (res,) = await hub.pull(0.01)
        # The dispatcher was only asked whether it serves the request (a re-admitted copy), never sent it.
        assert res.status == "rejected" and res.error == "budget_exhausted"
        assert [name for name, _ in disp.calls] == ["holds"]
        assert res.reason.startswith("budget global has $0.000000 left, and this request reserves up to $")
    run(go())


def test_a_policy_error_fails_its_requests_not_the_engine():
    class Broken:
        name = "broken"

        def group_key(self, req, compat, now):
            raise RuntimeError("boom")

    async def go():
        hub = ResultHub()
        g = Grouper(Broken(), CAT, ManualClock(0.0), {}, ledger(), hub)
        await g.add([Job(0, req(0), "a")])
        (res,) = await hub.pull(0.01)
        assert res.status == "failed" and "policy error: boom" in res.error
    run(go())


def test_dispatcher_resolves_sync_and_batch_and_hands_back_hedges():
    async def go():
        hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
        clock = ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, budget)
        jobs = [Job(i, req(i), f"fp{i}", claim=f"c{i}") for i in range(3)]
        hedged = Job(9, req(3), "fp3", claim="c9")
        await budget.reserve_many([Claim(f"c{k}", "t", "openai", "gpt-5-mini", "urgent", 1.0) for k in (0, 1, 2, 9)])
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", jobs[:1]),
                          BatchJob("b1", "batch_api", None, False, "process_as_batch", "cheap", jobs[1:]),
                          BatchJob("b2", "batch_api", 1.0, False, "consider_batch", "hedged", [hedged])])
        await ran_out(d, clock)
        got = {r.id: r for r in await hub.pull(0.01)}
        assert got["r0"].mode == "sync" and got["r1"].mode == "batch_api" and got["r2"].batch_id == "b1"
        assert got["r1"].cost_usd < got["r0"].cost_usd
        # The hedged batch went back to the policy holding its claim: the grouper releases it in the call that
        # reserves the fallback.
        (name, (readmit,)), = grouper.calls
        assert name == "add" and readmit[0].hedges == 1 and readmit[0].claim == "c9"
        book = budget.book
        assert set(book.claims) == {"c9"}  # every other member settled and released
        assert sum(book.spend.values()) == pytest.approx(got["r0"].cost_usd + got["r1"].cost_usd + got["r2"].cost_usd)
    run(go())


@pytest.mark.parametrize("claimed", [True, False])
def test_a_batch_whose_hedge_passed_on_the_way_goes_back_with_its_claim_not_sync_on_a_batch_price_claim(claimed):
    # Its members reserved the batch price; sent sync they may cost twice that, past the budget. They go back
    # to the grouper as a hedge does, and it reserves the sync price. An urgent member reserved sync: it goes.
    # Without a budget (no claim) too: the policy may still send it in a second batch (``goes_back``).
    async def go():
        hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
        clock = ManualClock(50.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, budget)
        c0, c1 = ("c0", "c1") if claimed else (None, None)
        normal, urgent = Job(0, req(0), "fp0", claim=c0), Job(1, req(1, priority="urgent"), "fp1", claim=c1)
        if claimed:
            await budget.reserve_many([Claim(f"c{k}", "default", "openai", "gpt-5-mini", "normal", 1.0)
                                       for k in (0, 1)])
        await d.run_many([BatchJob("b", "batch_api", 40.0, False, "consider_batch", "late", [normal, urgent])])
        await ran_out(d, clock)
        (name, (back,)), = grouper.calls
        assert name == "add" and [(j.req.id, j.claim, j.hedges) for j in back] == [("r0", c0, 1)]
        got = {r.id: r for r in await hub.pull(0.01)}
        assert set(got) == {"r1"} and got["r1"].mode == "sync"
        assert set(budget.book.claims) == ({"c0"} if claimed else set())  # c0 held until the grouper releases it
    run(go())


def test_a_hedged_claim_is_released_in_the_call_that_reserves_its_fallback():
    from engine.core.cost import reserve_bound

    async def go():
        disp, hub = Recorder(), ResultHub()
        budget = ledger(1.0)
        r = req(0, output_tokens=100, priority="urgent")
        need = reserve_bound(r, CAT, "sync", r.output_tokens)
        # The hedged member holds all but half of what its sync fallback needs: it fits only once released.
        await budget.reserve_many([Claim("held", "default", "openai", "gpt-5-mini", "urgent", 1.0 - need / 2)])
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": disp}, budget, hub,
                    reserve_model_max=False)
        await g.add([Job(0, r, "fp", hedges=1, claim="held")])
        await asyncio.sleep(0)  # the dispatcher's call is a task of its own (send does not wait)
        (name, ([batch],)), = disp.calls
        assert batch.jobs[0].claim not in (None, "held") and set(budget.book.claims) == {batch.jobs[0].claim}
        assert sum(budget.book.reserved.values()) == pytest.approx(need)
    run(go())


def test_the_grouper_tells_its_policy_which_budgets_hold_work_back():
    """The live half of smart's budget rule (tests/unit/test_budget_policy.py): after a reservation that holds
    work back, the group table's ``BudgetPressure`` names the budget, as the simulator's does."""
    async def go():
        disp, hub = Recorder(), ResultHub()
        spec, budget = await nearly_spent(0.999)
        clock = ManualClock(0.0)
        g = Grouper(load_policy("naive", CAT), CAT, clock, {"openai": disp}, budget, hub, budget_specs=(spec,))
        assert g.table.budget.model_max and g.table.budget.holding == ()
        await g.add([Job(0, req(0), "fp")])
        assert disp.calls == [] and len(g.waits) == 1  # it waits for the open claim to settle
        assert g.table.budget.holding == (spec,) and g.table.budget.holds(req(1))
        clock.advance(g._park_step)
        g._retry_parked()  # tried again while the open claim still holds the room: held again
        assert g.table.budget.holding == (spec,)  # also while the retry's reservation is under way
        while g._tasks:
            await asyncio.gather(*list(g._tasks))
        assert disp.calls == [] and len(g.waits) == 1 and g.table.budget.holding == (spec,)
        await budget.settle_many([("open", 0.0)])
        clock.advance(g._park_step)
        g._retry_parked()  # the timer's call, made at once
        while g._tasks:
            await asyncio.gather(*list(g._tasks))
        await asyncio.sleep(0)  # the dispatcher's call is a task of its own
        assert len(disp.calls) == 1 and g.table.budget.holding == ()
    run(go())


def test_a_rejected_leader_hands_its_in_flight_followers_back():
    """Identical requests that follow a leader in the cache must not hang when the leader is rejected."""
    follower = Job(1, req(1), "same-fp")

    class Cache:
        def __init__(self):
            self.asked = []

        async def orphans(self, failed):
            self.asked.append(failed)
            return [follower] if failed == [("same-fp", req(0).uid)] and len(self.asked) == 1 else []

    async def go():
        disp, hub, cache = Recorder(), ResultHub(), Cache()
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": disp}, ledger(0.0), hub,
                    cache=cache)
        await g.add([Job(0, req(0), "same-fp")])
        got = {r.id: r for r in await hub.pull(0.01)}
        assert set(got) == {"r0", "r1"} and all(r.status == "rejected" for r in got.values())
        assert cache.asked == [[("same-fp", req(0).uid)], [("same-fp", req(1).uid)]]
    run(go())


# --- faults a runtime must contain: a budget call that failed, a policy that failed -----------------------------

class FlakyBudget:
    """A budget controller whose first ``reserve_many`` fails before reaching the ledger (as a Ray call to a
    restarting actor does); every other call goes through."""

    def __init__(self, inner, fail_reserves: int = 1):
        self.inner, self.fail = inner, fail_reserves

    async def reserve_many(self, claims, release=()):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("ActorUnavailableError: the budget controller is restarting")
        return await self.inner.reserve_many(claims, release)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_hedged_claim_is_released_even_when_the_reservation_call_failed():
    async def go():
        disp, hub = Recorder(), ResultHub()
        inner = ledger(100.0)
        await inner.reserve_many([Claim("held", "default", "openai", "gpt-5-mini", "urgent", 5.0)])
        clock = ManualClock(0.0)
        g = Grouper(load_policy("naive", CAT), CAT, clock, {"openai": disp}, FlakyBudget(inner), hub)
        r = req(0, priority="urgent", deadline_s=3600.0)
        await g.add([Job(0, r, "fp", hedges=1, claim="held")])  # a hedged batch member, back with its claim
        assert disp.calls == [] and len(g.waits) == 1  # the call failed: it waits and tries again
        for _ in range(5):
            clock.advance(g._park_step)
            g._retry_parked()
            while g._tasks:
                await asyncio.gather(*list(g._tasks))
            await asyncio.sleep(0)
            if disp.calls:
                break
        (name, ([batch],)), = disp.calls
        (j,) = batch.jobs
        # Only the fallback's claim is open: the hedged member's claim was let go.
        assert set(inner.book.claims) == {j.claim}, f"open claims: {sorted(inner.book.claims)}"
    asyncio.run(go())


class FlakyOnce:
    """The ``fixed`` policy (batches of 3), whose ``decide`` fails once, for a group of two."""

    def __init__(self):
        self.inner = load_policy("fixed", CAT, {"max_batch_size": 3, "batch_wait_timeout_s": 100})
        self.name = self.inner.name
        self.failed = False

    def group_key(self, *a, **kw):
        return self.inner.group_key(*a, **kw)

    def decide(self, g, now):
        if len(g.members) == 2 and not self.failed:
            self.failed = True
            raise RuntimeError("transient policy bug")
        return self.inner.decide(g, now)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_transient_policy_error_fails_its_request_and_loses_no_other():
    async def go():
        disp, hub = Recorder(), ResultHub()
        g = Grouper(FlakyOnce(), CAT, ManualClock(0.0), {"openai": disp}, ledger(), hub, budget_limited=False)
        await g.add([Job(0, req(0), "a")])  # waits for company
        await g.add([Job(1, req(1), "b")])  # the policy fails: r1 (at least) fails
        try:
            await g.add([Job(2, req(2), "c")])  # before the fix: completes a batch with r1, still in the group
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"the grouper's add raised {exc!r}: its dispatch is lost") from exc
        await asyncio.sleep(0)
        failed = [r.id for r in await hub.pull(0.01)]
        assert "r1" in failed
        sent = [j.req.id for name, (batches,) in disp.calls if name == "run_many" for b in batches for j in b.jobs]
        waiting = sorted(r.id for grp in g.table.groups.values() for r in grp.members)
        # Every request is dispatched once, resolved here, or waiting in a group of the table, exactly one of them;
        # the grouper holds (pending) exactly what the table waits on: nothing held that no decision will send.
        assert sorted(sent + failed + waiting) == ["r0", "r1", "r2"], (sent, failed, waiting)
        assert sorted(j.req.id for j in g.pending.values()) == waiting, (sorted(g.pending), waiting)
    asyncio.run(go())


class FailsOnBad:
    """The naive policy, except that it fails on one prompt (a policy error ends that request in the grouper)."""

    def __init__(self):
        self.inner = load_policy("naive", CAT)

    def group_key(self, req, compat, now):
        if req.prompt == "bad":
            raise RuntimeError("boom")
        return self.inner.group_key(req, compat, now)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_id_used_again_after_it_was_forgotten_is_generated_not_answered_with_the_old_result():
    async def go():
        hub, disp = ResultHub(), Recorder()
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        g = Grouper(FailsOnBad(), CAT, ManualClock(0.0), {"openai": disp}, budget, hub)
        ing = Ingest([g], cache=None, hub=hub)
        await hub.claim("d1", [])
        old = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "bad"})
        assert await ing.submit([old], "d1") == 1
        (res,) = await hub.pull(0.5, "d1")
        assert res.status == "failed" and "policy error" in res.error
        # The driver's retention window passed: it forgets the id, which may now name a new request.
        await ing.forget([old.uid], "d1")
        new = old.model_copy(update={"prompt": "a good question"})
        assert await ing.submit([new], "d1") == 1
        await asyncio.sleep(0)
        got = await hub.pull(0.05, "d1")
        assert got == [], f"the new request got the forgotten one's result: {got}"
        assert [name for name, _ in disp.calls][-1] == "run_many"  # generated
    asyncio.run(go())


def test_ingest_s_forget_returns_only_once_the_hub_has_forgotten_the_id():
    """The driver sends a new request under a forgotten id once ingest's ``forget`` has returned. A hub that
    still held the id then answered the new request with the old result (and did not count it): ingest awaits
    the hub's forget, not only sends it. No loop turn is given between the two here."""
    async def go():
        hub = ResultHub()
        ing = Ingest([Recorder()], cache=None, hub=hub)
        r = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "q"})
        await hub.claim("d1", [])
        await hub.push([Result(id="a", status="ok", output="old", cost_usd=0.01)])
        assert await hub.claim("d1", [r.uid]) == []  # held: a claim is answered with it
        await ing.forget([r.uid])
        assert await hub.claim("d1", [r.uid]) == [r.uid]  # forgotten: a new request waits for its own
    asyncio.run(go())


def test_a_copy_readmitted_while_a_failed_request_is_being_ended_is_not_sent_beside_its_failure():
    """A request ends in the grouper (here its policy fails once), and while the grouper asks the dispatcher
    whether a copy of it is already under way, the driver re-admits the request (an actor restarted elsewhere).
    The copy was neither pending nor ended then: it was dispatched, billed, and its result dropped as a
    duplicate of the failure the driver got."""

    class FailsOnce:
        def __init__(self) -> None:
            self.inner, self.failed = load_policy("naive", CAT), False

        def group_key(self, req, compat, now):
            if not self.failed:
                self.failed = True
                raise RuntimeError("a transient policy error")
            return self.inner.group_key(req, compat, now)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class SlowHolds:
        """Answers ``holds`` when the test lets it (an actor call's latency); records what it is sent."""

        def __init__(self) -> None:
            self.asked, self.answer, self.ran = asyncio.Event(), asyncio.Event(), []

        async def holds(self, uids):
            self.asked.set()
            await self.answer.wait()
            return []

        async def run_many(self, batches, *learn):
            self.ran += [j.req.id for b in batches for j in b.jobs]

    async def go():
        hub, disp = ResultHub(), SlowHolds()
        g = Grouper(FailsOnce(), CAT, ManualClock(0.0), {"openai": disp},
                    BudgetController(BudgetSettings(), None, ManualClock(0.0)), hub)
        r = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "q",
                                    "priority": "urgent"})
        first = asyncio.create_task(g.add([Job(0, r, "fp")]))
        await disp.asked.wait()
        await g.add([Job(1, r, "fp")])  # the copy, re-admitted
        disp.answer.set()
        await first
        got = [(x.id, x.status) for x in await hub.pull(0.01)]
        assert got == [("a", "failed")] and disp.ran == [], (got, disp.ran)
    asyncio.run(go())


def test_grouper_keeps_members_back_from_a_hedge_together_and_apart_from_fresh_work():
    """A dispatcher re-admits the members of a batch cancelled late with ``hedges`` counted: the grouper tells its
    table so (``returned``), and smart gives them one group of their own, with no second checkpoint."""
    async def go():
        disp, hub = Recorder(), ResultHub()
        g = Grouper(batch_smart(), CAT, ManualClock(1500.0), {"openai": disp}, ledger(), hub)
        big = {"input_tokens": 20_000, "output_tokens": 800, "deadline_s": 3600.0}
        back = [Job(i, req(i, **big), f"fp{i}", hedges=1) for i in range(3)]
        fresh = Job(9, req(9, arrival_s=1500.0, **big), "fp9")
        await g.add(back + [fresh])
        groups = {key: grp for key, grp in g.table.groups.items() if grp.members}
        (key,) = [k for k, grp in groups.items() if any(r.id == "r0" for r in grp.members)]
        assert key[2][0] == "back" and [r.id for r in groups[key].members] == ["r0", "r1", "r2"]
        assert groups[key].returned == {j.req.uid for j in back}
        assert not any(r.id == "r9" for r in groups[key].members)
    run(go())


def test_grouper_sends_a_lanes_conversations_due_together_in_one_provider_batch():
    """The live grouper runs the same table as the simulator: two conversations of one lane, due 5 s apart,
    reach the dispatcher as one batch-API batch (smart's riders), not one per conversation."""
    async def go():
        disp, hub = Seen(), ResultHub()
        g = Grouper(load_policy("smart", CAT), CAT, ManualClock(0.0), {"anthropic": disp}, ledger(), hub)
        conv = {"model": "claude-sonnet-4-5", "input_tokens": 5120, "output_tokens": 300, "deadline_s": 86_400.0,
                "priority": "background"}
        jobs = [Job(i, req(i, arrival_s=5.0 * i, prefix_blocks=[100 * i + k for k in range(10)], **conv), f"fp{i}")
                for i in range(2)]
        await g.add(jobs)
        assert len(g.table.groups) == 2  # a group per conversation while they gather
        await disp.got.wait()
        (name, ([batch],)), = disp.calls
        assert batch.mode == "batch_api" and sorted(j.req.id for j in batch.jobs) == ["r0", "r1"]
        assert (await g.stats())["pending"] == 0 and not g.table.groups
    run(go())



def test_a_try_whose_members_all_went_back_leaves_the_share_of_the_next_try():
    """The members of a held batch all go back to the policy (its checkpoint passed): the reservation of what
    is left reserves nothing, and, as in the simulator, the share of held work the next try takes stays. Taken
    for a try that succeeded, it doubled, and the two runtimes then took different numbers of held requests."""
    async def go():
        spec, budget = await nearly_spent(0.5)
        g = Grouper(load_policy("smart", CAT), CAT, ManualClock(0.0), {"openai": Seen()}, budget, ResultHub(),
                    budget_specs=(spec,))
        g.waits.share = 16
        assert await g._reserve([], 0.0, []) == [] and g.waits.share == 16
        await g._reserve([BatchJob("b", "sync", None, False, "t", "t", [Job(0, req(0), "fp")])], 0.0, [])
        assert g.waits.share == 32  # a reservation that went through: the share grows
    run(go())

@pytest.mark.parametrize("model_max", [False, True])
def test_a_batch_a_budget_holds_past_its_checkpoint_goes_back_to_the_grouper_policy(model_max):
    """The live half of tests/unit/test_second_batch.py's budget case: a batch held back by a budget until past
    its checkpoint goes back to the policy, as at a hedge, and leaves in a second batch with a hedge of its own,
    not as the first batch's members past their hedge (the dispatcher sent those sync, at the full price)."""
    async def go():
        disp, hub = Seen(), ResultHub()
        spec, budget = await nearly_spent(0.9999)
        clock = ManualClock(0.0)
        pol = batch_smart({"min_batch_saving_usd": 0.0, "batch_gather_s": 0})
        g = Grouper(pol, CAT, clock, {"openai": disp}, budget, hub, budget_specs=(spec,),
                    reserve_model_max=model_max)
        r = req(0, input_tokens=20_000, output_tokens=800, max_output_tokens=800, deadline_s=3600.0)
        await g.add([Job(0, r, "fp")])
        (held,) = [h.payload[1] for h in g.waits.held.values()]
        assert disp.calls == [] and held.mode == "batch_api" and held.hedge_at < 3000.0
        await budget.settle_many([("open", 0.0)])
        clock.advance(held.hedge_at + 1.0)  # the room is free again, but only after the checkpoint
        g._retry_parked()
        await asyncio.wait_for(disp.got.wait(), 10.0)
        (name, ([batch],)), = disp.calls
        (j,) = batch.jobs
        assert batch.mode == "batch_api" and batch.hedge_at > clock.now() and j.hedges == 1
        assert (await g.stats())["pending"] == 0 and len(g.waits) == 0
        assert set(budget.book.claims) == {j.claim}  # the second batch's claim alone, no sync price first
    run(go())


def test_the_grouper_judges_the_requests_of_one_arrival_instant_together():
    """The live half of test_second_batch.py's burst: ten small requests of one instant in one call gather as
    one batch; decided one by one, the first two went sync at once at the full price."""
    async def go():
        disp = Seen()
        g = Grouper(batch_smart(), CAT, ManualClock(0.0), {"openai": disp}, ledger(), ResultHub())
        jobs = [Job(k, req(k, input_tokens=20, output_tokens=256, deadline_s=86400.0), f"fp{k}") for k in range(10)]
        await g.add(jobs)
        assert disp.calls == [] and [len(grp) for grp in g.table.groups.values()] == [10]
    run(go())



def test_the_in_flight_gauge_falls_back_when_work_ends_and_every_gauge_is_sent_again_to_a_restarted_hub():
    """``smartbatch_queue_depth`` was set only as work started, so it kept its peak after the work ended (a hunt:
    8 in flight 10 s after all 8 had answered); and a restarted hub had no gauge until its source next moved."""
    async def go():
        hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
        clock = ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, budget)
        jobs = [Job(i, req(i), f"fp{i}", claim=f"c{i}") for i in range(3)]
        await budget.reserve_many([Claim(f"c{k}", "t", "openai", "gpt-5-mini", "urgent", 1.0) for k in range(3)])
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", jobs)])
        await ran_out(d, clock)
        await d.flush()
        await asyncio.gather(*list(d.hub._tasks))
        assert len(await hub.pull(0.01)) == 3
        depth = lambda h: h.metrics.registry.get_sample_value("smartbatch_queue_depth", {"provider": "openai"})  # noqa: E731
        assert depth(hub) == 0.0
        # The hub restarts with empty metrics; the dispatcher sends its gauges again.
        hub.metrics = type(hub.metrics)()
        assert depth(hub) is None
        await d.report_again()
        await d.flush()
        await asyncio.gather(*list(d.hub._tasks))  # the sends to the hub (tasks, as to an actor)
        assert depth(hub) == 0.0
        assert hub.metrics.registry.get_sample_value("smartbatch_circuit_breaker_open_bool",
                                                     {"provider": "openai", "model": "gpt-5-mini"}) == 0.0
    run(go())


def test_the_last_report_of_a_burst_reaches_the_metrics_once_its_time_comes(tmp_path):
    """The cache reports at most every half second; the last lookups of a burst were never reported, and the
    metrics kept what they had before it ended (a hunt: 9 memory entries where the cache held 12)."""
    from engine.core.features import fingerprint

    async def go():
        hub = ResultHub()
        cache = ResultCache(ReuseSettings(exact=True), hub, ManualClock(0.0),
                            settings=Settings(cache={"blob_dir": str(tmp_path)}))
        entries = lambda: hub.metrics.registry.get_sample_value("smartbatch_cache_entries", {"layer": "memory"})  # noqa: E731
        for i in range(4):
            r = req(i)
            j = Job(i, r, fingerprint(r))
            assert await cache.lookup([j]) == [0]
            await cache.complete([(j.fp, Result(id=r.id, tenant=r.tenant, status="ok", output="x", cost_usd=0.01,
                                                mode="sync", provider=r.provider, model=r.model, done_s=1.0))])
        assert len(cache.memory) == 4
        await asyncio.wait_for(cache._trailing, timeout=5.0)  # due half a second after the first report
        assert entries() == 4.0
        await cache.report_again()
        assert entries() == 4.0
    run(go())


def test_a_request_ingest_readmits_releases_the_claim_its_lost_dispatch_held():
    """A dispatcher killed with work queued loses its jobs and their claims; ingest re-admits the requests (nobody
    holds them) and the grouper reserves again. The old claims were never settled and held the hard budget for the
    reservation TTL, two days (a hunt: $1.79 of a $2 budget held, and every later request refused). Released only
    once the dispatcher says it does not hold the request: a dispatch still on its way is not lost, and released,
    its spend would count nothing (a review)."""
    from actors._types import OWN_ROWS

    class Dispatcher_(Recorder):
        def __init__(self, keeps: bool):
            super().__init__()
            self.keeps = keeps

        async def holds(self, uids):
            return list(uids) if self.keeps else []

    async def go(keeps: bool):
        hub, budget, d = ResultHub(), ledger(10.0), Dispatcher_(keeps)
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": d}, budget, hub)
        r = req(0, priority="urgent")
        await g.add([Job(0, r, "fp")])
        (first,) = set(budget.book.claims)
        await g.add([Job(OWN_ROWS, r, "fp")])  # ingest re-admits it
        await asyncio.gather(*list(g._tasks))  # its old claim judged, then it joins (a task of its own)
        await asyncio.gather(*g._runs.get("openai", ()))
        claims = set(budget.book.claims)
        assert [name for name, _ in d.calls].count("run_many") == 2
        if keeps:  # still held by its dispatcher (its copy is dropped there, its claim settled at 0)
            assert first in claims and len(claims) == 2
            return
        (second,) = claims
        assert second != first
        # A job of another model (rerouted) keeps its old claim: its dispatcher settles that one.
        other = req(1, priority="urgent")
        await g.add([Job(1, other, "fp1")])
        await g.add([Job(OWN_ROWS + 1, other.model_copy(update={"model": "gpt-5"}), "fp1")])
        assert len(budget.book.claims) == 3

    run(go(False))
    run(go(True))


def test_a_lost_claim_is_judged_once_its_dispatcher_is_back_from_a_restart_under_the_question():
    """A dispatcher restarted while the grouper asked whether it holds a re-admitted request (a fault test killed
    it twice): the question failed and the old claim stayed held until the engine stopped, holding budget that
    later requests were refused for. It is asked again once the dispatcher is back."""
    from ray.exceptions import ActorUnavailableError

    from actors._types import OWN_ROWS

    class Restarting(Recorder):
        def __init__(self):
            super().__init__()
            self.asked = 0

        async def holds(self, uids):
            self.asked += 1
            if self.asked == 1:
                raise ActorUnavailableError("the actor was restarted", None)
            return []

    async def go():
        hub, budget, d = ResultHub(), ledger(10.0), Restarting()
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": d}, budget, hub)
        r = req(0, priority="urgent")
        await g.add([Job(0, r, "fp")])
        (first,) = set(budget.book.claims)
        await g.add([Job(OWN_ROWS, r, "fp")])  # ingest re-admits it
        await asyncio.wait_for(asyncio.gather(*list(g._tasks)), 10.0)
        await asyncio.gather(*g._runs.get("openai", ()))
        assert d.asked == 2 and first not in budget.book.claims and len(budget.book.claims) == 1
    run(go())


def test_a_delivered_message_is_asked_again_while_its_actor_restarts():
    """``Peer.deliver``: a settlement sent as the budget controller died was lost, and the spend with it."""
    from ray.exceptions import RayActorError

    from actors._peer import Peer

    async def go():
        got, fails = [], [RayActorError(), RayActorError()]

        class Method:  # as a Ray actor method: ``.remote`` gives an awaitable, which fails while it restarts
            def remote(self, *args):
                return self._run(args)

            async def _run(self, args):
                if fails:
                    raise fails.pop()
                got.append(len(args))

        class Handle:
            settle_many = Method()

        peer = Peer(Handle())
        peer._is_ray = True
        peer.deliver("settle_many", [("c1", 0.5)])
        await asyncio.wait_for(asyncio.gather(*list(peer._tasks)), timeout=10.0)
        assert got == [1] and not fails  # delivered once, after two failures
    run(go())


def test_what_the_report_counts_per_dispatcher_survives_its_restart():
    """Paid twice, possibly billed, re-attached: counted in the dead process only, the report read 0 after a restart
    where the bill had requests paid twice (a hunt); and a call cut by two restarts was charged as one."""
    async def go():
        hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
        d = Dispatcher("openai", CAT, Settings(), 0, ManualClock(0.0), [grouper], hub, None, budget)
        d.paid_twice, d.paid_twice_usd, d.possibly_billed, d.possibly_billed_usd = 3, 0.012, 1, 0.004
        d._unanswered["1:t/r7"] += 2
        await d.flush()
        again = Dispatcher("openai", CAT, Settings(), 0, ManualClock(0.0), [grouper], hub, None, budget)
        await again.recover()
        s = await again.stats()
        assert (s["paid_twice"], s["paid_twice_usd"], s["possibly_billed"], s["possibly_billed_usd"]) == (3, 0.012, 1,
                                                                                                       0.004)
        assert again._unanswered["1:t/r7"] == 2
        again.paid_twice += 1
        await again.flush()
        third = Dispatcher("openai", CAT, Settings(), 0, ManualClock(0.0), [grouper], hub, None, budget)
        await third.recover()
        assert (await third.stats())["paid_twice"] == 4  # the totals of every process, each counted once
    run(go())


def test_a_dispatcher_slow_to_say_what_it_holds_holds_back_no_other_work():
    """A re-admitted request waits for its dispatcher to judge its old claim (restarting, it reads its journal
    first): the other requests of the same call were held back with it, an urgent one of another provider too (a
    review). The judging is a task of its own now, and the request joins its group after it."""
    from actors._types import OWN_ROWS

    answer = asyncio.Event()

    class Slow(Recorder):
        async def holds(self, uids):
            await answer.wait()
            return []

    async def go():
        slow, other = Slow(), Recorder()
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": slow, "anthropic": other},
                    ledger(10.0), ResultHub())
        r = req(0, priority="urgent")
        await g.add([Job(0, r, "fp")])
        await g.add([Job(OWN_ROWS, r, "fp"), Job(1, req(1, model="claude-haiku-4-5", priority="urgent"), "fp1")])
        await asyncio.gather(*g._runs.get("anthropic", ()))
        assert [name for name, _ in other.calls] == ["run_many"]  # sent while openai's answer is awaited
        assert [name for name, _ in slow.calls].count("run_many") == 1
        answer.set()
        await asyncio.gather(*list(g._tasks))
        await asyncio.gather(*g._runs.get("openai", ()))
        assert [name for name, _ in slow.calls].count("run_many") == 2  # then the re-admitted one
    run(go())
