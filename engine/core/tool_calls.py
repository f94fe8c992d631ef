"""A result's tool calls (``Result.tool_calls``, as its provider gave them) in the shape of the API a caller
asked through: OpenAI chat's ``tool_calls``, or Responses output items. The endpoint and batch files answer in
the caller's shape whatever provider ran the request, and a reused result carries no provider body to copy."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["answer_output", "answer_text", "as_chat_calls", "as_response_items", "as_tool_use_blocks", "calls_bytes"]


def _name_args(item: dict) -> tuple[str, str, str, str]:
    """(kind, call id, name, arguments or input text) of one call of any of the three shapes."""
    kind = item.get("type")
    if kind == "tool_use":  # Anthropic: the input is an object
        return "function", str(item.get("id", "")), str(item.get("name", "")), json.dumps(item.get("input") or {})
    if kind in ("function_call", "custom_tool_call"):  # Responses
        args = item.get("arguments") if kind == "function_call" else item.get("input")
        return ("function" if kind == "function_call" else "custom", str(item.get("call_id") or item.get("id", "")),
                str(item.get("name", "")), str(args or ""))
    fn = item.get("function") or item.get("custom") or {}  # OpenAI chat
    return ("custom" if "custom" in item else "function", str(item.get("id", "")), str(fn.get("name", "")),
            str(fn.get("arguments", fn.get("input", "")) or ""))


def as_chat_calls(items: list[dict]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        kind, cid, name, args = _name_args(item)
        out.append({"id": cid, "type": "custom", "custom": {"name": name, "input": args}} if kind == "custom" else
                   {"id": cid, "type": "function", "function": {"name": name, "arguments": args}})
    return out


def as_response_items(items: list[dict]) -> list[dict[str, Any]]:
    out = []
    for k, item in enumerate(items):
        kind, cid, name, args = _name_args(item)
        if kind == "custom":
            out.append({"type": "custom_tool_call", "id": f"ctc_{k}", "call_id": cid, "name": name, "input": args})
        else:
            out.append({"type": "function_call", "id": f"fc_{k}", "call_id": cid, "name": name, "arguments": args,
                        "status": "completed"})
    return out


def as_tool_use_blocks(items: list[dict]) -> list[dict[str, Any]]:
    """The calls as Anthropic's ``tool_use`` content blocks, their input an object (arguments that are not a JSON
    object, which only another API's custom tool makes, go as ``{"input": text}``)."""
    out = []
    for item in items:
        if item.get("type") == "tool_use":
            out.append({"type": "tool_use", "id": item.get("id", ""), "name": item.get("name", ""),
                        "input": item.get("input") or {}})
            continue
        _, cid, name, args = _name_args(item)
        try:
            given = json.loads(args) if args else {}
        except ValueError:
            given = None
        out.append({"type": "tool_use", "id": cid, "name": name,
                    "input": given if isinstance(given, dict) else {"input": args}})
    return out


def answer_output(text: str | None, calls: list) -> tuple[str | None, list | None]:
    """(output, tool_calls) of an answer: with calls and no text, ``output`` carries them as JSON too (a hunt: the
    calls were dropped, and a copy answered from the cache got nothing usable)."""
    if not calls:
        return text, None
    return (json.dumps(calls) if text is None else text), calls


def calls_bytes(calls: list | None) -> int:
    """What a result's calls weigh in memory, for the caches' byte limits (their arguments can be large)."""
    return len(json.dumps(calls)) if calls else 0


def answer_text(output: str | None, tool_calls: list | None) -> str | None:
    """The answer's text: None for an answer of calls alone, whose ``output`` is the calls as JSON."""
    if tool_calls and output == json.dumps(tool_calls):
        return None
    return output
