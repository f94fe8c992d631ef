"""Discrete-event simulator: replays a trace through a policy against simulated providers.

The providers follow the catalog: sync latency (lognormal), failures with retries and exponential backoff,
rate limits (requests and tokens per minute, max concurrency), batch-API turnaround per submission slot,
prompt-cache warmth with TTL, and GPU batch runtimes. All randomness comes from ``Draws`` (one seed), so a
run is deterministic and every policy faces the same world. Rules are in docs/cost-model.md and
docs/simulator.md.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence

import numpy as np

from engine.core._budget_check import check_budgets
from engine.core.catalog import Catalog, default_catalog
from engine.core.cost import MODES
from engine.core.draws import Draws
from engine.core.errors import PolicyError
from engine.core.features import compat_key, fingerprint, near_class, near_vectors
from engine.core.grouping import Decision, Group
from engine.core.ledger import BudgetBook
from engine.core.request import Request
from engine.core.resilience import check_fallbacks
from engine.core.scheduling import Scheduling
from engine.core.settings import Settings, load_settings
from engine.core.trace import with_day_origin
from engine.runtime.admission import InFlight, release_lead
from engine.runtime.outcomes import call_mode, verdict
from engine.runtime.providers import Attempt, SimProvider, Work
from engine.runtime.reservation import dispatch_mode, goes_back
from engine.runtime.reuse import ReuseIndex
from engine.runtime.scheduler import Dispatch, GroupTable, Wake
from engine.runtime.waiting import BudgetWaits, sync_lead
from engine.sim._budget import SimBudget
from engine.sim._calls import SimCalls
from engine.sim._reuse import SimReuse
from engine.sim.results import (
    _FAILED,
    _OK,
    _PENDING,
    _REUSE,
    _REUSED,
    _SYNC,
    BatchRecord,
    SimResult,
)

__all__ = ["BatchRecord", "SimResult", "simulate"]



class _Sim(SimBudget, SimReuse, SimCalls):
    def __init__(self, reqs: Sequence[Request], policy, catalog: Catalog, settings: Settings, draws: Draws,
                 record_calls: bool = False):
        self.reqs = list(reqs)  # a rerouted request is replaced by its fallback copy
        self.policy = policy
        self.catalog = catalog
        self.settings = settings
        self.draws = draws
        self.max_att = settings.sim.max_attempts
        n = len(reqs)
        self.cost = np.zeros(n)
        self.done_at = np.full(n, np.nan)
        self.status = np.zeros(n, dtype=np.int8)
        self.mode = np.full(n, -1, dtype=np.int8)
        self.hit = np.zeros(n, dtype=np.int8)
        self.batch_of = np.full(n, -1, dtype=np.int64)
        self.attempts = np.zeros(n, dtype=np.int64)
        self.hedges = np.zeros(n, dtype=np.int64)
        self.idx_of = {r.uid: i for i, r in enumerate(reqs)}  # (tenant, id): two tenants may share an id
        self.compat = [compat_key(r) for r in reqs]
        self.reuse = policy.reuse
        any_reuse = self.reuse.exact or self.reuse.in_flight or self.reuse.near
        share = settings.cache.share_across_tenants  # as the live cache keys them
        self.fps = [fingerprint(r, share_across_tenants=share) for r in reqs] if any_reuse else None
        self.index = ReuseIndex(dim=1)
        self.vecs: dict[int, np.ndarray] = {}
        self.near_threshold = max(self.reuse.near_threshold, settings.sim.near_floor)
        # a near duplicate is searched for within its tenant, compatibility class and chat context (near_class);
        # only a trace that asks near needs the classes
        wants = self.reuse.near and any(r.reuse == "near" for r in reqs)
        self.near_cls = [near_class(r, r.tenant) for r in reqs] if wants else []
        if wants:
            classes = {self.near_cls[i] for i, r in enumerate(reqs) if r.reuse == "near"}
            need = [i for i in range(len(reqs)) if self.near_cls[i] in classes]
            if need:
                mat = near_vectors([reqs[i] for i in need])
                self.index = ReuseIndex(dim=mat.shape[1])
                self.vecs = dict(zip(need, mat))
        self.inflight: InFlight[int] = InFlight(self.reuse, release_lead(catalog, self.reuse))
        self.near_indexed: set[str] = set()  # fingerprints with a row in the near index (one row each)
        self.table = GroupTable(policy, catalog, settings.sim.day_origin_s)
        sched = getattr(policy, "scheduling", None) or Scheduling(order="fifo", fair_share=False)
        check_fallbacks(catalog, settings.resilience)
        check_budgets(catalog, settings.budgets)
        self.providers = {name: SimProvider(p, catalog, settings, draws, scheduling=sched, record=record_calls)
                          for name, p in catalog.providers.items()}
        self.pump_at: dict[str, float] = {}
        self.rerouted = 0
        self.flex_refused = 0  # flex calls refused for want of capacity, each sent again at the standard tier
        self.moved: set[int] = set()  # rerouted to a fallback model: its fingerprint is the original model's
        b = settings.budgets
        self.book = BudgetBook(list(b.specs), b.throttle) if b.specs else None
        self.model_max = self.table.budget.model_max = b.reserve_output == "model_max"
        self.claim_ids = itertools.count()
        self.claim_of: dict[int, tuple[str, float]] = {}
        if self.book is not None:  # a flex claim holds the flex price: the gate hands such work back to go standard
            for prov in self.providers.values():
                prov.flex_reserved = lambda w: w.idxs[0] in self.claim_of
        self.waits = BudgetWaits(lead_s=sync_lead(catalog))
        self.tick_at = math.inf
        self.budget_waits = 0
        self.deferrals = 0
        self.rejected: dict[str, int] = {}
        self.reject_why: dict[int, str] = {}
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        self.batch_ids = itertools.count()
        self.batches: list[BatchRecord] = []
        self.arrived: dict[int, Group] = {}  # groups that arrivals of this instant joined, not yet decided
        self.now = 0.0

    # -- event loop ----------------------------------------------------------------------------------------
    def push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload))

    def run(self) -> None:
        reqs, heap = self.reqs, self.heap
        n, i = len(reqs), 0
        while True:
            t_arr = reqs[i].arrival_s if i < n else math.inf
            if heap and heap[0][0] <= t_arr:
                t, _, kind, payload = heapq.heappop(heap)
                self.now = t
                getattr(self, "on_" + kind)(payload)
            elif i < n:
                # Arrivals at one instant are grouped together before any of their groups is decided, as the
                # live grouper takes those of one call (``GroupTable.join``).
                self.now = t_arr
                while True:
                    self.admit(i, fresh=True)
                    i += 1
                    if i >= n or reqs[i].arrival_s != t_arr:
                        break
                self.decide_arrived()
            else:
                break

    def on_wake(self, w: Wake) -> None:
        self.apply(*self.table.wake(w, self.now))

    def on_retry(self, i: int) -> None:
        self.admit(i, fresh=False)

    def on_hedge(self, idxs: list[int]) -> None:
        # Back to the policy, not straight to sync: the member whose deadline set the hedge now has no time
        # for a batch and goes sync, while members with later deadlines may ride another batch.
        for j in idxs:
            # A cancelled batch bills nothing unfinished: release the claim now, before the member reserves
            # again for its sync fallback.
            self.settle_claim_now(j)
            self.hedges[j] += 1
            if self.hedges[j] >= self.max_att:  # progress guard against a policy that re-batches forever
                bid = int(self.batch_of[j])  # -1: held back by a budget before any batch took it
                self.send(Decision("dispatch", mode="sync"), [j], bid if bid >= 0 else None)
            else:
                self.admit(j, fresh=False)

    def on_pump(self, name: str) -> None:
        if self.pump_at.get(name) == self.now:
            del self.pump_at[name]
        self.pump(name)

    def on_sync_fail(self, payload) -> None:
        i, k, a, w = payload
        prov = self.providers[self.reqs[i].provider]
        prov.failure(self.reqs[i].model, self.now)
        if verdict(False, int(self.attempts[i]), self.max_att) == "fail":
            self.settle_claim(i, 0.0, self.now)
            self.fail_final(i, self.now)
        else:
            self.push(prov.retry_at(i, k, a), "requeue", w._replace(attempts=[int(self.attempts[i])]))

    def on_sync_ok(self, i: int) -> None:
        self.providers[self.reqs[i].provider].success(self.reqs[i].model, self.now)

    def on_requeue(self, w: Work) -> None:
        r = w.reqs[0]
        self.providers[r.provider].enqueue(w)
        self.pump(r.provider)

    def on_settle(self, item: tuple[str, float]) -> None:
        self.book.settle_many([item])

    def on_budget_tick(self, at: float) -> None:
        if self.tick_at == at:
            self.tick_at = math.inf
        self.release_waiters()

    # -- admission and reuse -------------------------------------------------------------------------------
    def resolve_reused(self, i: int, at: float, hit: int) -> None:
        self.status[i], self.mode[i], self.hit[i], self.done_at[i] = _REUSED, _REUSE, hit, at

    def admit(self, i: int, fresh: bool) -> None:
        r, now, reuse = self.reqs[i], self.now, self.reuse
        if self.attempts[i] >= self.max_att:
            self.fail_final(i, now)
            return
        fps = self.fps
        if fresh and fps is not None and r.reuse != "none":
            fp = fps[i]
            found = self.index.exact(fp)
            if found is not None and found[1] <= now and reuse.exact:  # a stored result
                self.resolve_reused(i, now, 1)
                return
            # In flight: attach to the leader under ``may_follow`` (its deadline, or a release time of our own).
            # A live engine cannot know when a call will finish, so the simulator does not use that either.
            if self.follow(fp, r, i, "in_flight"):
                return
            if reuse.near and r.reuse == "near" and i in self.vecs and self.near(i, r, now):
                return
        # Back from a dispatch (a batch cancelled late, a failed attempt), as the live grouper tells it.
        returned = bool(self.hedges[i] or self.attempts[i])
        # A request leads when it is first generated, as the cache takes it (a miss, a released follower, an
        # orphan), never on its way back from a dispatch, which the cache does not see.
        if fps is not None and not returned and self.inflight.lead(fps[i], r, i):
            self.index_near(i, fps[i], math.inf)
        if fresh and not returned:
            g = self.table.join(r, self.compat[i], now)
            self.arrived.setdefault(id(g), g)  # decided once the instant's other arrivals have joined
        else:
            self.apply(*self.table.add(r, self.compat[i], now, returned=returned))

    def decide_arrived(self) -> None:
        """Decide the groups this instant's arrivals joined; their dispatches reserve together, as those of one
        grouper call do."""
        groups, self.arrived = self.arrived, {}
        dispatches: list[Dispatch] = []
        for g in groups.values():
            ds, wake = self.table.decide(g, self.now)
            dispatches += ds
            if wake is not None:
                self.push(wake.at, "wake", wake)
        self.apply(dispatches, None)

    def apply(self, dispatches: list[Dispatch], wake: Wake | None) -> None:
        if dispatches:
            self.send_many([(d.decision, [self.idx_of[r.uid] for r in d.members]) for d in dispatches])
        if wake is not None:
            self.push(wake.at, "wake", wake)

    # -- dispatch ------------------------------------------------------------------------------------------
    def send(self, d: Decision, idxs: list[int], bid: int | None) -> None:
        self.send_many([(d, idxs)], bid)

    def send_many(self, sends: list[tuple[Decision, list[int]]], bid: int | None = None) -> None:
        """Dispatches decided together, as the grouper's ``_dispatch`` takes them: the members a budget held past
        their hedge go back to the policy (as at a hedge, where a second batch may be on time) once the rest of
        every dispatch has reserved, in one go; even none left refreshes what the budgets hold, which the policy
        reads when those members are grouped again. One by one, the policy judged the members back of the first
        before the second had reserved, and a live grouper decided them otherwise (a helper's review)."""
        back: list[int] = []
        todo: list[tuple[list[int], str, Decision]] = []
        for d, idxs in sends:
            mode = dispatch_mode(d.mode, d.hedge_at, self.now)
            if mode != d.mode:
                gone = {i for i in idxs if goes_back(d.mode, d.hedge_at, self.now, self.reqs[i])}
                back += [i for i in idxs if i in gone]
                idxs = [i for i in idxs if i not in gone]
            todo.append((idxs, mode, d))
        for (_, mode, d), idxs in zip(todo, self.reserve(todo), strict=True):
            if idxs:
                self.launch(d, idxs, bid, mode)
        if back:
            self.on_hedge(back)

    def launch(self, d: Decision, idxs: list[int], bid: int | None, mode: str) -> None:
        first = self.reqs[idxs[0]]
        if bid is None:
            bid = next(self.batch_ids)
            self.batches.append(BatchRecord(bid, self.now, first.provider, first.model, mode, len(idxs),
                                            d.recommendation, d.reason))
        prov = self.providers[first.provider]
        if mode in ("sync", "flex"):
            for i in idxs:
                prov.enqueue(Work(mode, bid, [self.reqs[i]], [i], [int(self.attempts[i])], d.cache_write))
        else:
            prov.enqueue(Work(mode, bid, [self.reqs[i] for i in idxs], idxs,
                              [int(self.attempts[i]) for i in idxs], False, d.hedge_at))
        self.pump(first.provider)

    def complete(self, i: int, at: float, cost: float, mode: int, bid: int) -> None:
        if mode == _SYNC:
            r = self.reqs[i]
            mode = MODES.index(call_mode(self.catalog.providers[r.provider].models[r.model]))
        self.status[i], self.mode[i], self.cost[i], self.done_at[i], self.batch_of[i] = _OK, mode, cost, at, bid
        fps = self.fps
        if fps is not None:
            fp = fps[i]
            if i not in self.moved:  # a fallback model's output is no stored answer to the original model
                self.index.add(fp, i, at)
                self.index_near(i, fp, at)
            # It leads until its result exists, as in the cache: the requests waiting on it resolve then.
            self.push(at, "result", (fp, i))

    def on_result(self, payload: tuple[str, int]) -> None:
        fp, i = payload
        for f, hit in self.inflight.done(fp, i):
            self.resolve_reused(f, self.now, 2 if hit == "in_flight" else 3)

    def fail_final(self, i: int, at: float) -> None:
        self.status[i], self.done_at[i] = _FAILED, at
        self.orphans(i)

    def orphans(self, i: int) -> None:
        """``i`` failed or was rejected for good: the requests that followed it follow another copy in flight,
        or are generated after all (the first of them leads, and those after it may follow it)."""
        if self.fps is not None:
            fp = self.fps[i]
            for f, hit in self.inflight.orphans(fp, self.reqs[i].uid):
                if not self.follow_again(fp, f, hit):
                    self.admit(f, fresh=False)

    def settle(self, i: int, a: Attempt, mode: int, bid: int) -> None:
        """One attempt of a batch or GPU member ended: complete it, or hand it back to the policy as a retry
        (or fail it for good after the last attempt)."""
        self.attempts[i] += 1
        v = verdict(a.ok, int(self.attempts[i]), self.max_att)
        if v == "complete":
            self.complete(i, a.at, a.cost, mode, bid)
        elif v == "fail":
            self.fail_final(i, a.at)
        else:
            self.push(a.at, "retry", i)


def simulate(requests: Sequence[Request], policy, *, catalog: Catalog | None = None,
             settings: Settings | None = None, seed: int | None = None, trace_name: str = "trace",
             draws: Draws | None = None, record_calls: bool = False) -> SimResult:
    """Replay ``requests`` (in arrival order) through ``policy``; deterministic for a given seed.
    ``record_calls`` keeps every provider call's (start, tokens, end) per rate gate in
    ``extra["calls"][provider][model or None]``. Hours of day count from ``settings.sim.day_origin_s``, else the
    trace's (``engine.core.trace.with_day_origin``). A policy that learns the batch turnaround leaves what it
    learned in ``extra["turnaround"]`` (``TurnaroundEstimator.learned``)."""
    settings = with_day_origin(settings or load_settings(), requests)
    catalog = catalog or default_catalog()
    seed = settings.sim.seed if seed is None else seed
    reqs = list(requests)
    if any(a.arrival_s > b.arrival_s for a, b in zip(reqs, reqs[1:])):
        reqs.sort(key=lambda r: r.arrival_s)
    draws = draws or Draws(len(reqs), settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
    t0 = time.perf_counter()
    sim = _Sim(reqs, policy, catalog, settings, draws, record_calls)
    sim.run()
    wall = time.perf_counter() - t0
    pending = int((sim.status == _PENDING).sum())
    if pending:
        raise PolicyError(f"{policy.name}: {pending} request(s) were never dispatched; a policy must dispatch "
                          "or set wake_at for every group it keeps waiting")
    extra: dict = {"rejected": dict(sim.rejected), "reject_why": sim.reject_why, "rerouted": sim.rerouted,
                   "flex_refused": sim.flex_refused,
                   "circuit_opened": {n: p.breaker.opened for n, p in sim.providers.items() if p.breaker.opened}}
    if sim.book is not None:
        extra["budget"] = {"overrun_usd": round(sim.book.overrun_usd(), 6), "windows": sim.book.windows(),
                           "spend": sim.book.spend_report(), "deferrals": sim.deferrals,
                           "waits": sim.budget_waits}
    if record_calls:
        extra["calls"] = {n: p.history for n, p in sim.providers.items()}
    if sim.table.turnarounds is not None:  # what it learned, as of its last decision (a live grouper's, alike)
        extra["turnaround"] = sim.table.turnarounds.learned()
    return SimResult(getattr(policy, "name", type(policy).__name__), trace_name, sim.reqs, sim.cost, sim.done_at,
                     sim.status, sim.mode, sim.hit, sim.batch_of, sim.batches, wall, extra)
