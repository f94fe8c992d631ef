"""Google's OpenAI compatibility layer for Gemini (a provider whose catalog entry says ``compat: gemini``), where it
differs from OpenAI's chat completions as Google documents it: the fields it takes, Gemini's options under
``extra_body.google``, the reasoning efforts each model takes, an effort and a thinking budget refused together,
and thinking billed as output. How its usage counts the thoughts Google's pages do not say: the emulator counts
them in ``total_tokens`` only, beside ``completion_tokens`` (ASSUMPTION, the shape the layer's answers have been
reported in, and the harder one for a reader that must bill them as output).

Its errors are Google's, not OpenAI's: a list of one ``{"error": {"code", "message", "status"}}`` with the
google.rpc status name (``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``, ...), as the layer's answers are reported
through the ``openai`` SDK (``Error code: 400 - [{'error': {'code': 400, 'message': 'Invalid JSON payload
received. Unknown name "reasoning": Cannot find field.', 'status': 'INVALID_ARGUMENT', ...}}]``); a rate limit's
wait is no ``Retry-After`` header but a ``google.rpc.RetryInfo`` detail (``"retryDelay": "36s"``), as Google's
429s carry it (ASSUMPTION for the layer: its 429s are reported with it and without it)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.core._gemini import GEMINI_FIELDS, GEMINI_IMAGE_FIELDS, THINKING_KEYS
from engine.core.catalog import ModelSpec
from engine.emulator._wire import GOOGLE_STATUS as _STATUS
from engine.emulator._wire import RETRY_INFO, ApiError, Reply

__all__ = ["RETRY_INFO", "gemini_error", "gemini_image", "gemini_image_answer", "gemini_thoughts", "gemini_usage"]

# Tokens the emulator thinks at each effort or level (a real model thinks as long as it needs, within its budget).
# Asked nothing, it thinks not at all: a simplification (Gemini 2.5 thinks by default), so bodies without thinking
# bill as they did before the layer was played.
_THOUGHTS = {"none": 0, "minimal": 32, "low": 64, "medium": 128, "high": 256}
_DYNAMIC = 128  # a thinking_budget of -1: the model decides
# Output tokens of one image: Gemini 2.5 Flash Image's flat count at every aspect ratio (Google's image page).
_IMAGE_TOKENS = 1290


def _unknown(name: str) -> ApiError:
    return ApiError(400, f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.', param=name,
                    code="invalid_argument")


def gemini_thoughts(body: Mapping[str, Any], spec: ModelSpec) -> int:
    """Check ``body`` as the layer does (a 400 naming what it refuses) and return the tokens the call thinks."""
    for key in body:
        if key not in GEMINI_FIELDS:
            raise _unknown(key)
    extra = body.get("extra_body") or {}
    if not isinstance(extra, Mapping):
        raise ApiError(400, "extra_body must be an object", param="extra_body", code="invalid_argument")
    for key in extra:
        if key != "google":
            raise _unknown(key)
    google = extra.get("google") or {}
    if not isinstance(google, Mapping):
        raise ApiError(400, "extra_body.google must be an object", param="google", code="invalid_argument")
    for key in google:
        if key != "thinking_config":
            raise ApiError(400, f"extra_body.google.{key} is not served by this emulator", param=key,
                           code="invalid_argument")
    cfg = google.get("thinking_config") or {}
    for key in cfg:
        if key not in THINKING_KEYS:
            raise _unknown(f"thinking_config.{key}")
    effort = body.get("reasoning_effort")
    if effort is not None and ("thinking_budget" in cfg or "thinking_level" in cfg):
        raise ApiError(400, "reasoning_effort and thinking_config.thinking_budget (or thinking_level) cannot be set "
                       "together", param="reasoning_effort", code="invalid_argument")
    if effort is not None:
        if spec.efforts is not None and effort not in spec.efforts:
            raise ApiError(400, f"Invalid reasoning_effort: {effort}. Valid values are: "
                           f"{', '.join(sorted(spec.efforts))}", param="reasoning_effort", code="invalid_argument")
        return _THOUGHTS.get(effort, _THOUGHTS["medium"])
    if "thinking_budget" in cfg:
        budget = cfg["thinking_budget"]
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < -1:
            raise ApiError(400, f"thinking_budget must be an integer >= -1, got {budget!r}", param="thinking_budget",
                           code="invalid_argument")
        return _DYNAMIC if budget == -1 else min(budget, _THOUGHTS["high"])
    if "thinking_level" in cfg:
        return _THOUGHTS.get(str(cfg["thinking_level"]).lower(), _THOUGHTS["medium"])
    return 0


def gemini_image(body: Mapping[str, Any]) -> None:
    """Check an images body as the layer does: a field outside its images example (and ``size``) is a 400 naming
    it, and an answer in anything but base64 (ASSUMPTION: the layer serves no image address) a 400."""
    for key in body:
        if key not in GEMINI_IMAGE_FIELDS:
            raise _unknown(key)
    if body.get("response_format") not in (None, "b64_json"):
        raise ApiError(400, f"response_format {str(body['response_format'])[:20]!r} is not supported: give b64_json",
                       param="response_format", code="invalid_argument")


def gemini_image_answer(out: Mapping[str, Any], n: int) -> dict[str, Any]:
    """OpenAI's images answer as the layer gives it (ASSUMPTION: its usage in OpenAI's image shape, the prompt's
    text tokens in ``input_tokens``, each image's 1,290 tokens as output): the images in base64, and none of
    OpenAI's ``quality``, ``output_format`` or ``size``."""
    text = out["usage"]["input_tokens"]
    return {"created": out["created"], "data": out["data"],
            "usage": {"input_tokens": text, "output_tokens": _IMAGE_TOKENS * n, "total_tokens": text + _IMAGE_TOKENS * n,
                      "input_tokens_details": {"text_tokens": text, "image_tokens": 0}}}


def gemini_usage(input_tokens: int, read: int, output_tokens: int, thoughts: int) -> dict[str, Any]:
    """A chat completion's usage as the layer reports it: ``completion_tokens`` the answer's own, the thoughts only
    in ``total_tokens``; the cached part of the prompt in ``prompt_tokens_details``."""
    return {"prompt_tokens": input_tokens, "completion_tokens": output_tokens - thoughts,
            "total_tokens": input_tokens + output_tokens, "prompt_tokens_details": {"cached_tokens": read}}


def gemini_error(reply: Reply) -> Reply:
    """An error answer of the OpenAI routes in the shape Google's layer answers it: its message under Google's
    status, in a list of one; the wait of a ``retry-after`` header (if any) as a RetryInfo detail instead, and
    no OpenAI rate limit headers (a 429 without a wait is Google's bare "Resource has been exhausted")."""
    try:
        said = json.loads(reply.body).get("error") or {}
    except (ValueError, AttributeError):
        return reply
    err: dict[str, Any] = {"code": reply.status, "message": said.get("message") or "",
                           "status": _STATUS.get(reply.status, "INTERNAL" if reply.status >= 500 else "UNKNOWN")}
    wait = reply.headers.get("retry-after")
    if wait is not None:
        err["details"] = [{"@type": RETRY_INFO, "retryDelay": f"{wait}s"}]
    headers = {k: v for k, v in reply.headers.items() if k != "retry-after" and not k.startswith("x-ratelimit-")}
    return reply._replace(headers=headers, body=json.dumps([{"error": err}], separators=(",", ":")).encode())
