"""A request rerouted to a fallback model is not sent again under its first model when its driver re-admits it.

The case: a dispatcher whose model's circuit is open sends its work back as requests for the fallback model
(``Dispatcher._start_reroute``), out of what it carries. The fallback is another compatibility class, so with two
grouper shards it lands in the other grouper, where the smart policy gathers it for Anthropic's batch API: it may
wait there minutes, longer than the circuit stays open (30 s). An actor restart meanwhile makes the driver re-admit
every unfinished request. Ingest asked the dispatchers, the caches and the hub who held it, not the groupers, so it
heard "nobody" and sent the copy of the first model to the first grouper, whose check of a lost dispatch asked the
first dispatcher ("not held") and sent it on: billed under both models, one of the two results dropped at the hub.
"""

import asyncio

from actors import BudgetController, Grouper, Ingest, ResultHub
from actors._peer import as_peer
from actors._shards import class_shard
from actors._types import send_sharded
from engine.core.budgets import BudgetSettings
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.request import Request
from policies import load_policy

CAT = default_catalog()
FALLBACK = ("anthropic", "claude-sonnet-4-5")


class Clock(ManualClock):
    """Moved by hand, its seconds real ones: a group's wake-up waits for the test to fire it."""

    def real_delay(self, virtual_s: float) -> float:
        return max(virtual_s, 0.0)


class Provider:
    """A dispatcher stand-in: records what it is sent (billed) and carries it; while ``open`` (its model's circuit),
    it hands what it is sent back to the groupers as requests for the fallback, as ``_start_reroute`` does."""

    def __init__(self, groupers=(), open_=False):
        self.groupers, self.open = [as_peer(g) for g in groupers], open_
        self.sent: list[str] = []

    async def run_many(self, batches, *learns):
        jobs = [j for b in batches for j in b.jobs]
        if self.open:
            provider, model = FALLBACK
            send_sharded(self.groupers, [j._replace(req=j.req.model_copy(update={"provider": provider, "model": model}),
                                                    asked=(j.req.provider, j.req.model), claim=None) for j in jobs])
            return
        self.sent += [j.req.uid for j in jobs]

    async def holds(self, uids):
        return [u for u in uids if u in self.sent]

    recall = holds


async def settled(ing: Ingest, groupers: list[Grouper]) -> None:
    """Until every message ingest sent the groupers, and all they set off, has run."""
    while True:
        tasks = [t for p in ing.groupers for t in p._tasks]
        for g in groupers:
            tasks += [*g._tasks, *(t for ts in g._runs.values() for t in ts), *g.budget._tasks]
        if not tasks:
            return
        await asyncio.gather(*tasks, return_exceptions=True)


def test_a_readmission_while_a_rerouted_request_waits_in_another_grouper_does_not_bill_it_twice():
    async def go():
        clock, hub = Clock(0.0), ResultHub()
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        openai, anthropic = Provider(open_=True), Provider()
        dispatchers = {"openai": openai, "anthropic": anthropic}
        groupers = [Grouper(load_policy("smart", CAT), CAT, clock, dispatchers, budget, hub, name=f"g{k}")
                    for k in range(2)]
        openai.groupers = [as_peer(g) for g in groupers]
        wakes = []
        fallback_grouper = groupers[0]
        schedule = fallback_grouper._schedule
        fallback_grouper._schedule = lambda w: (wakes.append(w) if w is not None else None, schedule(w))
        ing = Ingest(groupers, None, dispatchers=[openai, anthropic], hub=[hub])
        r = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 1000,
                                    "output_tokens": 100, "deadline_s": 86_400.0})
        rerouted = r.model_copy(update=dict(zip(("provider", "model"), FALLBACK)))
        assert (class_shard(r, 2), class_shard(rerouted, 2)) == (1, 0)  # two classes, two groupers
        assert await ing.submit([r], "one") == 1
        await settled(ing, groupers)
        # gpt-5-mini went at once (flex); its circuit open, it came back for Claude, gathered for a batch in g0
        assert r.uid in fallback_grouper.pending and wakes and not openai.sent and not anthropic.sent
        openai.open = False  # the circuit closes (30 s) while the batch gathers (minutes)
        await ing.readmit([r], "one")  # an actor restarted: the driver re-admits what it has no result for
        await settled(ing, groupers)
        clock.advance(max(w.at for w in wakes))
        for w in list(wakes):  # the batch's gathering ends
            await fallback_grouper._on_wake(w)
        await settled(ing, groupers)
        assert anthropic.sent == [r.uid]  # the fallback's call
        assert openai.sent == [], "a rerouted request was billed under its first model too, re-admitted meanwhile"
    asyncio.run(go())
