"""Provider rate limits as a gate that says when a call may start.

A provider counts requests and tokens per minute over a *sliding* minute. A token bucket with a burst lets up
to twice its rate through in one sliding minute (a full bucket, then a minute of refill), and GCRA with a
burst tolerance does the same by the tolerance; a provider that enforces a sliding minute answers that with
429s. So the gate keeps the starts of the last minute (a moving window, as the ``limits`` library calls it)
and admits a call only when, counting it, the window holds at most ``rpm`` requests and ``tpm`` tokens. A
call's whole weight is spent at its start, so a batch or a long prompt is never split across windows.

Starts are monotone: a call never starts before the previous one, so the window is a deque and each check is
amortised O(1). Concurrency is a heap of the end times of running calls (the simulated provider knows each
call's duration when it starts). The gate is pure: time is a parameter.
"""

from __future__ import annotations

import heapq
from collections import deque

from engine.catalog import RateLimits

__all__ = ["EnqueuedTokens", "RateGate", "WINDOW_S"]

WINDOW_S = 60.0


class _Window:
    """Weights started in the last ``WINDOW_S`` seconds, against one limit."""

    __slots__ = ("limit", "log", "total")

    def __init__(self, limit: float):
        self.limit = limit
        self.log: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def earliest(self, t: float, w: float) -> float:
        """Earliest start >= t at which adding ``w`` keeps the window within the limit. A weight above the
        limit is capped at it (it starts in an empty window), so no call waits forever."""
        w = min(w, self.limit)
        log, total = self.log, self.total
        # Entries older than t - WINDOW_S no longer count at t.
        excess = total + w - self.limit
        if excess <= 1e-9:
            return t
        # Drop entries from the left (without mutating) until what is left fits; the start is when the last
        # dropped one leaves the window.
        freed = 0.0
        for at, weight in log:
            if at + WINDOW_S <= t:
                freed += weight
                if freed >= excess - 1e-9:
                    return t
                continue
            freed += weight
            if freed >= excess - 1e-9:
                return at + WINDOW_S
        return t  # unreachable when w <= limit: the whole log can always be dropped

    def take(self, t: float, w: float) -> None:
        log = self.log
        while log and log[0][0] + WINDOW_S <= t:
            self.total -= log.popleft()[1]
        w = min(w, self.limit)
        log.append((t, w))
        self.total += w


class RateGate:
    """Requests per minute, tokens per minute and concurrent calls of one provider (or one model with limits
    of its own). ``history``, when a list, records every (start, tokens, end) for tests and reports."""

    def __init__(self, limits: RateLimits, *, history: list | None = None):
        self.limits = limits
        self._req = _Window(limits.rpm)
        self._tok = _Window(limits.tpm)
        self._busy: list[float] = []
        self.last_start = 0.0
        self.history = history

    def __repr__(self) -> str:
        return (f"RateGate(rpm={self.limits.rpm:g}, tpm={self.limits.tpm:g}, busy={len(self._busy)}/"
                f"{self.limits.max_concurrency}, window_requests={len(self._req.log)})")

    def earliest(self, t: float, tokens: int) -> float:
        """When a call of ``tokens`` ready at ``t`` may start (nothing is booked)."""
        s = max(t, self.last_start)
        busy = self._busy
        while busy and busy[0] <= s:
            heapq.heappop(busy)
        if len(busy) >= self.limits.max_concurrency:
            s = max(s, busy[0])
        # Each window's answer only moves later, so two passes settle both.
        for _ in range(2):
            s = self._tok.earliest(self._req.earliest(s, 1.0), float(tokens))
        return s

    def take(self, s: float, tokens: int, duration: float) -> None:
        """Book a call starting at ``s`` (from ``earliest``) that runs ``duration`` seconds."""
        busy = self._busy
        while busy and busy[0] <= s:
            heapq.heappop(busy)
        heapq.heappush(busy, s + max(duration, 0.0))
        self._req.take(s, 1.0)
        self._tok.take(s, float(tokens))
        self.last_start = s
        if self.history is not None:
            self.history.append((s, tokens, s + duration))

    @property
    def running(self) -> int:
        return len(self._busy)


class EnqueuedTokens:
    """The batch API's limit on tokens in batches not yet finished (OpenAI's "enqueued tokens"). A batch holds
    its whole weight from submission until it ends or is cancelled."""

    def __init__(self, limit: float):
        self.limit = limit
        self._open: list[tuple[float, float]] = []  # (end, tokens)
        self.held = 0.0

    def __repr__(self) -> str:
        return f"EnqueuedTokens(held={self.held:g}/{self.limit:g}, batches={len(self._open)})"

    def _release(self, t: float) -> None:
        while self._open and self._open[0][0] <= t:
            self.held -= heapq.heappop(self._open)[1]

    def earliest(self, t: float, tokens: int) -> float:
        w = min(float(tokens), self.limit)
        self._release(t)
        if self.held + w <= self.limit + 1e-9:
            return t
        held = self.held
        for end, tok in sorted(self._open):
            held -= tok
            if held + w <= self.limit + 1e-9:
                return end
        return t

    def take(self, s: float, tokens: int, end: float) -> None:
        self._release(s)
        w = min(float(tokens), self.limit)
        heapq.heappush(self._open, (end, w))
        self.held += w
