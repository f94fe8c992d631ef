"""A Responses API body (OpenAI's ``/v1/responses``: ``input``, ``instructions``, ``max_output_tokens``) for a
model the catalog calls through chat completions (the default catalog's OpenAI models) or Anthropic's Messages
API. An unchanged Responses client of the endpoint (or a batch file's ``/v1/responses`` lines) was refused for
every such model, where docs/service.md lists the route as working (a helper's hunt).

The request keeps the caller's body (its errors name the caller's fields, its fingerprint is the caller's); the
provider's body builder turns it into messages on the wire (``as_messages``), for a sync call and a batch line
alike. What has no counterpart there is refused when the request is validated (``check_responses_body``),
naming the field and the fix (the model's ``api: responses`` in a catalog overlay), never dropped: a dropped
field changes the answer the caller paid for. A field at its default value changes nothing and is left out.
The answer comes back in the Responses shape (``answer_body.response_body``).

At Anthropic, function calling passes too (``engine.core._claude_tools``): function ``tools``, ``tool_choice`` and
``parallel_tool_calls``, ``function_call`` items as ``tool_use`` blocks of an assistant message and
``function_call_output`` items as ``tool_result`` blocks of a user message (a run of either, one message), each
call answered by an output right after it, as Anthropic requires; and images, an ``input_image`` part of a user
message or of a tool's output as an ``image`` block, by the chat route's rule (``_claude_tools.image_block``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.core._checks import FieldProblem
from engine.core._claude_tools import (
    anthropic_tool,
    anthropic_tool_choice,
    call_id,
    image_block,
    says_nothing,
    tool_input,
)

__all__ = ["as_messages", "check_responses_body", "translates"]

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
_FIX = "leave it out, or set the model's api: responses in a catalog overlay"
# Responses fields and the values at which they change nothing (left out on the wire); any other value is refused.
_DEFAULTS = {"previous_response_id": (), "conversation": (), "prompt": (), "include": ([],),
             "truncation": ("disabled",), "background": (False,), "reasoning": ({},), "tools": ([],),
             "text": ({}, {"format": {"type": "text"}}), "tool_choice": ("none", "auto")}
# Moot where ``tools`` and ``include`` are refused unless empty (chat completions refuses parallel_tool_calls
# without tools, and top_logprobs without logprobs): left out whatever their value.
_MOOT = ("parallel_tool_calls", "max_tool_calls", "top_logprobs")
# The caller's bookkeeping, which Messages has no field for (its metadata takes a user_id alone); the answer is
# the same without them. ``store`` is refused above when it asks for something.
_NOT_MESSAGES = ("metadata", "user", "safety_identifier", "store")


def translates(body: Mapping, api: str, route: str) -> bool:
    """Whether ``body`` is a Responses body that ``as_messages`` turns into messages for ``api`` and ``route``."""
    return "input" in body and "messages" not in body and (api == "anthropic" or api == "openai" and route == "chat")


def check_responses_body(body: Mapping[str, Any], where: str, api: str, route: str) -> None:
    """Raise ``FieldProblem`` for a Responses body that cannot go as messages to the model's API (``api``: the
    provider's wire format, "openai" or "anthropic"; ``route``: the catalog's ``api`` of the model, "chat" or
    "responses"); any other body passes."""
    if translates(body, api, route):
        _translate(body, where, api)


def as_messages(body: dict[str, Any], api: str, route: str, came: dict[str, str] | None = None) -> dict[str, Any]:
    """``body`` as the model's API takes it: a Responses body for chat completions or Messages gets ``input`` as
    ``messages``, ``instructions`` (and a ``system`` beside it) as the system prompt and ``max_output_tokens`` as
    that API's cap, in a new dict; any other body is returned as it is. Never raises: a body that was not
    checked (a ``Request`` made under other settings, a fallback's reroute) and cannot go as messages is sent
    as it is, for the provider to refuse that request alone; raised here, it failed every member of its batch
    (a review). ``came``, when given, gets where each path of the messages came from in the Responses body
    (``engine.core._callers``), so a refusal of the translated body names the caller's field."""
    if not translates(body, api, route):
        return body
    try:
        return _translate(body, "body", api, came)
    except FieldProblem:
        return body


def _text(value: Any, where: str, through: str, api: str, images: bool = False) -> list[dict[str, Any]] | str:
    """A string as it is, or a list of text parts as text blocks; at Anthropic with the rest of each part (a
    ``cache_control`` breakpoint on a system block: dropped, the caller's cached prefix was billed in full), and
    where ``images`` (a user message, a tool's output) an ``input_image`` part as an image block."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise FieldProblem(where, f"{where} must be text or a list of text parts, got {type(value).__name__}")
    images = images and api == "anthropic"
    out = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        mark = {"cache_control": part["cache_control"]} if api == "anthropic" and kind and "cache_control" in part \
            else {}
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            # An output_text part's annotations (an answer sent back) are no field of a text block there.
            out.append({"type": "text", "text": part["text"], **mark})
        elif kind == "input_image" and images:
            if part.get("file_id") is not None:
                raise FieldProblem(f"{where}[{j}].file_id", f"{where}[{j}].file_id names a file OpenAI keeps, which "
                                   f"{through} cannot read: give the image as image_url (a web URL or a data: URL)")
            out.append({**image_block(part.get("image_url"), part.get("detail"), f"{where}[{j}].image_url",
                                      f"{where}[{j}].detail"), **mark})
        else:
            kinds = ", ".join((*_TEXT_PARTS, *(("input_image",) if images else ())))
            raise FieldProblem(f"{where}[{j}]", f"{where}[{j}] is not a part of these kinds ({kinds}); only "
                               f"{'text and images pass' if images else 'text passes'} to {through} here: {_FIX}")
    return out


def _translate(body: Mapping[str, Any], where: str, api: str, came: dict[str, str] | None = None) -> dict[str, Any]:
    through = "chat completions" if api == "openai" else "Anthropic's Messages API"
    tools = _tools(body, where) if api == "anthropic" else {}
    for key, defaults in _DEFAULTS.items():
        if api == "anthropic" and key in ("tools", "tool_choice"):
            continue  # _tools
        if body.get(key) is not None and body[key] not in defaults:
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} is a Responses API field this model's API "
                               f"({through}) cannot carry as given: {_FIX}")
    if api == "anthropic" and body.get("store"):
        raise FieldProblem(f"{where}.store", f"{where}.store asks the provider to keep the answer, which "
                           f"{through} does not: {_FIX}")
    items = body["input"]
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise FieldProblem(f"{where}.input", f"{where}.input must be a string or a non-empty list of messages")
    system = [_text(body[k], f"{where}.{k}", through, api) for k in ("system", "instructions") if body.get(k)]
    system_from = [k for k in ("system", "instructions") if body.get(k)]  # the caller's path of each system part
    messages: list[dict[str, Any]] = []
    item_of: dict[int, int] = {}  # a message's index -> the input item it is (a run of calls: _Turns.runs)
    turns = _Turns(where)
    for k, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, Mapping) else type(item).__name__
        if api == "anthropic" and kind in ("function_call", "function_call_output"):
            turns.add(messages, k, item)
            continue
        if kind != "message" or item.get("role") not in _ROLES:
            raise FieldProblem(f"{where}.input[{k}]", f"{where}.input[{k}] is not a message with a role of "
                               f"{', '.join(_ROLES)} (a {kind!r} item); only messages pass to {through}: {_FIX}")
        content = _text(item.get("content"), f"{where}.input[{k}].content", through, api,
                        images=item["role"] == "user")
        if api == "anthropic" and item["role"] == "assistant" and says_nothing(content):
            continue  # an empty answer sent back, which Anthropic refuses (_claude_tools.says_nothing)
        if api == "anthropic" and item["role"] in ("system", "developer") and not messages:
            system.append(content)  # Messages takes the system prompt beside the messages, not among them
            system_from.append(f"input.{k}.content")
        else:
            # A later one stays where it is, as Anthropic's mid-conversation system message, which the engine's
            # check takes or refuses by the model (engine.core._api_fields): lifted to the system prompt, it
            # changed the instructions of the turns before it and the cached prefix of the conversation.
            role = "system" if api == "anthropic" and item["role"] == "developer" else item["role"]
            item_of[len(messages)] = k
            messages.append({"role": role, "content": content})
    turns.check(messages)
    if not messages:
        raise FieldProblem(f"{where}.input", f"{where}.input has no user or assistant message; give one")
    left_out = ("input", "instructions", "max_output_tokens", "system", *_DEFAULTS, *_MOOT,
                *(_NOT_MESSAGES if api == "anthropic" else ()))
    out = {k: v for k, v in body.items() if k not in left_out}
    if api == "anthropic":
        if system:
            out["system"] = [block for s in system for block in
                             ([{"type": "text", "text": s}] if isinstance(s, str) else s)]
    else:
        messages[:0] = [{"role": "system", "content": s} for s in system]
    if came is not None:
        came.update(_came_from(system, system_from, item_of, turns.runs, api, isinstance(body["input"], str)))
    out.update(tools)
    out["messages"] = messages
    if body.get("max_output_tokens") is not None:
        out["max_tokens" if api == "anthropic" else "max_completion_tokens"] = body["max_output_tokens"]
    return out


def _tools(body: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A Responses body's function ``tools`` and ``tool_choice`` as Anthropic's (the keys to send)."""
    tools, out, names = body.get("tools"), {}, []
    if tools:
        if not isinstance(tools, list):
            raise FieldProblem(f"{where}.tools", f"{where}.tools must be a list of tools")
        built = []
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, Mapping) else type(tool).__name__
            if kind != "function":
                raise FieldProblem(f"{where}.tools[{i}]", f"{where}.tools[{i}] is a {str(kind)[:40]!r} tool, and "
                                   "only function tools pass to Anthropic's Messages API: " + _FIX)
            built.append(anthropic_tool(tool, f"{where}.tools[{i}]", extra=("type",)))
            names.append(built[-1]["name"])
        out["tools"] = built
    choice = anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), names, flat=True,
                                   where=where)
    return {**out, **({"tool_choice": choice} if choice is not None else {})}


def _came_from(system: list, system_from: list[str], item_of: dict[int, int], runs: dict[int, list[tuple[int, str]]],
               api: str, plain: bool) -> dict[str, str]:
    """Where each path of the translated body came from in the Responses body (dotted, without ``body.``): its
    system parts (Anthropic's top-level ``system``; chat's leading system messages), its messages and, in a run
    of calls or outputs, each block."""
    came: dict[str, str] = {}
    shift = 0 if api == "anthropic" else len(system)
    if api == "anthropic":
        n = 0
        for part, src in zip(system, system_from, strict=True):
            for j in range(1 if isinstance(part, str) else len(part)):
                came[f"system.{n}"] = src if isinstance(part, str) else f"{src}.{j}"
                n += 1
    else:
        came.update({f"messages.{i}.content": src for i, src in enumerate(system_from)})
    for j, k in item_of.items():  # a string input is the one user message's content
        came[f"messages.{j + shift}"] = "input" if plain else f"input.{k}"
        if plain:
            came[f"messages.{j + shift}.content"] = "input"
    for j, blocks in runs.items():
        came[f"messages.{j + shift}"] = f"input.{blocks[0][0]}"
        for n, (k, _) in enumerate(blocks):
            at = f"messages.{j + shift}.content.{n}"
            came.update({at: f"input.{k}", f"{at}.content": f"input.{k}.output", f"{at}.input": f"input.{k}.arguments"})
    return came


class _Turns:
    """``function_call`` and ``function_call_output`` items as Anthropic's blocks: a run of calls is one assistant
    message of ``tool_use`` blocks, a run of outputs one user message of ``tool_result`` blocks; ``check``: each
    run of calls answered, each of its calls once, by the run of outputs right after it."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.runs: dict[int, list[tuple[int, str]]] = {}  # a message's index -> (item index, call id) per block

    def add(self, messages: list[dict[str, Any]], k: int, item: Mapping[str, Any]) -> None:
        at = f"{self.where}.input[{k}]"
        other = sorted(key for key in item if key not in ("type", "call_id", "name", "arguments", "output", "id",
                                                          "status") and item[key] is not None)
        if other:
            raise FieldProblem(f"{at}.{other[0]}", f"{at}.{other[0]} has no counterpart in Anthropic's Messages "
                               f"API: {_FIX}")
        cid = call_id(item.get("call_id"), f"{at}.call_id")
        if item["type"] == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise FieldProblem(f"{at}.name", f"{at}.name must be the function's name, as the model gave it")
            role, block = "assistant", {"type": "tool_use", "id": cid, "name": name,
                                        "input": tool_input(item.get("arguments"), f"{at}.arguments")}
        else:
            role, block = "user", {"type": "tool_result", "tool_use_id": cid, **self._output(item, at)}
        if not (messages and len(messages) - 1 in self.runs and messages[-1]["role"] == role):
            messages.append({"role": role, "content": []})
            self.runs[len(messages) - 1] = []
        messages[-1]["content"].append(block)
        self.runs[len(messages) - 1].append((k, cid))

    @staticmethod
    def _output(item: Mapping[str, Any], at: str) -> dict[str, Any]:
        output = item.get("output")
        if isinstance(output, list):
            output = _text(output, f"{at}.output", "Anthropic's Messages API", "anthropic", images=True)
        elif not isinstance(output, str):
            raise FieldProblem(f"{at}.output", f"{at}.output must be text or a list of text parts")
        return {"content": output} if output else {}  # an empty result: no content (Anthropic refuses empty text)

    def check(self, messages: list[dict[str, Any]]) -> None:
        asked: list[tuple[int, str]] = []
        for i in range(len(messages) + 1):
            blocks = self.runs.get(i, []) if i < len(messages) and messages[i]["role"] == "user" else []
            open_ids = {cid for _, cid in asked}
            for k, cid in blocks:
                if cid not in open_ids:
                    raise FieldProblem(f"{self.where}.input[{k}].call_id", f"{self.where}.input[{k}].call_id "
                                       f"{cid!r} answers no function_call of the items right before it not answered "
                                       "yet: give the call_id of the call this is the output of, once")
                open_ids.discard(cid)
            if open_ids:
                k = next(k for k, cid in asked if cid in open_ids)
                raise FieldProblem(f"{self.where}.input[{k}]", f"{self.where}.input[{k}], a function_call, has no "
                                   "function_call_output right after the calls it came with: give each call's "
                                   "output there (Anthropic requires it)")
            asked = self.runs.get(i, []) if i < len(messages) and messages[i]["role"] == "assistant" else []
