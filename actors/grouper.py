"""The similarity grouper: runs the policy over open groups (the same ``GroupTable`` the simulator uses) and
sends each dispatch, after its budget reservation, to the provider's dispatcher.

Shardable by compatibility key: the driver routes each request to one grouper by a hash of its key, so
several groupers can split the load and a group never spans two of them.
"""

from __future__ import annotations

import asyncio
import itertools

from actors._peer import Warm, as_peer
from actors._types import BatchJob, Job
from engine.catalog import Catalog
from engine.cost import price_alone
from engine.features import compat_key
from engine.result import Result
from engine.scheduler import Dispatch, GroupTable, Wake

__all__ = ["Grouper"]


class Grouper(Warm):
    def __init__(self, policy, catalog: Catalog, clock, dispatchers: dict, budget, hub,
                 name: str = "g0", budget_limited: bool = True):
        self.policy = policy
        self.catalog = catalog
        self.clock = clock
        self.dispatchers = {k: as_peer(v) for k, v in dispatchers.items()}
        self.budget = as_peer(budget)
        self.hub = as_peer(hub)
        self.name = name
        self.budget_limited = budget_limited
        self.table = GroupTable(policy, catalog)
        self.pending: dict[str, Job] = {}
        self._bids = itertools.count()
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task] = set()
        self.dispatched = 0

    async def set_clock(self, clock) -> None:
        """The engine sets the clock once every actor is up, so engine time 0 is when submitting can start."""
        self.clock = clock

    def __repr__(self) -> str:
        return f"Grouper({self.name}, pending={len(self.pending)}, dispatched={self.dispatched}, {self.table!r})"

    async def add(self, jobs: list[Job]) -> None:
        now = self.clock.now()
        dispatches: list[Dispatch] = []
        failed: list[Result] = []
        for job in jobs:
            self.pending[job.req.id] = job
            try:
                ds, wake = self.table.add(job.req, compat_key(job.req), now)
            except Exception as exc:  # a policy failure fails its requests, never the engine
                self.pending.pop(job.req.id, None)
                failed.append(self._failed(job, f"policy error: {exc}"))
                continue
            dispatches.extend(ds)
            self._schedule(wake)
        if failed:
            await self.hub.call("push", failed, [0.0] * len(failed))
        await self._send(dispatches)

    def _failed(self, job: Job, error: str, status: str = "failed") -> Result:
        r = job.req
        return Result(id=r.id, status=status, provider=r.provider, model=r.model, arrival_s=r.arrival_s,
                      done_s=self.clock.now(), deadline_met=False, error=error)

    def _schedule(self, wake: Wake | None) -> None:
        if wake is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            task = loop.create_task(self._on_wake(wake))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        handle = loop.call_later(self.clock.real_delay(wake.at - self.clock.now()), fire)
        self._timers.add(handle)

    async def _on_wake(self, wake: Wake) -> None:
        try:
            ds, nxt = self.table.wake(wake, max(self.clock.now(), wake.at))
        except Exception as exc:
            members = list(wake.group.members)
            self.table.groups.pop(wake.group.key, None)
            jobs = [self.pending.pop(r.id) for r in members if r.id in self.pending]
            await self.hub.call("push", [self._failed(j, f"policy error: {exc}") for j in jobs], [0.0] * len(jobs))
            return
        self._schedule(nxt)
        await self._send(ds)

    async def _send(self, dispatches: list[Dispatch]) -> None:
        if not dispatches:
            return
        batches: list[BatchJob] = []
        for d in dispatches:
            jobs = [self.pending.pop(r.id) for r in d.members]
            # Reserve the list price of each member alone: no mode or cache state bills more than that.
            est = sum(price_alone(j.req, self.catalog, "sync").total for j in jobs)
            dec = d.decision
            batches.append(BatchJob(f"{self.name}-{next(self._bids)}", dec.mode, dec.hedge_at, dec.cache_write,
                                    dec.recommendation, dec.reason, jobs, est))
        if self.budget_limited:
            allowed = await self.budget.call("reserve_many", [(b.bid, b.reserved_usd) for b in batches])
        else:  # no limit: nothing can be refused, so urgent work does not wait for a round trip
            allowed = [True] * len(batches)
        refused: list[Result] = []
        per_provider: dict[str, list[BatchJob]] = {}
        for b, ok in zip(batches, allowed):
            if ok:
                self.dispatched += len(b.jobs)
                per_provider.setdefault(b.jobs[0].req.provider, []).append(b)
            else:
                refused.extend(self._failed(j, "budget_exhausted", status="rejected") for j in b.jobs)
        for provider, part in per_provider.items():  # one call per dispatcher, however many dispatches
            self.dispatchers[provider].send("run_many", part)
        if refused:
            await self.hub.call("push", refused, [0.0] * len(refused))

    async def set_dispatchers(self, dispatchers: dict) -> None:
        """Dispatchers need this grouper's handle and it needs theirs: the engine wires them after creation."""
        self.dispatchers = {k: as_peer(v) for k, v in dispatchers.items()}

    async def stats(self) -> dict:
        return {"pending": len(self.pending), "groups": len(self.table.groups), "dispatched": self.dispatched}
