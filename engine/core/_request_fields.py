"""A request's field vocabulary: the JSON-number types, the provider body's own keys and an OpenAI Batch input
line's shape, which ``engine.core.request`` reads while it fills a request in."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator

from engine.core._checks import FieldProblem

__all__ = ["BATCH_LINE_URLS", "BODY_KEYS", "Float", "Int", "ParamValue"]

ParamValue = str | int | float | bool
# The params a media request may carry, by kind; the priced ones (size, resolution, duration_s) are checked
# against the model's catalog entry. A text request takes none: its provider fields go in ``body``.
MEDIA_PARAMS: dict[str, tuple[str, ...]] = {
    "text": (),
    "image": ("size", "quality", "steps", "sampler", "seed"),
    "video": ("resolution", "duration_s", "fps", "quality", "steps", "sampler", "seed"),
}


def _number(v: Any) -> Any:
    """A JSON number only: ``true`` is not 1 and ``"12"`` is not 12 (pydantic's lax mode would coerce both)."""
    if isinstance(v, (bool, str, bytes)):
        what = "a boolean" if isinstance(v, bool) else "a string"
        shown = str(v).lower() if isinstance(v, bool) else repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise ValueError(f"must be a number, not {what} ({shown}); write it as a bare JSON number")
    return v


Float = Annotated[float, BeforeValidator(_number)]
Int = Annotated[int, BeforeValidator(_number)]

# Fields of the providers' own request bodies. A submitted dict may carry them at its top level (as an OpenAI or
# Anthropic call would); they move into ``body`` and are sent unchanged.
BODY_KEYS = frozenset({
    "messages", "system", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
    "tools", "tool_choice", "response_format", "stop", "stop_sequences", "seed",
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "metadata",
    "reasoning_effort", "reasoning", "thinking", "input", "instructions", "text", "quality", "style",
    "background", "output_format", "moderation", "n", "prompt_cache_key", "service_tier", "parallel_tool_calls", "size",
})
_CAP_KEYS = ("max_output_tokens", "max_completion_tokens", "max_tokens")
# An OpenAI Batch input line: {"custom_id", "method", "url", "body"}; /v1/messages: a Message Batch's (Anthropic's).
_URL_KIND = {"/v1/chat/completions": "text", "/v1/responses": "text", "/v1/images/generations": "image", "/v1/messages": "text"}
BATCH_LINE_URLS = tuple(_URL_KIND)


def _from_batch_line(d: dict) -> dict:
    """A line of an OpenAI Batch input file as a request: ``custom_id`` is the id, ``body`` is sent as is."""
    body = d.get("body")
    if not isinstance(body, dict):
        raise FieldProblem("body", "a batch line with 'custom_id' needs a 'body' object (the API request body)")
    url = d.get("url", "/v1/chat/completions")
    if url not in BATCH_LINE_URLS:
        raise FieldProblem("url", f"url {url!r} is not supported; use one of {list(BATCH_LINE_URLS)}")
    if d.get("method", "POST") != "POST":
        raise FieldProblem("method", "a batch line's method must be POST")
    out = {k: v for k, v in d.items() if k not in ("custom_id", "method", "url")}
    out["id"] = d["custom_id"]
    out.setdefault("model", body.get("model"))
    return out


_LINE_KEYS = frozenset({"custom_id", "method", "url"})  # an OpenAI Batch input line's own
