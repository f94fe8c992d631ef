"""A Responses API body (OpenAI's ``/v1/responses``: ``input``, ``instructions``, ``max_output_tokens``) for a
model the catalog calls through chat completions (the default catalog's OpenAI models) or Anthropic's Messages
API: the same conversation, as messages. An unchanged Responses client of the endpoint (or a batch file's
``/v1/responses`` lines) was refused for every such model, where docs/service.md lists the route as working (a
helper's hunt). What has no counterpart there is refused, naming the field and the fix (the model's
``api: responses`` in a catalog overlay), never dropped: a dropped field changes the answer the caller paid for.
The answer comes back in the Responses shape (``batchfile.response_body``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.core._checks import FieldProblem

__all__ = ["as_messages"]

# Responses fields with no counterpart in chat completions or Messages (tools differ in shape too).
_NO_MATCH = ("previous_response_id", "conversation", "include", "store", "text", "reasoning", "truncation",
             "prompt", "background", "tools", "tool_choice")
_TEXT_PARTS = ("input_text", "output_text")
_FIX = "leave it out, or set the model's api: responses in a catalog overlay"


def as_messages(body: dict[str, Any], where: str, api: str, route: str) -> dict[str, Any]:
    """``body`` as the model's API takes it (``api``: the provider's wire format, "openai" or "anthropic";
    ``route``: the catalog's ``api`` of the model, "chat" or "responses"): a Responses body for chat
    completions or Messages gets ``input`` (a string, or message items whose content is text) as ``messages``,
    ``instructions`` as the system prompt and ``max_output_tokens`` as that API's cap, in a new dict. Any
    other body is returned as it is."""
    if "input" not in body or "messages" in body or not (api == "anthropic" or api == "openai" and route == "chat"):
        return body
    through = "chat completions" if api == "openai" else "Anthropic's Messages API"
    for key in _NO_MATCH:
        if body.get(key) is not None:
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} is a Responses API field, and this model is "
                               f"called through {through}, which has no such field: {_FIX}")
    items = body["input"]
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise FieldProblem(f"{where}.input", f"{where}.input must be a string or a non-empty list of messages")
    system = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
    messages = []
    for k, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, Mapping) else type(item).__name__
        if kind != "message" or not isinstance(item.get("role"), str):
            raise FieldProblem(f"{where}.input[{k}]", f"{where}.input[{k}] is a {kind!r} item; only messages (a "
                               f"role and text content) pass to {through}: {_FIX}")
        content = item.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS
                        and isinstance(part.get("text"), str)):
                    raise FieldProblem(f"{where}.input[{k}].content[{j}]", f"{where}.input[{k}].content[{j}] is "
                                       f"not a text part ({' or '.join(_TEXT_PARTS)}); only text passes to "
                                       f"{through}: {_FIX}")
            content = "".join(part["text"] for part in content)
        if api == "anthropic" and item["role"] in ("system", "developer"):
            if isinstance(content, str):
                system.append(content)  # Messages takes the system prompt beside the messages, not among them
        else:
            messages.append({"role": item["role"], "content": content})
    out = {k: v for k, v in body.items() if k not in ("input", "instructions", "max_output_tokens")}
    if api == "anthropic":
        if system:
            out["system"] = "\n\n".join(system)
    else:
        messages[:0] = [{"role": "system", "content": text} for text in system]
    out["messages"] = messages
    if body.get("max_output_tokens") is not None:
        out["max_tokens" if api == "anthropic" else "max_completion_tokens"] = body["max_output_tokens"]
    return out
