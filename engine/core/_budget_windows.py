"""A budget's windows: its ``budget_duration`` read (``30s`` ... ``1mo``), the window holding a time, and a window's
bound as a reader takes it. Pure; split from ``engine.core.budgets`` (the specs, the throttle and the verdicts)."""

from __future__ import annotations

import calendar
import functools
import math
import re
from datetime import datetime, timezone

__all__ = ["parse_duration", "window_bounds", "window_label"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|mo)\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_MONTHS = 1200  # 100 years


@functools.lru_cache(maxsize=256)  # every reservation asks it again of the same few specs
def parse_duration(text: str | None) -> tuple[float, str] | None:
    """``"1h"`` -> (1.0, "h"); ``"1mo"`` -> (1.0, "mo"); None -> None (no reset)."""
    if text is None:
        return None
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"budget_duration {text!r}: use a positive number and a unit, e.g. 30s, 15m, 1h, 1d, 30d, "
                         "1mo (calendar month)")
    n, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(n):  # 400 digits read as inf
        raise ValueError(f"budget_duration {text[:20]!r}...: a number too large; at most 100 years (e.g. 36500d)")
    # Months are calendar months, counted whole (0.5mo was a division by zero, 1.5mo read as 1mo); and no window
    # outlives the calendar's years (100000mo ran past year 9999).
    if unit == "mo" and (n != int(n) or n > _MAX_MONTHS):
        raise ValueError(f"budget_duration {text!r}: months are whole calendar months, 1mo to {_MAX_MONTHS}mo; "
                         "for a part of a month use days or hours, e.g. 15d")
    if unit != "mo" and n * _UNIT_S[unit] > _MAX_MONTHS * 31 * 86400:
        raise ValueError(f"budget_duration {text!r}: at most 100 years (e.g. 36500d); leave it out for a budget "
                         "that never resets")
    return n, unit


def window_bounds(duration: str | None, t: float) -> tuple[float, float]:
    """The [start, end) of the window holding epoch second ``t``: fixed windows are aligned to the epoch,
    months to the calendar (UTC)."""
    d = parse_duration(duration)
    if d is None:
        return (0.0, math.inf)
    n, unit = d
    if unit != "mo":
        size = n * _UNIT_S[unit]
        start = math.floor(t / size) * size
        return (start, start + size)
    dt = datetime.fromtimestamp(t, tz=timezone.utc)
    months = dt.year * 12 + (dt.month - 1)
    first = months - months % int(n)

    def epoch(m: int) -> float:
        return float(calendar.timegm((m // 12, m % 12 + 1, 1, 0, 0, 0)))

    return (epoch(first), epoch(first + int(n)))


def window_label(t: float) -> str:
    """A window's bound as a reader takes it: the calendar (UTC) for a ledger at real speed, whose windows are
    keyed by Unix seconds, else engine seconds (a time-compressed engine's, from its start: a year at most)."""
    if math.isinf(t):
        return "never"
    if t >= 1e9:
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"t={t:,.0f}s"
