"""``n`` > 1 on the chat completions route: n requests to the engine, answered as one body of n choices. It was
a 400 ("one request makes one output"), so an application that samples several answers (best-of, voting) could
not change only its ``base_url`` (a helper's tour).

Why n requests rather than ``n`` on the wire: the engine's unit is one request with one output. Its cache keeps
one output a result, a batch line and a reservation are one request's, and Anthropic and Gemini take no ``n``. So
each choice is a request of its own, decided (batch API or sync), reserved for and billed as one: the input is
billed n times where OpenAI's ``n`` bills it once, and each reservation holds the whole output of its own choice.

Choice 0 is the caller's request as it would be with ``n`` left out (its id, its reuse): an identical request
answered before may answer it. Choices 1 to n-1 are sent with ``reuse: "none"``, so they are generated: served
from the cache, or following choice 0 in flight, they would repeat its answer, which is not what n asks for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.app._endpoint_wire import ApiError

__all__ = ["MAX_CHOICES", "choices_wanted", "fan_out", "merged_body", "merged_headers"]

MAX_CHOICES = 128  # OpenAI's own bound on n


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


def fan_out(d: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The engine requests of ``d`` (one request dict, ``n`` already out of its body) for ``n`` choices: ``d``
    itself, then ``<id>/n<k>`` with ``reuse: "none"`` for each further choice."""
    return [d, *({**d, "id": f"{d['id']}/n{k}", "reuse": "none"} for k in range(1, n))]


def merged_body(bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``chat.completion`` of the n bodies (one choice each), choice k from body k. ``usage`` adds them up:
    each choice was its own call, whose input was billed (a reused one's usage is its original call's)."""
    head = dict(bodies[0])
    head["choices"] = [{**(b.get("choices") or [{}])[0], "index": k} for k, b in enumerate(bodies)]
    used = [b.get("usage") or {} for b in bodies]
    n_in = sum(int(u.get("prompt_tokens", 0)) for u in used)
    n_out = sum(int(u.get("completion_tokens", 0)) for u in used)
    head["usage"] = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
    return head


def merged_headers(each: Sequence[dict[str, str]], *, cost: str, saving: str, mode: str, hit: str,
                   met: str) -> dict[str, str]:
    """The smartbatch headers of n choices: the first's (its request id is the caller's), cost and saving summed,
    the mode and hit of each choice comma-separated in choice order when they differ, and the deadline met
    only when every choice met it."""
    out = dict(each[0])
    for name in (cost, saving):
        out[name] = f"{sum(float(h[name]) for h in each):.10f}"
    for name in (mode, hit):
        values = [h[name] for h in each]
        out[name] = values[0] if len(set(values)) == 1 else ",".join(values)
    out[met] = "true" if all(h[met] == "true" for h in each) else "false"
    return out
