"""A request re-admitted while another driver's submit of it waits for the hub's verdict is not sent twice.

The case: Ray restarts a sharded ingest (its ``seen`` lost). Driver two re-admits its unfinished request ``r``
while driver one submits the same request with others, one of whose hub shards is slow to answer the admission.
The submit's ``r`` was marked as on its way (``_moving``) only once every hub shard had answered, so the
re-admission, asking who held ``r`` in that gap, heard "nobody" and sent it straight to its grouper, while the
submit's copy went on through the cache and followed an identical request in flight there: a provider call billed
for ``r`` beside the answer it was to share, one of the two dropped at the hub.
"""

import asyncio

from actors import Ingest, ResultCache, ResultHub
from actors._shards import uid_shard
from actors._types import Job
from engine.core.clock import ManualClock
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from tests.unit.helpers import JobSink, until


def req(rid: str, prompt: str) -> Request:
    return Request.model_validate({"id": rid, "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": prompt,
                                   "input_tokens": 50, "output_tokens": 10, "reuse": "exact"})



class SlowHub(ResultHub):
    """A hub shard whose ``admit`` answers once ``gate`` is set."""

    def __init__(self):
        super().__init__()
        self.asked, self.gate = asyncio.Event(), asyncio.Event()

    async def admit(self, client, uids, fps):
        self.asked.set()
        await self.gate.wait()
        return await super().admit(client, uids, fps)



def test_a_readmission_while_a_submit_of_its_request_awaits_the_hub_does_not_send_a_second_copy():
    async def go():
        hubs = [ResultHub(), SlowHub()]
        r, s, x = req("r", "same"), req("s1", "other"), req("x", "same")  # x: r's content under another id
        assert (uid_shard(r.uid, 2), uid_shard(s.uid, 2)) == (0, 1)
        cache, grouper = ResultCache(ReuseSettings(exact=True, in_flight=True, near=False), hubs, ManualClock(0.0)), JobSink()
        assert await cache.lookup([Job(0, x, fingerprint(x))]) == [0]  # x leads: r's content is being generated
        await hubs[0].admit("two", [r.uid], [fingerprint(r)])  # driver two submitted r before the restart
        ing = Ingest([grouper], [cache], hub=hubs, shard=(0, 2))
        ing.reconstructed()  # Ray restarted the ingest: its ``seen`` is gone
        submit = asyncio.ensure_future(ing.submit([r, s], "one", seqs=[1, 2]))
        await asyncio.wait_for(hubs[1].asked.wait(), 5.0)  # r's shard answered; s's has not yet
        again = asyncio.ensure_future(ing.readmit([r], "two"))
        await until(lambda: "two" in hubs[0]._owners.get(r.uid, ()))  # the re-admission is admitted
        for _ in range(20):  # whatever it does next without the hub's verdict on the submit
            await asyncio.sleep(0)
        hubs[1].gate.set()
        await asyncio.wait_for(asyncio.gather(submit, again), 5.0)
        following = {f.req.uid for f in cache.inflight.following()}
        sent = [j.req.uid for j in grouper.jobs]
        assert r.uid in following  # the submit's copy shares x's answer
        assert sent == [s.uid], "a copy of r was sent to be generated while r follows x's call in the cache"
    asyncio.run(go())


class SlowDispatcher:
    """A dispatcher stand-in holding nothing, whose answer to ``recall`` waits for ``gate``."""

    def __init__(self):
        self.asked, self.gate = asyncio.Event(), asyncio.Event()

    async def recall(self, uids):
        self.asked.set()
        await self.gate.wait()
        return []


def test_a_submit_of_a_request_whose_readmission_is_asking_who_holds_it_does_not_make_a_second_copy():
    """The other order: the re-admission asks who holds ``r``; meanwhile the submit of ``r`` awaits the hub."""
    async def go():
        hubs, disp = [ResultHub(), SlowHub()], SlowDispatcher()
        r, s, x = req("r", "same"), req("s1", "other"), req("x", "same")
        cache, grouper = ResultCache(ReuseSettings(exact=True, in_flight=True, near=False), hubs, ManualClock(0.0)), JobSink()
        assert await cache.lookup([Job(0, x, fingerprint(x))]) == [0]
        await hubs[0].admit("two", [r.uid], [fingerprint(r)])
        ing = Ingest([grouper], [cache], hub=hubs, shard=(0, 2), dispatchers=[disp])
        ing.reconstructed()
        again = asyncio.ensure_future(ing.readmit([r], "two"))
        await asyncio.wait_for(disp.asked.wait(), 5.0)
        submit = asyncio.ensure_future(ing.submit([r, s], "one", seqs=[1, 2]))
        await asyncio.wait_for(hubs[1].asked.wait(), 5.0)
        disp.gate.set()  # nobody holds r, says the dispatcher
        for _ in range(20):
            await asyncio.sleep(0)
        hubs[1].gate.set()
        await asyncio.wait_for(asyncio.gather(submit, again), 5.0)
        assert r.uid in {f.req.uid for f in cache.inflight.following()}
        assert [j.req.uid for j in grouper.jobs] == [s.uid], "a copy of r was sent while r follows x in the cache"
    asyncio.run(go())
