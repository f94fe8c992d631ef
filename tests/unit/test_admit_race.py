"""A restarted hub shard is never given the fingerprint of an id whose admission is still out.

The case: a sharded ingest (or one Ray restarted, its ``seen`` lost) admits ids at the hub shard of each id
(``Ingest._admit_ids``), and ``reregister`` gives a restarted hub shard the fingerprints of the ids admitted here,
less those still being admitted: one may yet be refused, and its content is then not the id's. Two admissions of
one id overlap when one driver re-admits it while another submits the same id with other content. The
re-admission's end let go of the "being admitted" mark the submit still needed (a set, and only the first holder
had marked it), so the hub took the submit's content for the id over the one it had admitted: both contents were
generated and paid under one id, and a driver got the other content's answer.
"""

import asyncio

from actors import Ingest, ResultHub
from engine.core.features import fingerprint
from engine.core.request import Request
from tests.unit.helpers import JobSink, until


def req(prompt: str) -> Request:
    return Request.model_validate({"id": "r1", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": prompt,
                                   "input_tokens": 50, "output_tokens": 10, "reuse": "exact"})



class GatedHub(ResultHub):
    """A hub shard whose ``admit`` calls each wait for their own gate, and whose ``recall`` waits for ``back``."""

    def __init__(self):
        super().__init__()
        self.gates: list[asyncio.Event] = []
        self.recalling, self.back = asyncio.Event(), asyncio.Event()

    async def admit(self, client, uids, fps):
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return await super().admit(client, uids, fps)

    async def recall(self, uids):
        self.recalling.set()
        await self.back.wait()
        return await super().recall(uids)



def test_an_id_still_being_admitted_is_not_reregistered_when_another_admission_of_it_ends():
    async def go():
        hub, grouper = GatedHub(), JobSink()
        ing = Ingest([grouper], None, hub=[hub], shard=(0, 2))  # sharded: every admission asks the hub
        theirs, mine = req("b"), req("a")  # one id, two contents, two drivers
        again = asyncio.ensure_future(ing.readmit([theirs], "two"))
        await until(lambda: len(hub.gates) == 1)
        submit = asyncio.ensure_future(ing.submit([mine], "one"))
        await until(lambda: len(hub.gates) == 2)
        hub.gates[0].set()  # the re-admission is admitted; it then asks who holds the request
        await asyncio.wait_for(hub.recalling.wait(), 5.0)
        # The hub shard restarts now: the submit's admission is still out (it will be refused).
        assert await ing.reregister(0) == 0, "the fingerprint of an id still being admitted was given to the hub"
        assert hub._fps[theirs.uid] == fingerprint(theirs)
        hub.gates[1].set()
        hub.back.set()
        assert await asyncio.wait_for(submit, 5.0) == 0  # refused: the id names the other content
        assert await asyncio.wait_for(again, 5.0) == 1
        await asyncio.sleep(0)
        assert [j.req.prompt for j in grouper.jobs] == ["b"], "two contents were generated under one id"
        (refused,) = await hub.pull(0, "one")
        assert refused.status == "failed" and "other content" in refused.error
    asyncio.run(go())
