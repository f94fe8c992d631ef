"""The exact-parity trace and comparison, shared by test_parity.py (one node) and _cluster_run.py (a simulated
cluster): see test_parity.py for why the trace is built this way."""

from __future__ import annotations

import collections

import pytest

from engine.core.cost import MODES
from engine.core.draws import Draws
from engine.core.features import fingerprint
from engine.core.trace import TraceRequests
from engine.core.tracegen import synth

SPEEDUP = 10
MIN_GAP_S = 1.0  # engine seconds
WAVE_S = 10.0


TURNAROUND_SCALE = 0.3  # batch-API turnarounds of the parity catalog, as a share of the default catalog's
# Smart's parameters the parity traces were searched under. Their premise (no decision within MIN_GAP_S of an
# arrival) holds for these flush times, not for any default: a change of smart's defaults must not move them.
PARITY_POLICY = {"gather_p_loss": 0.01, "shared_gather_p_loss": 0.01}


def parity_catalog():
    """The default catalog with batch-API turnarounds at ``TURNAROUND_SCALE``: batches and their hedges then
    fit deadlines of minutes, so the trace (and the test) ends sooner, with every lane still used."""
    from engine.core.catalog import Catalog, default_catalog

    d = default_catalog().model_dump()
    for p in d["providers"].values():
        ba = p.get("batch_api")
        if ba:
            for k in ("turnaround_median_s", "turnaround_p95_s", "turnaround_min_s"):
                ba[k] *= TURNAROUND_SCALE
    return Catalog.model_validate(d)


def wave_trace(n: int = 160, seed: int = 52, span_s: float = 150.0, max_deadline_s: float = 400.0):
    """``synth`` squeezed into ``span_s`` and rounded into waves ``WAVE_S`` apart, deadlines capped."""
    reqs = synth(n, seed=seed, duration_s=span_s)
    a0, a1 = min(r.arrival_s for r in reqs), max(r.arrival_s for r in reqs)
    return [r.model_copy(update={
        "deadline_s": min(r.deadline_s, max_deadline_s),
        "arrival_s": WAVE_S * round((r.arrival_s - a0) * span_s / (a1 - a0) / WAVE_S)}) for r in reqs]


# The learning case: smart with the plain fit (no benefit of the doubt for the catalog) and epochs of 60 s, in a
# world whose batches take 0.3x what the catalog says, so a run of ~200 s learns over three epochs from batches
# that finish. The guard is no multiple of the waves' 10 s, so no wave's batch starts on a cut.
LEARNING = {**PARITY_POLICY, "turnaround": {"epoch_s": 60.0, "guard_s": 25.0, "doubt_z": 0.0}}
LEARNING_WORLD = 0.3
MIDNIGHT_AT_S = 60.0  # engine time of the learning trace's midnight: batches fall in hours 23 and 0


# Seed 30, not 39: 39's decisions hung on when a batch ended. A sonnet batch's end at 102.6 s warmed a prompt
# prefix and pulled three waiting requests to sync, 0.55 engine s before their group's own flush would have sent
# them in a batch: a batch ended 110 ms of real time late live (at 5x, the machine loaded), and the three rode a
# batch where the simulator's went sync (stop 77's failed rehearsal; reproduced with two busy loops beside it,
# and by the simulator itself with every batch ending 0.6 s late). ``closest_call`` does not see such a gap (the
# flush it beat never happens); ``LateDraws`` does. Seed 30 decides alike with every batch 4 s late.
LEARNING_TRACE = {"n": 100, "seed": 30, "span_s": 100.0, "max_deadline_s": 150.0}


def learning_trace() -> TraceRequests:
    """A wave trace that started at 23:59 UTC (as a trace built from timestamps knows), so a runtime that counts
    hours from anything but the trace's origin files its batches under other hours."""
    return TraceRequests(wave_trace(**LEARNING_TRACE), day_origin_s=86400.0 - MIDNIGHT_AT_S)


class LateDraws(Draws):
    """The simulator's draws with every batch-API batch submitted ``lag_s`` after it was decided: its turnaround
    that of the slot it then lands in, and it ends ``lag_s`` later. What a live dispatcher's lag does to a batch
    and to all that hangs on its end (the prompt prefixes it warms, the requests that follow it, its hedge): a
    trace whose decisions do not move under it has none within ``lag_s`` of a batch's end. A negative ``lag_s``
    ends every batch that much sooner, in the slot it was sent in: a hedge that late, against the batch's end."""

    def __init__(self, n_requests: int, max_attempts: int, seed: int, slot_s: float, lag_s: float):
        super().__init__(n_requests, max_attempts, seed, slot_s)
        self.lag_s = lag_s

    def turnaround(self, provider, ba, t, world=None) -> float:
        return self.lag_s + super().turnaround(provider, ba, t + max(self.lag_s, 0.0), world)


def sim_differences(sim, other) -> list:
    """``differences`` between two simulations of one trace (``other``: under ``LateDraws``, say)."""
    return differences(sim, {r.id: _AsResult(other, i) for i, r in enumerate(other.requests)})


class _AsResult:
    """Request ``i`` of a simulation, read as ``differences`` reads a live Result."""

    def __init__(self, sim, i: int):
        self.id, self.mode, self.cost_usd = sim.requests[i].id, MODES[sim.mode[i]], float(sim.cost[i])
        self.deadline_met, self.batch_id = bool(sim.met[i]), int(sim.batch_of[i])
        self.hit = {0: None, 1: "identical", 2: "in_flight", 3: "near"}[int(sim.hit[i])]


def closest_cut(sim, epoch_s: float, guard_s: float) -> float:
    """Engine seconds between a learning cut (``k * epoch_s - guard_s``: what an epoch's estimate knows) and the
    nearest start or finish of a batch-API batch. A live batch starts and ends milliseconds after the
    simulator's, so one on a cut would count in one runtime's epoch only."""
    times = [b.t for b in sim.batches if b.mode == "batch_api"]
    times += [float(sim.done_at[i]) for i in range(len(sim.requests)) if MODES[sim.mode[i]] == "batch_api"]
    cuts = [k * epoch_s - guard_s for k in range(1, int(max(times) // epoch_s) + 2)]
    return min(abs(t - c) for t in times for c in cuts)


def cache_ties(sim, catalog) -> int:
    """Waves in which two requests sharing a prefix go sync to one model of a provider that caches prompts by
    itself: which of them warms the cache for the other follows the order their calls start, which the live
    dispatcher may take otherwise (the wave trace above has none; with 11, the first learning trace tried billed
    four requests differently live, though not in total)."""
    n = collections.Counter()
    for i, r in enumerate(sim.requests):
        pc = catalog.providers[r.provider].cache_of(r.model)
        if MODES[sim.mode[i]] == "sync" and r.prefix_blocks and pc is not None and pc.automatic:
            n[(r.provider, r.model, r.prefix_blocks[0], r.arrival_s)] += 1
    return sum(k > 1 for k in n.values())


def closest_call(sim) -> float:
    """Engine seconds between an arrival and the nearest event it could have changed: a batch of its lane
    being sent, or the completion of an identical request."""
    lane, same = collections.defaultdict(list), collections.defaultdict(list)
    for r in sim.requests:
        lane[(r.provider, r.model)].append(r.arrival_s)
        same[fingerprint(r)].append(r.arrival_s)
    gaps = [abs(a - b.t) for b in sim.batches if b.mode != "sync" for a in lane[(b.provider, b.model)]]
    gaps += [abs(a - sim.done_at[i]) for i, r in enumerate(sim.requests) if MODES[sim.mode[i]] != "reuse"
             and sim.status[i] != 0 for a in same[fingerprint(r)]]
    return min(g for g in gaps if g > 1e-6)


def coverage(sim) -> tuple[dict, dict, int]:
    """Requests per mode, per reuse kind (0 none, 1 exact, 2 in flight, 3 near), and hedged batches."""
    return (dict(collections.Counter(MODES[m] for m in sim.mode)),
            dict(collections.Counter(int(h) for h in sim.hit)), sum(b.outcome == "hedged" for b in sim.batches))


def differences(sim, live: dict) -> list:
    """Requests whose mode, cost, deadline outcome or reuse kind differ (``live``: id -> Result), and whether
    the batch-API and GPU batches have different members."""
    near = {0: None, 1: "identical", 2: "identical", 3: "near"}
    diffs = []
    for i, r in enumerate(sim.requests):
        got = live[r.id]
        want = (MODES[sim.mode[i]], round(float(sim.cost[i]), 9), bool(sim.met[i]), near[int(sim.hit[i])])
        have = (got.mode, round(got.cost_usd, 9), bool(got.deadline_met),
                None if got.hit is None else "near" if got.hit == "near" else "identical")
        if want != have:
            diffs.append((r.id, want, have))

    def batches(pairs):
        out = collections.defaultdict(set)
        for rid, mode, bid in pairs:
            if mode in ("batch_api", "gpu_batch"):
                out[bid].add(rid)
        return sorted(sorted(s) for s in out.values())

    if batches((r.id, MODES[sim.mode[i]], int(sim.batch_of[i])) for i, r in enumerate(sim.requests)) != \
            batches((x.id, x.mode, x.batch_id) for x in live.values()):
        diffs.append(("batches", "members differ", ""))
    return diffs


def refit(catalog, learning, day_origin_s: float, epoch: int, starts: dict, ends: dict, lags: dict | None = None):
    """What a fresh ``TurnaroundEstimator`` learns by epoch ``epoch`` from the batches a grouper's was told
    (``starts``: key -> {start: how many}; ``ends``: key -> [(start, end, censored)]), each moved earlier by its
    ``lags`` (key -> {start: engine seconds}) first: a grouper's learning checked against the events it saw,
    whenever they came."""
    from engine.runtime.turnaround import Turnaround, TurnaroundEstimator

    back = (lags or {})
    est = TurnaroundEstimator(catalog, learning, day_origin_s)
    for (p, m), got in starts.items():
        lag = back.get((p, m), {})
        est.observe(Turnaround(p, m, s - lag.get(s, 0.0)) for s, n in got.items() for _ in range(n))
    for (p, m), got in ends.items():
        lag = back.get((p, m), {})
        est.observe(Turnaround(p, m, s - lag.get(s, 0.0), e - lag.get(s, 0.0), c) for s, e, c in got)
    est.advance(epoch * learning.epoch_s)
    return est.learned()


def lags_behind(sim, starts: dict, ends: dict, cut: float) -> dict:
    """Per (provider, model), how much later than the simulator's each batch-API batch it started by ``cut`` (the
    learning cut of the epoch in force) started live: key -> {live start: lag}. The live engine's first batches
    are the simulator's, one for one in order, and those after them started past the cut (asserted); one may
    have started past the cut itself, late. A lag moves a batch's start and end alike (the provider ends it a
    turnaround after it got it): each of them that finished took the simulator's turnaround, to 10 ms of real
    time (asserted), so the start told is when the provider got it, however late that was."""
    live: dict = collections.defaultdict(collections.Counter)
    for key, got in starts.items():
        live[key].update(got)
    for key, got in ends.items():
        for s, n in collections.Counter(s for s, _, _ in got).items():
            live[key][s] = max(live[key][s], n)
    took = collections.defaultdict(float)  # simulated batch id -> turnaround (its last member's end)
    for i in range(len(sim.requests)):
        if MODES[sim.mode[i]] == "batch_api":
            took[int(sim.batch_of[i])] = max(took[int(sim.batch_of[i])], float(sim.done_at[i]))
    out = {}
    for key in set(live) | {(b.provider, b.model) for b in sim.batches if b.mode == "batch_api"}:
        mine = sorted(s for s, n in live.get(key, {}).items() for _ in range(n))
        theirs = sorted((b.t, b.id) for b in sim.batches if (b.provider, b.model) == key and b.mode == "batch_api"
                        and b.t <= cut)
        assert len(mine) >= len(theirs) and all(s > cut for s in mine[len(theirs):]), (key, mine, theirs)
        out[key] = {s: s - t for s, (t, _) in zip(mine, theirs)}
        finished = {s: e - s for s, e, censored in ends.get(key, ()) if not censored}
        for s, (t, bid) in zip(mine, theirs):
            if s in finished or bid in took:
                assert finished.get(s, 0.0) == pytest.approx(took.get(bid, 0.0) - t, abs=0.05), (key, s, t)
    return out
