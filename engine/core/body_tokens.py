"""What a provider body bills as input: its text (``split_body``), tool definitions, images and the system prompt a
provider adds for tool use.

The engine estimates a request's input tokens before the call (budgets reserve on the estimate; the provider's
``usage`` replaces it after), and the emulator bills by the same rules, so both must count what the providers
count. Tool definitions count as their canonical JSON. An image counts by its provider's published rule, from
its pixel size when the body carries the image (a ``data:`` URL or base64 source: PNG, GIF, JPEG and WebP
headers are read) and at the rule's largest count when it does not (a URL): a reservation that guesses low
lets a hard budget be overrun, one that guesses high only holds money back until the ``usage`` comes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.core._checks import FieldProblem

__all__ = ["TEXT_PARTS", "ImageInput", "ToolPrompt", "block_call_text", "body_image_tokens", "call_chars",
           "call_texts", "image_blocks", "image_size", "image_tokens", "only_tool_outputs", "sends_prompt",
           "split_body", "tool_chars", "tool_output_parts", "tool_prompt_tokens"]


class ImageInput(BaseModel):
    """How a model bills an input image, as its provider documents it (catalog: ``image_input``).

    - ``tiles`` (OpenAI GPT-4o, GPT-5, gpt-4o-mini): ``detail: low`` costs ``base_tokens``; otherwise the image
      is fitted in 2048 x 2048, its short side brought down to 768, and each 512 px tile costs ``tile_tokens``
      on top of ``base_tokens``. At most 8 tiles.
    - ``patches`` (OpenAI GPT-5 mini, GPT-4.1 mini): 32 px patches, at most 1,536 (the image is scaled down to
      fit), times ``multiplier``.
    - ``area`` (Anthropic): width x height / 750 once the long edge is at most 1,568 px, at most ``max_tokens``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    scheme: Literal["tiles", "patches", "area"]
    base_tokens: int = Field(default=85, ge=0)
    tile_tokens: int = Field(default=170, ge=0)
    multiplier: float = Field(default=1.0, gt=0)
    max_tokens: int = Field(default=1600, ge=1)


class ToolPrompt(BaseModel):
    """The system prompt a provider adds to a call that carries tools, billed as input tokens (catalog:
    ``tool_prompt``). Anthropic's size depends on the model and on the call's ``tool_choice``: ``auto`` tokens
    when the choice leaves the model free (auto, none, or no choice given), ``any`` when it forces a call (any,
    or a tool by name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    auto: int = Field(ge=0)
    any: int = Field(ge=0)


# A model whose catalog entry names no rule: Anthropic's, whose largest count (1,600) is also about what the
# tile models charge for a large image.
DEFAULT_IMAGE_INPUT = ImageInput(scheme="area")
_PATCH, _MAX_PATCHES = 32, 1536
# The content parts that are text (Chat and Anthropic ``text``, Responses ``input_text`` and ``output_text``):
# each API refuses one whose ``text`` is not a string, with a 400 for the whole call.
TEXT_PARTS = ("text", "input_text", "output_text")
_OUTPUT_PARTS = ("input_text", "input_image")  # of a tool output, the parts that are text and images
_HEAD_B64 = 87_384  # base64 characters read for a header: 64 kB of image (a JPEG's size follows its EXIF)


def sends_prompt(body: dict | None, kind: str = "text") -> bool:
    """Whether a request's ``prompt`` is what goes to the provider as the user's text, as the providers' wire
    builds the call (``actors/providers``): with no body, or with a body that carries none of its own: for text
    no ``messages`` or ``input`` (a ``system``, sampling settings, a Responses ``prompt`` template object beside
    it), for an image no ``prompt`` string. Beside a body that has its text, the prompt is a label, sent nowhere."""
    if not body:
        return True
    if kind == "image":
        return not isinstance(body.get("prompt"), str)
    return "messages" not in body and "input" not in body


def split_body(body: dict, where: str = "body") -> tuple[str, dict]:
    """(the body's text: system/instructions, every message's text, then ``input`` or ``prompt``; the body with
    that text blanked out: the shape tools, settings, roles and images make). One walk for both, so what counts
    as text and what as shape never disagree. A text part whose ``text`` is not a string raises
    ``FieldProblem`` naming its path (``where`` is the body's): it is refused per request here, where the
    provider would refuse the call that carries it and its neighbours."""
    parts: list[str] = []

    def text(v: Any, path: str) -> Any:
        if isinstance(v, str):
            parts.append(v)
            return ""
        return [block(b, path, n) for n, b in enumerate(v)] if isinstance(v, list) else v

    def block(b: Any, path: str, n: int) -> Any:
        if not isinstance(b, dict):
            return text(b, path) if isinstance(b, str) else b  # an image, a tool call...: shape
        if isinstance(b.get("text"), str):
            parts.append(b["text"])
            return {**b, "text": ""}
        if b.get("type") in TEXT_PARTS:
            got = repr(b["text"]) if "text" in b else "nothing"
            got = got if len(got) <= 40 else got[:37] + "..."
            raise FieldProblem(f"{path}[{n}].text", f"{path}[{n}].text must be a string, got {got}: the provider "
                               f"refuses a {b['type']!r} part with any other text; send the text as a JSON string")
        if "content" in b:
            return {**b, "content": text(b["content"], f"{path}[{n}].content")}
        if b.get("type") == "function_call_output" and isinstance(b.get("output"), list):
            # A tool's output of parts: its text is text, as a message's.
            return {**b, "output": text(b["output"], f"{path}[{n}].output")}
        return b

    shape = dict(body)
    for key in ("system", "instructions"):
        if key in body:
            shape[key] = text(body[key], f"{where}.{key}")
    messages = body.get("messages")
    if isinstance(messages, list):
        shape["messages"] = [{**m, "content": text(m["content"], f"{where}.messages[{i}].content")}
                             if isinstance(m, dict) and "content" in m else m for i, m in enumerate(messages)]
    for key in ("input", "prompt"):
        if key in body:
            shape[key] = text(body[key], f"{where}.{key}")
    return "\n".join(parts), shape


def tool_chars(body: Any) -> int:
    """Characters of a body's tool definitions, as their canonical JSON: billed as input (the emulator too), so
    an estimate from the messages alone let a budget reserve 8 tokens for a call billed 6,700."""
    tools = body.get("tools") if isinstance(body, dict) else None
    if not isinstance(tools, list):
        return 0
    return sum(len(json.dumps({k: v for k, v in t.items() if k != "cache_control"} if isinstance(t, dict) else t,
                              sort_keys=True, separators=(",", ":"))) for t in tools)


def tool_prompt_tokens(body: Any, rule: ToolPrompt | None) -> int:
    """Tokens of the system prompt ``rule``'s provider adds to ``body``: once, when it carries tools (a
    non-empty ``tools``, server tools too), by its ``tool_choice`` in Anthropic's shape (``{type: auto | none | any
    | tool}``) or OpenAI's ("auto", "none", "required", a function by name), as a body for a Claude model may come
    in either. A choice of another shape counts the larger: a reservation never guesses low."""
    tools = body.get("tools") if isinstance(body, dict) else None
    if rule is None or not isinstance(tools, list) or not tools:
        return 0
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else choice
    if kind in (None, "auto", "none"):
        return rule.auto
    return rule.any if kind in ("any", "tool", "required", "function") else max(rule.auto, rule.any)


def image_blocks(content: Any) -> list[tuple[str, str]]:
    """(source, detail) of every image block in a message's content: OpenAI chat ``image_url``, Responses
    ``input_image``, Anthropic ``image`` (base64 or URL source). ``source`` is a URL or base64 data."""
    out: list[tuple[str, str]] = []
    for b in content if isinstance(content, list) else ():
        if not isinstance(b, dict):
            continue
        kind = b.get("type")
        if kind == "image_url" and isinstance(b.get("image_url"), dict):
            url = b["image_url"].get("url")
            out.append((url if isinstance(url, str) else "", str(b["image_url"].get("detail") or "auto")))
        elif kind == "input_image":
            url = b.get("image_url")
            out.append((url if isinstance(url, str) else "", str(b.get("detail") or "auto")))
        elif kind == "image" and isinstance(b.get("source"), dict):
            src = b["source"]
            data = src.get("data") if src.get("type") == "base64" else src.get("url")
            out.append((data if isinstance(data, str) else "", "auto"))
    return out


def body_image_tokens(body: Any, rule: ImageInput | None) -> int:
    """Input tokens of every image in a body's ``system`` blocks and messages (chat ``messages``, Responses
    ``input``), tool results' content and Responses tool outputs included: everywhere the emulator's prompt
    builders bill one."""
    if not isinstance(body, dict):
        return 0

    def of(content: Any) -> int:
        n = sum(image_tokens(rule, image_size(src), detail) for src, detail in image_blocks(content))
        for b in content if isinstance(content, list) else ():
            if isinstance(b, dict) and b.get("type") == "tool_result":
                n += of(b.get("content"))
        return n

    total = of(body.get("system"))
    for m in _items(body):
        total += of(m.get("content")) + of(tool_output_parts(m))
    return total


def call_chars(body: Any) -> int:
    """Characters of the tool calls and tool outputs a body's conversation carries beyond its text blocks
    (``call_texts``, ``block_call_text``): billed as input, and an agent's history is mostly these."""
    total = 0
    for m in _items(body) if isinstance(body, dict) else ():
        total += sum(map(len, call_texts(m)))
        content = m.get("content")
        for b in content if isinstance(content, list) else ():
            if isinstance(b, dict):
                total += len(block_call_text(b))
    return total


def call_texts(item: dict) -> list[str]:
    """What a conversation item bills beyond its content: an OpenAI assistant message's ``tool_calls`` (each
    call's function, as canonical JSON), a Responses ``function_call`` item (its name and arguments) or
    ``function_call_output`` item (its output: a string, or the parts of a list that are neither
    ``input_text`` nor ``input_image``, which are text and images and counted as such, ``tool_output_parts``)."""
    kind = item.get("type")
    if kind == "function_call":
        return [_canonical({"name": item.get("name"), "arguments": item.get("arguments")})]
    if kind == "function_call_output":
        out = item.get("output")
        if isinstance(out, list):  # an input_file part, say: its JSON, rather than nothing
            return [_canonical(p) for p in out if not (isinstance(p, dict) and p.get("type") in _OUTPUT_PARTS)]
        return [out if isinstance(out, str) else _canonical(out)]
    calls = item.get("tool_calls")
    return [_canonical(c.get("function")) for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def tool_output_parts(item: dict) -> list[dict]:
    """The text and image parts of a Responses ``function_call_output`` item's list ``output`` (a tool that
    returns a screenshot): billed as the same parts of a user message are, so a base64 image counts by its
    model's image rule, not as characters of JSON."""
    out = item.get("output") if item.get("type") == "function_call_output" else None
    return [p for p in out if isinstance(p, dict) and p.get("type") in _OUTPUT_PARTS] if isinstance(out, list) else []


def only_tool_outputs(body: Any) -> bool:
    """Whether a body's ``input`` is Responses ``function_call_output`` items alone: a turn of an agent's loop
    that continues an earlier response (``previous_response_id`` holds the rest). Such a turn is a valid call
    even when every output is empty (a tool that returned nothing), though it has no text to send."""
    inp = body.get("input") if isinstance(body, dict) else None
    return isinstance(inp, list) and bool(inp) and all(
        isinstance(m, dict) and m.get("type") == "function_call_output" for m in inp)


def block_call_text(block: dict) -> str:
    """What an Anthropic ``tool_use`` content block bills: its name and input, as canonical JSON ("" for any
    other block; a ``tool_result``'s content is text and images, counted as such)."""
    return _canonical({"name": block.get("name"), "input": block.get("input")}) if block.get("type") == "tool_use" else ""


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


def _items(body: dict) -> list[dict]:
    out: list[dict] = []
    for key in ("messages", "input"):
        msgs = body.get(key)
        out.extend(m for m in (msgs if isinstance(msgs, list) else ()) if isinstance(m, dict))
    return out


def image_tokens(rule: ImageInput | None, size: tuple[int, int] | None, detail: str = "auto") -> int:
    """Tokens of one image of ``size`` (width, height; None: unknown, so the rule's largest count)."""
    rule = rule or DEFAULT_IMAGE_INPUT
    if rule.scheme == "tiles":
        if detail == "low":
            return rule.base_tokens
        if size is None:
            return rule.base_tokens + 8 * rule.tile_tokens
        w, h = size
        fit = min(1.0, 2048 / max(w, h))
        w, h = w * fit, h * fit
        short = min(1.0, 768 / min(w, h))
        w, h = w * short, h * short
        return rule.base_tokens + rule.tile_tokens * math.ceil(w / 512) * math.ceil(h / 512)
    if rule.scheme == "patches":
        patches = _MAX_PATCHES if size is None else _patches(*size)
        return math.ceil(patches * rule.multiplier)
    if size is None:
        return rule.max_tokens
    w, h = size
    scale = min(1.0, 1568 / max(w, h))
    return min(rule.max_tokens, math.ceil(w * scale * h * scale / 750))


def _patches(w: int, h: int) -> int:
    n = math.ceil(w / _PATCH) * math.ceil(h / _PATCH)
    if n <= _MAX_PATCHES:
        return n
    # Scaled down to fit the budget, then to a whole number of patches across (OpenAI's documented steps).
    shrink = math.sqrt(_MAX_PATCHES * _PATCH**2 / (w * h))
    w2, h2 = w * shrink, h * shrink
    fit = math.floor(w2 / _PATCH) / (w2 / _PATCH)
    return min(_MAX_PATCHES, math.ceil(w2 * fit / _PATCH) * math.ceil(h2 * fit / _PATCH))


def image_size(source: str) -> tuple[int, int] | None:
    """(width, height) read from an image's header when ``source`` carries the image (a ``data:`` URL or bare
    base64); None for a URL or a header this does not know."""
    if source.startswith("data:"):
        source = source.partition(",")[2]
    elif source.startswith(("http://", "https://", "file:")) or not source:
        return None
    head = source[:_HEAD_B64]
    try:
        raw = base64.b64decode(head[: len(head) // 4 * 4])
    except (binascii.Error, ValueError):
        return None
    try:
        size = _size_of(raw)
    except (struct.error, IndexError):
        return None
    # A width or height of 0 says nothing (a JPEG may give its height later, in a DNL segment); as a size it
    # would be divided by, or count the image as no tokens.
    return size if size is not None and min(size) > 0 else None


def _size_of(b: bytes) -> tuple[int, int] | None:
    if b.startswith(b"\x89PNG\r\n\x1a\n"):
        return struct.unpack(">II", b[16:24])
    if b[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", b[6:10])
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        chunk = b[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little")
        if chunk == b"VP8L":
            bits = int.from_bytes(b[21:25], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", b[26:30])
            return w & 0x3FFF, h & 0x3FFF
        return None
    if b[:2] == b"\xff\xd8":  # JPEG: walk the segments to a start-of-frame marker
        i = 2
        while i + 9 < len(b):
            if b[i] != 0xFF:
                return None
            marker = b[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", b[i + 5:i + 9])
                return w, h
            i += 2 + struct.unpack(">H", b[i + 2:i + 4])[0]
    return None
