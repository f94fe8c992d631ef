"""Reading an OpenAI-compatible answer (``openai_http``): its usage, from chat completions or the Responses API,
its text and tool calls, and how it ended."""

from __future__ import annotations

from collections.abc import Mapping

from actors.providers._wire import tokens
from engine.core._gemini import gemini_output_tokens
from engine.core.provider_api import Usage
from engine.core.tool_calls import answer_output

__all__: list[str] = []


def _usage_chat(u: Mapping | None, gemini: bool = False) -> Usage:
    u = u or {}
    det = u.get("prompt_tokens_details") or {}
    # Gemini's layer may count thinking apart from completion_tokens; Google bills it as output.
    out = gemini_output_tokens(u) if gemini else tokens(u.get("completion_tokens"))
    # cache_write_tokens: billed at 1.25x the input price from the GPT-5.6 family on (the catalog's write terms)
    return Usage(tokens(u.get("prompt_tokens")), out, tokens(det.get("cached_tokens")),
                 tokens(det.get("cache_write_tokens")))


def _usage_responses(u: Mapping | None) -> Usage:
    u = u or {}
    det = u.get("input_tokens_details") or {}
    return Usage(tokens(u.get("input_tokens")), tokens(u.get("output_tokens")), tokens(det.get("cached_tokens")),
                 tokens(det.get("cache_write_tokens")))


# Responses output items the caller runs (the provider's own tools, e.g. web search, are results, not calls).
_CALL_ITEMS = frozenset({"function_call", "custom_tool_call"})


def _text_chat(body: Mapping) -> tuple[str | None, list | None]:
    choices = body.get("choices") or []
    msg = (choices[0] or {}).get("message") or {} if choices else {}
    return answer_output(msg.get("content"), list(msg.get("tool_calls") or []))


def _finish_chat(body: Mapping) -> str | None:
    choices = body.get("choices") or []
    said = (choices[0] or {}).get("finish_reason") if choices else None
    return "tool_calls" if said == "function_call" else said


def _finish_responses(body: Mapping, calls: list | None) -> str:
    if body.get("status") == "incomplete":
        why = (body.get("incomplete_details") or {}).get("reason")
        return "content_filter" if why == "content_filter" else "length"
    return "tool_calls" if calls else "stop"


def _text_responses(body: Mapping) -> tuple[str | None, list | None]:
    items = body.get("output") or []
    calls = [item for item in items if item.get("type") in _CALL_ITEMS]
    if isinstance(body.get("output_text"), str):
        return answer_output(body["output_text"], calls)
    parts = []
    for item in items:
        for c in item.get("content") or []:
            if c.get("type") == "output_text":
                parts.append(c.get("text", ""))
    return answer_output("".join(parts) if parts else None, calls)
