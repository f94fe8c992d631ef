"""A request that ends in a grouper lets go of its budget claim before its result can be seen.

The case (a helper's hunt for results seen before the engine's own bookkeeping): a driver withdraws a request while
its reservation call is out; the ledger grants it, and the grouper ends it withdrawn (``_drop_withdrawn``). The
grouper pushed the result to the hub, waited for the hub's answer, and only then settled the claim at 0: a driver
that read ``report()`` as soon as it had the result found the ledger still holding the withdrawn request's bound
(``reserved_usd``), and the report asked only the dispatchers whether their settlements were in. Now the settlement
leaves first, as a dispatcher's does, and the report asks the groupers too (``spend_told``).
"""

import asyncio

import pytest

from actors import Grouper, ResultHub
from actors._types import BatchJob, Job
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from policies import load_policy
from tests.unit.helpers import SlowDispatcher
from tests.unit.test_actors import ledger
from tests.unit.test_withdrawn_window import req

CAT = default_catalog()


def test_a_withdrawn_members_claim_is_settled_before_its_result_reaches_the_hub_and_spend_told_waits_for_it():
    async def go():
        budget, disp, hub, steps = ledger(100.0), SlowDispatcher(), ResultHub(), []
        disp.answer.set()
        reserve, settle, push = budget.reserve_many, budget.settle_many, hub.push
        asked, answer, arrived = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def held_reserve(claims, release=()):  # the reservation call is out while the driver withdraws
            asked.set()
            await answer.wait()
            return await reserve(claims, release)

        async def late_settle(items):  # its message reaches the ledger only once ``arrived`` is set
            steps.append("settle sent")
            await arrived.wait()
            await settle(items)
            steps.append("settled")

        async def seen_push(results, prices=None):
            steps.append("result at the hub")
            await push(results, prices)

        budget.reserve_many, budget.settle_many, hub.push = held_reserve, late_settle, seen_push
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"anthropic": disp}, budget, hub)
        w = req("w")
        call = asyncio.ensure_future(g._dispatch([BatchJob("b0", "sync", None, False, "t", "t", [Job(0, w, "fp-w")])]))
        await asyncio.wait_for(asked.wait(), 5.0)
        assert await g.withdraw([w.uid]) == 0  # under way: ended once its reservation answers
        answer.set()
        await asyncio.wait_for(call, 5.0)
        (res,) = await asyncio.wait_for(hub.pull(1.0), 5.0)  # the driver has the result
        assert res.status == "failed" and "withdrawn" in res.error and disp.sent == []
        assert steps[:2] == ["settle sent", "result at the hub"], steps  # it left first, as a dispatcher's does
        assert budget.book.reserved_total() > 0  # the message is still on its way: the report must wait for it

        told = asyncio.ensure_future(g.spend_told(5.0))
        _, pending = await asyncio.wait([told], timeout=0.05)  # bounded: it must still be waiting
        assert pending == {told}
        arrived.set()
        assert await asyncio.wait_for(told, 5.0) is True
        assert (await budget.report())["reserved_usd"] == pytest.approx(0.0)
    asyncio.run(go())
