"""The grouper's side of an engine-wide cancel (``actors._cancel`` says what the cancel does): what waits in a
group, or is held by a budget, ends at no cost; a driver's withdrawal takes a request out before it is sent."""

from __future__ import annotations

import math

from actors._cancel import _WHY, _WITHDRAWN, _remember
from actors._shards import by_result_uid
from actors._stop_cut import end_at_stop
from actors._types import Job
from engine.core.result import Result
from engine.runtime.scheduler import GroupFailed

__all__ = ["CancelGroups"]


class CancelGroups:
    """The grouper's side: needs its ``pending``, ``table``, ``waits``, ``_timers``, ``_tasks``, ``_park_timer``,
    ``_ended``, ``_reserving``, ``hubs``, ``_resolve`` and ``_failed``."""

    _cancelled = False
    _reborn = False  # restarted by Ray: what it holds may be copies of requests sent before (``cut_at_stop``)
    _copies = False  # took a re-admitted copy (``Grouper.add``): its original may have been sent meanwhile
    _cut = False  # ended by the engine's stop (``cut_at_stop``), not by a cancel

    def reconstructed(self) -> None:
        self._reborn = True

    async def cancel(self) -> int:
        """Nothing held here is sent: every request waiting (in a group, or held by a budget) ends failed
        (``cancelled``), billed nothing, and so does every request that comes later (back from a cancelled
        batch, a follower of a request that ended so). Returns how many ended now."""
        jobs = self._cancel_held()
        await self._resolve([(j, self._failed(j, _WHY)) for j in jobs])
        return len(jobs)

    async def cut_at_stop(self) -> list[str]:
        """The engine stops: nothing held here is sent; the ids of those never sent (``_stop_cut.end_at_stop``)."""
        self._cut = True
        return end_at_stop(self, self._cancel_held(), _WHY)

    def _cancel_held(self) -> list[Job]:
        """Turn the grouper off (no await: nothing it holds is sent after this) and take out what it holds."""
        self._cancelled = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for g in list(self.table.groups.values()):
            self.table.drop(g)
        jobs = [*self.pending.values(), *self._take_parked()]
        self.pending.clear()
        return jobs

    _withdrawn: dict[str, None] | None = None

    async def withdraw(self, uids: list[str]) -> int:
        """Requests their driver withdrew (``Engine.cancel_requests``): those held here (in a group, held by a
        budget) end cancelled, billed nothing, and so does any that comes later (back from a batch, a follower
        of a request that failed, one still on its way here); the groups they left are decided again. Returns
        how many ended now."""
        if self._withdrawn is None:
            self._withdrawn = {}
        _remember(self._withdrawn, uids)
        gone = set(uids)
        now = self.clock.now()
        reqs, changed = self.table.withdraw(gone)
        jobs = [self.pending.pop(r.uid) for r in reqs if r.uid in self.pending]
        jobs += [h.payload[0] for u in gone if u in self.waits and (h := self.waits.drop(u)) is not None]
        ended = [(j, self._failed(j, _WITHDRAWN)) for j in jobs]
        dispatches = []
        for g in changed:
            try:
                ds, wake = self.table.decide(g, now)
            except GroupFailed as gf:
                dispatches += gf.dispatches
                ended += self._fail_members(gf.members, gf.cause)
                continue
            dispatches += ds
            self._schedule(wake)
        await self._resolve(ended)
        await self._send(dispatches)
        return len(jobs)

    def _keep_withdrawn_out(self, jobs: list[Job]) -> tuple[list[Job], list[tuple[Job, Result]]]:
        """``jobs`` less those withdrawn, and those ended cancelled."""
        w = self._withdrawn
        if not w:
            return jobs, []
        return ([j for j in jobs if j.req.uid not in w],
                [(j, self._failed(j, _WITHDRAWN)) for j in jobs if j.req.uid in w])

    async def _drop_withdrawn(self, batches: list) -> list:
        """``batches`` less the members withdrawn while their reservation was out (ended here, claims at 0)."""
        if not self._withdrawn:
            return batches
        out, ended = [], []
        for b in batches:
            keep, gone = self._keep_withdrawn_out(b.jobs)
            ended += gone
            if keep:
                out.append(b._replace(jobs=keep) if gone else b)
        if ended:
            await self._resolve(ended)
        return out

    async def _cancel_reserved(self, batches: list, refused: list) -> None:
        """A dispatch whose reservation was under way when the cancel came: its members (and any the ledger
        had the grouper hold back) end cancelled, their claims settled at 0, and the budget's refusals stand."""
        jobs = [*(j for b in batches for j in b.jobs), *self._take_parked()]
        if self._cut:  # after the stop's word: as what it held, the claims just made let go (``end_at_stop``)
            end_at_stop(self, jobs, _WHY, reserved=True)
            jobs = []
        await self._resolve([*refused, *((j, self._failed(j, _WHY)) for j in jobs)])

    def _take_parked(self) -> list[Job]:
        """Every job a budget holds back here, taken out, and their timer stopped."""
        if self._park_timer is not None:
            self._park_timer[1].cancel()
            self._park_timer = None
        late, again = self.waits.take(math.inf)
        return [h.payload[0] for h in (*late, *again)]

    async def _refuse_cancelled(self, jobs: list[Job]) -> None:
        """``add`` after the cancel: each job ends cancelled (one that ended here gets its result again; one
        held here already is a re-admitted copy, and is dropped)."""
        ended = self._ended
        again = [ended[j.req.uid] for j in jobs if j.req.uid in ended]
        if again:
            self.hubs.send("push", by_result_uid, again, [0.0] * len(again))
        fresh = {j.req.uid: j for j in jobs if not any(j.req.uid in held for held in
                                                       (ended, self.pending, self._reserving, self.waits))}
        if fresh and self._cut:  # after the stop's word: as what it held (``end_at_stop``)
            end_at_stop(self, list(fresh.values()), _WHY)
        elif fresh:
            await self._resolve([(j, self._failed(j, _WHY)) for j in fresh.values()])
