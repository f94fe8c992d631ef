"""One dispatcher per provider: carries out dispatches through the provider and resolves them.

Work waits in the provider's fair queue until its rate gate lets it start (``SimProvider.pump`` with
``draw=False``, re-run by a timer when the gate next opens and whenever a call ends). A started call or batch
goes to the ``Provider`` (``engine.core.provider_api``): simulated (the catalog's draws on the engine clock) or
over HTTP; the dispatcher knows only the protocol. A call holds its concurrency slot until its outcome arrives
(a video's, until its create is answered: its polls hold none, and its job is journaled, ``_dispatch_jobs``).
A failed sync call is retried after ``Retry-After`` or a jittered backoff and counts toward the model's circuit
breaker; over HTTP a rate limit's 429 is no try while the deadline leaves room, and a billing refusal is never
retried (``_sync_calls``). A batch is polled until it ends; at its hedge it is cancelled, its finished members are
used (billed once, never sent again) and only the unfinished go back to the policy; what it left at the provider
(OpenAI's input file) is then deleted (``_batch_files``). A batch refused for a full batch queue is queued again at
the gate, in parts that fit its limit, until its hedge (``_queue_full``). Results, cache fills, settlements and
retries leave in batches (an outbox flushed every few milliseconds), never one actor call per request. The
endpoint's Anthropic token count is asked here too, with the provider's own client and key (``_count_tokens``), and
a video's bytes (``_video_content``)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque

from actors._batch_api import BatchApiRuns
from actors._batch_files import FileCleanup
from actors._batch_gate import BatchGate
from actors._batch_index import BatchIndex
from actors._cancel import CancelDispatches
from actors._count_tokens import CountTokens
from actors._dispatch_ends import MemberEnds
from actors._dispatch_jobs import MadeJobs
from actors._dispatch_outbox import Outbox, engine_error
from actors._dispatch_recovery import Recovery
from actors._peer import Warm, as_peer, resolve_clock
from actors._results_room import ResultsRoom
from actors._shards import Shards
from actors._stop_cut_dispatch import CutDispatches
from actors._sync_calls import QuotaStop, SyncCalls
from actors._types import BatchJob, Job
from actors._video_content import VideoContent
from actors.journal import JournalWriter, make_journal
from actors.metrics import DispatchCounts
from actors.providers import make_provider
from engine.core._logkeys import get_logger
from engine.core.catalog import Catalog
from engine.core.draws import Draws, TurnaroundWorld, engine_day_origin
from engine.core.provider_api import CallJob, Secret, call_key
from engine.core.result import Result
from engine.core.scheduling import Scheduling
from engine.core.settings import Settings
from engine.runtime.providers import Event, SimProvider
from engine.runtime.reservation import goes_back

log = get_logger("smartbatch.dispatcher")

__all__ = ["Dispatcher"]

# Finished requests kept with their results, so a re-admission after a restart elsewhere gets the result again
# instead of a second call; bounded by count and age (re-admissions follow restarts within seconds).
TOLD_KEPT = 4096  # messages about batches kept, for a grouper Ray restarts (one per outbox flush that had any)


class Dispatcher(MemberEnds, SyncCalls, CutDispatches, CancelDispatches, Outbox, BatchApiRuns, BatchGate, Recovery,
                 MadeJobs, Warm, CountTokens, VideoContent, BatchIndex):
    def __init__(self, provider: str, catalog: Catalog, settings: Settings, seed: int, clock, groupers: list,
                 hub, cache, budget, scheduling: Scheduling | None = None, key: Secret | None = None,
                 engine: str = "engine", learners: bool = False, warm_readers: bool = True):
        self.name, self.catalog, self.settings = provider, catalog, settings
        self.clock = clock = resolve_clock(clock)[0]
        self.max_att = settings.sim.max_attempts
        self.sim = SimProvider(catalog.provider(provider), catalog, settings,
                               Draws(0, settings.sim.max_attempts, seed, settings.sim.batch_slot_s),
                               scheduling=scheduling, draw=False)
        self.sim.flex_reserved = lambda w: w.item[1][0].claim is not None  # reserved at the flex price
        self._day_from(clock)
        self._key = key
        self.provider = make_provider(provider, catalog, settings, self.sim, clock, key)
        self._files = FileCleanup(provider)  # ended batches' files deleted at the provider (``_batch_files``)
        self._tasks: set[asyncio.Task] = set()
        self.members_saved_by_cancel = 0  # finished members of cancelled batches: used, never sent again
        self.paid_twice, self.paid_twice_usd = 0, 0.0  # members a too-slow cancel still finished after sent again
        self.key_conflicts = 0  # sync calls the provider refused with 409: their key was billed with another body
        self.possibly_billed, self.possibly_billed_usd = 0, 0.0  # failed requests whose call timed out (charged)
        # Answers the provider gave again under their Idempotency-Key (an earlier run's calls, paid then): counted 0
        # here, and counted, so a second run of a trace against the emulator says why it cost less (a tour)
        self.replayed, self.replayed_usd = 0, 0.0
        self._unanswered: Counter[str] = Counter()  # uid -> its sync calls that got no answer (maybe billed)
        # uid -> its flex calls given up at their timeout (maybe billed, under keys no standard retry answers)
        self._flex_unanswered: Counter[str] = Counter()
        self._kept: set[str] = set()  # uids whose last try gave up polling a job its next try polls (one bound)
        self.flex_refused = self.flex_timed_out = 0  # flex calls sent again standard: refused, or timed out
        self._quota = QuotaStop()  # a billing refusal, held for the other requests (``SyncCalls``)
        self.groupers = [as_peer(g) for g in groupers]
        self.hubs, self.caches = Shards(hub), Shards(cache)  # results by id, cache fills by class
        self.hub, self.budget = self.hubs.first, as_peer(budget)  # hub shard 0: metrics and the journal
        self._engine = engine  # (its run's journal name: its stop publishes under the engine's, ``CutDispatches``)
        self.journal = make_journal(settings, engine, self.hub, self._journal_back, f"dispatcher:{provider}")
        self._space = f"batches:{provider}"
        # idempotency key -> (dispatch, job, cache_write, body) of a sync call over HTTP, until it ends
        self._sync_calls: dict[str, tuple] = {}
        self._watching: dict[str, tuple] = {}  # key -> (dispatch, handle, jobs, start, cancel): members went again
        # Journal records of work that ended, cleared once its results are with the hub: a restart in between
        # finds the record (re-makes the call under its key, or re-reads the batch), not losing billed results.
        self._unjournal: list[tuple[str, str]] = []
        self._unjournal_held: list[tuple[str, str]] = []  # records of results the hub did not take (yet)
        self._journal_retries: set[asyncio.Task] = set()  # deletes of records tried again (the journal failed)
        self._sync_journal = JournalWriter(self.journal, f"sync:{provider}", self._sync_index_put)
        self._init_jobs()  # the jobs its sync calls poll (videos), journaled (``_dispatch_jobs``)
        # journal key -> (BatchJob, jobs, start, tokens, handle, body) of open batches; handle None while
        # being created (body: what the create sends, when it must be sent the same again)
        self._open: dict[str, tuple] = {}
        self._parts_left: dict[str, int] = {}  # split dispatch (its parts' key stem) -> parts not ended
        # One image batch's results read at a time, and past a hedge one batch's worth more (``_results_slot``)
        self._image_reads = ResultsRoom(int(settings.batch_results_max_mb * 2**20))
        self._creates_waiting: dict[object, list] = {}  # batch creates waiting out a 429: their call jobs
        self._known: set[str] = set()  # uids this dispatcher is carrying out (queued, calling, in a batch, retrying)
        self._done: OrderedDict[str, tuple[Result, float, float]] = OrderedDict()  # uid -> (result, price, when)
        self._outputs: OrderedDict[str, int] = OrderedDict()  # of ``_done``, the outputs kept (``_keep_done``)
        self._results: list[Result] = []
        self._list_prices: list[float] = []
        # (cache shard, (fingerprint, result)) of ended requests; (cache shard, (fingerprint, uid)) of failed ones
        self._fills: list[tuple[int, tuple[str, Result]]] = []
        self._orphans: list[tuple[int, tuple[str, str]]] = []
        self._readmit: list[Job] = []
        self._settle: list[tuple[str, float]] = []
        self._observed: list[tuple[str, list[float], int]] = []
        self._turnarounds: list = []  # batches started and ended, for every grouper (engine.runtime.turnaround)
        self._warmth: list = []  # prompt-cache warmth its results showed, for every grouper (``_note_warm``)
        # What it told them, numbered by message: a grouper Ray restarts learns it again (``turnarounds_told``).
        self._told: deque = deque(maxlen=TOLD_KEPT)
        self._told_seq = time.time_ns() // 1000  # above the last incarnation's: a grouper skips numbers it heard
        # Whether the groupers learn batch turnarounds (a constructor argument: a restarted dispatcher tells them
        # how its re-attached batches end)
        self._learners = learners
        # Whether the groupers' policy reads prompt-cache warmth (``reads_warmth``): no notes for one that does not
        self._warm_readers = warm_readers
        self._counts = DispatchCounts()  # counters for the hub's metrics, sent with the observations (``flush``)
        self._queued_at: dict[int, float] = {}  # id(work item) -> engine time it joined the rate gate's queue
        self._breaker_reported: dict[str, int] = {}
        self._breaker_dirty = True  # the first flush reports every model's circuit as closed
        self._flusher: asyncio.Task | None = None
        # Per cache shard, the fills and orphans it has not taken yet, sent by a task of its own
        # (``Outbox._cache_lane``)
        self._cache_queues: dict[int, tuple[list[tuple[str, Result]], list[tuple[str, str]]]] = {}
        self._cache_tasks: dict[int, asyncio.Task] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._pump_timer: tuple[float, asyncio.TimerHandle] | None = None
        # reattached: journaled (or indexed, ``_batch_index``) batches followed again after a restart
        self.in_flight = self.rerouted = self.batches_cancelled = self.reattached = 0
        self.resumed_calls = 0  # journaled sync calls made again (same key and body) after a restart
        self.waits: deque[float] = deque(maxlen=10_000)  # engine seconds from arrival to start, for benchmarks

    async def set_clock(self, clock) -> None:
        """The engine sets the clock once every actor is up, so engine time 0 is when submitting can start."""
        self.clock = clock
        self.provider.clock = clock
        self._day_from(clock)

    def _day_from(self, clock) -> None:
        """The simulated world's hours of day count from the engine's origin, as the groupers' learned ones do:
        the setting, else the engine clock's (a restarted dispatcher has the published clock already)."""
        sim = self.settings.sim
        self.sim.world = TurnaroundWorld.of(sim, engine_day_origin(sim.day_origin_s, clock))

    def __repr__(self) -> str:
        return f"Dispatcher({self.name}, in_flight={self.in_flight}, {self.provider!r}, {self.sim!r})"

    # -- carrying out -----------------------------------------------------------------------------------------
    async def turnarounds_told(self) -> list[tuple[int, list]]:
        """Its latest ``TOLD_KEPT`` messages to the groupers about batches, with their numbers."""
        return list(self._told)

    async def run_many(self, batches: list[BatchJob], learners: bool = False) -> None:
        """``learners``: the sending grouper learns batch turnarounds, so from now on every grouper is told of
        the batches this dispatcher starts and ends (one message per grouper per flush that has any)."""
        await self._ready()  # restarted by Ray: its journal first, or it sends its open batches' members again
        self._learners = self._learners or learners
        for b in batches:
            self.run(b)
        self._pump()

    def _fresh(self, jobs: list[Job]) -> list[Job]:
        """The jobs not already here: a request re-admitted after a restart elsewhere may arrive while its first
        dispatch runs (it must not run twice) or after it finished (its result is sent again, no new call)."""
        known, done = self._known, self._done
        self._note_copies(jobs)  # (``cut_at_stop``)
        out, here = [], set()
        for j in jobs:
            uid = j.req.uid
            if (uid not in known or self._stray_of_other(j)) and uid not in done and uid not in here:
                out.append(j)
                here.add(uid)
                continue
            if uid in done and uid not in here:
                self._send_again(uid)
                here.add(uid)
            if (spare := self._spare_claim(j)) is not None:  # (``_batch_index``; a stray's copy: ``_batch_strays``)
                self._settle.append((spare, 0.0))  # the duplicate's own reservation is not needed
        if len(out) == len(jobs):
            return jobs
        self._kick()
        return out

    def run(self, b: BatchJob) -> None:
        """Queue a dispatch at the provider (``run_many`` then starts what the gates allow)."""
        jobs = self._fresh(b.jobs)
        if not jobs:
            return
        if jobs is not b.jobs:
            b = b._replace(jobs=jobs)
        t = self.clock.now()  # first: a failure here must leave no trace (a uid known here is never re-sent)
        self._known.update(j.req.uid for j in jobs)
        self.in_flight += len(jobs)
        if b.mode == "batch_api" and (b.hedge_at is None or b.hedge_at > t):
            self._enqueue("batch_api", b, jobs, first=True)
        elif b.mode == "gpu_batch":
            self._enqueue("gpu_batch", b, jobs, first=True)
        else:  # sync or flex, or a batch hedged before it started
            for j in jobs:
                # A member whose hedge passed on the way here goes back to the grouper, as at a hedge: its policy
                # may still send it in a second batch, and its claim (of the batch price, where sync costs up to
                # twice that) is released in the call that reserves what it decides (``goes_back``).
                if goes_back(b.mode, b.hedge_at, t, j.req):
                    self._hedged(j)
                    self._kick()
                else:
                    self._queue_call(b, j, first=True)

    def _pump(self) -> None:
        now = self.clock.now()
        events, nxt = self.sim.pump(now)
        observed: dict[str, list[float]] = {}
        for e in events:
            b, jobs = e.work.item
            queued_at, first = self._unqueued(e.work.item)
            if e.kind not in ("reroute", "to_standard"):
                observed.setdefault(b.mode, []).extend(now - j.req.arrival_s for j in jobs)
                if queued_at is not None:
                    self._counts.rate_limit_wait_s.setdefault(b.mode, []).extend(
                        [max(e.start - queued_at, 0.0)] * len(jobs))  # one per request, as dispatch waits
            if (jobs := self._to_start(e.kind, b, jobs)) and e.kind == "batch_api":
                self._start_batch_api(e, b, jobs, first)  # (a stop may name its members until its create begins)
            elif jobs:
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

    def _spawn(self, coro, jobs: list[Job], b: BatchJob) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                # A bug, not a provider's failure (those are outcomes): fail the members rather than lose them.
                log.error("dispatcher %s: %s", self.name, said := engine_error(self.provider, t.exception()))
                for j in jobs:
                    self._final(b, j, False, 0.0, b.mode, error=said)
                self._kick()

        task.add_done_callback(done)

    def _call_job(self, j: Job, start: float, cache_write: bool = False, batch: bool = False) -> CallJob:
        r = j.req
        key = call_key(r.tenant, r.id, r.model, j.attempts if batch else 0)
        return CallJob(key, r, start, j.attempts, j.seq, cache_write)

    def _start_sync(self, e: Event, b: BatchJob, jobs: list[Job]) -> None:
        (j,) = jobs
        if e.kind == "sync" and b.mode == "flex":  # the gate started it standard (``SimProvider.pump``), as planned
            b = self._to_standard(b, j)
        self._spawn(self._run_sync(b, j, e.work.cache_write, e.start), jobs, b)

    def _start_gpu_batch(self, e: Event, b: BatchJob, jobs: list[Job]) -> None:
        calling = self._calling = self._calling or {}  # under way (billed by the GPU second): the stop settles it
        for j, a in zip(jobs, e.outcome):  # at its bound; left out, its claim held its room until reservation_ttl_s
            calling[key := f"gpu_batch:{j.req.uid}"] = (b, j)
            self._at(a.at, lambda j=j, a=a, key=key: (calling.pop(key, None),
                                                      self._attempt(b, j, a.ok, a.cost, "gpu_batch")))

    def _start_reroute(self, e: Event, b: BatchJob, jobs: list[Job]) -> None:
        """The model's circuit is open: its work goes back to the policy as requests for the fallback."""
        provider, model = e.outcome.split("/", 1)
        self.rerouted += len(jobs)
        for j in jobs:
            # A sync call of it that timed out may be billed, and the fallback does not retry its key: its claim
            # keeps that call's upper bound, as a failed request's does (``_maybe_billed``).
            self._member_done(j, usd := self._maybe_billed(j))
            req = j.req.model_copy(update={"provider": provider, "model": model})
            self._readmit.append(j._replace(req=req, asked=j.asked or (j.req.provider, j.req.model), claim=None,
                                            billed_usd=j.billed_usd + usd))

    def _at(self, at: float, fn) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            fn()
            self._kick()

        handle = loop.call_later(self.clock.real_delay(at - self.clock.now()), fire)
        self._timers.add(handle)

    async def stats(self, waits: bool = False) -> dict:
        out = {"provider": self.name, "calls": "http" if self.provider.real else "simulated",
               "in_flight": self.in_flight, "queued": self.sim.waiting,
               "rerouted": self.rerouted, "circuit_opened": self.sim.breaker.opened,
               "batches_cancelled": self.batches_cancelled, "members_saved_by_cancel": self.members_saved_by_cancel,
               "paid_twice": self.paid_twice, "paid_twice_usd": round(self.paid_twice_usd, 6),
               "possibly_billed": self.possibly_billed, "possibly_billed_usd": round(self.possibly_billed_usd, 6),
               "replayed": self.replayed, "replayed_usd": round(self.replayed_usd, 6),
                "key_conflicts": self.key_conflicts, "flex_refused": self.flex_refused,
                "flex_timed_out": self.flex_timed_out, "quota_unsent": self._quota.refused, "open_batches": len(self._open),
                "reattached": self.reattached, "resumed_calls": self.resumed_calls, "journal_unread": self.journal_unread,
                "journal_lost": self.journal_lost, **self._files.stats()}
        if waits:
            out["waits"] = list(self.waits)
        return out
