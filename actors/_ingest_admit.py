"""Ingest's side of the hub's check that an id names one content: a submit's ids admitted at the hub shards,
the ids another content holds refused, and a restarted hub shard given the fingerprints admitted here. Split from
``actors.ingest`` (a mixin placed first in ``Ingest``'s bases)."""

from __future__ import annotations

import asyncio

from actors._shards import by_result_uid, uid_shard
from actors._types import Job
from engine.core.request import Request
from engine.core.result import ID_TAKEN, Result

__all__ = ["HubAdmission", "_other_content"]


def _other_content(r: Request) -> Result:
    return Result(id=r.id, tenant=r.tenant, status="failed", arrival_s=r.arrival_s, reason=ID_TAKEN,
                  error=f"field 'id': tenant {r.tenant!r} already submitted id {r.id!r} with other content "
                        "(another driver of this engine?); an id names one request: use a new id for a new request")


class HubAdmission:
    """``Ingest``'s admission at the hub (its state, ``seen``, ``hubs`` and the marks, is ``Ingest``'s)."""

    async def _admit_deciding(self, client: str, jobs: list[Job]) -> list[Job]:
        """``_admit_across``, its ids marked as deciding meanwhile. A re-admission of one of them (another
        driver's) asked who held it in that wait, heard nobody and sent it to its grouper, while the submit's copy
        went on through the cache to follow an identical request in flight: a call billed beside the answer it was
        to share (a review). The caller marks those that go on ``_moving`` before any await."""
        asking = [j.req.uid for j in jobs]
        self._deciding.update(asking)
        try:
            return await self._admit_across(client, jobs)
        finally:
            self._deciding.difference_update(asking)
            if self._verdict is not None:
                self._verdict.set_result(None)
                self._verdict = None

    async def _decided(self, uids: list[str]) -> None:
        """Until no submit of ``uids`` awaits the hub's verdict (``_admit_deciding``)."""
        while any(u in self._deciding for u in uids):
            if self._verdict is None:
                self._verdict = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._verdict)

    async def _admit_across(self, client: str, jobs: list[Job]) -> list[Job]:
        """Claim ``jobs`` for ``client`` at the hub shards of their ids, which refuse an id another ingest shard
        admitted with other content; returns the jobs that may go on. Restarted, this ingest takes an id the hub
        knew with this content for a repeat, as its lost ``seen`` would have: its result is claimed, never
        generated and paid again (a review: a repeat of a request finished minutes before was)."""
        try:
            refused, repeats, missing = await self._admit_ids(client, [j.req for j in jobs], [j.fp for j in jobs])
        except Exception:
            # Not admitted (a hub shard is down): ``seen`` must not vouch for their content, or a restarted hub
            # shard takes it from ``reregister`` over the content the id was admitted with (a hunt: another
            # driver's request got the first one's answer). The driver re-admits them, checked again.
            for j in jobs:
                self.seen.pop(j.req.uid, None)
            raise
        if repeats and self._reborn:
            again = [j.req for j in jobs if j.req.uid in repeats]
            await self._claim_repeats(client, again, missing=missing & repeats)
            refused |= repeats
        return [j for j in jobs if j.req.uid not in refused] if refused else jobs

    async def _admit_ids(self, client: str, reqs: list[Request], fps: list[str]) -> tuple[set[str], ...]:
        """``ResultHub.admit`` at the hub shards of the ids: the ids refused (another content holds them), whose
        driver is told so and which stay unseen here, then the repeats and the claimed ids whose result is not
        at the hub (``ResultHub.admit``). A refusal from one shard stands even when another shard failed (which
        then raises: the driver re-admits those requests, and re-admission admits them again)."""
        asking = [r.uid for r in reqs]
        self._admitting.update(asking)
        try:
            answers, errors = await self.hubs.call_partial("admit", uid_shard, [r.uid for r in reqs], fps,
                                                           lead=(client,))
        finally:
            self._admitting.difference_update(asking)
        refused, repeats, missing = ({u for _, part in answers for u in part[k]} for k in range(3))
        if refused:
            bad = []
            for r in reqs:
                if r.uid in refused:
                    self.seen.pop(r.uid, None)
                    self._release(r.uid, client)
                    bad.append(_other_content(r))
            self.hubs.send("refuse", by_result_uid, bad, lead=(client,))
        if errors:
            raise errors[0]
        return refused, repeats, missing

    async def reregister(self, shard: int) -> int:
        """Hub shard ``shard`` restarted and lost the fingerprints of the ids it checks: give it those of the
        ids admitted here (the rest of the engine's are given by the other ingest shards). Returns how many."""
        n = len(self.hubs)  # not those the hub has yet to admit: one may be refused, and its content is not the id's
        uids = [u for u in self.seen if uid_shard(u, n) == shard and u not in self._admitting]
        await self.hubs[shard].call("register", uids, [self.seen[u] for u in uids], self.shard[0])  # even none:
        return len(uids)  # the hub waits for every ingest shard
