"""The emulator's token convention: a prompt's text, its cache breakpoints, its token count and the output.

Tokens are ``ceil(chars / 4)``, the engine's own estimate (``Settings.chars_per_token``), so a caller that
estimates from the same text gets the same counts the emulator bills.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, NamedTuple

from engine.core._api_fields import anthropic_block
from engine.core.body_tokens import (
    TEXT_PARTS,
    ImageInput,
    ToolPrompt,
    block_call_text,
    call_texts,
    image_blocks,
    image_size,
    image_tokens,
    tool_output_parts,
    tool_prompt_tokens,
)
from engine.emulator._wire import ApiError

__all__ = [
    "CHARS_PER_TOKEN",
    "MARKER",
    "Prompt",
    "anthropic_prompt",
    "chat_prompt",
    "filler_text",
    "forced_tool",
    "natural_tokens",
    "responses_prompt",
    "tokens",
]

CHARS_PER_TOKEN = 4
MARKER = "[[emulator:output_tokens=N]]"
_MARKER_RE = re.compile(r"\[\[emulator:output_tokens=(\d+)\]\]")
# A line separator (U+2028) as models sometimes write one: JSON leaves it raw inside a string, so a JSONL
# reader that splits lines at it (str.splitlines) breaks on the emulator's batch files as on a provider's.
_FILLER = " lorem ipsum dolor sit amet, consectetur adipiscing elit,\u2028sed do eiusmod tempor incididunt"


class Prompt(NamedTuple):
    """The request's text in cache order (tools, system/instructions, messages), the character offsets where
    a block marked ``cache_control`` ends, the text of the last user message (where the marker is read), and
    the offsets where every block ends (tools, content blocks, string contents: where a cache looks back)."""

    text: str
    breakpoints: tuple[int, ...]
    last_user: str
    bounds: tuple[int, ...] = ()
    hour_marks: frozenset[int] = frozenset()  # the breakpoints marked ``ttl: "1h"`` (Anthropic's one-hour entry)

    @property
    def tokens(self) -> int:
        return tokens(len(self.text))


def tokens(chars: int) -> int:
    """Tokens of ``chars`` characters of text: ``ceil(chars / 4)``."""
    return -(-chars // CHARS_PER_TOKEN)


def natural_tokens(last_user: str, default: int) -> int:
    """The output the "model" wants to write: N from the last ``[[emulator:output_tokens=N]]``, else ``default``."""
    hits = _MARKER_RE.findall(last_user)
    return int(hits[-1]) if hits else default


def filler_text(prompt_text: str, output_tokens: int) -> str:
    """Exactly ``4 * output_tokens`` characters, deterministic, and different for different prompts (it starts
    with a digest of the prompt), so a result paired with the wrong request shows."""
    n = CHARS_PER_TOKEN * output_tokens
    head = f"[emulator {hashlib.sha256(prompt_text.encode()).hexdigest()[:16]}]"
    reps = n // len(_FILLER) + 1
    return (head + _FILLER * reps)[:n]


# The roles each wire format takes in its messages (openai/types/chat, anthropic/types/message_param.py).
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# A system message is billed as any other where a model takes one (mid-conversation; the rule per model:
# ``_anthropic._system_messages``, which answers the others 400 first).
_ANTHROPIC_ROLES = ("user", "assistant", "system")
_RESPONSES_ROLES = ("system", "developer", "user", "assistant")
_MAX_BREAKPOINTS = 4  # Anthropic's documented limit of cache_control blocks in one request
# Part types of the other API, which each refuses ("Input tag 'image_url' found using 'type' does not match ...").
_NOT_CHAT = frozenset({"image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"})
_NOT_ANTHROPIC = frozenset({"image_url", "input_image", "input_text", "output_text", "file", "input_file",
                            "input_audio", "refusal"})


class _Builder:
    def __init__(self, images: ImageInput | None = None, roles: tuple[str, ...] = _CHAT_ROLES,
                 anthropic: bool = False) -> None:
        self.images = images  # the model's rule for input images (None: the engine's default)
        self.roles = roles
        self.anthropic = anthropic  # Anthropic's rules: cache_control checked, system text only
        self.foreign = _NOT_ANTHROPIC if anthropic else _NOT_CHAT if roles == _CHAT_ROLES else frozenset()
        self.parts: list[str] = []
        self.length = 0
        self.breakpoints: list[int] = []
        self.bounds: list[int] = []
        self.last_user = ""
        self.marks = 0  # cache_control blocks seen (Anthropic)
        self.hour_marks: set[int] = set()
        self._hour = False  # the block being marked asked for the one-hour entry

    def add(self, text: str, marked: bool) -> None:
        self.parts.append(text)
        self.length += len(text)
        if marked:
            self.mark()

    def mark(self) -> None:
        """A breakpoint where the text so far ends (the end of a block marked ``cache_control``)."""
        self.end_block()
        if self.length > 0 and (not self.breakpoints or self.breakpoints[-1] != self.length):
            self.breakpoints.append(self.length)
        if self.length > 0 and self._hour:
            self.hour_marks.add(self.length)
        self._hour = False

    def end_block(self) -> None:
        """A block ends where the text so far ends."""
        if self.length > 0 and (not self.bounds or self.bounds[-1] != self.length):
            self.bounds.append(self.length)

    def tools(self, tools: Any, hidden: int = 0) -> None:
        # Tool definitions are tokens too and come first in the cache prefix (both providers document this
        # order); they are counted as their canonical JSON without the cache_control marker. The system prompt
        # a provider adds for tool use (``hidden`` tokens, Anthropic's) goes before them: a cached prefix that
        # covers the tools covers it, and the prefix of a call with tools is the same for the same tool choice.
        if tools is None:
            return
        if not isinstance(tools, list):
            raise ApiError(400, "tools must be a list", param="tools")
        if tools and hidden:
            self.add(_stand_in("[tool use system prompt]", hidden), False)
        for tool in tools:
            if not isinstance(tool, dict):
                raise ApiError(400, "each tool must be an object", param="tools")
            plain = {k: v for k, v in tool.items() if k != "cache_control"}
            self.add(json.dumps(plain, sort_keys=True, separators=(",", ":")), self._marked(tool, "tools"))
            self.end_block()

    def content(self, content: Any, where: str, text_only: bool = False) -> str:
        """Add a message's content (a string or a list of blocks; ``text_only``: text blocks only, as
        Anthropic's system prompt); return its text."""
        if content is None:
            return ""
        if isinstance(content, str):
            self.add(content, False)
            self.end_block()
            return content
        if not isinstance(content, list):
            raise ApiError(400, f"{where} must be a string or a list of content blocks", param=where)
        texts = []
        for n, block in enumerate(content):
            if not isinstance(block, dict):
                raise ApiError(400, f"each block of {where} must be an object", param=where)
            if block.get("type") in self.foreign or self.anthropic and not anthropic_block(block.get("type")):
                raise ApiError(400, f"{where}.{n}.type: Input tag {block.get('type')!r} found using 'type' does not "
                               "match any of the expected tags", param=f"{where}.{n}.type")
            # A marked block is one breakpoint, where the block ends. Its parts are added unmarked: marked,
            # the empty call text of a text block put a breakpoint where the block starts, an entry Anthropic
            # never makes, which a later call that stopped one block short read.
            for source, detail in image_blocks([block]):
                # An image is billed by its provider's rule (engine.core.body_tokens), the engine's estimate
                # too; it stands in the cache order as text of that many tokens, the same for the same image.
                self.add(_image_text(source, image_tokens(self.images, image_size(source), detail)), False)
            if block.get("type") == "tool_result":  # its content is text and images, billed as such
                texts.append(self.content(block.get("content"), f"{where}[{n}].content"))
            else:
                # A tool call is billed as input too: its name and arguments (engine.core.body_tokens, as the
                # engine's estimate counts it).
                self.add(block_call_text(block), False)
                text = block.get("text") if block.get("type") in TEXT_PARTS else ""
                if not isinstance(text, str):  # null or missing too: both APIs answer 400
                    raise ApiError(400, f"{where}[{n}].text: expected a string, got "
                                   f"{'null' if text is None else type(text).__name__}",
                                   param=f"{where}[{n}].text")
                if self.anthropic and block.get("type") == "text" and not text:
                    raise ApiError(400, f"{where}.{n}: text content blocks must be non-empty", param=f"{where}.{n}")
                self.add(text, False)
                texts.append(text)
            if text_only and block.get("type") != "text":
                raise ApiError(400, f"{where}.{n}: must be a text block; {where} takes text only",
                               param=f"{where}.{n}")
            if self._marked(block, f"{where}.{n}"):
                self.mark()
            self.end_block()
        return "".join(texts)

    def _marked(self, block: dict, where: str) -> bool:
        cc = block.get("cache_control")
        if cc is None or not self.anthropic:
            return _marked(block)
        if not isinstance(cc, dict) or cc.get("type") != "ephemeral" or cc.get("ttl", "5m") not in ("5m", "1h"):
            raise ApiError(400, f"{where}.cache_control: Input should be {{'type': 'ephemeral'}} with an optional "
                           f"ttl of '5m' or '1h', got {cc!r}", param=f"{where}.cache_control")
        self.marks += 1
        self._hour = cc.get("ttl") == "1h"
        if self.marks > _MAX_BREAKPOINTS:
            raise ApiError(400, f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                           f"Found {self.marks}.", param=f"{where}.cache_control")
        return True

    def messages(self, messages: Any, param: str) -> None:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, f"'{param}' must be a non-empty list of messages", param=param)
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"{param}[{i}] must be an object with 'role' and 'content'", param=param)
            if m.get("type", "message") != "message":  # a Responses function call or its output
                # A tool output's text and image parts, billed as a message's are (the engine's estimate too).
                self.content(tool_output_parts(m), f"{param}[{i}].output")
                for t in call_texts(m):
                    self.add(t, False)
                continue
            if m.get("role") not in self.roles:
                raise ApiError(400, f"{param}[{i}].role: Input should be one of {', '.join(map(repr, self.roles))}, "
                               f"got {m.get('role')!r}", param=f"{param}[{i}].role")
            extra = sorted(k for k in m if k not in ("role", "content")) if self.anthropic else ()
            if extra:
                raise ApiError(400, f"{param}.{i}.{extra[0]}: Extra inputs are not permitted",
                               param=f"{param}.{i}.{extra[0]}")
            text = self.content(m.get("content"), f"{param}[{i}].content",
                                text_only=self.anthropic and m.get("role") == "system")
            for t in call_texts(m):  # an assistant's tool calls, after its text
                self.add(t, False)
            if m.get("role") == "user":
                self.last_user = text

    def build(self) -> Prompt:
        return Prompt("".join(self.parts), tuple(self.breakpoints), self.last_user, tuple(self.bounds),
                      frozenset(self.hour_marks))


def _image_text(source: str, n_tokens: int) -> str:
    return _stand_in(f"[image {hashlib.sha256(source.encode()).hexdigest()[:16]}]", n_tokens)


def _stand_in(head: str, n_tokens: int) -> str:
    """Text of exactly ``n_tokens`` tokens that stands for what is billed but not sent as text (an image, a
    provider's own prompt): ``head`` repeated, so the same thing is the same text in the cache order."""
    n = CHARS_PER_TOKEN * n_tokens
    return (head * (n // len(head) + 1))[:n]


def _marked(block: dict) -> bool:
    cc = block.get("cache_control")
    return isinstance(cc, dict) and cc.get("type") == "ephemeral"


def chat_prompt(body: dict, images: ImageInput | None = None, tool_prompt: ToolPrompt | None = None) -> Prompt:
    """OpenAI chat completions: tools, then every message (system and developer messages included) in order.
    ``tool_prompt``: the system prompt the provider adds to a call with tools (the catalog's), before them."""
    b = _Builder(images)
    b.tools(body.get("tools"), tool_prompt_tokens(body, tool_prompt))
    b.messages(body.get("messages"), "messages")
    return b.build()


def responses_prompt(body: dict, images: ImageInput | None = None, tool_prompt: ToolPrompt | None = None) -> Prompt:
    """OpenAI Responses: tools, ``instructions``, then ``input`` (a string or a list of message items)."""
    b = _Builder(images, _RESPONSES_ROLES)
    b.tools(body.get("tools"), tool_prompt_tokens(body, tool_prompt))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError(400, "instructions must be a string", param="instructions")
        b.add(instructions, False)
    inp = body.get("input")
    if isinstance(inp, str):
        b.add(inp, False)
        b.last_user = inp
    else:
        b.messages(inp, "input")
    return b.build()


def anthropic_prompt(body: dict, images: ImageInput | None = None, tool_prompt: ToolPrompt | None = None) -> Prompt:
    """Anthropic messages: the tool-use system prompt (``tool_prompt``, when the body carries tools), tools,
    ``system`` (a string or text blocks), then the messages. A top-level ``cache_control`` is a breakpoint at the
    end of the last block, as the API applies it."""
    b = _Builder(images, _ANTHROPIC_ROLES, anthropic=True)
    b.tools(body.get("tools"), tool_prompt_tokens(body, tool_prompt))
    b.content(body.get("system"), "system", text_only=True)
    b.messages(body.get("messages"), "messages")
    if body.get("cache_control") is not None and b._marked(body, "request"):
        b.mark()
    return b.build()


def forced_tool(body: dict) -> str | None:
    """The name of the tool a body makes the model call, else None: ``tool_choice`` naming one, or asking for any
    (OpenAI's "required", Anthropic's ``{"type": "any"}``), which the emulator answers with the first tool. A
    tool's name sits at ``function.name`` (OpenAI chat) or ``name`` (Responses, Anthropic)."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) for t in tools):
        return None
    if isinstance(choice, dict):
        named = choice.get("name") or (choice.get("function") or {}).get("name")
        if named:
            return str(named)
        if choice.get("type") != "any":
            return None
    elif choice != "required":
        return None
    first = tools[0]
    return str(first.get("name") or (first.get("function") or {}).get("name") or "tool")
