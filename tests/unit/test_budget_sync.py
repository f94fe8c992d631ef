"""The groupers converge on the budgets the budget actor holds, told or not (a fault hunt): a change kept with
the driver killed before it told the groupers (Ctrl-C on `smartbatch budget set`) was never enforced, and a
budget actor restarted with an older change number was ignored by groupers holding a higher one, along with
every change after it. The actor classes are driven directly, without Ray; the ask is called as its timer does."""

from __future__ import annotations

import asyncio

from actors import BudgetController, Grouper, ResultHub
from actors._peer import as_peer
from actors._types import Job
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.request import Request
from policies import load_policy
from tests.unit.helpers import Recorder

CAT = default_catalog()
DAY = BudgetSpec(tenant="acme", max_budget=1.0, budget_duration="1d")


def _req(i: int) -> Request:
    return Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 100,
                                   "output_tokens": 10, "tenant": "acme", "deadline_s": 86400.0,
                                   "priority": "urgent"})


def _grouper(ctl: BudgetController, clock: ManualClock, disp=None, specs: tuple = ()) -> Grouper:
    return Grouper(load_policy("naive", CAT), CAT, clock, {"openai": disp or Recorder()}, ctl, ResultHub(),
                   budget_limited=bool(specs), budget_specs=specs)


async def _settled(g: Grouper) -> None:
    while g._tasks:
        await asyncio.gather(*list(g._tasks))
    await asyncio.sleep(0)  # the dispatcher's call is a task of its own


def _limit(g: Grouper) -> float:
    (spec,) = g.budget_specs
    return spec.max_budget


def test_a_change_no_driver_told_reaches_the_grouper_by_its_own_ask_and_is_enforced():
    async def go():
        clock = ManualClock(0.0)
        ctl = BudgetController(BudgetSettings(), None, clock)  # an engine started without budgets
        disp = Recorder()
        g = _grouper(ctl, clock, disp)
        await ctl.change_budgets([DAY])  # kept; the driver is killed before it tells the groupers
        assert await g.sync_budgets()
        assert g.budget_specs == (DAY,) and g.budget_limited
        assert not await g.sync_budgets()  # asked again: nothing new, nothing done
        await g.add([Job(0, _req(0), "fp")])
        await _settled(g)
        (_, ([batch],)), = disp.calls
        assert batch.jobs[0].claim in ctl.book.claims  # reserved under the budget no driver told it of
    asyncio.run(go())


def test_the_grouper_asks_on_its_own_timer_from_its_clock_on(monkeypatch):
    from actors import _grouper_budgets

    monkeypatch.setattr(_grouper_budgets, "BUDGET_ASK_S", 0.0)  # no real second waited in a unit test

    async def go():
        clock = ManualClock(0.0)
        ctl = BudgetController(BudgetSettings(), None, clock)
        g = _grouper(ctl, clock)
        taken = asyncio.Event()
        take = g.set_budgets

        async def told(*state):
            out = await take(*state)
            if g.budget_specs:
                taken.set()
            return out

        g.set_budgets = told
        await ctl.change_budgets([DAY])  # no driver tells it
        await g.set_clock(clock)  # as the engine's start, or the rewire of a restarted grouper
        await asyncio.wait_for(taken.wait(), 10)
        assert g.budget_specs == (DAY,) and g.budget_limited
        g._budget_ask.cancel()
    asyncio.run(go())


def test_a_budget_actor_restarted_with_an_older_change_number_is_followed_and_so_are_its_changes():
    async def go():
        clock, hub = ManualClock(0.0), ResultHub()  # the hub keeps the memory ledger's journal
        ctl = BudgetController(BudgetSettings(specs=(DAY,)), hub, clock)
        g = _grouper(ctl, clock, specs=(DAY,))
        await g.set_budgets(*await ctl.change_budgets([DAY.model_copy(update={"max_budget": 3.0})]))

        async def refused(*a):
            raise OSError("the hub did not take the write")

        ctl.journal.put = ctl.journal.put_checked = refused  # the journal writes of the next two changes fail (logged; the ledger goes on)
        await g.set_budgets(*await ctl.change_budgets([DAY.model_copy(update={"max_budget": 5.0})]))
        await g.set_budgets(*await ctl.change_budgets([DAY.model_copy(update={"max_budget": 6.0})]))
        assert (g._budget_version, _limit(g)) == (3, 6.0)
        # Ray restarts the budget actor: it takes back change 1, the last its journal kept.
        again = BudgetController(BudgetSettings(specs=(DAY,)), hub, clock)
        again.reconstructed()
        g.budget = as_peer(again)  # its peer by name: the new incarnation
        assert await again.budget_specs() == (1, (DAY.model_copy(update={"max_budget": 3.0}),))
        assert await g.sync_budgets() and (g._budget_version, _limit(g)) == (1, 3.0)  # what the actor holds
        # A change after the restart is number 2, under the 3 the grouper held: taken all the same.
        await g.set_budgets(*await again.change_budgets([DAY.model_copy(update={"max_budget": 4.0})]))
        assert (g._budget_version, _limit(g)) == (2, 4.0)
        # A slow driver's word of the old incarnation, come late, is let be.
        await g.set_budgets(3, (DAY.model_copy(update={"max_budget": 6.0}),), ctl.spec_incarnation)
        assert (g._budget_version, _limit(g)) == (2, 4.0)
        assert not await g.sync_budgets()
    asyncio.run(go())


def test_a_change_told_straight_after_a_restart_is_taken_though_its_number_went_back():
    async def go():
        clock = ManualClock(0.0)
        ctl = BudgetController(BudgetSettings(), None, clock)  # no journal: a restart starts from its settings
        g = _grouper(ctl, clock)
        for limit in (1.0, 2.0, 3.0):
            await g.set_budgets(*await ctl.change_budgets([DAY.model_copy(update={"max_budget": limit})]))
        again = BudgetController(BudgetSettings(), None, clock)
        await g.set_budgets(*await again.change_budgets([DAY.model_copy(update={"max_budget": 0.5})]))  # change 1
        assert (g._budget_version, _limit(g)) == (1, 0.5)  # was ignored: 1 < 3, and so was every later change
    asyncio.run(go())


class _DownRedis:
    """A Redis ledger's client while Redis does not answer."""

    async def hmget(self, key, *fields):
        raise ConnectionError("Connection refused")

    async def hgetall(self, key):
        raise ConnectionError("Connection refused")


def test_a_redis_ledger_restarted_while_redis_is_down_leaves_the_groupers_budgets_be():
    async def go():
        clock = ManualClock(0.0)
        ctl = BudgetController(BudgetSettings(redis_url="redis://127.0.0.1:1/0"), None, clock, ledger_id="L")
        ctl.book.client = _DownRedis()
        ctl.reconstructed()  # restarted by Ray: its live budgets are in a Redis that does not answer
        g = _grouper(ctl, clock, specs=(DAY,))
        g._budget_incarnation = "before"  # it followed the actor's run before the restart
        assert await ctl.budget_state() is None  # not "no budget", the settings' budgets it holds meanwhile
        assert not await g.sync_budgets() and g.budget_specs == (DAY,) and g.budget_limited
    asyncio.run(go())


def test_a_redis_ledger_whose_budgets_are_unread_tries_redis_once_per_retry_not_once_per_call():
    # While a Redis ledger's budgets were unread (a restart, or an engine started with none in its settings) each
    # call read them under the one lock, Redis down or not: against a Redis that does not answer, every call of the
    # groupers waited its turn and a whole timeout, one after the other.
    asked = []

    class _Counted(_DownRedis):
        async def hmget(self, key, *fields):
            asked.append(key)
            return await super().hmget(key, *fields)

    async def go():
        ctl = BudgetController(BudgetSettings(redis_url="redis://127.0.0.1:1/0", redis_retry_s=60.0), None,
                               ManualClock(0.0), ledger_id="L")
        ctl.book.client = _Counted()
        ctl.reconstructed()
        claims = [Claim(f"c{i}", "acme", "openai", "gpt-5-mini", "urgent", 0.1) for i in range(5)]
        verdicts = [v for c in claims for v in await ctl.reserve_many([c])]
        states = [await ctl.budget_state() for _ in range(5)]
        return verdicts, states

    verdicts, states = asyncio.run(go())
    assert [v.reason for v in verdicts] == ["budget_unavailable"] * 5 and states == [None] * 5
    assert len(asked) == 1, asked  # the next try once its retry time has come
