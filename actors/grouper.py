"""The similarity grouper: runs the policy over open groups (the same ``GroupTable`` the simulator uses) and
sends each dispatch, after its budget reservation, to the provider's dispatcher.

Budgets: each member reserves the upper bound of its dispatch (``reserve_bound``). A member the budget holds
back waits here under the kernel's rule (``engine.runtime.waiting``, as in the simulator), tried again on one
timer, in one reservation call for what is due. One refused outright is ``rejected`` (budget_exhausted).

Shardable by compatibility key: ingest routes each request to one grouper by a hash of its key, so several
groupers can split the load and a group never spans two of them.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict

from actors._cancel_groups import CancelGroups
from actors._grouper_budgets import BudgetFollow
from actors._grouper_ends import GroupEnds
from actors._grouper_learn import Learning
from actors._grouper_park import Parking
from actors._peer import Warm, as_peer, resolve_clock
from actors._shards import Shards, by_result_uid
from actors._types import OWN_ROWS, BatchJob, Held, Job
from engine.core._logkeys import get_logger
from engine.core.catalog import Catalog
from engine.core.draws import engine_day_origin
from engine.core.features import compat_key
from engine.core.grouping import Decision, Group, WarmNote
from engine.core.result import Result
from engine.runtime.reservation import goes_back
from engine.runtime.scheduler import Dispatch, GroupFailed, GroupTable, Wake
from engine.runtime.waiting import BudgetWaits, sync_lead

__all__ = ["Grouper"]

log = get_logger("smartbatch.grouper")


class Grouper(GroupEnds, CancelGroups, Learning, BudgetFollow, Parking, Warm):
    def __init__(self, policy, catalog: Catalog, clock, dispatchers: dict, budget, hub,
                 name: str = "g0", budget_limited: bool = True, *, max_attempts: int = 4,
                 reserve_model_max: bool = True, cache=None, budget_specs: tuple = (),
                 day_origin_s: float | None = None):
        self.policy = policy
        self.catalog = catalog
        self.clock, _ = resolve_clock(clock)
        # Hours of day count from the engine's origin: the setting, else the engine clock's (a function of the
        # clock, so a grouper Ray restarts, which reads the published clock here, counts from the same).
        self._day_origin = day_origin_s
        self.dispatchers = {k: as_peer(v) for k, v in dispatchers.items()}
        self.budget = as_peer(budget)
        self.hubs = Shards(hub)  # each result to its id's shard
        self.caches = Shards(cache)  # told of requests resolved here, so their in-flight followers go on
        self.name = name
        self.budget_limited = budget_limited
        self.max_attempts = max_attempts
        self.reserve_model_max = reserve_model_max
        self.budget_specs = tuple(budget_specs)
        # The budget actor's state held (``BudgetFollow``): its change number, of which run of it (None: none
        # heard of yet), the runs left behind, and the timer (or the call) of the next ask.
        self._budget_version, self._budget_incarnation = 0, None
        self._left_incarnations: set[str] = set()  # a few: one per restart of the budget actor
        self._budget_ask: asyncio.TimerHandle | asyncio.Task | None = None
        # Members a budget holds back, by request id, each with its dispatch (actors._grouper_park).
        self.waits = BudgetWaits(self._park_step, sync_lead(catalog))
        self._park_timer: tuple[float, asyncio.TimerHandle] | None = None
        self._trying = False  # a try of held work is under way (``Parking._retry_parked``): one at a time
        self._claims = itertools.count()
        # Claim ids must be unique across engines sharing one Redis ledger and across restarts.
        self._claim_prefix = f"{name}-{secrets.token_hex(4)}"
        self._ledger_down = ""  # why the budget ledger last failed to answer (the reason of work it held back)
        self.table = GroupTable(policy, catalog, engine_day_origin(day_origin_s, self.clock), keep_going=True)
        self.table.budget.model_max = reserve_model_max
        self._heard: dict[str, int] = {}  # dispatcher -> number of its last message about batches taken
        self._first_heard: dict[str, int] | None = None  # while relearning: the first message that came meanwhile
        self.pending: dict[str, Job] = {}
        self._reserving = Held()  # uids under way here (a reservation call, a rejection, a check): none is taken anew
        # Claims a failed reservation call may have left open (the hedged ones it was to release, the ones it may
        # have made before its answer was lost): released by the next call (settling an unknown claim is a no-op).
        self._unsure_claims: list[str] = []
        self._dispatched: OrderedDict[str, tuple[str, str, str]] = OrderedDict()  # uid -> claim (``_lost_claim``)
        self._runs: dict[str, set[asyncio.Task]] = {}  # provider -> its dispatch calls under way
        self._ended: OrderedDict[str, Result] = OrderedDict()  # requests resolved here lately (rejected, failed)
        self._bids = itertools.count()
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task] = set()
        self.dispatched = 0

    async def set_clock(self, clock) -> None:
        """The engine sets the clock once every actor is up, so engine time 0 is when submitting can start."""
        self.clock = clock
        self._arm_budget_ask()  # at the start, and from the rewire of a grouper Ray restarted
        origin = engine_day_origin(self._day_origin, clock)
        est = self.table.turnarounds
        if est is not None and est.day_origin_s != origin:
            # Only while the origin was unknown: at the first clock, before anything was learned (or in a
            # restarted grouper that could not read the published clock: ``rewire`` relearns next).
            self.table.relearn(origin)

    def __repr__(self) -> str:
        # Ray may call repr from another thread while the loop changes the groups: never let that kill the actor.
        try:
            table = repr(self.table)
        except RuntimeError:
            table = "GroupTable(changing)"
        return f"Grouper({self.name}, pending={len(self.pending)}, dispatched={self.dispatched}, {table})"

    async def recall(self, uids: list[str]) -> list[str]:
        """Of ``uids``, those held here (waiting, parked, reserving) or ended here lately (sent again)."""
        held = [u for u in uids if u in self.pending or u in self.waits or u in self._reserving or u in self._ended]
        again = [self._ended[u] for u in held if u in self._ended]
        if again:
            self.hubs.send("push", by_result_uid, again, [0.0] * len(again))
        return held

    async def forget(self, uids: list[str]) -> None:
        """The driver forgot these requests (past its retention window): their ids may name new requests, which
        must not be answered with a result that ended here for the old one."""
        for u in uids:
            self._ended.pop(u, None)
            if self._withdrawn:  # free again: a new request under it is sent (a review)
                self._withdrawn.pop(u, None)

    async def observe_warmth(self, notes: list[WarmNote]) -> None:
        """Prompt-cache warmth the dispatchers' results showed (``GroupTable.warm``): a hint, whose loss costs a
        cheaper way at most, never a request. Waiting turns it makes cheaper sync now go at once."""
        pulled = self.table.warm(notes, self.clock.now())
        for w in pulled.wakes:
            self._schedule(w)
        failed = [x for gf in pulled.failed for x in self._fail_members(gf.members, gf.cause)]
        if failed:  # ended first, as in ``_on_wake``: until then a re-admitted copy would find them nowhere
            await self._resolve(failed)
        await self._send(pulled.dispatches + [d for gf in pulled.failed for d in gf.dispatches])

    async def add(self, jobs: list[Job]) -> None:
        self._arm_budget_ask()  # a grouper Ray restarted whose rewire has not come asks all the same
        self._copies = self._copies or any(j.seq >= OWN_ROWS for j in jobs)  # (``cut_at_stop``)
        if self._cancelled:
            await self._refuse_cancelled(jobs)
            return
        jobs, withdrawn = self._keep_withdrawn_out(jobs)
        if withdrawn:
            await self._resolve(withdrawn)
        now = self.clock.now()
        dispatches: list[Dispatch] = []
        failed: list[tuple[Job, Result]] = []
        dup_claims: list[tuple[str, float]] = []
        lost: list[tuple[Job, str]] = []  # re-admitted, with the claim of their lost dispatch
        again: list[Result] = []
        # Fresh requests of one arrival instant join their groups first, and each group is decided once they all
        # have: as the simulator groups the arrivals of one instant (``GroupTable.join``).
        joined: dict[int, Group] = {}
        instant: float | None = None

        def decide_joined() -> None:
            for g in joined.values():
                try:
                    ds, wake = self.table.decide(g, now)
                except GroupFailed as gf:
                    dispatches.extend(gf.dispatches)
                    failed.extend(self._fail_members(gf.members, gf.cause))
                    continue
                dispatches.extend(ds)
                self._schedule(wake)
            joined.clear()

        for job in jobs:
            fresh = job.hedges == 0 and job.attempts == 0 and job.standard is None
            if joined and (not fresh or job.req.arrival_s != instant):
                decide_joined()
            uid = job.req.uid
            if uid in self._ended:  # ended here (rejected): a late re-admitted copy gets that result again
                again.append(self._ended[uid])
                if job.claim is not None:
                    dup_claims.append((job.claim, 0.0))
                continue
            if uid in self.pending or uid in self.waits or uid in self._reserving:
                # Re-admitted after a restart elsewhere while this grouper still holds it: one copy only.
                if job.claim is not None:
                    dup_claims.append((job.claim, 0.0))
                continue
            if fresh and job.seq >= OWN_ROWS and job.claim is None and (x := self._lost_claim(job)):  # re-admitted
                lost.append((job, x))  # joins once its old claim is judged (``_check_lost``)
                continue
            self.pending[uid] = job
            if job.standard is not None:  # a flex call gone standard: sent sync as decided, once reserved so
                cw, rec, why = job.standard
                self.pending[uid] = job._replace(standard=None)
                dispatches.append(Dispatch(Decision("dispatch", mode="sync", cache_write=cw, recommendation=rec,
                                                    reason=why), [job.req]))
                continue
            if job.hedges >= self.max_attempts:
                # Progress guard (as in the simulator): a request hedged this often is sent sync now.
                dispatches.append(Dispatch(Decision("dispatch", mode="sync", reason="hedged too often"),
                                           [job.req]))
                continue
            try:
                if fresh:
                    g = self.table.join(job.req, compat_key(job.req), now)
                    joined.setdefault(id(g), g)
                    instant = job.req.arrival_s
                    continue
                ds, wake = self.table.add(job.req, compat_key(job.req), now, returned=True)
            except GroupFailed as gf:  # its group's decision failed: what it decided goes, the rest fails
                dispatches.extend(gf.dispatches)
                failed.extend(self._fail_members(gf.members, gf.cause))
                continue
            except Exception as exc:  # a policy failure fails its requests, never the engine
                self.pending.pop(job.req.uid, None)
                failed.append((job, self._failed(job, f"policy error: {exc}")))
                continue
            dispatches.extend(ds)
            self._schedule(wake)
        decide_joined()
        if dup_claims:
            self.budget.deliver("settle_many", dup_claims)
        if again:
            self.hubs.send("push", by_result_uid, again, [0.0] * len(again))
        if failed:
            await self._resolve(failed)
        self._check_lost(lost)
        await self._send(dispatches)

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
        except GroupFailed as gf:
            await self._resolve(self._fail_members(gf.members, gf.cause))
            await self._send(gf.dispatches)
            return
        except Exception as exc:
            members = list(wake.group.members)
            self.table.drop(wake.group)
            jobs = [self.pending.pop(r.uid) for r in members if r.uid in self.pending]
            await self._resolve([(j, self._failed(j, f"policy error: {exc}")) for j in jobs])
            return
        self._schedule(nxt)
        await self._send(ds)

    async def _send(self, dispatches: list[Dispatch]) -> None:
        if not dispatches:
            return
        batches: list[BatchJob] = []
        for d in dispatches:
            jobs = [self.pending.pop(r.uid) for r in d.members]
            dec = d.decision
            batches.append(BatchJob(f"{self.name}-{next(self._bids)}", dec.mode, dec.hedge_at, dec.cache_write,
                                    dec.recommendation, dec.reason, jobs))
        await self._dispatch(batches)

    async def _dispatch(self, batches: list[BatchJob], marked: list[str] | None = None) -> None:
        """Reserve, then send each dispatcher its batches in one call. ``marked``: ids the caller marked as under
        way (``_retry_parked``), let go of (and emptied) once this call has marked them itself, before it waits."""
        now = self.clock.now()
        refused: list[tuple[Job, Result]] = []
        back = [j for b in batches for j in b.jobs if goes_back(b.mode, b.hedge_at, now, j.req)]
        if back:  # held past its hedge by a budget: back to the policy, as at a hedge (the simulator's ``send``)
            gone = {j.req.uid for j in back}
            self.waits.answered(gone)  # taken by a try, they go back to the policy: they hold nothing behind them
            rest = [b._replace(jobs=[j for j in b.jobs if j.req.uid not in gone]) for b in batches]
            # Neither pending nor parked until ``add`` takes them back: a copy re-admitted meanwhile is one.
            self._reserving.update(gone)
            try:
                await self._dispatch([b for b in rest if b.jobs], marked)
            finally:
                self._reserving.difference_update(gone)
                await self.add([j._replace(hedges=j.hedges + 1) for j in back])
            return
        if self.budget_limited:
            # While the reservation call is out, these requests are neither pending nor parked: a copy
            # re-admitted meanwhile must still be recognised, or both would go on. So until they are sent or
            # ended: ending a member withdrawn meanwhile asks the dispatchers first, and a copy of a refused or
            # reserved member re-admitted in that wait was sent beside it (a review).
            uids = [j.req.uid for b in batches for j in b.jobs]
            self._reserving.update(uids)
            self._let_go(marked)
            try:
                batches = await self._reserve(batches, now, refused)
                if self._cancelled:  # cancelled while the ledger answered: sent nowhere, its claims settled at 0
                    await self._cancel_reserved(batches, refused)
                    return
                batches = await self._drop_withdrawn(batches)
            finally:
                self._reserving.difference_update(uids)
        self._let_go(marked)
        per_provider: dict[str, list[BatchJob]] = {}
        for b in batches:
            self.dispatched += len(b.jobs)
            per_provider.setdefault(b.jobs[0].req.provider, []).append(b)
        learns = (True,) if self.table.turnarounds is not None else ()  # tell me of its batches' turnarounds
        self._send_runs(per_provider, learns)  # one call per dispatcher, however many dispatches
        if refused:
            await self._resolve(refused)

    def _let_go(self, marked: list[str] | None) -> None:
        if marked:
            self._reserving.difference_update(marked)
            marked.clear()

    async def stats(self) -> dict:
        return {"pending": len(self.pending), "groups": len(self.table.groups), "dispatched": self.dispatched,
                "parked": len(self.waits), "budget_change": self._budget_version,
                "budgets": [s.name for s in self.budget_specs]}  # those it reserves under (``BudgetFollow``)
