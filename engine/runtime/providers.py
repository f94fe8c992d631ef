"""Simulated providers: the catalog's behaviour of one provider, shared by the simulator and the live
dispatcher actors (which run it in compressed real time), so both runtimes bill and time calls alike.

A runtime hands a ``SimProvider`` work (``enqueue``) and asks it what may start now (``pump``). Work waits in
a ``FairQueue`` per rate gate (docs/budgets.md) and starts when the gate allows: requests and tokens per
sliding minute and concurrent calls, per provider or per model with limits of its own; batch-API batches wait
for the enqueued-token limit. What happens to a started call is drawn from ``Draws``: its latency, whether
it fails (a 429 with the provider's ``Retry-After``, or a 5xx), what it costs (the cost model, with this
provider's prompt-cache warmth). A model whose circuit is open (``engine.core.resilience``) sends its work to the
fallback model, or holds it until the cool-down ends.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence

from engine.core.catalog import Catalog, ProviderSpec
from engine.core.cost import (
    Mode,
    cache_split,
    cached_blocks,
    call_marks,
    left_warm,
    list_price_text,
    mark_room,
    price_alone,
    price_batch,
    price_text,
    warm_run,
)
from engine.core.draws import Draws, TurnaroundWorld
from engine.core.grouping import token_sums
from engine.core.latency import flex_room, gpu_batch_seconds, sync_latency_median
from engine.core.request import PRIORITY_RANK, Request
from engine.core.resilience import CircuitBreaker, Resilience, retry_delay
from engine.core.scheduling import FairQueue, Scheduling, Unit
from engine.core.settings import Settings
from engine.runtime._work import Attempt, BatchOutcome, Event, SyncAttempt, Work
from engine.runtime.batch_queue import BatchQueue
from engine.runtime.ratelimit import EnqueuedTokens, RateGate

__all__ = ["Attempt", "BatchOutcome", "Event", "SimProvider", "SyncAttempt", "Work"]

FAILED_CALL_FRACTION = 0.3  # a failing call errors after this share of its latency
_INF = math.inf


class SimProvider:
    def __init__(self, provider: ProviderSpec, catalog: Catalog, settings: Settings, draws: Draws, *,
                 scheduling: Scheduling | None = None, record: bool = False, draw: bool = True):
        # draw=False (the live dispatcher): sync calls and batch-API batches leave the queue undrawn, holding their
        # gate slot until ``finish_sync``/``finish_batch``, as real calls do. GPU dispatches are always drawn.
        self.draw = draw
        self.spec = provider
        self.catalog = catalog
        self.draws = draws
        self.max_att = settings.sim.max_attempts
        self.backoff = settings.sim.backoff_base_s
        self.bt = settings.prefix_block_tokens
        self.world = TurnaroundWorld.of(settings.sim)  # the true turnaround, where it differs from the catalog
        res: Resilience = settings.resilience
        self.backoff_max = res.backoff_max_s
        self.breaker = CircuitBreaker(res.allowed_fails, res.window_s, res.cooldown_time, res.failure_share)
        self.fallbacks = {a.split("/", 1)[1]: b for a, b in res.fallbacks.items()
                          if a.split("/", 1)[0] == provider.name}
        sched = scheduling or Scheduling()
        self.history: dict[str | None, list] | None = {} if record else None
        # One gate and queue per model with limits of its own; the rest share the provider's (key None).
        self.gates: dict[str | None, RateGate] = {}
        self.queues: dict[str | None, FairQueue] = {}
        for key, rl in [(None, provider.rate_limits)] + [(m, s.rate_limits) for m, s in provider.models.items()
                                                         if s.rate_limits is not None]:
            hist = self.history.setdefault(key, []) if self.history is not None else None
            self.gates[key] = RateGate(rl, history=hist)
            self.queues[key] = FairQueue(sched, self.max_att)
        self._gate_of = {m: (m if s.rate_limits is not None else None) for m, s in provider.models.items()}
        ba = provider.batch_api
        self.enqueued = EnqueuedTokens(ba.max_enqueued_tokens) if ba is not None else None
        # A cancel takes the catalog's cancel_s, which its policy plans with (not the settings': docs/simulator.md).
        self.cancel_s = ba.cancel_s if ba is not None else 0.0
        self.batch_queue = BatchQueue(sched, self.max_att)
        # Work of models whose circuit is open and that have no fallback: a heap by when the circuit closes.
        self.parked: list[tuple[float, int, Unit]] = []
        self._parked_seq = itertools.count()
        self.warm: dict[str, dict[int, float]] = {}  # model -> block -> warm until
        self.warm_from: dict[str, dict[int, float]] = {}  # model -> block -> warm since (last cold -> warm)
        self._warm_sweep_at = 0.0  # when ``pump`` next drops blocks long cold (``_sweep_warm``)
        self._lead: dict[str, float] = {}
        # Whether a flex call's budget claim holds the flex price (the runtime says, per work): then the gate does
        # not start it standard itself but hands it back (``to_standard``) to reserve the standard price first.
        self.flex_reserved: Callable[[Work], bool] | None = None

    def __repr__(self) -> str:
        return (f"SimProvider({self.spec.name}, waiting={self.waiting - len(self.parked)}, parked={len(self.parked)}, "
                f"running={sum(g.running for g in self.gates.values())}, {self.breaker!r})")

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values()) + len(self.batch_queue) + len(self.parked)

    # -- the queue ------------------------------------------------------------------------------------------
    def take_queued(self) -> list[Work]:
        """Everything that waits to start (queued at a gate, or parked behind an open circuit), taken out: a
        cancelled engine ends it without sending it."""
        out: list[Work] = [u.item for u in self.batch_queue.take_all()]
        for q in self.queues.values():
            while len(q):
                out.append(q.take(q.peek(0.0)).item)
        out += [u.item for _, _, u in self.parked]
        self.parked.clear()
        return out

    def enqueue(self, w: Work) -> None:
        reqs, first = w.reqs, w.reqs[0]
        spec = self.spec.models[first.model]
        if w.kind == "sync" and spec.gpu_priced:
            w = w._replace(kind="gpu_batch")
        lead = self._lead.get(first.model)
        if lead is None:
            lead = self._lead[first.model] = sync_latency_median(self.spec, spec, first) * 2.0
        text = spec.kind == "text"
        sums = token_sums(spec, reqs) if text else (0, 0, 0, 0)
        tokens = sums[0] + sums[1] if w.kind != "gpu_batch" else 0
        cost = list_price_text(spec, *sums) if text else 0.0
        prio = min((r.priority for r in reqs), key=PRIORITY_RANK.__getitem__)
        u = Unit(w, first.tenant, prio, min(r.deadline_at for r in reqs), min(r.arrival_s for r in reqs),
                 tokens, cost, max(w.attempts), 0.0 if w.kind == "batch_api" else lead, sums[0])
        if w.kind == "batch_api":
            self.batch_queue.push(u, w.hedge_at)
        else:
            self.queues[self._gate_of[first.model]].push(u)

    def pump(self, now: float) -> tuple[list[Event], float | None]:
        """Start everything the gates allow at ``now``, in the queues' order. Returns what left the queues
        and when to pump again (None: nothing waits)."""
        events: list[Event] = []
        next_at = _INF
        if now >= self._warm_sweep_at:
            self._sweep_warm(now)
        parked = self.parked
        while parked and parked[0][0] <= now:
            u = heapq.heappop(parked)[2]
            self.queues[self._gate_of[u.item.reqs[0].model]].push(u)
        if parked:
            next_at = parked[0][0]
        for key, q in self.queues.items():
            gate = self.gates[key]
            while len(q):
                picked = q.peek(now)
                u = picked[2]
                w: Work = u.item
                model = w.reqs[0].model
                until = self.breaker.open_until(model, now)
                if until is not None:
                    q.take(picked)
                    fb = self.fallbacks.get(model)
                    if fb is not None:
                        events.append(Event("reroute", w, now, fb))
                    else:
                        heapq.heappush(parked, (until, next(self._parked_seq), u))
                        next_at = min(next_at, until)
                    continue
                s = gate.earliest(now, u.tokens)
                if s > now + 1e-9:
                    next_at = min(next_at, s)
                    break
                q.take(picked)
                if w.kind == "flex" and (len(q) >= gate.limits.max_concurrency - gate.running or s > w.reqs[
                        0].deadline_at - flex_room(self.spec, self.spec.models[model], w.reqs[0])):
                    # Standard when more wait at this gate than it has free slots (a slow call would hold its slot
                    # from them) or it waited past its room for a slow call: time is short here, and flex spends it.
                    if self.flex_reserved is not None and self.flex_reserved(w):
                        # Its budget holds the flex price: back to the runtime, which reserves the standard price
                        # before it queues the call again (a standard call on a flex claim could pass a budget).
                        events.append(Event("to_standard", w, now, None))
                        continue
                    w = w._replace(kind="sync")
                # Start at s, not now: s may pass now by a rounding error, and starting early by even that
                # much would put a call inside a minute the gate had counted it out of.
                events.append(self._start(w, s, gate))
        bq = self.batch_queue
        for u in bq.late(now):  # its hedge came while it waited: back to the policy now, never submitted
            w = u.item
            events.append(Event("batch_api", w, now, self.batch(w.idxs, w.reqs, now, w.hedge_at, w.attempts)
                                if self.draw else 0))
        while (picked := bq.peek(now)) is not None:
            u = picked[2]
            s = self.enqueued.earliest(now, u.tokens, u.item.reqs[0].model, u.input_tokens)
            if s > now + 1e-9:
                next_at = min(next_at, s)
                break
            bq.take(picked)
            events.append(self._start_batch(u.item, s, u.tokens, u.input_tokens))
        next_at = min(next_at, bq.next_hedge())
        return events, (None if next_at == _INF else next_at)

    def _sweep_warm(self, now: float) -> None:
        """Forget prefix blocks cold for more than one cache TTL, once per TTL of engine time (kept for good, a
        trace's fresh blocks grew without end: 15,000 requests held 120,000 blocks, none warm). A call starts
        no earlier than the pump that started it, so a block cold a TTL before a pump is never read again."""
        if self.spec.prompt_cache is None:
            self._warm_sweep_at = _INF  # nothing is ever warm here
            return
        for model, warm in list(self.warm.items()):
            cold = now - self.spec.cache_of(model).ttl_s  # type: ignore[union-attr]  # a model's TTL may be its own
            since = self.warm_from.get(model, {})
            for b in [b for b, until in warm.items() if until < cold]:
                del warm[b]
                since.pop(b, None)
            if not warm:
                del self.warm[model]
                self.warm_from.pop(model, None)
        self._warm_sweep_at = now + min(self.spec.cache_of(m).ttl_s for m in self.spec.models)  # type: ignore[union-attr]

    def failure(self, model: str, t: float) -> None:
        """A call of ``model`` failed at ``t`` (told when the failure happens, not when it was drawn)."""
        self.breaker.failure(model, t)

    def success(self, model: str, t: float) -> None:
        """A call of ``model`` answered at ``t``."""
        self.breaker.success(model, t)

    def retry_at(self, i: int, attempt: int, a: SyncAttempt) -> float:
        """When attempt ``attempt + 1`` of draw row ``i`` may be queued after attempt ``attempt`` failed."""
        return a.at + retry_delay(attempt + 1, self.backoff, self.backoff_max, self.draws.jit_u(i, attempt),
                                  a.retry_after_s)

    def _start(self, w: Work, s: float, gate: RateGate) -> Event:
        if w.kind == "gpu_batch":
            outs = self.gpu(w.idxs, w.reqs, s, w.attempts, gate)
            return Event("gpu_batch", w, s, outs)
        if not self.draw:
            gate.take(s, w.reqs[0].input_tokens + w.reqs[0].output_tokens, _INF)
            return Event(w.kind, w, s, None)
        return Event(w.kind, w, s, self.sync(w.idxs[0], w.reqs[0], s, w.attempts[0], w.cache_write, gate,
                                             w.kind == "flex"))

    def hold_sync(self, model: str, at: float, tokens: int) -> None:
        """A sync call with no drawn outcome holds a slot from ``at`` until ``finish_sync`` (one made again)."""
        self.gates[self._gate_of[model]].take(at, tokens, _INF)

    def finish_sync(self, model: str, end: float, extra_tokens: int = 0) -> None:
        """A sync call with no drawn outcome ended at ``end`` (``extra_tokens``: usage past the gate's estimate)."""
        self.gates[self._gate_of[model]].finish(end, extra_tokens)

    def finish_batch(self, tokens: int, end: float, model: str | None = None) -> None:
        if self.enqueued is not None:
            self.enqueued.finish(tokens, end, model)

    # -- sync calls ---------------------------------------------------------------------------------------
    def sync(self, i: int, r: Request, s: float, attempt: int, cache_write: bool | tuple[int, ...],
             gate: RateGate | None = None, flex: bool = False) -> SyncAttempt:
        """Attempt ``attempt`` of ``r`` (draw row ``i``), starting at ``s`` (at the flex tier if ``flex``)."""
        a, dur = self.draw_sync(i, r, s, attempt, cache_write, flex)
        (gate or self.gates[self._gate_of[r.model]]).take(s, r.input_tokens + r.output_tokens, dur)
        return a

    def draw_sync(self, i: int, r: Request, s: float, attempt: int, cache_write: bool | tuple[int, ...],
                  flex: bool = False) -> tuple[SyncAttempt, float]:
        """The drawn outcome of a sync attempt and how long it holds its slot (the gate is not touched). A flex
        call is ``flex.slowdown`` times slower, and refused (quickly, unbilled) when the failure draw lands in the
        first ``unavailable_rate`` above the failure rate: failing stays one draw at either tier, as the bound reads."""
        prov = self.spec
        spec = prov.models[r.model]
        base = sync_latency_median(prov, spec, r)
        sigma = prov.sync_latency.sigma if spec.kind == "text" else prov.media_latency.sigma
        k = min(attempt, self.max_att - 1)
        lat = base * math.exp(sigma * self.draws.lat_z(i, k)) * (prov.flex.slowdown if flex else 1.0)
        u = self.draws.fail_u(i, k)
        failed = u < prov.failure_rate
        dur = lat * FAILED_CALL_FRACTION if failed else lat
        if failed:
            throttled = u < prov.failure_rate * prov.throttled_share
            return SyncAttempt(False, s + dur, 0.0, prov.retry_after_s if throttled else None), dur
        if flex and (u - prov.failure_rate) / (1.0 - prov.failure_rate) < prov.flex.unavailable_rate:
            return SyncAttempt(False, s + (q := base * FAILED_CALL_FRACTION), 0.0, None, refused=True), q
        cost, cached = self._sync_price(r, spec, s, cache_write, "flex" if flex else "sync")
        return SyncAttempt(True, s + lat, cost, None, cached), dur

    def _sync_price(self, r: Request, spec, start: float, cache_write: bool | tuple[int, ...],
                    mode: Mode = "sync") -> tuple[float, int]:
        """The call's price and the prefix blocks it left warm."""
        prov = self.spec
        if spec.kind != "text":
            return price_alone(r, self.catalog, mode).total, 0
        pc = prov.cache_of(spec)
        blocks = r.prefix_blocks
        if pc is None or not blocks:
            return price_text(prov, spec, cache_split(prov, spec, r.input_tokens, 0, 0, 0, self.bt),
                              r.output_tokens, mode).total, 0
        # An explicit cache's entry is read by a prompt that holds it whole: its partial last block is its own.
        held = blocks if pc.automatic else blocks[:r.input_tokens // self.bt]
        # A body whose own marks leave the engine no breakpoint (or of messages, sent as written) reads and
        # writes none of its blocks on the wire: priced so, where the simulator read and wrote them (stop 86).
        room = mark_room(r.body) if not pc.automatic else 1
        n_warm = warm_run(held, lambda b: self._is_warm(r.model, b, start), pc.automatic) if room else 0
        # A write marks the last whole block, as the live body does: a partial last block goes with the tail.
        whole = cache_write and not isinstance(cache_write, tuple) and room  # (an automatic cache: unread)
        mark = min(len(blocks), r.input_tokens // self.bt) if whole else 0
        if parts := call_marks(cache_write, n_warm, len(held), self.bt, prov, spec, mark_room(r.body)):
            mark, parts = parts[0], parts[1:]  # the depths the policy named: an entry at each, as the live body
        split = cache_split(prov, spec, r.input_tokens, len(blocks), n_warm, mark, self.bt)
        cached = cached_blocks(split.read, split.write, self.bt)
        if cached:
            ends = left_warm(r, split.read, split.write, self.bt, pc.automatic) + tuple(blocks[k - 1] for k in parts)
            self._keep_warm(r.model, ends, start, start + pc.ttl_s)
        return price_text(prov, spec, split, r.output_tokens, mode).total, cached

    # -- GPU batches ----------------------------------------------------------------------------------------
    def gpu(self, idxs: Sequence[int], reqs: Sequence[Request], t: float, attempts: Sequence[int],
            gate: RateGate | None = None) -> list[Attempt]:
        """One GPU dispatch of compatible jobs starting at ``t``: one warm-up plus the batch at its speed-up."""
        prov = self.spec
        spec = prov.models[reqs[0].model]
        run = gpu_batch_seconds(prov, spec, list(reqs))
        run *= math.exp(prov.sync_latency.sigma * self.draws.lat_z(idxs[0], min(attempts[0], self.max_att - 1)))
        (gate or self.gates[self._gate_of[reqs[0].model]]).take(t, 0, run)
        end = t + run
        prices = price_batch(list(reqs), self.catalog, "gpu_batch", block_tokens=self.bt)
        fail_u = self.draws.fail_u
        return [Attempt(fail_u(i, k) >= prov.failure_rate, end, p.total) for i, k, p in zip(idxs, attempts, prices)]

    # -- batch API ------------------------------------------------------------------------------------------
    def _start_batch(self, w: Work, s: float, tokens: int, inputs: int = 0) -> Event:
        if not self.draw:
            self.enqueued.take(s, tokens, _INF, w.reqs[0].model, inputs)
            return Event("batch_api", w, s, tokens)
        out = self.batch(w.idxs, w.reqs, s, w.hedge_at, w.attempts)
        self.enqueued.take(s, tokens, out.at)  # held until it ends or is cancelled
        return Event("batch_api", w, s, out)

    def _is_warm(self, model: str, b: int, at: float) -> bool:
        """Whether block ``b`` is in ``model``'s cache at ``at``: used by a call no later, and not expired since."""
        return self.warm.get(model, {}).get(b, -1.0) >= at and self.warm_from.get(model, {}).get(b, _INF) <= at

    def _keep_warm(self, model: str, blocks: Sequence[int], at: float, until: float) -> None:
        """A call read or wrote ``blocks`` at ``at``: warm from then until ``until``. One period per block: a call
        priced out of engine-time order (the live loop can) joins the period it overlaps, and one earlier and
        apart leaves the later as it is (a read then is priced plain; never is a block read that was cold)."""
        warm = self.warm.setdefault(model, {})
        since = self.warm_from.setdefault(model, {})
        for b in blocks:
            w, s0 = warm.get(b, -1.0), since.get(b, _INF)
            if w < at:  # cold at ``at``: a new period
                since[b], warm[b] = at, until
            elif at >= s0:  # within the period: a refresh
                warm[b] = max(w, until)
            elif until >= s0:  # before the period and overlapping it
                since[b], warm[b] = at, max(w, until)

    def batch(self, idxs: Sequence[int], reqs: Sequence[Request], t: float, hedge_at: float | None,
              attempts: Sequence[int]) -> BatchOutcome:
        """Submit a batch at ``t``. If it would finish after ``hedge_at`` it is cancelled then, and back once the
        cancel is through (``cancel_s``) billing nothing (its members finish together); one that ends sooner is billed."""
        prov = self.spec
        ba = prov.batch_api
        if hedge_at is not None and hedge_at <= t:  # it waited in the queue past its hedge: never submitted
            return BatchOutcome(True, t, [])
        done = t + self.draws.turnaround(prov.name, ba, t, self.world)
        if hedge_at is not None and done > hedge_at + self.cancel_s:
            return BatchOutcome(True, hedge_at + self.cancel_s, [])
        fail_u = self.draws.fail_u
        oks = [fail_u(i, k) >= prov.failure_rate for i, k in zip(idxs, attempts)]
        return BatchOutcome(False, done, [], (list(reqs), oks))

    def end_batch(self, out: BatchOutcome) -> list[Attempt]:
        """Price the members of a batch that ended (``out.at``), once: they run then, in order, as the emulator
        runs a batch that follows an engine's clock. A member reads the prefix blocks warm then, or written by
        an earlier member, and keeps those it read or wrote warm for one TTL (docs/cost-model.md, "Warmth")."""
        if out.members or out.pending is None:
            return out.members
        (reqs, oks), done = out.pending, out.at
        model = reqs[0].model
        pc = self.spec.cache_of(model)
        stacks = pc is not None and pc.stacks_with_batch
        blocks = {b for r in reqs for b in r.prefix_blocks} if stacks else ()  # most shared by many: each asked once
        warm_blocks = {b for b in blocks if self._is_warm(model, b, done)}
        warmed: list[int] = []  # per member, the blocks it read or wrote: only those stay warm
        left: list[tuple[int, ...]] = []  # and those of them the cache keeps (an explicit one: its entries' ends)
        prices = price_batch(list(reqs), self.catalog, "batch_api", warm=warm_blocks, block_tokens=self.bt,
                             failed=[m for m, ok in enumerate(oks) if not ok], warmed=warmed, left=left)
        for ok, p, n_warm, ends in zip(oks, prices, warmed, left):
            out.members.append(Attempt(ok, done, p.total, n_warm if ok and stacks else 0))
            if ok and stacks and ends:
                self._keep_warm(model, ends, done, done + pc.ttl_s)
        return out.members
