"""Counts and money said in words: "1 request", "2 requests" (a one-request trace's tables read "1 requests");
"$80.00", "$0.000244" (a budget's $80 limit read "$80.000000")."""

from __future__ import annotations

import math


def counted(n: int, noun: str) -> str:
    """``n`` (with thousands separators) and ``noun``, plural unless ``n`` is 1 (a regular plural: add ``s``)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def dollars(x: float) -> str:
    """``x`` US dollars as one figure on its own: to the micro-dollar, the precision the budget ledger reports
    (``engine.core.budgets.usd``), its trailing zeros trimmed down to the cents, with thousands separators:
    $80.00, $0.30, $0.0123, $0.000244, $1,234.5678. A fixed 6 decimals read a limit of $80 as "$80.000000"; a
    column's decimals from its largest figure (``bench.places_for``) read a spend of $0.000244 beside it as
    "$0.00". A figure that rounds to nothing reads $0.00, never -$0.00."""
    if not math.isfinite(x):  # a limit stored before limits were checked at input (docs/budgets.md)
        return f"{'-' if x < 0 else ''}${abs(x)}"
    text = f"{abs(x):,.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    sign = "-" if x < 0 and text.strip("0.,") else ""
    return f"{sign}${whole}.{frac.ljust(2, '0')}"
