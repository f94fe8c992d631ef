"""Function calling of an OpenAI chat body in the shapes of Anthropic's Messages API (``_endpoint_claude``): the
tools and the tool choice (``engine.core._claude_tools``), and the conversation. An assistant message's
``tool_calls`` are ``tool_use`` blocks after its text; a run of ``role: tool`` messages is one user message of
``tool_result`` blocks, as Anthropic requires the results of a turn's calls in the message right after it; an image
part (``image_url``, a ``data:`` URL or a web URL) is an ``image`` block. Each call must be answered in the tool
messages right after its assistant message, and each tool message must answer one of them: OpenAI refuses the
same conversations, so an application that works there is not refused here.

Every place a translated field lands is recorded (``came``: the Messages path -> the caller's, dotted), so a
refusal found later, by the engine, names the caller's field (``engine.core._callers.callers_field``). A refusal found
here names it at once, raised as ``FieldProblem``."""

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

__all__ = ["claude_messages", "claude_system", "claude_tools"]

# What an assistant message carries that Anthropic's has no field for, once its text and calls are blocks: null
# (the SDK's unset) is left out, anything else is refused.
_ASSISTANT_EXTRA = ("refusal", "audio", "function_call", "annotations")
# Fields of an OpenAI message that say nothing when null, as the SDK's ``message.model_dump()`` sends every unset
# one (and OpenAI's own answers ``annotations: []``): left out, they were 400s ("not a field of an Anthropic
# message") for a conversation OpenAI takes.
_SAY_NOTHING = ("name", "tool_calls", *_ASSISTANT_EXTRA)


def claude_tools(out: dict[str, Any], came: dict[str, str], forced_ok: bool) -> None:
    """``out``'s OpenAI ``tools``, ``tool_choice`` and ``parallel_tool_calls`` in Anthropic's shapes (in place).
    Tools already in Anthropic's shape (``{name, input_schema}``, or a typed tool of Anthropic's) and a choice
    of Anthropic's (``{type: auto | any | tool | none}``) pass as they are, for the engine's checks."""
    for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
        if out.get(old) is not None:
            raise FieldProblem(old, f"{old} is OpenAI's deprecated form of {new}: give {new}")
    tools, names = out.get("tools"), []
    if isinstance(tools, list):
        built = []
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            if kind == "function":
                other = sorted(k for k in tool if k not in ("type", "function", "cache_control"))
                if other:
                    raise FieldProblem(f"tools.{i}.{other[0]}", f"tools.{i}.{other[0]} is not a field of a "
                                       "function tool: give {type: 'function', function: {name, description, "
                                       "parameters}}")
                cache = {"cache_control": tool["cache_control"]} if tool.get("cache_control") is not None else {}
                tool = {**anthropic_tool(tool.get("function"), f"tools.{i}.function"), **cache}
                came.update({f"tools.{i}.{k}": f"tools.{i}.function.{k}" for k in ("name", "description", "strict")})
                came[f"tools.{i}.input_schema"] = f"tools.{i}.function.parameters"
            elif kind == "custom" and "custom" in tool:
                raise FieldProblem(f"tools.{i}.type", f"tools.{i}.type 'custom' is an OpenAI custom tool (free-form "
                                   "text input), which Anthropic's Messages API has no counterpart for: give it as a "
                                   "function tool with a JSON Schema")
            names.extend([tool["name"]] if isinstance(tool, Mapping) and isinstance(tool.get("name"), str) else [])
            built.append(tool)
        out["tools"] = built
    choice = out.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") in ("auto", "any", "tool", "none"):
        return  # Anthropic's own
    choice = anthropic_tool_choice(out.pop("tool_choice", None), out.pop("parallel_tool_calls", None), names,
                                   forced_ok=forced_ok)
    if choice is not None:
        out["tool_choice"] = choice
        came["tool_choice.disable_parallel_tool_use"] = "parallel_tool_calls"


def claude_messages(messages: list, came: dict[str, str]) -> tuple[list, list]:
    """``messages`` (an OpenAI chat conversation) as Anthropic's, and the leading system and developer messages'
    content, for Messages' top-level ``system`` (``claude_system``); ``came`` gets where each part went."""
    out: list = []
    lead: list = []  # (index, message) of the system and developer messages before any other
    asked: tuple[int, dict[str, int]] | None = None  # the last assistant message with calls: its index, call ids
    k = 0
    while k < len(messages):
        m = messages[k]
        if isinstance(m, Mapping):
            m = {key: v for key, v in m.items() if not (key in _SAY_NOTHING and v in (None, []))}
        role = m.get("role") if isinstance(m, Mapping) else None
        if role in ("system", "developer") and not out:
            # Anthropic takes a system message among the messages only mid-conversation, after a user turn, and
            # at few models: a leading one was refused by the provider after the request was accepted.
            lead.append((k, m))
            k += 1
            continue
        if role == "tool":
            if asked is None:
                raise FieldProblem(f"messages.{k}", f"messages.{k} is a tool message, and the message before it "
                                   "is no assistant message with tool_calls: a tool message answers one of its "
                                   "calls, right after it")
            k = _results(messages, k, asked, out, came)
            asked = None
            continue
        if asked is not None:
            _unanswered(asked, k, len(messages))
        if role == "function":
            raise FieldProblem(f"messages.{k}.role", f"messages.{k}.role 'function' is OpenAI's deprecated tool "
                               "message: give role 'tool' with the tool_call_id it answers")
        if role == "assistant" and m.get("tool_calls") is None and says_nothing(m.get("content")):
            k += 1  # an empty answer sent back (engine.core._claude_tools.says_nothing)
            continue
        if len(out) != k:
            came[f"messages.{len(out)}"] = f"messages.{k}"
        # A later system or developer message (OpenAI's system message for its newer models) stays where it is, as
        # Anthropic's mid-conversation system message: the engine's check (engine.core._api_fields) takes it at a
        # model that takes one, right after a user turn, and refuses it, naming the caller's message, elsewhere.
        if role == "developer":
            m = {**m, "role": "system"}
            came[f"messages.{len(out)}.role"] = f"messages.{k}.role"
        if role == "assistant" and m.get("tool_calls") is not None:
            m, ids = _calls(m, k, len(out), came)
            asked = (k, ids) if ids else None
        elif isinstance(m, Mapping) and isinstance(m.get("content"), list):
            m = {**m, "content": [_part(p, f"messages.{k}.content.{n}", f"messages.{len(out)}.content.{n}", came)
                                  for n, p in enumerate(m["content"])]}
        out.append(m)
        k += 1
    if asked is not None:
        _unanswered(asked, len(messages), len(messages))
    if lead and not out:
        raise FieldProblem("messages", "messages has system or developer messages alone: Anthropic takes them as "
                           "the system prompt and needs a user message after them; give one")
    return out, lead


def claude_system(system: Any, lead: list, came: dict[str, str]) -> Any:
    """Messages' top-level ``system``: the body's own (``system``: Anthropic's shape, or None), then the leading
    system and developer messages (``lead``, from ``claude_messages``) in order; one message of text alone stays a
    string. None: no system prompt."""
    if not lead:
        return system
    if system is None and len(lead) == 1 and isinstance(lead[0][1].get("content"), str):
        k, m = lead[0]
        _plain(m, k)
        came["system"] = f"messages.{k}.content"
        return m["content"] or None
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) and system else list(system or [])
    for k, m in lead:
        _plain(m, k)
        content = m.get("content")
        if isinstance(content, str):
            if content:  # Anthropic refuses an empty text block
                came[f"system.{len(blocks)}"] = f"messages.{k}.content"
                blocks.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for n, part in enumerate(content):
                came[f"system.{len(blocks)}"] = f"messages.{k}.content.{n}"
                blocks.append(part)
        else:
            raise FieldProblem(f"messages.{k}.content", f"messages.{k}.content must be text or a list of text "
                               f"parts, got {type(content).__name__}")
    return blocks or None


def _plain(m: Mapping, k: int) -> None:
    """A system message carries its role and content alone: what else it has (a participant's ``name``) no
    system prompt of Anthropic's has."""
    other = sorted(key for key in m if key not in ("role", "content"))
    if other:
        fix = "name the speaker in the content" if other[0] == "name" else "leave it out"
        raise FieldProblem(f"messages.{k}.{other[0]}", f"messages.{k}.{other[0]} is not a field of an Anthropic "
                           f"system prompt: {fix}")


def _unanswered(asked: tuple[int, dict[str, int]], at: int, total: int) -> None:
    k, ids = asked
    first = min(ids.values())
    where = "the conversation ends" if at >= total else f"messages.{at} comes"
    raise FieldProblem(f"messages.{k}.tool_calls.{first}", f"messages.{k}.tool_calls.{first} has no tool message "
                       f"answering it ({where} first): give each call's result right after messages.{k}, as a tool "
                       "message with its tool_call_id (Anthropic, as OpenAI, requires it)")


def _results(messages: list, k: int, asked: tuple[int, dict[str, int]], out: list, came: dict[str, str]) -> int:
    """The run of tool messages from ``k`` as one user message of ``tool_result`` blocks; returns where it ends."""
    ids, blocks, at = dict(asked[1]), [], len(out)
    while k < len(messages) and isinstance(messages[k], Mapping) and messages[k].get("role") == "tool":
        m, where = messages[k], f"messages.{k}"
        other = sorted(key for key in m if key not in ("role", "content", "tool_call_id", "name") and m[key] is not None)
        if other:
            raise FieldProblem(f"{where}.{other[0]}", f"{where}.{other[0]} is not a field of a tool message (role, "
                               "content, tool_call_id): leave it out")
        cid = m.get("tool_call_id")
        if not isinstance(cid, str) or ids.pop(cid, None) is None:
            raise FieldProblem(f"{where}.tool_call_id", f"{where}.tool_call_id {str(cid)[:70]!r} answers none of the "
                               f"calls of messages.{asked[0]} not answered yet (its calls: {', '.join(asked[1])}): "
                               "give the id of the call this is the result of, once")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise FieldProblem(f"{where}.content", f"{where}.content must be text or a list of text parts, got "
                               f"{type(content).__name__}")
        n = len(blocks)
        # An empty result is a block without content: Anthropic refuses an empty text.
        blocks.append({"type": "tool_result", "tool_use_id": cid, **({"content": content} if content else {})})
        came[f"messages.{at}.content.{n}"] = where
        came[f"messages.{at}.content.{n}.tool_use_id"] = f"{where}.tool_call_id"
        k += 1
    if ids:
        _unanswered((asked[0], ids), k, len(messages))
    came[f"messages.{at}"] = came[f"messages.{at}.content.0"]
    out.append({"role": "user", "content": blocks})
    return k


def _calls(m: Mapping, k: int, at: int, came: dict[str, str]) -> tuple[dict, dict[str, int]]:
    """An assistant message with ``tool_calls`` as one with its text, then a ``tool_use`` block per call."""
    where = f"messages.{k}"
    calls = m["tool_calls"]
    if not isinstance(calls, list):
        raise FieldProblem(f"{where}.tool_calls", f"{where}.tool_calls must be a list of calls, got "
                           f"{type(calls).__name__}")
    bad = next((key for key in _ASSISTANT_EXTRA if m.get(key) is not None), None)
    if bad is not None:
        raise FieldProblem(f"{where}.{bad}", f"{where}.{bad} has no counterpart in Anthropic's Messages API: leave "
                           "it out (null passes)")
    content = m.get("content")
    if isinstance(content, str):
        blocks: list = [{"type": "text", "text": content}] if content.strip() else []
        came[f"messages.{at}.content.0"] = f"{where}.content"
    elif isinstance(content, list):
        blocks = list(content)
    elif content is None:
        blocks = []
    else:
        raise FieldProblem(f"{where}.content", f"{where}.content must be text, a list of text parts or null, got "
                           f"{type(content).__name__}")
    ids: dict[str, int] = {}
    for j, call in enumerate(calls):
        path, block = f"{where}.tool_calls.{j}", f"messages.{at}.content.{len(blocks)}"
        if not isinstance(call, Mapping) or call.get("type", "function") != "function":
            kind = call.get("type") if isinstance(call, Mapping) else type(call).__name__
            raise FieldProblem(f"{path}.type", f"{path}.type {str(kind)[:40]!r} is not a function call, the only "
                               "kind Anthropic's Messages API has: give {id, type: 'function', function: {name, "
                               "arguments}}")
        fn = call.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise FieldProblem(f"{path}.function", f"{path}.function must be {{name, arguments}}, as the model "
                               "gave it")
        cid = call_id(call.get("id"), f"{path}.id")
        if cid in ids:
            raise FieldProblem(f"{path}.id", f"{path}.id {cid!r} is the id of an earlier call of {where}: each call "
                               "has its own")
        ids[cid] = j
        blocks.append({"type": "tool_use", "id": cid, "name": fn["name"],
                       "input": tool_input(fn.get("arguments"), f"{path}.function.arguments")})
        came.update({block: path, f"{block}.input": f"{path}.function.arguments",
                     f"{block}.name": f"{path}.function.name"})
    rest = {key: v for key, v in m.items() if key not in ("tool_calls", "content", *_ASSISTANT_EXTRA)}
    return {**rest, "content": blocks}, ids


def _part(part: Any, where: str, lands: str, came: dict[str, str]) -> Any:
    """A content part as Anthropic takes it: an ``image_url`` part as an ``image`` block (base64 from a ``data:``
    URL, else a URL source); any other part as it is (the engine's checks name what Anthropic refuses)."""
    if not isinstance(part, Mapping) or part.get("type") != "image_url":
        return part
    other = sorted(k for k in part if k not in ("type", "image_url", "cache_control") and part[k] is not None)
    if other:
        raise FieldProblem(f"{where}.{other[0]}", f"{where}.{other[0]} has no counterpart in Anthropic's Messages "
                           "API (its cache mark is cache_control): leave it out")
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else None
    if not isinstance(url, str):
        raise FieldProblem(f"{where}.image_url", f"{where}.image_url must be {{url: ...}}, the image's URL or a "
                           "data: URL")
    block = image_block(url, image.get("detail"), f"{where}.image_url.url", f"{where}.image_url.detail")
    came[f"{lands}.source"] = f"{where}.image_url"
    return {**block, **({"cache_control": part["cache_control"]} if part.get("cache_control") is not None else {})}
