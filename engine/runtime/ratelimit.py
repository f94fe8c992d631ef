"""Provider rate limits as a gate that says when a call may start.

A provider counts requests and tokens per minute over a *sliding* minute. A token bucket with a burst lets up
to twice its rate through in one sliding minute (a full bucket, then a minute of refill), and GCRA with a
burst tolerance does the same by the tolerance; a provider that enforces a sliding minute answers that with
429s. So the gate keeps the starts of the last minute (a moving window, as the ``limits`` library calls it)
and admits a call only when, counting it, the window holds at most ``rpm`` requests and ``tpm`` tokens. A
call's whole weight is spent at its start, so a batch or a long prompt is never split across windows.

Starts are monotone: a call never starts before the previous one, so each window is a sorted list with running
sums and each check a binary search. Concurrency is a heap of the end times of running calls (the simulated provider knows each
call's duration when it starts). The gate is pure: time is a parameter.
"""

from __future__ import annotations

import bisect
import heapq
import math

from engine.core.catalog import RateLimits

# Within the minute, at most BURST_SHARE of its quota in any BURST_S seconds. A minute's whole quota may
# otherwise start in its first instant (a flood takes it all), and work that comes a second later (urgent
# work, a quiet tenant) waits for the minute to slide. The minute's limit is unchanged. (In the core, where a
# policy reads them too: ``engine.core.rates.start_spread_s``.)
from engine.core.rates import BURST_S, BURST_SHARE, WINDOW_S

__all__ = ["BURST_S", "BURST_SHARE", "EnqueuedTokens", "LEARNT_LIMIT_S", "RateGate", "WINDOW_S"]


class _Window:
    """Weights started in the last ``WINDOW_S`` seconds, against one limit.

    When each entry leaves the window (its start plus ``span``) and running sums of weight are kept in two
    lists, so "when does enough weight leave the window" is a binary search, not a scan (a full minute at
    10,000 rpm is 10,000 entries). Weights are whole tokens or requests, so the sums are exact in floating
    point."""

    __slots__ = ("base", "cum", "ends", "head", "last", "limit", "span")

    def __init__(self, limit: float, span: float = WINDOW_S):
        self.limit = limit
        self.span = span
        self.ends: list[float] = []  # start + span of each entry, in order: kept, not computed per search
        self.last = 0.0  # the latest start
        self.cum: list[float] = []  # weight started up to and including each entry
        self.head = 0  # first entry that may still count
        self.base = 0.0  # weight before ``head``

    def _first_live(self, t: float) -> tuple[int, float]:
        """First entry still in the window at ``t`` (``start + span > t``) and the weight before it. The test
        reads the same ``start + span`` that ``earliest`` answers: ``t - span`` can round to just below the
        start and keep an entry alive at the very time it was said to leave."""
        k = bisect.bisect_right(self.ends, t, lo=self.head)
        return k, (self.cum[k - 1] if k > self.head else self.base)

    def earliest(self, t: float, w: float) -> float:
        """Earliest start >= t at which adding ``w`` keeps the window within the limit. A weight above the
        limit is capped at it (it starts in an empty window), so no call waits forever."""
        w = min(w, self.limit)
        if not self.ends:
            return t
        k, before = self._first_live(t)
        excess = self.cum[-1] - before + w - self.limit
        if excess <= 0:
            return t
        # The start is when the entry that frees enough weight leaves the window.
        m = bisect.bisect_left(self.cum, before + excess, lo=k)
        return self.ends[m]

    def take(self, t: float, w: float) -> None:
        k, before = self._first_live(t)
        self.head, self.base = k, before
        if k > 4096 and k * 2 > len(self.ends):  # forget what left the window, now and then
            del self.ends[:k], self.cum[:k]
            self.head = 0
        self.ends.append(t + self.span)
        self.last = t
        self.cum.append((self.cum[-1] if self.cum else self.base) + min(w, self.limit))

    def __len__(self) -> int:
        return len(self.ends) - self.head


class RateGate:
    """Requests per minute, tokens per minute and concurrent calls of one provider (or one model with limits
    of its own). ``history``, when a list, records every (start, tokens, end) for tests and reports."""

    def __init__(self, limits: RateLimits, *, history: list | None = None):
        self.limits = limits
        self._windows = (_Window(limits.rpm), _Window(limits.tpm), _Window(max(limits.rpm * BURST_SHARE, 1.0), BURST_S),
                         _Window(max(limits.tpm * BURST_SHARE, 1.0), BURST_S))
        self._req = self._windows[0]
        self._busy: list[float] = []
        self.last_start = 0.0
        self.history = history

    def __repr__(self) -> str:
        return (f"RateGate(rpm={self.limits.rpm:g}, tpm={self.limits.tpm:g}, busy={len(self._busy)}/"
                f"{self.limits.max_concurrency}, window_requests={len(self._req)})")

    def earliest(self, t: float, tokens: int) -> float:
        """When a call of ``tokens`` ready at ``t`` may start (nothing is booked)."""
        s = max(t, self.last_start)
        busy = self._busy
        while busy and busy[0] <= s:
            heapq.heappop(busy)
        if len(busy) >= self.limits.max_concurrency:
            s = max(s, busy[0])
        # Each window's answer only moves later: repeat until none moves it.
        req, tok, req_b, tok_b = self._windows
        while True:
            s2 = tok_b.earliest(req_b.earliest(tok.earliest(req.earliest(s, 1.0), float(tokens)), 1.0),
                                float(tokens))
            if s2 <= s:
                return s
            s = s2

    def take(self, s: float, tokens: int, duration: float) -> None:
        """Book a call starting at ``s`` (from ``earliest``) that runs ``duration`` seconds."""
        busy = self._busy
        while busy and busy[0] <= s:
            heapq.heappop(busy)
        heapq.heappush(busy, s + max(duration, 0.0))
        req, tok, req_b, tok_b = self._windows
        req.take(s, 1.0)
        tok.take(s, float(tokens))
        req_b.take(s, 1.0)
        tok_b.take(s, float(tokens))
        self.last_start = s
        if self.history is not None:
            self.history.append((s, tokens, s + duration))

    def finish(self, end: float, extra_tokens: float = 0.0) -> None:
        """A call booked with an unknown duration (``take(s, tokens, inf)``) ended at ``end``: its
        concurrency slot frees then, and tokens its real usage showed beyond the estimate count at ``end``
        (a smaller usage is not given back: the windows only grow, and over-counting is the safe side)."""
        busy = self._busy
        try:
            i = busy.index(math.inf)
        except ValueError:
            return  # nothing open: the call was booked with its duration
        busy[i] = end
        heapq.heapify(busy)
        if extra_tokens > 0:
            req, tok, req_b, tok_b = self._windows
            for w in (tok, tok_b):
                w.take(max(end, w.last if w.ends else end), float(extra_tokens))

    @property
    def running(self) -> int:
        return len(self._busy)


# Engine seconds a limit the provider named for one model's batch queue is kept (``EnqueuedTokens.learn``): an
# account's tier rises with its spend, and a limit kept for good held every later batch to the old one. Forgotten,
# a limit still in force costs one refused batch (nothing billed) and is learnt again.
LEARNT_LIMIT_S = 3600.0


class _ModelQueue:
    """One model's batches under way, weighed as its provider's batch queue counts them: by their input tokens
    (OpenAI's "enqueued prompt tokens"; output is not counted). Counted from the first batch, learnt limit or
    not, so a limit learnt later meets the exact count, batches taken but not yet created included."""

    __slots__ = ("guess", "held", "limit", "open", "until")

    def __init__(self) -> None:
        self.open: list[list[float]] = []  # [end, its weight at the catalog's gate (what ``finish`` names), inputs]
        self.held = 0.0
        self.limit: float | None = None  # None: no limit learnt (or forgotten)
        self.until = math.inf  # when a learnt limit is forgotten
        self.guess = False  # the limit is what was under way at a refusal that named none

    def __repr__(self) -> str:
        return f"{self.held:g}/{self.limit if self.limit is not None else '-'}"

    def release(self, t: float) -> None:
        if any(e[0] <= t for e in self.open):
            self.held -= sum(e[2] for e in self.open if e[0] <= t)
            self.open = [e for e in self.open if e[0] > t]
        # A guess stood for the batches under way at the refusal: once none is, it says nothing more.
        if self.limit is not None and (t >= self.until or self.guess and not self.open):
            self.limit, self.until, self.guess = None, math.inf, False

    def earliest(self, t: float, inputs: float) -> float:
        self.release(t)
        if self.limit is None:
            return t
        w = min(inputs, self.limit)  # a part heavier alone starts in an empty queue
        held = self.held
        if held + w <= self.limit + 1e-9:
            return t
        for end, _, tok in sorted(self.open):
            held -= tok
            if held + w <= self.limit + 1e-9:
                return min(max(end, t), self.until)
        return self.until


class EnqueuedTokens:
    """The batch API's limit on tokens in batches not yet finished (OpenAI's "enqueued tokens"). A batch holds
    its whole weight from submission until it ends or is cancelled. A limit the provider named for one model
    (``learn``: OpenAI's batch queue limits are per model and per account tier, and count input tokens) holds
    that model's batches too, weighed by their input tokens, for ``LEARNT_LIMIT_S``."""

    def __init__(self, limit: float):
        self.limit = limit
        self._open: list[tuple[float, float]] = []  # (end, tokens)
        self.held = 0.0
        self._models: dict[str, _ModelQueue] = {}  # per model: its batches' input tokens, and a learnt limit

    def __repr__(self) -> str:
        return f"EnqueuedTokens(held={self.held:g}/{self.limit:g}, batches={len(self._open)}, models={self._models})"

    def learn(self, model: str, limit: float, now: float, *, guess: bool = False) -> None:
        """``model``'s batches wait for room under ``limit`` input tokens from ``now`` for ``LEARNT_LIMIT_S``
        (``guess``: the limit is what was under way at a refusal that named none, forgotten too once none of the
        model's batches is under way). The count is kept: it is the model's since its first batch, exact."""
        q = self._models.setdefault(model, _ModelQueue())
        q.release(now)
        q.limit, q.until, q.guess = float(limit), now + LEARNT_LIMIT_S, guess

    def learnt(self, model: str, now: float) -> float | None:
        """The limit learnt for ``model`` still in force at ``now``, if any."""
        q = self._models.get(model)
        if q is None:
            return None
        q.release(now)
        return q.limit

    def _release(self, t: float) -> None:
        while self._open and self._open[0][0] <= t:
            self.held -= heapq.heappop(self._open)[1]

    def earliest(self, t: float, tokens: int, model: str | None = None, inputs: int = 0) -> float:
        """When a batch of ``tokens`` (the catalog's weight) and ``inputs`` input tokens of ``model`` may start."""
        q = self._models.get(model) if model is not None else None
        s = q.earliest(t, float(inputs)) if q is not None else t
        w = min(float(tokens), self.limit)
        self._release(t)
        if self.held + w <= self.limit + 1e-9:
            return s
        held = self.held
        for end, tok in sorted(self._open):
            held -= tok
            if held + w <= self.limit + 1e-9:
                return max(end, s)
        return s

    def take(self, s: float, tokens: int, end: float, model: str | None = None, inputs: int = 0) -> None:
        if model is not None:
            q = self._models.setdefault(model, _ModelQueue())
            q.release(s)
            q.open.append([end, float(tokens), float(inputs)])
            q.held += inputs
        self._release(s)
        w = min(float(tokens), self.limit)
        heapq.heappush(self._open, (end, w))
        self.held += w

    def finish(self, tokens: int, end: float, model: str | None = None) -> None:
        """A batch taken with an unknown end (``take(s, tokens, inf)``) ended at ``end``."""
        q = self._models.get(model) if model is not None else None
        if q is not None:
            # Named by its weight, as below: of two open batches of one weight, either may be closed, and the
            # count is off by their inputs' difference until the other ends.
            e = next((e for e in q.open if e[0] == math.inf and e[1] == float(tokens)), None)
            if e is not None:
                e[0] = end
        w = min(float(tokens), self.limit)
        try:
            i = self._open.index((math.inf, w))
        except ValueError:
            return
        self._open[i] = (end, w)
        heapq.heapify(self._open)
