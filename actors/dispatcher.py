"""One dispatcher per provider: carries out dispatches through the provider's adapter and resolves them.

The adapter here is the simulator's ``SimProvider`` run in (compressed) real time, queue and all: work waits
in its fair queue until the provider's rate gate lets it start (``pump``, re-run by a timer when the gate
next opens), the outcome of a call is drawn when it starts, and each member resolves when its completion
time comes on the engine clock. A failed sync call is retried after ``Retry-After`` or a jittered backoff,
and counts toward the model's circuit breaker when it fails, not when it was drawn. Results, cache fills,
budget settlements (one per member's reservation) and retries leave in batches (an outbox flushed every few
milliseconds), never one actor call per request.
"""

from __future__ import annotations

import asyncio
from collections import deque

from actors._peer import Warm, as_peer
from actors._types import BatchJob, Job, send_sharded
from engine.catalog import Catalog
from engine.cost import price_alone
from engine.draws import Draws
from engine.providers import Event, SimProvider, Work
from engine.result import Result
from engine.scheduling import Scheduling
from engine.settings import Settings

__all__ = ["Dispatcher"]

FLUSH_S = 0.005


class Dispatcher(Warm):
    def __init__(self, provider: str, catalog: Catalog, settings: Settings, seed: int, clock, groupers: list,
                 hub, cache, budget, scheduling: Scheduling | None = None):
        self.name = provider
        self.catalog = catalog
        self.clock = clock
        self.max_att = settings.sim.max_attempts
        self.sim = SimProvider(catalog.provider(provider), catalog, settings,
                               Draws(0, settings.sim.max_attempts, seed, settings.sim.batch_slot_s),
                               scheduling=scheduling)
        self.groupers = [as_peer(g) for g in groupers]
        self.hub, self.cache, self.budget = map(as_peer, (hub, cache, budget))
        self._results: list[Result] = []
        self._list_prices: list[float] = []
        self._fills: list[tuple[str, Result]] = []
        self._orphans: list[str] = []
        self._readmit: list[Job] = []
        self._settle: list[tuple[str, float]] = []
        self._observed: list[tuple[str, list[float], int]] = []
        self._flusher: asyncio.Task | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._pump_timer: tuple[float, asyncio.TimerHandle] | None = None
        self.in_flight = 0
        self.rerouted = 0
        self.waits: deque[float] = deque(maxlen=10_000)  # engine seconds from arrival to start, for benchmarks

    async def set_clock(self, clock) -> None:
        """The engine sets the clock once every actor is up, so engine time 0 is when submitting can start."""
        self.clock = clock

    def __repr__(self) -> str:
        return f"Dispatcher({self.name}, in_flight={self.in_flight}, {self.sim!r})"

    # -- carrying out -----------------------------------------------------------------------------------------
    async def run_many(self, batches: list[BatchJob]) -> None:
        for b in batches:
            self.run(b)
        self._pump()

    def run(self, b: BatchJob) -> None:
        """Queue a dispatch at the provider (``run_many`` then starts what the gates allow)."""
        t = self.clock.now()
        jobs = b.jobs
        self.in_flight += len(jobs)
        if b.mode == "batch_api" and (b.hedge_at is None or b.hedge_at > t):
            self._enqueue("batch", b, jobs)
        elif b.mode == "gpu_batch":
            self._enqueue("gpu", b, jobs)
        else:  # sync, or a batch hedged before it started
            for j in jobs:
                self._enqueue("sync", b, [j])

    def _enqueue(self, kind: str, b: BatchJob, jobs: list[Job]) -> None:
        self.sim.enqueue(Work(kind, (b, jobs), [j.req for j in jobs], [j.seq for j in jobs],
                              [j.attempts for j in jobs], b.cache_write and kind == "sync",
                              b.hedge_at if kind == "batch" else None))

    def _pump(self) -> None:
        now = self.clock.now()
        events, nxt = self.sim.pump(now)
        observed: dict[str, list[float]] = {}
        for e in events:
            b, jobs = e.work.item
            if e.kind != "reroute":
                observed.setdefault(b.mode, []).extend(now - j.req.arrival_s for j in jobs)
            getattr(self, "_start_" + e.kind)(e, b, jobs)
        for mode, waits in observed.items():
            self.waits.extend(waits)
            self._observed.append((mode, waits, self.in_flight))
        if nxt is not None and (self._pump_timer is None or nxt < self._pump_timer[0]):
            if self._pump_timer is not None:
                self._pump_timer[1].cancel()
            loop = asyncio.get_running_loop()
            self._pump_timer = (nxt, loop.call_later(self.clock.real_delay(nxt - now), self._on_pump_timer))
        self._kick()

    def _on_pump_timer(self) -> None:
        self._pump_timer = None
        self._pump()

    def _start_sync(self, e: Event, b: BatchJob, jobs: list[Job]) -> None:
        (j,) = jobs
        a = e.outcome
        mode = "gpu_batch" if self.sim.spec.models[j.req.model].gpu_priced else "sync"
        if a.ok:
            def answered() -> None:
                self.sim.success(j.req.model, self.clock.now())
                self._final(b, j, True, a.cost, mode)

            self._at(a.at, answered)
            return

        def failed() -> None:
            self.sim.failure(j.req.model, self.clock.now())
            if j.attempts + 1 >= self.max_att:
                self._final(b, j, False, 0.0, mode)
                return
            nj = j._replace(attempts=j.attempts + 1)
            self._at(self.sim.retry_at(j.seq, j.attempts, a), lambda: (self._enqueue("sync", b, [nj]), self._pump()))

        self._at(a.at, failed)

    def _start_gpu(self, e: Event, b: BatchJob, jobs: list[Job]) -> None:
        for j, a in zip(jobs, e.outcome):
            self._at(a.at, lambda j=j, a=a: self._attempt(b, j, a.ok, a.cost, "gpu_batch"))

    def _start_batch(self, e: Event, b: BatchJob, jobs: list[Job]) -> None:
        out = e.outcome
        if out.hedged:  # cancelled at the hedge, billing nothing: members go back to the policy
            self._at(out.at, lambda: [self._hedged(j) for j in jobs])
            return
        for j, a in zip(jobs, out.members):
            self._at(a.at, lambda j=j, a=a: self._attempt(b, j, a.ok, a.cost, "batch_api"))

    def _start_reroute(self, e: Event, b: BatchJob, jobs: list[Job]) -> None:
        """The model's circuit is open: its work goes back to the policy as requests for the fallback."""
        provider, model = e.outcome.split("/", 1)
        self.rerouted += len(jobs)
        for j in jobs:
            self._member_done(j, 0.0)
            self._readmit.append(j._replace(req=j.req.model_copy(update={"provider": provider, "model": model}),
                                            claim=None))

    def _at(self, at: float, fn) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            fn()
            self._kick()

        handle = loop.call_later(self.clock.real_delay(at - self.clock.now()), fire)
        self._timers.add(handle)

    def _member_done(self, j: Job, cost: float) -> None:
        self.in_flight -= 1
        if j.claim is not None:
            self._settle.append((j.claim, cost))

    def _attempt(self, b: BatchJob, j: Job, ok: bool, cost: float, mode: str) -> None:
        """A batch or GPU member's attempt ended; a failure goes back to the policy while attempts remain."""
        if not ok and j.attempts + 1 < self.max_att:
            self._member_done(j, 0.0)
            self._readmit.append(j._replace(attempts=j.attempts + 1, claim=None))
            return
        self._final(b, j, ok, cost, mode)

    def _hedged(self, j: Job) -> None:
        # The claim goes back with the job: the grouper releases it in the same budget call that reserves the
        # sync fallback, so the room it held cannot be taken in between.
        self.in_flight -= 1
        self._readmit.append(j._replace(hedges=j.hedges + 1))

    def _final(self, b: BatchJob, j: Job, ok: bool, cost: float, mode: str) -> None:
        r = j.req
        now = max(self.clock.now(), r.arrival_s)
        self._member_done(j, cost if ok else 0.0)
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
        out = {"provider": self.name, "in_flight": self.in_flight, "queued": self.sim.waiting,
               "rerouted": self.rerouted, "circuit_opened": self.sim.breaker.opened}
        if waits:
            out["waits"] = list(self.waits)
        return out
