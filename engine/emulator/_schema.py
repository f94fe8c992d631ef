"""What the emulated model writes: lorem text, or JSON that is a valid instance of the schema the request gives
(a ``json_schema`` response format, a forced tool call's parameters), so a client that parses the answer against
its schema (the SDKs' ``parse`` helpers, a tool call's arguments) works against the emulator as against a provider.

The instance is deterministic from the request: its first free-form string starts with the prompt's digest, as the
lorem text does, so an answer paired with the wrong request shows. Its output tokens are those of the text it is
(``ceil(chars / 4)``), the call's arguments' added to the message text's; an answer longer than the cap is cut
there, mid-JSON, as a provider cuts it (finish reason ``length``).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from typing import Any, NamedTuple

from engine.emulator._text import CHARS_PER_TOKEN, filler_text, forced_tool, tokens

__all__ = ["JSON_OBJECT", "Answer", "Output", "answer_of", "instance"]

# ``{"type": "json_object"}`` asks for any JSON object: the emulator writes one free-form string in one.
JSON_OBJECT: dict[str, Any] = {"type": "object", "properties": {"answer": {"type": "string"}},
                               "required": ["answer"], "additionalProperties": False}
_DEPTH = 32  # past this, arrays take their fewest items and objects their required fields at their simplest
_FORMATS = {"date": "2000-01-01", "date-time": "2000-01-01T00:00:00Z", "time": "00:00:00Z",
            "email": "emulated@example.com", "uri": "https://example.com/emulated", "hostname": "example.com",
            "ipv4": "192.0.2.1", "ipv6": "2001:db8::1", "duration": "P1D"}


class Output(NamedTuple):
    text: str  # the message's text ("" when the model writes none)
    tokens: int  # output tokens: the text's and the arguments'
    capped: bool  # cut at the cap
    args: str | None = None  # a forced tool call's arguments (JSON), None without one


class Answer(NamedTuple):
    """The shape of an answer: its text lorem (``text_schema`` None), JSON of ``text_schema``, or none at all
    (``text`` False); and, with ``call``, a tool call whose arguments follow ``call_schema`` after it."""

    text_schema: dict | None = None
    text: bool = True
    call: bool = False
    call_schema: Any = None

    def write(self, prompt: str, natural: int, budget: int) -> Output:
        """The answer to a prompt of text ``prompt``: its text sized to ``natural`` tokens (a JSON instance as long
        as its fields need, or longer where it has a free-form string to say more in), then the call's minimal
        arguments, cut at ``budget`` tokens."""
        if not self.text:
            text, want = "", 0
        elif self.text_schema is None:
            want = natural
            text = filler_text(prompt, min(natural, budget))
        else:
            text = _sized(self.text_schema, prompt, natural)
            want = tokens(len(text))
        args = _sized(self.call_schema, prompt, 0) if self.call else None
        need = tokens(len(args)) if args is not None else 0
        if want + need <= budget:
            return Output(text, want + need, False, args)
        used = min(want, budget)
        text = text[:CHARS_PER_TOKEN * used]
        if args is not None:
            args = args[:CHARS_PER_TOKEN * (budget - used)]
        return Output(text, budget, True, args)


def answer_of(body: dict, api: str, text: bool = True) -> Answer:
    """The answer a body asks for at ``api`` ("chat", "responses" or "anthropic"): JSON of the schema its format
    names (chat's ``response_format``, Responses' ``text.format``, Anthropic's ``output_config.format``; any JSON
    object for ``json_object``), else lorem; and a call of the tool it forces, its arguments after the tool's
    parameters (``function.parameters``, ``parameters`` or ``input_schema``). ``text`` False: no text at all."""
    fmt = (body.get("response_format") if api == "chat" else
           _get(body.get("text"), "format") if api == "responses" else _get(body.get("output_config"), "format"))
    schema = None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        schema = JSON_OBJECT
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = _get(fmt.get("json_schema") if api == "chat" else fmt, "schema") or JSON_OBJECT
    name = forced_tool(body)
    if name is None:
        return Answer(schema, text)
    tool = next((t for t in body.get("tools") or () if isinstance(t, dict) and
                 (t.get("name") or _get(t.get("function"), "name")) == name), {})
    params = _get(tool.get("function"), "parameters") if api == "chat" else tool.get(
        "parameters" if api == "responses" else "input_schema")
    return Answer(schema, text, True, params if isinstance(params, dict) else {"type": "object"})


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _sized(schema: Any, prompt: str, natural: int) -> str:
    """JSON of an instance of ``schema``; with a free-form string, ``4 * natural`` characters long if that is
    longer than the instance at its shortest (the string says more), as lorem text of ``natural`` tokens is."""
    head = filler_text(prompt, 7)[:-1]  # "[emulator <digest>]": the lorem text's first 27 characters
    value, free = instance(schema, head)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    extra = CHARS_PER_TOKEN * natural - len(text)
    if not free or extra <= 0:
        return text
    longer = filler_text(prompt, tokens(len(head) + extra))[:len(head) + extra]
    return text.replace(json.dumps(head, ensure_ascii=False), json.dumps(longer, ensure_ascii=False), 1)


def instance(schema: Any, head: str) -> tuple[Any, bool]:
    """A value valid against ``schema`` (``$defs``/``$ref`` resolved against it) and whether it has a free-form
    string (no enum, const, format, pattern or maxLength), the first of which is ``head``."""
    gen = _Gen(schema if isinstance(schema, dict) else {}, head)
    return gen.value(schema, 0), gen.free


class _Gen:
    def __init__(self, root: dict, head: str) -> None:
        self.root, self.head, self.free = root, head, False

    def resolve(self, schema: dict) -> dict:
        for _ in range(_DEPTH):  # a chain of references; a local JSON pointer, as pydantic writes them
            ref = schema.get("$ref")
            if not isinstance(ref, str) or not ref.startswith("#"):
                return schema
            target: Any = self.root
            for part in (p for p in ref[1:].split("/") if p):
                target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema

    def value(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict):
            return self.string({})
        if depth > 3 * _DEPTH:  # a schema that requires itself without end: no instance exists; stop somewhere
            return None
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                # A nullable field gets its value, not null: a client's parsing of it is what a test wants to see.
                # Deep in a recursive schema, null ends it.
                null = [o for o in options if isinstance(o, dict) and self.resolve(o).get("type") == "null"]
                real = [o for o in options if o not in null]
                pick = (real if real and (depth <= _DEPTH or not null) else null)[0]
                rest = {k: v for k, v in schema.items() if k not in (key, "default")}
                return self.value({**rest, **pick} if isinstance(pick, dict) else {}, depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part) if isinstance(part, dict) else {}
                merged = {**merged, **part, "properties": {**merged.get("properties", {}),
                                                           **part.get("properties", {})},
                          "required": [*merged.get("required", []), *part.get("required", [])]}
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        if kind == "object":
            props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
            required = [k for k in schema.get("required") or () if isinstance(k, str)]
            return {k: self.value(props.get(k, {}), depth + 1) for k in dict.fromkeys(required)}
        if kind == "array":
            return self.array(schema, depth)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.string(schema)

    def array(self, schema: dict, depth: int) -> list:
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        n = max(lo, 0 if depth > _DEPTH else 1)
        n = min(n, hi) if isinstance(hi, int) else n
        prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
        items = schema.get("items", {})
        return [self.value(prefix[i] if i < len(prefix) else items, depth + 1)
                for i in range(max(n, len(prefix)))]

    def string(self, schema: dict) -> str:
        fmt = schema.get("format")
        if fmt == "uuid":
            return str(uuid.UUID(hashlib.sha256(self.head.encode()).hexdigest()[:32], version=4))
        if fmt in _FORMATS:
            return _FORMATS[fmt]
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if fmt is None and "pattern" not in schema and hi is None and not self.free:
            self.free = True
            text = self.head
        else:
            text = "emulated"
        text = (text + "x" * lo)[:max(lo, len(text))] if isinstance(lo, int) and len(text) < lo else text
        return text[:hi] if isinstance(hi, int) else text


def _number(schema: dict, integer: bool) -> int | float:
    """1 if it fits the bounds, else a value inside them (their midpoint when both are given)."""
    lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum", max)
    hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum", min)
    if integer:
        lo = None if lo is None else math.floor(lo) + 1 if lo_open and lo == math.floor(lo) else math.ceil(lo)
        hi = None if hi is None else math.ceil(hi) - 1 if hi_open and hi == math.ceil(hi) else math.floor(hi)
        lo_open = hi_open = False
    fits = (lo is None or (1 > lo if lo_open else 1 >= lo)) and (hi is None or (1 < hi if hi_open else 1 <= hi))
    if fits:
        value: float = 1
    elif lo is not None and hi is not None:
        value = (lo + hi) / 2
    elif lo is not None:
        value = lo + 1 if lo_open else lo
    else:
        value = hi - 1 if hi_open else hi  # type: ignore[operator]  # 1 did not fit, so hi is set
    step = schema.get("multipleOf")
    if isinstance(step, (int, float)) and step > 0:
        value = math.ceil(value / step) * step
    return int(math.floor(value)) if integer else value


def _bound(schema: dict, inclusive: str, exclusive: str, tighter: Any) -> tuple[float | None, bool]:
    vals = [(v, False) for v in (schema.get(inclusive),) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    vals += [(v, True) for v in (schema.get(exclusive),) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not vals:
        return None, False
    best = tighter(v for v, _ in vals)
    return best, any(v == best and open_ for v, open_ in vals)
