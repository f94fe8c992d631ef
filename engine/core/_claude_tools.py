"""OpenAI's function tools, tool choices and tool calls in the shapes of Anthropic's Messages API, for a model called
through it: a function ``{name, description, parameters, strict}`` is a tool ``{name, description, input_schema,
strict}``; ``tool_choice`` "auto", "none", "required" and a named function are ``{type: auto | none | any | tool}``,
and ``parallel_tool_calls: false`` is its ``disable_parallel_tool_use``; a call's ``arguments`` (a JSON string) is
a ``tool_use`` block's ``input`` (an object). The chat completions route (``engine.app._endpoint_claude``) and a
Responses body sent as messages (``engine.core.responses_input``) share them: one rule, one place.

What has no counterpart is refused, naming the caller's field (``where``) and the fix, never dropped: OpenAI's
``custom`` tools (free-form text input), ``allowed_tools`` choices, a tool the provider runs. ``strict: true`` goes
as Anthropic's own ``strict`` (grammar-constrained sampling of the input against the schema, as OpenAI's); false
or null is Anthropic's default and is left out."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from engine.core._checks import FieldProblem

__all__ = ["anthropic_tool", "anthropic_tool_choice", "call_id", "image_block", "says_nothing", "tool_input"]

# OpenAI's rule for a function's name, which Anthropic's for a tool's name takes too.
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Anthropic's rule for a tool_use block's id (an OpenAI call id is "call_..."; Anthropic's own, "toolu_...").
_ID = re.compile(r"^[a-zA-Z0-9_-]{1,256}$")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")
_DATA_URL = re.compile(r"data:(image/(?:jpeg|png|gif|webp));base64,(.*)", re.S)  # Anthropic's four image types
_CHOICES = ("auto", "none", "required")


def anthropic_tool(fn: Any, where: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """An OpenAI function definition (``where``: its path as the caller wrote it, e.g. ``tools.0.function``) as an
    Anthropic tool. ``extra``: keys of ``fn`` that are not the function's (a Responses tool's ``type``)."""
    if not isinstance(fn, Mapping):
        raise FieldProblem(where, f"{where} must be an object {{name, description, parameters}}, got "
                           f"{type(fn).__name__}")
    other = sorted(k for k in fn if k not in _FUNCTION_KEYS and k not in extra and fn[k] not in (None, False))
    if other:
        raise FieldProblem(f"{where}.{other[0]}", f"{where}.{other[0]} is not a field of a function tool "
                           f"(they are {', '.join(_FUNCTION_KEYS)}), and Anthropic's Messages API has no "
                           "counterpart: leave it out")
    name = fn.get("name")
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise FieldProblem(f"{where}.name", f"{where}.name must be 1 to 64 letters, digits, '_' or '-', got "
                           f"{str(name)[:70]!r}")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise FieldProblem(f"{where}.description", f"{where}.description must be a string, got "
                           f"{type(description).__name__}")
    schema = fn.get("parameters")
    if schema is None:  # OpenAI: "omitting parameters defines a function with an empty parameter list"
        schema = {"type": "object", "properties": {}}
    if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
        raise FieldProblem(f"{where}.parameters", f"{where}.parameters must be a JSON Schema object with type "
                           f"'object' (a function's arguments are an object), got {str(schema)[:60]}")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise FieldProblem(f"{where}.strict", f"{where}.strict must be true or false, got {strict!r}")
    return {"name": name, **({"description": description} if description else {}),
            "input_schema": {"type": "object", **schema}, **({"strict": True} if strict else {})}


def anthropic_tool_choice(choice: Any, parallel: Any, names: Sequence[str], *, forced_ok: bool = True,
                          flat: bool = False, where: str = "") -> dict[str, Any] | None:
    """Anthropic's ``tool_choice`` for OpenAI's ``tool_choice`` and ``parallel_tool_calls`` over the tools
    ``names`` (none: no tools given), or None when it goes without one. ``forced_ok``: the model takes a choice that
    forces a call (``ModelSpec.forced_tool_choice``); ``flat``: a named choice is the Responses API's
    ``{type: function, name}``, else chat's ``{type: function, function: {name}}``; ``where``: the body's path,
    before the fields' names (none: they are the caller's)."""
    at = f"{where}." if where else ""
    if parallel is not None and not isinstance(parallel, bool):
        raise FieldProblem(f"{at}parallel_tool_calls", f"{at}parallel_tool_calls must be true or false, got "
                           f"{parallel!r}")
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        fn = choice if flat else choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name not in names:
            field = f"{at}tool_choice.name" if flat else f"{at}tool_choice.function.name"
            known = f"one of the tools given ({', '.join(names)})" if names else "a tool given in tools"
            raise FieldProblem(field, f"{field} {str(name)[:70]!r} must name {known}")
        out: dict[str, Any] = {"type": "tool", "name": name}
    elif choice is None or choice in _CHOICES:
        kind = {"required": "any", None: "auto"}.get(choice, choice)
        if kind == "any" and not names:
            raise FieldProblem(f"{at}tool_choice", f"{at}tool_choice 'required' asks for a tool call, and no tools are "
                               "given: give tools, or leave tool_choice out")
        if not names:  # moot without tools
            return None
        out = {"type": kind}
    else:
        kind = choice.get("type") if isinstance(choice, Mapping) else choice
        raise FieldProblem(f"{at}tool_choice", f"{at}tool_choice {str(kind)[:40]!r} has no counterpart in Anthropic's "
                           "Messages API: give 'auto', 'none', 'required' or a function by name")
    if out["type"] in ("any", "tool") and not forced_ok:
        shown = repr(choice) if isinstance(choice, str) else f"{{type: 'function', name: {out['name']!r}}}"
        raise FieldProblem(f"{at}tool_choice", f"{at}tool_choice {shown} forces a tool call, which this model "
                           "refuses: give 'auto' (or 'none') and ask for the tool in the prompt")
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    if out == {"type": "auto"} and choice is None:
        return None  # Anthropic's default with tools: nothing to send
    return out


def tool_input(arguments: Any, where: str) -> dict[str, Any]:
    """A call's ``arguments`` (OpenAI's JSON string) as a ``tool_use`` block's ``input`` (an object); an empty
    string is no arguments."""
    if isinstance(arguments, str) and not arguments.strip():
        return {}
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError as exc:
        raise FieldProblem(where, f"{where} is not valid JSON ({exc}): give the call's arguments as the model "
                           "gave them, a JSON object as a string, e.g. '{\"city\": \"Oslo\"}'") from None
    if not isinstance(value, dict):
        raise FieldProblem(where, f"{where} must be a JSON object as a string, e.g. '{{\"city\": \"Oslo\"}}', got "
                           f"{str(arguments)[:60]!r}: Anthropic takes a tool call's input as an object")
    return value


def call_id(value: Any, where: str) -> str:
    """A tool call's id as Anthropic takes one (letters, digits, '_' and '-')."""
    if not (isinstance(value, str) and _ID.fullmatch(value)):
        raise FieldProblem(where, f"{where} must be the call's id as the model gave it (letters, digits, '_' or "
                           f"'-'), got {str(value)[:70]!r}")
    return value


def says_nothing(content: Any) -> bool:
    """Whether an assistant message's ``content`` (with no tool calls beside it) says nothing: null, blank text, or
    text parts of blank text alone. A Claude answer of no text (``end_turn`` with no content) comes back as ``""``,
    and an agent sends it back so; Anthropic refuses it ("all messages must have non-empty content except for the
    optional final assistant message"), where OpenAI takes it. Left out, the turns beside it are one turn, as
    Anthropic reads two messages of one role in a row."""
    if content is None or isinstance(content, str):
        return not (content or "").strip()
    return isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") in ("text", "input_text", "output_text")
        and isinstance(p.get("text"), str) and not p["text"].strip() for p in content)


def image_block(url: Any, detail: Any, at_url: str, at_detail: str) -> dict[str, Any]:
    """OpenAI's image (its ``url``: a ``data:`` URL or a web URL, and its ``detail``) as an Anthropic ``image``
    block; ``at_url`` and ``at_detail``: their paths as the caller wrote them (chat's ``image_url.url``, the
    Responses API's ``image_url``)."""
    if detail == "low":
        raise FieldProblem(at_detail, f"{at_detail} 'low' has no counterpart at Anthropic, which reads every image "
                           "at its size (width x height / 750 tokens, at most about 1,600): leave detail out, or "
                           "scale the image down")
    data = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if data is not None:
        return {"type": "image", "source": {"type": "base64", "media_type": data.group(1), "data": data.group(2)}}
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise FieldProblem(at_url, f"{at_url} must be a web URL or a base64 data: URL of a JPEG, PNG, GIF or WebP image "
                       f"(Anthropic's image types), got {str(url)[:40]!r}")
