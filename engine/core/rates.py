"""How a provider's rate limits spread the starts of calls sent together: the rule the rate gate applies
(``engine.runtime.ratelimit.RateGate``) and the one a policy's hedge needs before it sends a batch's fallback.

A provider counts requests and tokens over a sliding minute (``WINDOW_S``), and within it at most
``BURST_SHARE`` of either quota in any ``BURST_S`` seconds (engine/runtime/ratelimit.py says why)."""

from __future__ import annotations

import math

from engine.core.catalog import RateLimits

__all__ = ["BURST_S", "BURST_SHARE", "WINDOW_S", "start_spread_s"]

WINDOW_S = 60.0
BURST_S = 10.0
BURST_SHARE = 1 / 3


def _spread(n: int, per_window: float, per_burst: float) -> float:
    """Seconds from the first to the last start of ``n`` equal calls when ``per_window`` fit in a minute and
    ``per_burst`` in ``BURST_S``: bursts every ``BURST_S`` until the minute's quota is spent, then the next
    minute, as the first calls leave the window."""
    per_window = max(math.floor(per_window), 1)
    per_burst = max(min(math.floor(per_burst), per_window), 1)
    minutes, rest = divmod(n - 1, per_window)
    return WINDOW_S * minutes + BURST_S * (rest // per_burst)


def start_spread_s(limits: RateLimits, n: int, tokens: float) -> float:
    """Seconds between the first and the last start of ``n`` calls of ``tokens`` in all (input + output, as the
    gate counts them), sent at once to a gate with nothing else in its windows; 0 when all start together. The
    calls are taken as equal (``tokens / n`` each): an estimate, exact for equal calls. A call heavier than a
    window's limit counts as the limit, as the gate caps it."""
    if n <= 1:
        return 0.0
    by_requests = _spread(n, limits.rpm, max(limits.rpm * BURST_SHARE, 1.0))
    if tokens <= 0:
        return by_requests
    each = tokens / n
    burst = max(limits.tpm * BURST_SHARE, 1.0)
    by_tokens = _spread(n, limits.tpm / min(each, limits.tpm), burst / min(each, burst))
    return max(by_requests, by_tokens)
