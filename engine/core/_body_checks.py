"""Checks of a chat body's shape: its messages, an Anthropic system prompt, its cache marks and its tools. Split from
``engine.core._checks`` (a request's raw values and generation parameters), which imports them back."""

from __future__ import annotations

from collections.abc import Mapping

from engine.core._field_problem import FieldProblem

__all__ = ["cache_blocks", "check_anthropic_system", "check_cache_ttl", "check_messages", "check_tools",
           "no_text_problem"]


def cache_blocks(body: dict):
    """(path, block) of every place an Anthropic body may carry ``cache_control``."""
    yield "", body
    for name in ("system", "tools"):
        if isinstance(part := body.get(name), list):
            yield from ((f".{name}.{i}", b) for i, b in enumerate(part))
    for k, m in enumerate(body.get("messages") or ()):
        if isinstance(m, dict) and isinstance(c := m.get("content"), list):
            for i, b in enumerate(c):
                yield f".messages.{k}.content.{i}", b
                if isinstance(b, dict) and isinstance(inner := b.get("content"), list):  # a tool_result's blocks
                    yield from ((f".messages.{k}.content.{i}.content.{j}", x) for j, x in enumerate(inner))


def check_cache_ttl(body: dict, where: str) -> None:
    """An Anthropic ``cache_control`` with ``ttl: "1h"`` writes its entry at 2x the input price; the catalog, and
    so every estimate, reservation and result, prices the 5-minute entry's 1.25x. Refused, naming the block."""
    for path, block in cache_blocks(body):
        cc = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(cc, dict) and cc.get("ttl") not in (None, "5m"):
            field = f"{where}{path}.cache_control.ttl"
            raise FieldProblem(field, f"{field} must be '5m' or left out, got {cc['ttl']!r}: the catalog prices "
                               "Anthropic's 5-minute cache (writes at 1.25x the input price), and a 1-hour entry "
                               "writes at 2x; leave ttl out")


def check_anthropic_system(body: dict, where: str) -> None:
    """Anthropic's ``system`` is text: a string or a list of text blocks (each may carry ``cache_control``).
    An image or document block there was accepted, reserved for and sent, and the API answered 400."""
    system = body.get("system")
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise FieldProblem(f"{where}.system", f"{where}.system must be a string or a list of text blocks, got "
                           f"{type(system).__name__} {repr(system)[:40]}; give the instructions as a string")
    for i, block in enumerate(system):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            continue
        field = f"{where}.system.{i}"
        if kind is None or kind == "text":
            raise FieldProblem(field, f"{field} must be a text block {{'type': 'text', 'text': '...'}}, got "
                               f"{str(block)[:60]!r}")
        raise FieldProblem(field, f"{field} must be a text block, got type {str(kind)[:40]!r}: Anthropic takes "
                           "only text in system; put images and documents in a user message")


# Tools the caller runs itself: the provider bills only their tokens, which the cost model prices. Anthropic's
# own client tools carry a versioned type (``bash_20250124``); custom ones none, or "custom".
_CLIENT_TOOLS = {"anthropic": (("custom", "bash_", "text_editor_", "computer_", "memory_"),
                               "tools without a type (or 'custom'), or Anthropic's bash, text_editor, computer "
                               "and memory tools"),
                 "openai": (("function", "custom"), "tools of type 'function' or 'custom'")}
# Body fields that switch on a tool the provider runs and bills per use.
_SERVER_TOOL_FIELDS = {"anthropic": ("mcp_servers",), "openai": ("web_search_options",)}


def check_tools(body: dict, where: str, api: str) -> None:
    """A tool the provider runs on its side (web search, web fetch, code execution, file search, MCP) bills per
    use on top of the tokens ($10 per 1,000 Anthropic web searches), which no catalog price covers: every
    estimate, reservation and result would be short of the bill (a helper's fault hunt: $0.024 counted for a
    $0.074 call, a hard budget overrun ninefold). Refused, naming the tool; tools the caller runs pass."""
    for name in _SERVER_TOOL_FIELDS.get(api, ()):
        if body.get(name) is not None:
            raise FieldProblem(f"{where}.{name}", f"{where}.{name} runs tools the provider bills per use, which the "
                               "catalog does not price: leave it out, or send this request to the provider "
                               "directly")
    tools = body.get("tools")
    if tools is None:
        return
    # Every API takes a list of objects: anything else was accepted here and refused by the provider after, with
    # the provider's words and no field named (a helper's hunt of the endpoint).
    bad = next((i for i, t in enumerate(tools) if not isinstance(t, dict)), None) if isinstance(tools, list) else -1
    if bad is not None:
        at = f"{where}.tools" if bad < 0 else f"{where}.tools.{bad}"
        raise FieldProblem(at, f"{at} must be {'a list of tool objects' if bad < 0 else 'a tool object'}, got "
                           f"{type(tools if bad < 0 else tools[bad]).__name__}; give each tool as a JSON object")
    if api not in _CLIENT_TOOLS:
        return
    allowed, hint = _CLIENT_TOOLS[api]
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if api == "anthropic" and kind == "function":  # OpenAI's shape, which a chat call to a Claude model keeps
            raise FieldProblem(f"{where}.tools.{i}", f"{where}.tools.{i} is an OpenAI function tool, and this model "
                               "is called through Anthropic's Messages API, which takes a tool as {'name', "
                               "'description', 'input_schema'} (the function's parameters): give it in that shape")
        if kind is not None and not (isinstance(kind, str) and kind.startswith(allowed)):
            raise FieldProblem(f"{where}.tools.{i}.type", f"{where}.tools.{i}.type {kind!r} is a tool the provider "
                               f"runs and bills per use, which the catalog does not price; give {hint}, which "
                               "you run, or send this request to the provider directly")


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's; Anthropic's are among them


def check_messages(body: Mapping, where: str, kind: str = "text") -> None:
    """Every message of ``body`` names a role a provider takes and has text or a list of parts as its content
    (or none): otherwise it was accepted, reserved for and sent, and the provider answered 400, or a number
    given as the content was reported as a body with no text (a helper's review; in simulation nothing
    noticed). An image or video model takes a prompt, not messages: beside a prompt of its own they were
    dropped unsaid, and the image made from the other text (a helper's hunt)."""
    messages = body.get("messages")
    if kind != "text" and messages is not None:
        raise FieldProblem(f"{where}.messages", f"{where}.messages is for text models, and this model makes "
                           f"{kind}: give its description as prompt")
    for k, m in enumerate(messages if isinstance(messages, list) else ()):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in _ROLES:
            got = "no role" if role is None else f"role {str(role)[:40]!r}"
            raise FieldProblem(f"{where}.messages[{k}].role", f"a message needs a role, one of "
                               f"{', '.join(_ROLES)}; got {got}")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise FieldProblem(f"{where}.messages[{k}].content", f"a message's content is text or a list of "
                               f"parts, got {type(c).__name__} {str(c)[:40]!r}: give it as a string")


def no_text_problem(body: Mapping, where: str = "body") -> FieldProblem:
    """The problem of a text body with nothing to send, naming a misspelt ``messages`` or ``input`` where the
    body has one: "the body has no text to send" alone sent a user with ``mesages`` looking for text that was
    there (a new user's tour; a server that refuses unknown fields names it, one that does not is sent it)."""
    import difflib

    texts = ("messages", "input")
    for key in body:
        if isinstance(key, str) and key not in texts and (near := difflib.get_close_matches(key, texts, 1, 0.75)):
            return FieldProblem(f"{where}.{key}", f"{where}.{key} is not a field the text is read from: did you "
                                f"mean {where}.{near[0]}? fix its spelling")
    return FieldProblem(f"{where}.messages", f"the {where} has no text to send: give messages with content, e.g. "
                        '[{"role": "user", "content": "..."}] (or input, for /v1/responses)')
