"""Learning a provider's batch turnaround online, from the batches the engine itself submits.

The catalog's turnaround (``BatchApi``: a lognormal by median and p95) is a prior. ``TurnaroundEstimator`` fits
the log-median of each provider and model, overall and per hour of day, to the batches submitted lately, and
hands the runtime a learned ``BatchApi`` (the catalog's, with median and p95 moved) that the policy reads instead.
Pure: no I/O, no clock; every method is told the time. The hour of day is ``engine.core.draws.hour_of_day`` of
engine time from ``day_origin_s`` (the time of day at engine time 0), the rule the simulated world's by-hour
turnaround follows: a batch is filed under the hour the world drew it in.

Censoring. Most batches tell only a bound: one cancelled because it was late ran longer than it was given, and
one still running has taken longer than it has run so far. Learning from completions alone keeps the fast batches
and drops the slow ones (a fresh estimate sees only batches that were quick enough to have ended), so it would be
biased fast, most of all in a slow world, where it matters. So the fit is the censored-data maximum a posteriori
log-median (EM for a normal of the catalog's spread, the prior as ``prior_weight`` batches): a finished batch
counts its turnaround; a cancelled or running one its expected log-turnaround given that it exceeded what it ran.

Parity. The simulator knows of a batch when it starts; a live grouper hears of it from its dispatcher some
milliseconds later, with messages of several dispatchers in any order. So nothing takes effect when it is told:
the estimate changes only at *epochs* (engine times ``k * epoch_s``), and epoch ``k``'s is a function of what was
known at its cut, ``k * epoch_s - guard_s`` (batches started by then, and which of them ended by then). A runtime
told all of that by the epoch, in whatever order, decides alike.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from engine.core.catalog import BatchApi, Catalog, ProviderSpec
from engine.core.draws import hour_of_day
from engine.core.settings import TurnaroundLearning

__all__ = ["Turnaround", "TurnaroundEstimator", "fit", "mean_above", "submitted"]

MAX_BATCHES = 512  # batches kept per provider and model (the latest started); older ones weigh next to nothing
KEEP_HALF_LIVES = 4.0  # batches started longer ago than this many half-lives are dropped (weight < 7 %)
EM_STEPS = 50
BURST_S = 60.0  # batches of one model submitted within one such span of engine time count as one between them
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)

Key = tuple[str, str]  # (provider, model)


class Turnaround(NamedTuple):
    """A batch-API batch of ``provider``/``model`` submitted at ``start``. ``end``: None while running (a live
    dispatcher tells when it submits); else when it finished, or, when ``censored``, when it was cancelled
    unfinished (late: its turnaround only exceeds ``end - start``). Telling an ended batch implies its start."""

    provider: str
    model: str
    start: float
    end: float | None = None
    censored: bool = False


def batch_turnaround(provider: str, model: str, start: float, ends: list[float], n: int, end: float) -> Turnaround:
    """What a batch of ``n`` members that ended tells of the turnaround: when its last member finished
    (``ends``: when each it answered did), or, with members missing (cancelled late, expired), only that it ran
    longer than it did, censored at ``end`` (its hedge time when it was cancelled, which is when the simulator
    ends it too)."""
    if len(ends) == n:
        return Turnaround(provider, model, start, max(max(ends), start))
    return Turnaround(provider, model, start, end, censored=True)


def submitted(start: float, hedge_at: float | None) -> bool:
    """Whether a batch starting at ``start`` reaches the provider (and so tells of its turnaround): one whose
    hedge came while it queued is never sent (``engine.runtime.providers.SimProvider.batch``)."""
    return hedge_at is None or hedge_at > start


def mills(alpha: float) -> float:
    """phi(alpha) / (1 - Phi(alpha)): how far above a bound, in spreads, a normal that exceeds it lies."""
    if alpha > 30.0:  # too far in the tail for erfc; the asymptotic ratio is exact to 1e-4 here
        return alpha + 1.0 / alpha
    return math.exp(-0.5 * alpha * alpha) / _SQRT2PI / (0.5 * math.erfc(alpha / _SQRT2))


def mean_above(mu: float, sigma: float, a: float) -> float:
    """E[X | X > a] for X ~ N(mu, sigma^2)."""
    return mu + sigma * mills((a - mu) / sigma)


def fit(mu0: float, k0: float, sigma: float, exact: list[tuple[float, float]], above: list[tuple[float, float]],
        doubt_z: float) -> float:
    """The log-median of a normal of spread ``sigma``, from ``exact`` (weight, log-turnaround) and ``above``
    (weight, log-bound) values and the prior ``mu0`` as ``k0`` observations: EM from the prior to its fixed
    point. Then moved back toward the prior by ``doubt_z`` standard errors (never past it): a right catalog
    stays exactly right, where a fit to a few dozen batches would wander by tens of percent around it (and
    every move costs: the policy's choices are tuned to the turnaround it is told), while a wrong one shows at
    once. The standard error counts each censored value by its Fisher information (1 for an exact one, less
    for a bound: next to nothing for one far under the median)."""
    w_exact = sum(w for w, _ in exact)
    base = k0 * mu0 + sum(w * x for w, x in exact)
    w_all = k0 + w_exact + sum(w for w, _ in above)
    mu = base / (k0 + w_exact)
    if above:
        mu = mu0
        for _ in range(EM_STEPS):
            nxt = (base + sum(w * mean_above(mu, sigma, a) for w, a in above)) / w_all
            if abs(nxt - mu) < 1e-7:
                mu = nxt
                break
            mu = nxt
    info = k0 + w_exact
    for w, a in above:
        alpha = (a - mu) / sigma
        lam = mills(alpha)
        info += w * lam * (lam - alpha)
    slack = doubt_z * sigma / math.sqrt(info)
    return mu0 + math.copysign(max(abs(mu - mu0) - slack, 0.0), mu - mu0)


class TurnaroundEstimator:
    def __init__(self, catalog: Catalog, learning: TurnaroundLearning, day_origin_s: float = 0.0):
        self.catalog = catalog
        self.cfg = learning
        self.day_origin_s = day_origin_s  # fixed for its life: the fitted hours are keyed by it
        # Per (provider, model): batches told started (start -> count) and ended (start, end, censored).
        self._starts: dict[Key, Counter[float]] = {}
        self._ends: dict[Key, list[tuple[float, float, bool]]] = {}
        self._epoch = 0
        self._next_at = learning.epoch_s
        # Log-medians of the epoch in force and of the one before: key -> (overall, {hour: log-median}).
        self._mu: dict[Key, tuple[float, dict[int, float]]] = {}
        self._prev: dict[Key, tuple[float, dict[int, float]]] = {}
        self._views: dict[tuple, ProviderSpec] = {}  # learned specs of this epoch, made on demand
        self._late = False  # told, after this epoch was fitted, of a batch started by its cut

    def __repr__(self) -> str:
        medians = {f"{p}/{m}": round(math.exp(mu), 1) for (p, m), (mu, _) in self._mu.items()}
        return (f"TurnaroundEstimator(epoch={self._epoch}, batches={self.batches}, medians={medians}, "
                f"day_origin_s={self.day_origin_s})")

    @property
    def batches(self) -> int:
        """Batches held (bounded: ``MAX_BATCHES`` per provider and model)."""
        return sum(len(e) for e in self._ends.values()) + sum(sum(c.values()) for c in self._starts.values())

    # -- observations ----------------------------------------------------------------------------------------
    def observe(self, obs: Iterable[Turnaround]) -> None:
        """Batches started or ended; they count from the first epoch whose cut is past what they tell."""
        for o in obs:
            prov = self.catalog.providers.get(o.provider)
            if prov is None or prov.batch_api is None or o.model not in prov.models:
                continue
            key = (o.provider, o.model)
            if self._epoch and o.start <= self._epoch * self.cfg.epoch_s - self.cfg.guard_s:
                self._late = True
            if o.end is None:
                self._starts.setdefault(key, Counter())[o.start] += 1
            else:
                self._ends.setdefault(key, []).append((o.start, o.end, o.censored))

    def advance(self, now: float) -> None:
        """Make the estimate in force at ``now`` (that of the epoch it falls in); cheap when already made. The
        previous epoch's is kept: a live timer set for just before an epoch may fire after another decision made
        the next one (``provider`` picks the estimate by the time it is asked for)."""
        if now < self._next_at:
            if self._late:
                # A message that came after this epoch's first decision (a live dispatcher's poll, a busy
                # grouper) still counts from the next decision on, rather than not at all this epoch: the
                # simulator, told everything in time, never gets here.
                self._late = False
                self._mu = self._fit_all(self._epoch * self.cfg.epoch_s - self.cfg.guard_s)
                self._views.clear()
            return
        self._late = False
        k = int(now // self.cfg.epoch_s)
        cut = k * self.cfg.epoch_s - self.cfg.guard_s
        self._prev = self._mu if k == self._epoch + 1 else self._fit_all(cut - self.cfg.epoch_s)
        self._mu = self._fit_all(cut)
        self._epoch = k
        self._next_at = (k + 1) * self.cfg.epoch_s
        self._views.clear()

    def _fit_all(self, cut: float) -> dict[Key, tuple[float, dict[int, float]]]:
        self._prune(cut)
        out = {}
        for key in set(self._starts) | set(self._ends):
            got = self._fit(key, cut)
            if got is not None:
                out[key] = got
        return out

    def _prune(self, cut: float) -> None:
        """Bounded memory: only batches started within ``KEEP_HALF_LIVES`` half-lives, and at most ``MAX_BATCHES``
        (the latest started) per provider and model. A function of the batches started by ``cut`` only (a batch
        told started and then ended is one batch), so every runtime keeps the same ones."""
        oldest = cut - KEEP_HALF_LIVES * self.cfg.half_life_s
        for key in list(set(self._starts) | set(self._ends)):
            ends = [e for e in self._ends.get(key, ()) if e[0] >= oldest]
            starts = Counter({s: n for s, n in self._starts.get(key, Counter()).items() if s >= oldest})
            n = Counter(e[0] for e in ends)
            for s, k in starts.items():
                n[s] = max(n[s], k)
            held = 0
            for s in sorted((s for s in n if s <= cut), reverse=True):
                held += n[s]
                if held > MAX_BATCHES:  # this start and all before it go
                    ends = [e for e in ends if e[0] > s]
                    starts = Counter({t: k for t, k in starts.items() if t > s})
                    break
            if ends or starts:
                self._ends[key], self._starts[key] = ends, starts
            else:
                self._ends.pop(key, None)
                self._starts.pop(key, None)

    def _fit(self, key: Key, cut: float) -> tuple[float, dict[int, float]] | None:
        """The log-medians (overall, per hour) from what was known at ``cut``; None when nothing was."""
        ba = self.catalog.providers[key[0]].batch_api
        lo, hi = math.log(max(ba.turnaround_min_s, 1e-3)), math.log(ba.completion_window_s)
        ends = [e for e in self._ends.get(key, ()) if e[0] <= cut]
        ended = Counter(e[0] for e in ends)
        running = {s: n - ended[s] for s, n in self._starts.get(key, Counter()).items() if s <= cut and n > ended[s]}
        # Batches submitted within the same minute met the same queue at the provider: their turnarounds move
        # together, so together they count as one batch (else a burst of flushes would pass for evidence).
        burst = Counter(int(s // BURST_S) for s, _, _ in ends)
        for s, n in running.items():
            burst[int(s // BURST_S)] += n
        exact: dict[int, list] = {}
        above: dict[int, list] = {}
        decay = math.log(2.0) / self.cfg.half_life_s

        def count(s: float, to: dict[int, list], x: float) -> None:
            w = math.exp(-decay * (cut - s)) / burst[int(s // BURST_S)]
            to.setdefault(self._hour(s), []).append((w, min(max(x, lo), hi)))

        for s, e, censored in ends:
            if e > cut:  # still running at the cut: it has run this long
                if cut - s > ba.turnaround_min_s:
                    count(s, above, math.log(cut - s))
            elif censored:  # a bound under the catalog's floor says nothing: every batch takes that long
                if e - s > ba.turnaround_min_s:
                    count(s, above, math.log(e - s))
            else:
                count(s, exact, math.log(max(e - s, 1e-3)))
        for s, n in running.items():  # told started, not (yet) ended: running at the cut
            if cut - s > ba.turnaround_min_s:
                for _ in range(n):
                    count(s, above, math.log(cut - s))
        if not exact and not above:
            return None
        # Sorted: float sums in one order, whether a running batch was told as started (live) or as ending
        # after the cut (the simulator knows its end when it starts).
        for part in (exact, above):
            for v in part.values():
                v.sort()
        mu0, sigma, z = math.log(ba.turnaround_median_s), ba.turnaround_sigma, self.cfg.doubt_z
        mu = fit(mu0, self.cfg.prior_weight, sigma, [v for h in sorted(exact) for v in exact[h]],
                 [v for h in sorted(above) for v in above[h]], z)
        hours = {}
        if self.cfg.by_hour:
            for h in sorted(set(exact) | set(above)):
                mu_h = fit(mu, self.cfg.hour_weight, sigma, exact.get(h, []), above.get(h, []), z)
                if mu_h != mu:
                    hours[h] = mu_h
        if mu == mu0 and not hours:
            return None  # the catalog's, as it is (not a copy a rounding away from it)
        return mu, hours

    # -- the estimate ------------------------------------------------------------------------------------------
    def _hour(self, t: float) -> int:
        return hour_of_day(t, self.day_origin_s) if self.cfg.by_hour else 0

    def _in_force(self, t: float) -> dict[Key, tuple[float, dict[int, float]]]:
        return self._prev if int(t // self.cfg.epoch_s) == self._epoch - 1 else self._mu

    def learned(self) -> dict[Key, tuple[float, dict[int, float]]]:
        """The medians in force since the last ``advance`` that moved off the catalog's, by (provider, model):
        (over all hours, {hour of day: its own}). Empty while the catalog's stands."""
        return {key: (math.exp(mu), {h: math.exp(x) for h, x in hours.items()})
                for key, (mu, hours) in sorted(self._mu.items())}

    def median(self, provider: str, model: str, t: float) -> float:
        """The learned median turnaround at ``t`` (the catalog's while nothing is known), before clipping."""
        got = self._in_force(t).get((provider, model))
        if got is None:
            return self.catalog.providers[provider].batch_api.turnaround_median_s
        mu, hours = got
        return math.exp(hours.get(self._hour(t), mu))

    def batch_api(self, provider: str, model: str, t: float) -> BatchApi:
        """The learned turnaround at ``t`` (under the epoch made by the last ``advance``): the catalog's spread
        (p95 / median) around the learned median, clipped to the catalog's floor and completion window. Only
        the median is learned: a few dozen batches, most of them censored, place a median, not a tail."""
        ba = self.catalog.providers[provider].batch_api
        med = min(max(self.median(provider, model, t), ba.turnaround_min_s), ba.completion_window_s)
        p95 = min(med * ba.turnaround_p95_s / ba.turnaround_median_s, ba.completion_window_s)
        return ba.model_copy(update={"turnaround_median_s": med, "turnaround_p95_s": p95})

    def provider(self, prov: ProviderSpec, model: str, t: float) -> ProviderSpec:
        """``prov`` with the learned ``batch_api`` for ``model`` at ``t``; ``prov`` itself while nothing is
        known of that model, so a run without batches decides exactly as with the catalog."""
        if prov.batch_api is None or (prov.name, model) not in self._in_force(t):
            return prov
        key = (prov.name, model, self._hour(t), int(t // self.cfg.epoch_s) == self._epoch - 1)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = prov.model_copy(update={"batch_api": self.batch_api(prov.name, model, t)})
        return view
