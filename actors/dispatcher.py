"""One dispatcher per provider: carries out dispatches through the provider's adapter and resolves them.

The adapter here is the simulator's ``SimProvider`` run in (compressed) real time: the outcome of a dispatch is
computed when it is sent, and each member resolves when its completion time comes on the engine clock. Results,
cache fills, budget settlements and retries leave in batches (an outbox flushed every few milliseconds), never
one actor call per request.
"""

from __future__ import annotations

import asyncio
from collections import deque

from actors._peer import Warm, as_peer
from actors._types import BatchJob, Job, send_sharded
from engine.catalog import Catalog
from engine.cost import price_alone
from engine.draws import Draws
from engine.providers import SimProvider
from engine.result import Result
from engine.settings import Settings

__all__ = ["Dispatcher"]

FLUSH_S = 0.005


class Dispatcher(Warm):
    def __init__(self, provider: str, catalog: Catalog, settings: Settings, seed: int, clock, groupers: list,
                 hub, cache, budget):
        self.name = provider
        self.catalog = catalog
        self.clock = clock
        self.max_att = settings.sim.max_attempts
        self.sim = SimProvider(catalog.provider(provider), catalog, settings,
                               Draws(0, settings.sim.max_attempts, seed, settings.sim.batch_slot_s))
        self.groupers = [as_peer(g) for g in groupers]
        self.hub, self.cache, self.budget = map(as_peer, (hub, cache, budget))
        self._open: dict[str, list] = {}  # batch id -> [members unresolved, actual cost so far]
        self._results: list[Result] = []
        self._list_prices: list[float] = []
        self._fills: list[tuple[str, Result]] = []
        self._orphans: list[str] = []
        self._readmit: list[Job] = []
        self._settle: list[tuple[str, float]] = []
        self._observed: list[tuple[str, list[float], int]] = []
        self._flusher: asyncio.Task | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self.in_flight = 0
        self.waits: deque[float] = deque(maxlen=10_000)  # engine seconds from arrival to dispatch, for benchmarks

    async def set_clock(self, clock) -> None:
        """The engine sets the clock once every actor is up, so engine time 0 is when submitting can start."""
        self.clock = clock

    def __repr__(self) -> str:
        return f"Dispatcher({self.name}, in_flight={self.in_flight}, open_batches={len(self._open)}, {self.sim!r})"

    # -- carrying out -----------------------------------------------------------------------------------------
    async def run_many(self, batches: list[BatchJob]) -> None:
        for b in batches:
            await self.run(b)
        self._kick()

    async def run(self, b: BatchJob) -> None:
        t = self.clock.now()
        jobs = b.jobs
        self._open[b.bid] = [len(jobs), 0.0]
        self.in_flight += len(jobs)
        waits = [t - j.req.arrival_s for j in jobs]
        self.waits.extend(waits)
        self._observed.append((b.mode, waits, self.in_flight))
        if b.mode == "batch_api" and (b.hedge_at is None or b.hedge_at > t):
            out = self.sim.batch([j.seq for j in jobs], [j.req for j in jobs], t, b.hedge_at,
                                 [j.attempts for j in jobs])
            if out.hedged:  # cancelled at the hedge, billing nothing: members go back to the policy
                self._at(out.at, lambda: [self._hedged(b, j) for j in jobs])
                return
            for j, a in zip(jobs, out.members):
                self._at(a.at, lambda j=j, a=a: self._attempt(b, j, a.ok, a.cost, "batch_api"))
        elif b.mode == "gpu_batch":
            outs = self.sim.gpu([j.seq for j in jobs], [j.req for j in jobs], t, [j.attempts for j in jobs])
            for j, a in zip(jobs, outs):
                self._at(a.at, lambda j=j, a=a: self._attempt(b, j, a.ok, a.cost, "gpu_batch"))
        else:  # sync, or a batch hedged before it started
            for j in jobs:
                o = self.sim.sync(j.seq, j.req, t, j.attempts, b.cache_write)
                mode = "gpu_batch" if self.sim.spec.models[j.req.model].gpu_priced else "sync"
                self._at(o.at, lambda j=j, o=o, mode=mode: self._final(b, j._replace(attempts=o.attempts - 1),
                                                                      o.ok, o.cost, mode))

    def _at(self, at: float, fn) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            fn()
            self._kick()

        handle = loop.call_later(self.clock.real_delay(at - self.clock.now()), fire)
        self._timers.add(handle)

    def _member_done(self, b: BatchJob, cost: float) -> None:
        entry = self._open[b.bid]
        entry[0] -= 1
        entry[1] += cost
        self.in_flight -= 1
        if entry[0] == 0:
            del self._open[b.bid]
            self._settle.append((b.bid, entry[1]))

    def _attempt(self, b: BatchJob, j: Job, ok: bool, cost: float, mode: str) -> None:
        """A batch or GPU member's attempt ended; a failure goes back to the policy while attempts remain."""
        if not ok and j.attempts + 1 < self.max_att:
            self._member_done(b, 0.0)
            self._readmit.append(j._replace(attempts=j.attempts + 1))
            return
        self._final(b, j, ok, cost, mode)

    def _hedged(self, b: BatchJob, j: Job) -> None:
        if j.hedges + 1 >= self.max_att:
            # Progress guard (as in the simulator): a request hedged this often is sent sync now.
            o = self.sim.sync(j.seq, j.req, self.clock.now(), j.attempts, False)
            self._at(o.at, lambda: self._final(b, j, o.ok, o.cost, "sync"))
            return
        self._member_done(b, 0.0)
        self._readmit.append(j._replace(hedges=j.hedges + 1))

    def _final(self, b: BatchJob, j: Job, ok: bool, cost: float, mode: str) -> None:
        r = j.req
        now = max(self.clock.now(), r.arrival_s)
        self._member_done(b, cost if ok else 0.0)
        if ok:
            res = Result(id=r.id, status="ok", output=f"sim://{r.provider}/{r.model}/{r.id}", cost_usd=cost,
                         mode=mode, provider=r.provider, model=r.model, batch_id=b.bid, arrival_s=r.arrival_s,
                         done_s=now, deadline_met=now <= r.deadline_at + 1e-6, recommendation=b.recommendation,
                         reason=b.reason)
        else:
            res = Result(id=r.id, status="failed", provider=r.provider, model=r.model, batch_id=b.bid,
                         arrival_s=r.arrival_s, done_s=now, deadline_met=False, recommendation=b.recommendation,
                         error=f"{r.provider} failed {self.max_att} attempts")
            self._orphans.append(j.fp)
        self._results.append(res)
        self._list_prices.append(price_alone(r, self.catalog, "sync").total)
        self._fills.append((j.fp, res))

    # -- the outbox -----------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def _outbox_empty(self) -> bool:
        return not (self._results or self._fills or self._orphans or self._readmit or self._settle
                    or self._observed)

    async def _flush_soon(self) -> None:
        # Loop until empty: what timers add while a flush awaits the cache must not wait for a later kick
        # that may never come (the dispatcher's last completions).
        while not self._outbox_empty():
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        results, prices, self._results, self._list_prices = self._results, self._list_prices, [], []
        fills, self._fills = self._fills, []
        orphans, self._orphans = self._orphans, []
        readmit, self._readmit = self._readmit, []
        settle, self._settle = self._settle, []
        observed, self._observed = self._observed, []
        if observed:
            self.hub.send("observe_dispatches", self.name, observed)
        if results:
            self.hub.send("push", results, prices)
        if fills and self.cache is not None:
            await self.cache.call("complete", fills)
        if orphans and self.cache is not None:
            readmit.extend(await self.cache.call("orphans", orphans))
        if settle:
            self.budget.send("settle_many", settle)
        if readmit:
            send_sharded(self.groupers, readmit)

    async def stats(self, waits: bool = False) -> dict:
        out = {"provider": self.name, "in_flight": self.in_flight, "open_batches": len(self._open)}
        if waits:
            out["waits"] = list(self.waits)
        return out
