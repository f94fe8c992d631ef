"""A request the grouper is rejecting is never dispatched again under a re-admitted copy.

The case (the chaos test, on a loaded machine): the budget controller restarts while one reservation call carries
an urgent and a normal member (asked a priority at a time). The urgent tier's call fails, so its member is parked
until the ledger answers; the normal tier's call hangs on the restarting actor. Meanwhile the urgent member can no
longer finish by its deadline and is rejected, which first asks the dispatchers whether they hold a copy. The
driver re-admits the request (the hub restarted too) while that question is out. The reservation call's end let go
of the request's "under way" mark, which the rejection had set as well, so the copy was taken for new work,
reserved and sent: billed by the provider while the driver got the rejection (10 of 800 requests in a run).
"""

import asyncio

from actors import BudgetController, Grouper, ResultHub
from actors._hub_stats import merge_reports
from actors._types import OWN_ROWS, BatchJob, Job
from engine.core.budgets import BudgetSettings, BudgetSpec
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.request import Request
from engine.core.result import Result
from policies import load_policy
from tests.unit.helpers import SlowDispatcher

CAT = default_catalog()


def req(rid: str, priority: str, deadline_s: float) -> Request:
    return Request.model_validate({"id": rid, "arrival_s": 0.0, "model": "claude-sonnet-4-5", "provider": "anthropic",
                                   "input_tokens": 1000, "output_tokens": 100, "priority": priority,
                                   "deadline_s": deadline_s})


class Restarting(BudgetController):
    """A ledger whose first reservation call fails (the actor restarting) and whose second hangs until ``back``."""

    def __init__(self):
        super().__init__(BudgetSettings(specs=(BudgetSpec(max_budget=100.0),)), None, ManualClock(0.0))
        self.asks, self.hanging, self.back = 0, asyncio.Event(), asyncio.Event()

    async def reserve_many(self, claims, release=()):
        self.asks += 1
        if self.asks == 1:
            raise RuntimeError("ActorUnavailableError: the actor is restarting")
        if self.asks == 2:
            self.hanging.set()
            await self.back.wait()
        return await super().reserve_many(claims, release)



def test_a_copy_readmitted_while_its_request_is_rejected_is_not_sent():
    async def go():
        clock, budget, disp, hub = ManualClock(0.0), Restarting(), SlowDispatcher(), ResultHub()
        g = Grouper(load_policy("smart", CAT), CAT, clock, {"anthropic": disp}, budget, hub)
        urgent, normal = req("u", "urgent", 300.0), req("n", "normal", 86_400.0)
        jobs = [Job(0, urgent, "fp-u"), Job(1, normal, "fp-n")]
        call = asyncio.ensure_future(g._dispatch([BatchJob("b0", "sync", None, False, "t", "t", jobs)]))
        await asyncio.wait_for(budget.hanging.wait(), 5.0)  # the urgent member is parked; the normal tier's call hangs
        assert urgent.uid in g.waits and not disp.sent
        clock.advance(300.0)  # its deadline has come: rejected, once the dispatchers say they hold no copy
        g._retry_parked()
        await asyncio.wait_for(disp.asked.wait(), 5.0)
        budget.back.set()  # the ledger answers the hanging call: that reservation call ends
        await asyncio.wait_for(call, 5.0)
        assert disp.sent == [normal.uid]
        # The driver re-admits the urgent request while the rejection waits for the dispatchers' answer.
        await g.add([Job(OWN_ROWS + 1, urgent, "fp-u")])
        disp.answer.set()
        await asyncio.gather(*list(g._tasks), *[t for ts in g._runs.values() for t in ts])
        assert urgent.uid not in disp.sent, "the copy of a request being rejected was sent to its provider"
        (res,) = await hub.pull(0.01)
        assert res.id == "u" and res.status == "rejected" and res.error == "budget_unavailable"
    asyncio.run(go())


def test_an_answer_billed_after_its_driver_got_a_refusal_is_counted_and_logged(caplog):
    """Should a copy of a refused request still be billed (the race above, or another like it), the hub keeps the
    first result for the driver, but the report and the log say what the provider billed behind it; a result sent
    again with the same cost (a dispatcher answering a re-admitted request it finished) is no such case."""
    async def go():
        hubs = [ResultHub(), ResultHub()]
        await hubs[0].push([Result(id="u", status="rejected", error="budget_unavailable", cost_usd=0.0)])
        await hubs[0].push([Result(id="u", status="ok", cost_usd=0.25, mode="sync", provider="anthropic")])
        await hubs[1].push([Result(id="v", status="ok", cost_usd=0.5, mode="sync", provider="anthropic")])
        await hubs[1].push([Result(id="v", status="ok", cost_usd=0.5, mode="sync", provider="anthropic")])
        await hubs[1].push([Result(id="w", status="rejected", error="budget_exhausted", cost_usd=0.0)])
        await hubs[1].push([Result(id="x", status="ok", cost_usd=0.125, mode="batch_api", provider="openai")])
        await hubs[1].push([Result(id="w", status="ok", cost_usd=0.125, mode="batch_api", provider="openai")])
        return merge_reports([await h.report() for h in hubs])
    rep = asyncio.run(go())
    assert rep["billed_behind_refusal"] == {"requests": 2, "cost_usd": 0.375}
    assert rep["spend_usd"] == 0.625 and rep["by_status"] == {"rejected": 2, "ok": 2}
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(said) == 2 and "'u'" in said[0] and "$0.250000" in said[0] and "budget_unavailable" in said[0]
