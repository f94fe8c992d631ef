"""Urgent work never loses its budget to less urgent work that waited beside it or came later, in the simulator and
in the grouper driven directly (no Ray, a ManualClock), and held work is tried in engine time at any speed-up.

The case: a $1 budget with $0.50 held by an open claim; an urgent request reserving $0.60 and a normal one
reserving $0.44 come together. The urgent one must wait for the open claim; the normal one fits under its 95 %
at once. Reserved in one call, the normal one took that room and held it for its long call, past the urgent
one's deadline, which was then rejected (a helper's tour saw 714 urgent requests refused so at 200x)."""

import asyncio

import pytest

from actors import BudgetController, Grouper, ResultHub
from actors._types import Job
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim, Throttle
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.request import Request, validation_context
from engine.core.settings import Settings, with_budget
from engine.runtime.waiting import STEP_S
from engine.sim.simulator import simulate
from policies import load_policy
from tests.unit.helpers import Recorder

CAT = default_catalog()
CTX = validation_context(CAT, Settings())


def req(rid, arrival_s, priority, max_output_tokens, output_tokens, deadline_s):
    """gpt-5 at $10 per million output tokens: a sync claim is about ``max_output_tokens`` x $0.00001."""
    return Request.model_validate({"id": rid, "arrival_s": arrival_s, "model": "gpt-5", "input_tokens": 100,
                                   "output_tokens": output_tokens, "max_output_tokens": max_output_tokens,
                                   "priority": priority, "deadline_s": deadline_s}, context=CTX)


OPEN = req("open", 0.0, "normal", 50_000, 1_000, 3600.0)  # $0.50, settles within seconds
NORMAL = req("n", 1.0, "normal", 44_000, 20_000, 3600.0)  # $0.44, a call of minutes
URGENT = req("u", 1.0, "urgent", 60_000, 20, 60.0)  # $0.60


@pytest.mark.parametrize("first", ["normal", "urgent"])
def test_in_the_simulator_a_normal_request_of_the_same_instant_waits_behind_a_held_urgent_one(first):
    pair = [NORMAL, URGENT] if first == "normal" else [URGENT, NORMAL]
    res = simulate([OPEN, *pair], load_policy("naive", CAT), catalog=CAT, settings=with_budget(Settings(), 1.0))
    done = {r.id: (int(s), float(t)) for r, s, t in zip(res.requests, res.status, res.done_at)}
    assert res.summary()["rejected"] == {}  # the urgent one was rejected, held to its deadline
    assert done["u"][1] <= URGENT.deadline_at and done["u"][1] < done["n"][1]
    assert res.extra["budget"]["overrun_usd"] == 0.0


async def grouper_beside_open_claim(clock: ManualClock) -> tuple[Grouper, BudgetController, Recorder]:
    """A grouper on ``clock`` (its dispatcher a ``Recorder``) and its $1 budget, $0.50 of which an open claim
    holds."""
    spec = BudgetSpec(max_budget=1.0)
    budget = BudgetController(BudgetSettings(specs=(spec,)), None, ManualClock(0.0))
    await budget.reserve_many([Claim("open", "default", "openai", "gpt-5", "normal", 0.5)])
    disp = Recorder()
    g = Grouper(load_policy("naive", CAT), CAT, clock, {"openai": disp}, budget, ResultHub(), budget_specs=(spec,))
    return g, budget, disp


async def settle_tasks(g: Grouper) -> None:
    while g._tasks:
        await asyncio.gather(*list(g._tasks))
    await asyncio.sleep(0)  # the dispatcher's call is a task of its own


def sent(disp: Recorder) -> list[str]:
    return [j.req.id for name, (batches, *_) in disp.calls if name == "run_many" for b in batches for j in b.jobs]


def test_in_the_grouper_a_normal_request_of_the_same_call_waits_behind_a_held_urgent_one():
    async def go():
        clock = ManualClock(1.0)
        g, budget, disp = await grouper_beside_open_claim(clock)
        await g.add([Job(0, NORMAL, "n"), Job(1, URGENT, "u")])
        await settle_tasks(g)
        assert sent(disp) == [] and set(g.waits.held) == {NORMAL.uid, URGENT.uid}
        await budget.settle_many([("open", 0.001)])
        clock.advance(STEP_S)
        g._retry_parked()
        await settle_tasks(g)
        assert sent(disp) == ["u"] and set(g.waits.held) == {NORMAL.uid}  # the room went to the urgent one
    asyncio.run(go())


def test_in_the_grouper_work_that_comes_while_a_try_asks_the_ledger_waits_behind_it():
    """The members a try takes count as held until their reservation answers; and one try is out at a time."""
    async def go():
        clock = ManualClock(1.0)
        g, _, disp = await grouper_beside_open_claim(clock)
        await g.add([Job(1, URGENT, "u")])
        assert set(g.waits.held) == {URGENT.uid}
        clock.advance(STEP_S)
        g._retry_parked()  # its reservation is under way (a task not yet run) when the normal request comes
        assert g._park_timer is None
        await g.add([Job(0, NORMAL, "n")])
        await settle_tasks(g)
        assert sent(disp) == [] and set(g.waits.held) == {NORMAL.uid, URGENT.uid}
        assert g._park_timer is not None  # armed again once the try had its answer
    asyncio.run(go())


class Fast(ManualClock):
    """A replay at 200x: what a floor in real time between tries multiplies."""

    speedup = 200.0

    def real_delay(self, virtual_s: float) -> float:
        return max(virtual_s, 0.0) / self.speedup


def test_held_work_is_tried_again_one_engine_second_later_at_any_speed_up():
    async def go():
        clock = Fast(1.0)
        g, _, _ = await grouper_beside_open_claim(clock)
        await g.add([Job(1, URGENT, "u")])
        assert set(g.waits.held) == {URGENT.uid}
        assert g._park_timer[0] == pytest.approx(clock.now() + STEP_S)  # 10 engine seconds at 200x before
        g._park_timer[1].cancel()
    asyncio.run(go())


def counted_writes(ctl: BudgetController) -> list[int]:
    """A list that grows by one at each journal write of ``ctl``."""
    writes: list[int] = []
    write = ctl._put_snapshot

    async def counted():
        writes.append(1)
        return await write()

    ctl._put_snapshot = counted
    return writes


def test_a_try_that_must_wait_again_writes_no_journal_a_reservation_does():
    """Held work is tried once per engine second (200 tries a second at 200x): a try that reserved and released
    nothing changed only the refusal counts, and waits for no write of the whole ledger."""
    async def go():
        spec = BudgetSpec(max_budget=1.0)
        ctl = BudgetController(BudgetSettings(specs=(spec,)), ResultHub(), ManualClock(0.0))
        writes = counted_writes(ctl)
        (v,) = await ctl.reserve_many([Claim("a", "default", "openai", "gpt-5", "normal", 0.9)])
        assert v.ok and len(writes) == 1
        (v,) = await ctl.reserve_many([Claim("b", "default", "openai", "gpt-5", "urgent", 0.5)])
        assert v.reason == "wait" and len(writes) == 1 and ctl.refusals["wait"] == 1
        (v,) = await ctl.reserve_many([Claim("c", "default", "openai", "gpt-5", "urgent", 0.5)], ["a"])
        assert v.ok and len(writes) == 2  # a release and a reservation: written before the answer
    asyncio.run(go())


def test_a_restart_after_tries_that_wrote_no_journal_recovers_the_same_ledger():
    """A call that reserved and released nothing writes no journal, yet it moves the ledger's clock and lets an
    ended window go. A restart after it must still take back a ledger that counts and decides as the one it
    replaces (only the refusal counts, a figure of the report, may lag). A 60 s window ends between the calls.
    The restarted controller takes over, as under Ray, where the one it replaces is dead: its epoch ranks the old
    incarnation's snapshots below its own, so a test that kept calling the old one would read a ledger nobody
    serves (until stop 73 one key held the hub's snapshot, and the old one's writes replaced the new one's)."""
    async def go():
        spec, hub, clock = BudgetSpec(max_budget=1.0, budget_duration="60s"), ResultHub(), ManualClock(0.0)
        settings = BudgetSettings(specs=(spec,), throttle=Throttle(pace=False))
        ctl = BudgetController(settings, hub, clock)

        def claim(rid, usd, priority="normal"):
            return Claim(rid, "default", "openai", "gpt-5", priority, usd)

        async def same_after_restart(ctl: BudgetController) -> BudgetController:
            again = BudgetController(settings, hub, clock)
            again.reconstructed()
            mine, theirs = await ctl.report(), await again.report()
            for k in ("windows", "overrun_usd", "reserved_usd", "spent_usd", "spend", "budgets"):
                assert theirs[k] == mine[k], k
            return again

        writes = counted_writes(ctl)
        assert (await ctl.reserve_many([claim("a", 0.5)]))[0].ok
        await ctl.settle_many([("a", 0.45)])
        n = len(writes)
        clock.advance(70.0)  # the first window ended, and nothing refers to it
        (v,) = await ctl.reserve_many([claim("c", 1.5)])  # more than the limit: refused
        assert not v.ok and len(writes) == n and len(ctl.book.ended) == 1  # the first window went, unwritten
        ctl = await same_after_restart(ctl)
        writes = counted_writes(ctl)
        assert (await ctl.reserve_many([claim("open", 0.6)]))[0].ok and writes
        n = len(writes)
        (v,) = await ctl.reserve_many([claim("b", 0.5, "urgent")])  # must wait for "open"
        assert v.reason == "wait" and len(writes) == n
        again = await same_after_restart(ctl)
        for book in (ctl, again):  # the same calls next: the same answers, the same ledger
            await book.settle_many([("open", 0.2)])
            assert [x.ok for x in await book.reserve_many([claim("d", 0.9), claim("e", 0.7)])] == [False, True]
        mine, theirs = await ctl.report(), await again.report()
        assert theirs["windows"] == mine["windows"] and theirs["spent_usd"] == mine["spent_usd"]
    asyncio.run(go())
