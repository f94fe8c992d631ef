"""``n`` > 1 on a chat completions body: n requests to the engine, answered as one body of n choices. One rule for
the endpoint's chat route (``engine.app._endpoint_choices``) and for a batch file's line, read by ``smartbatch
batch`` or the endpoint's Batches API (``engine.core.batchfile``); both were a 400 or an error line before
("one request makes one output"), so an application or a batch file that samples several answers (best-of,
voting) could not move to smartbatch unchanged (a helper's tour).

Why n requests rather than ``n`` on the wire: the engine's unit is one request with one output. Its cache keeps
one output a result, a batch line and a reservation are one request's, and Anthropic and Gemini take no ``n``. So
each choice is a request of its own, decided (batch API or sync), reserved for and billed as one: the input is
billed n times where OpenAI's ``n`` bills it once, and each reservation holds the whole output of its own choice.

Choice 0 is the request as it would be with ``n`` left out (its id, its reuse): an identical request answered
before may answer it. Choices 1 to n-1 are ``<id>/n<k>`` with ``reuse: "none"``, so they are generated: served
from the cache, or following choice 0 in flight, they would repeat its answer, which is not what n asks for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.core._checks import FieldProblem

if TYPE_CHECKING:
    from engine.core.request import Request

__all__ = ["CHAT_URL", "MAX_CHOICES", "choice_id", "fan_out", "fan_out_request", "joined", "line_choices",
           "merged_body"]

MAX_CHOICES = 128  # OpenAI's own bound on n
CHAT_URL = "/v1/chat/completions"  # the one route whose body takes n


def choice_id(request_id: str, k: int) -> str:
    """The engine request id of choice ``k`` of the request ``request_id``."""
    return request_id if k == 0 else f"{request_id}/n{k}"


def fan_out(d: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The engine requests of ``d`` (one request dict, ``n`` already out of its body) for ``n`` choices: ``d``
    itself, then ``<id>/n<k>`` with ``reuse: "none"`` for each further choice."""
    return [d, *({**d, "id": choice_id(d["id"], k), "reuse": "none"} for k in range(1, n))]


def fan_out_request(req: Request, n: int) -> tuple[Request, ...]:
    """``fan_out`` of a validated request (``n`` already out of its body): its choices 1 to n-1."""
    return tuple(req.model_copy(update={"id": choice_id(req.id, k), "reuse": "none"}) for k in range(1, n))


def line_choices(line: dict[str, Any], url: str) -> tuple[int, dict[str, Any]]:
    """A batch file's line as (its number of choices, the line the engine reads): a chat completions body with an
    ``n`` from 1 to ``MAX_CHOICES`` loses its ``n``, as on the endpoint's chat route (each choice is a request of
    its own, and Anthropic takes no ``n``); any other line is as it was (an images body keeps its own rule).
    ``FieldProblem`` naming ``body.n``: an ``n`` out of range on a chat line, or any ``n`` but 1 on a Responses
    line (that API has none)."""
    body = line.get("body")
    n = body.get("n") if isinstance(body, dict) else None
    if n is None or n == 1 and type(n) is int and url != CHAT_URL:
        return 1, line
    if url == "/v1/responses":
        raise FieldProblem("body.n", f"body.n {str(n)[:20]!r}: the Responses API has no n (OpenAI refuses it); "
                           f"leave it out, or send the line to {CHAT_URL}, whose n asks for up to {MAX_CHOICES} "
                           "choices")
    if url != CHAT_URL:
        return 1, line  # checked with the request's other fields (an image is one request for one image)
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        shown = repr(n) if len(repr(n)) <= 20 else repr(n)[:17] + "..."
        raise FieldProblem("body.n", f"body.n must be a whole number from 1 to {MAX_CHOICES} (the number of "
                           f"choices to generate), got {shown}; fix it, or leave it out for one choice")
    return n, {**line, "body": {k: v for k, v in body.items() if k != "n"}}


def merged_body(bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``chat.completion`` of the n bodies (one choice each), choice k from body k. ``usage`` adds them up:
    each choice was its own call, whose input was billed (a reused one's usage is its original call's); the
    input read from a prompt cache too, where a body says (a resumed batch run prices a kept line by it)."""
    head = dict(bodies[0])
    head["choices"] = [{**(b.get("choices") or [{}])[0], "index": k} for k, b in enumerate(bodies)]
    used = [b.get("usage") or {} for b in bodies]
    n_in = sum(int(u.get("prompt_tokens", 0)) for u in used)
    n_out = sum(int(u.get("completion_tokens", 0)) for u in used)
    # Each call's own total: Gemini's counts its thoughts there alone (billed as output, ``gemini_output_tokens``).
    total = sum(int(u.get("total_tokens") or 0) or int(u.get("prompt_tokens", 0)) + int(u.get("completion_tokens", 0))
                for u in used)
    head["usage"] = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": total}
    # Each key any choice's details have, summed (OpenAI always sends them: ``None`` failed the reader of
    # usage.completion_tokens_details.reasoning_tokens on a call of n choices, a helper's tour; the prompt's kept
    # two keys alone, and audio_tokens, 0 in each choice's body, read None: a user's tour).
    for part in ("prompt_tokens_details", "completion_tokens_details"):
        done = [u[part] for u in used if isinstance(u.get(part), dict)]
        if done:
            head["usage"][part] = {key: sum(int(d.get(key) or 0) for d in done)
                                   for key in dict.fromkeys(k for d in done for k in d)}
    return head


def joined(values: Sequence[str]) -> str:
    """What n choices' values (a mode, a hit) read as together: the one value they share, else each in choice
    order, comma-separated."""
    return values[0] if len(set(values)) == 1 else ",".join(values)
