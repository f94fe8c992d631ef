"""A reservation's members stay marked as under way while the grouper ends a member withdrawn meanwhile.

The case: a reservation call carries three members; the driver withdraws one while the call is out, and the ledger
refuses another (its budget is spent). Once the call answered, the grouper let go of the members' marks, then
ended the withdrawn one (``_drop_withdrawn``), which first asks the dispatchers whether they hold a copy. A copy
re-admitted in that wait found the refused member nowhere (neither pending, parked, under way nor ended): it was
taken as new work and sent, billed beside the rejection its driver got; a copy of the member let through was
taken for a lost dispatch, judged before its own dispatch left, and sent a second time.
"""

import asyncio

from actors import Grouper, ResultHub
from actors._types import OWN_ROWS, BatchJob, Job
from engine.core.budgets import Verdict
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.request import Request
from policies import load_policy
from tests.unit.helpers import SlowDispatcher

CAT = default_catalog()


def req(rid: str) -> Request:
    return Request.model_validate({"id": rid, "arrival_s": 0.0, "model": "claude-sonnet-4-5", "provider": "anthropic",
                                   "input_tokens": 1000, "output_tokens": 100, "deadline_s": 86_400.0})


class Ledger:
    """Answers the reservation call once ``answer`` is set: the first member goes, the second is refused for good,
    the third goes."""

    def __init__(self):
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    async def reserve_many(self, claims, release=()):
        self.asked.set()
        await self.answer.wait()
        return [Verdict(True), Verdict(False, "budget_exhausted", budget="global", remaining_usd=0.0), Verdict(True)][:len(claims)]

    async def settle_many(self, settled):
        pass



def test_copies_readmitted_while_a_withdrawn_member_of_their_reservation_is_ended_are_not_sent_again():
    async def go():
        ledger, disp, hub = Ledger(), SlowDispatcher(), ResultHub()
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"anthropic": disp}, ledger, hub)
        kept, refused, withdrawn = req("k"), req("x"), req("w")
        jobs = [Job(0, kept, "fp-k"), Job(1, refused, "fp-x"), Job(2, withdrawn, "fp-w")]
        call = asyncio.ensure_future(g._dispatch([BatchJob("b0", "sync", None, False, "t", "t", jobs)]))
        await asyncio.wait_for(ledger.asked.wait(), 5.0)
        assert await g.withdraw([withdrawn.uid]) == 0  # under way: ended once its reservation answers
        ledger.answer.set()
        await asyncio.wait_for(disp.asked.wait(), 5.0)  # ending w: do the dispatchers hold a copy?
        # The driver re-admits k and x meanwhile (the hub restarted: it lost what it had heard of them).
        await g.add([Job(OWN_ROWS + 1, kept, "fp-k"), Job(OWN_ROWS + 2, refused, "fp-x")])
        disp.answer.set()
        await asyncio.wait_for(call, 5.0)
        for _ in range(3):  # the grouper's own tasks (a lost dispatch's check) and its dispatch calls
            await asyncio.gather(*list(g._tasks), *[t for ts in g._runs.values() for t in ts])
        assert sorted(disp.sent) == [kept.uid], f"sent {sorted(disp.sent)}: a re-admitted copy went too"
        got = {r.id: r for r in await hub.pull(0.01)}
        assert got["x"].status == "rejected" and got["w"].status == "failed"
    asyncio.run(go())
