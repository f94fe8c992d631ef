"""``n`` > 1 on the chat completions route: n requests to the engine, answered as one body of n choices, by the rule
of ``engine.core._choices`` (a batch file's line follows it too). It was a 400 ("one request makes one output"),
so an application that samples several answers (best-of, voting) could not change only its ``base_url`` (a
helper's tour). Here: ``n`` read as the route's 400, and the smartbatch headers of the n choices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.app._endpoint_wire import ApiError
from engine.core._choices import MAX_CHOICES, fan_out, joined, merged_body

__all__ = ["MAX_CHOICES", "choices_wanted", "fan_out", "merged_body", "merged_headers"]


def choices_wanted(body: dict[str, Any]) -> int:
    """The ``n`` of a chat body (1 when left out or null), or a 400 naming it. The caller takes ``n`` out of the
    body the engine gets: each request makes one output, at any provider."""
    n = body.get("n")
    if n is None:
        return 1
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n {n!r} must be a whole number from 1 to {MAX_CHOICES}: the number of choices to "
                            "generate", param="n")
    return n


def merged_headers(each: Sequence[dict[str, str]], *, cost: str, saving: str, mode: str, hit: str,
                   met: str) -> dict[str, str]:
    """The smartbatch headers of n choices: the first's (its request id is the caller's), cost and saving summed,
    the mode and hit of each choice comma-separated in choice order when they differ, and the deadline met
    only when every choice met it."""
    out = dict(each[0])
    for name in (cost, saving):
        out[name] = f"{sum(float(h[name]) for h in each):.10f}"
    for name in (mode, hit):
        out[name] = joined([h[name] for h in each])
    out[met] = "true" if all(h[met] == "true" for h in each) else "false"
    return out
