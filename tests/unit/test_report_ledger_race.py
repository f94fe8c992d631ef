"""A report read as soon as the last result is in counts that result's spend in the ledger.

The case (tests/integration/test_release_faults.py, one run in four with a busy core beside it): a dispatcher sends
a result's settlement to the budget controller and then pushes the result to the hub. The driver takes the result
from the hub and reads the report, the ledger last. Ray orders calls from one caller to one actor, not a
dispatcher's settlement and the driver's read (two callers), so the read could come first: the ledger one image
($0.042) short of the bill. Now the driver first asks each dispatcher ``spend_told``, which answers once the budget
controller has taken what the dispatcher sent it, and reads the ledger after.
"""

import asyncio
import threading
from types import SimpleNamespace

import pytest

from actors import Dispatcher, ResultHub
from actors._types import BatchJob, Job
from engine.app._driver_report import Reporting
from engine.core.budgets import Claim
from engine.core.clock import ManualClock
from engine.core.settings import Settings
from tests.unit.test_actors import CAT, ledger, req


def test_spend_told_answers_once_the_ledger_took_the_settlement_of_a_result_already_out():
    async def go():
        hub, budget, clock = ResultHub(), ledger(100.0), ManualClock(0.0)
        settle, arrived, steps = budget.settle_many, asyncio.Event(), []

        async def late_settle(items):  # the settlement's message is still on its way to the budget controller
            await arrived.wait()
            await settle(items)
            steps.append("settled")
        budget.settle_many = late_settle
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [], hub, None, budget)
        await budget.reserve_many([Claim("c0", "default", "openai", "gpt-5-mini", "urgent", 1.0)])
        job = Job(0, req(0, priority="urgent"), "fp0", claim="c0")
        await d.run_many([BatchJob("b0", "sync", None, False, "process_individually", "now", [job])])
        clock.advance(10_000.0)  # past the call's end: its timer fires at once on a ManualClock
        (res,) = await asyncio.wait_for(hub.pull(1.0), 5.0)  # the driver has the result
        assert res.status == "ok" and res.cost_usd > 0 and not budget.book.spend

        told = asyncio.ensure_future(d.spend_told(5.0))
        _, pending = await asyncio.wait([told], timeout=0.05)  # bounded: it must still be waiting
        assert pending == {told}
        arrived.set()
        assert await asyncio.wait_for(told, 5.0) is True
        steps.append("told")
        assert steps == ["settled", "told"]
        assert sum(budget.book.spend.values()) == pytest.approx(res.cost_usd)
    asyncio.run(go())


class _Call:
    def __init__(self, log: list, who: str, method: str, answer):
        self.log, self.who, self.method, self.answer = log, who, method, answer

    def remote(self):
        self.log.append((self.who, self.method))
        return self.answer


class _Actor:
    """A Ray actor handle stand-in: each ``.remote()`` is logged in order and answered at once."""

    def __init__(self, log: list, who: str, answers: dict):
        self._log, self._who, self._answers = log, who, answers

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return _Call(self._log, self._who, method, self._answers[method])


def test_a_report_reads_the_ledger_only_after_every_dispatcher_and_grouper_said_its_spend_was_told():
    log: list = []
    ray = SimpleNamespace(get=lambda refs, timeout=None: list(refs),
                          exceptions=SimpleNamespace(ActorUnavailableError=RuntimeError))
    hub_report = ResultHub()
    answers = {"report": asyncio.run(hub_report.report()), "spend_told": True}
    drv = Reporting()
    drv._ray, drv._kept = ray, None
    drv._h = {"hubs": [_Actor(log, "hub", answers)],
              "budget": _Actor(log, "budget", {"report": {"budgets": []}}),
              "dispatchers": {p: _Actor(log, p, {**answers, "stats": {"provider": p}}) for p in ("openai", "gpu")},
              "groupers": [_Actor(log, g, answers) for g in ("g0", "g1")], "caches": []}
    drv._lock = threading.Lock()
    drv._read_report(timeout_s=5.0)
    ledger_read = log.index(("budget", "report"))
    # The groupers too: a claim a grouper let go (a withdrawn member) is settled by it (test_claim_before_result).
    told = [log.index((a, "spend_told")) for a in ("openai", "gpu", "g0", "g1") if (a, "spend_told") in log]
    assert len(told) == 4 and max(told) < ledger_read, log
