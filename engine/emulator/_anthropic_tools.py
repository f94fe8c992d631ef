"""Tool use as Anthropic's Messages API takes and answers it (``_anthropic``): a custom tool needs its
``input_schema`` (an object schema); every ``tool_use`` block of an assistant turn needs a ``tool_result`` block in
the turn right after it, and a ``tool_result`` answers a ``tool_use`` of the turn right before (consecutive turns
of one role are one turn, as the API combines them); a forced call (``tool_choice`` ``any`` or ``tool``) is the
answer's only content, "the model will not emit a natural language response before tool_use blocks" (Anthropic's
tool-use docs), with an ``input`` that is an instance of the tool's ``input_schema`` (``_schema``)."""

from __future__ import annotations

import json
from typing import Any

from engine.emulator._wire import ApiError

__all__ = ["check_tool_turns", "check_tools", "forced", "tool_input"]


def check_tools(tools: Any) -> None:
    """A custom tool (no ``type``, or ``custom``) without an object ``input_schema`` is a 400."""
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            continue
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ApiError(400, f"tools.{i}.custom.name: Field required", param=f"tools.{i}.name")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise ApiError(400, f"tools.{i}.custom.input_schema: Field required", param=f"tools.{i}.input_schema")
        if schema.get("type") != "object":
            raise ApiError(400, f"tools.{i}.custom.input_schema.type: Input should be 'object'",
                           param=f"tools.{i}.input_schema.type")


def _blocks(m: Any, kind: str) -> list[tuple[int, dict]]:
    content = m.get("content") if isinstance(m, dict) else None
    return [(j, b) for j, b in enumerate(content if isinstance(content, list) else ())
            if isinstance(b, dict) and b.get("type") == kind]


def check_tool_turns(messages: Any) -> None:
    """Each assistant turn's ``tool_use`` ids answered by ``tool_result`` blocks in the next turn, and each
    ``tool_result`` answering one of the turn before; else the API's 400."""
    if not isinstance(messages, list):
        return
    turns: list[tuple[str, list[int]]] = []  # (role, indices of its messages)
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if turns and turns[-1][0] == role:
            turns[-1][1].append(i)
        else:
            turns.append((role, [i]))
    asked: dict[str, int] = {}  # the previous turn's tool_use ids, by the index of their message
    for role, idx in turns:
        results = [(i, j, b) for i in idx for j, b in _blocks(messages[i], "tool_result")]
        for i, j, b in results:
            if b.get("tool_use_id") not in asked:
                raise ApiError(400, f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                               f"blocks: {b.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                               "`tool_use` block in the previous message.", param=f"messages.{i}.content.{j}")
        missing = set(asked) - {b.get("tool_use_id") for _, _, b in results}
        if missing:
            at = min(asked[m] for m in missing)
            raise ApiError(400, f"messages.{at}: `tool_use` ids were found without `tool_result` blocks immediately "
                           f"after: {', '.join(sorted(missing))}. Each `tool_use` block must have a corresponding "
                           "`tool_result` block in the next message.", param=f"messages.{at}")
        asked = {b.get("id"): i for i in idx for _, b in _blocks(messages[i], "tool_use")} if role == "assistant" \
            else {}
    if asked:
        at = min(asked.values())
        raise ApiError(400, f"messages.{at}: `tool_use` ids were found without `tool_result` blocks immediately "
                       f"after: {', '.join(sorted(asked))}. Each `tool_use` block must have a corresponding "
                       "`tool_result` block in the next message.", param=f"messages.{at}")


def forced(body: dict) -> bool:
    """Whether ``tool_choice`` forces a call (``any`` or a named ``tool``)."""
    choice = body.get("tool_choice")
    return isinstance(choice, dict) and choice.get("type") in ("any", "tool")


def tool_input(args: str | None) -> dict[str, Any]:
    """A forced call's ``input``: its arguments (an instance of the tool's ``input_schema``, ``_schema``); a call
    cut at ``max_tokens`` mid-arguments has what parses, which is nothing."""
    try:
        value = json.loads(args or "")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
