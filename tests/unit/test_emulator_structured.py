"""Structured outputs against the emulator: a ``json_schema`` answer and a forced tool call's arguments are
instances of the schema the request gives, so the SDKs' parse helpers work against it; their tokens are billed
as the text they are. Each was lorem text or ``{}`` before."""

from __future__ import annotations

import enum
import json

import jsonschema
import pydantic
import pytest

from engine.emulator import MARKER
from engine.emulator._schema import instance
from engine.emulator._text import tokens
from tests.unit.test_emulator import Emulator, Sdk, emu, sdk, user  # noqa: F401  (emu, sdk: the fixtures)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Part(pydantic.BaseModel):
    name: str
    weight_kg: float = pydantic.Field(ge=2.5, le=3.0)


class Order(pydantic.BaseModel):
    title: str
    color: Color
    parts: list[Part]
    count: int = pydantic.Field(gt=10)
    note: str | None = None
    urgent: bool


class Plain(pydantic.BaseModel):
    color: Color
    names: list[str]
    note: str | None


def asks(n: int, text: str = "An order, please.") -> list[dict]:
    return user(f"{text} {MARKER.replace('N', str(n))}")


def test_chat_parse_with_a_pydantic_model_gets_an_instance_billed_as_its_text(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.openai()
    done = client.chat.completions.parse(model="gpt-4o-mini", messages=asks(120), response_format=Order)
    order, msg = done.choices[0].message.parsed, done.choices[0].message
    assert isinstance(order, Order) and order.parts and isinstance(order.parts[0], Part)
    assert order.note is not None and 2.5 <= order.parts[0].weight_kg <= 3.0 and order.count > 10
    # As long as the marker asks (a free-form string says more), and billed as that text.
    assert len(msg.content) == 4 * 120 and done.usage.completion_tokens == 120
    assert emu.bill().items[-1].usage["output_tokens"] == 120
    other = client.chat.completions.parse(model="gpt-4o-mini", messages=asks(120, "Another."), response_format=Order)
    assert other.choices[0].message.parsed.title != order.title  # seeded by the prompt, as the lorem text is
    again = client.chat.completions.parse(model="gpt-4o-mini", messages=asks(120), response_format=Order)
    assert again.choices[0].message.content == msg.content
    # Fewer tokens asked than the instance needs: the whole instance, billed as what it is.
    short = client.chat.completions.parse(model="gpt-4o-mini", messages=asks(1), response_format=Order)
    assert short.choices[0].message.parsed is not None
    assert short.usage.completion_tokens == tokens(len(short.choices[0].message.content)) > 1


def test_responses_json_schema_and_forced_tool_calls_follow_their_schemas(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.openai()
    schema = Order.model_json_schema()
    parsed = client.responses.parse(model="gpt-4o-mini", input="An order.", text_format=Order)
    assert isinstance(parsed.output_parsed, Order)
    params = {"type": "object", "additionalProperties": False, "required": ["city", "days", "order", "when"],
              "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 3, "maximum": 9},
                             "when": {"type": "string", "format": "date"}, "order": {"$ref": "#/$defs/Order"}},
              "$defs": {**schema.pop("$defs"), "Order": schema}}
    tool = {"type": "function", "function": {"name": "book", "parameters": params, "strict": True}}
    done = client.chat.completions.create(model="gpt-4o-mini", messages=asks(5), tools=[tool], tool_choice="required")
    (call,) = done.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, params)
    Order.model_validate(args["order"])
    # The call's arguments are output too: the text's 5 tokens and theirs.
    assert done.usage.completion_tokens == 5 + tokens(len(call.function.arguments))
    # Past the cap the arguments are cut there, as a provider cuts them, and the answer says so.
    cut = client.chat.completions.create(model="gpt-4o-mini", messages=asks(5), tools=[tool], tool_choice="required",
                                         max_completion_tokens=8)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 8
    assert cut.choices[0].message.tool_calls[0].function.arguments == call.function.arguments[:4 * 3]
    rtool = {"type": "function", "name": "book", "parameters": params, "strict": True}
    resp = client.responses.create(model="gpt-4o-mini", input="Book.", tools=[rtool], tool_choice="required")
    jsonschema.validate(json.loads(resp.output[-1].arguments), params)


def test_a_forced_anthropic_tool_use_and_output_format_follow_their_schemas(emu: Emulator, sdk: Sdk):  # noqa: F811
    claude = sdk.anthropic()
    schema = Order.model_json_schema()
    tools = [{"name": "order", "input_schema": schema}]
    forced = claude.messages.create(model="claude-sonnet-4-5", max_tokens=500, messages=asks(50), tools=tools,
                                    tool_choice={"type": "tool", "name": "order"})
    (use,) = forced.content
    order = Order.model_validate(use.input)
    assert order.parts and forced.stop_reason == "tool_use"
    # The call is the whole answer: billed as its input, not as text it does not write.
    assert forced.usage.output_tokens == tokens(len(json.dumps(use.input, ensure_ascii=False, separators=(",", ":"))))
    # Anthropic's parse helper sends numeric bounds as description text only, which the emulator does not read.
    parsed = claude.messages.parse(model="claude-sonnet-4-5", max_tokens=500, messages=asks(50),
                                   output_format=Plain)
    assert isinstance(parsed.parsed_output, Plain) and parsed.usage.output_tokens == 50


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 6}, "minItems": 3,
     "maxItems": 4},
    {"type": ["number", "null"], "minimum": -9, "maximum": -7},
    {"anyOf": [{"type": "null"}, {"type": "string", "format": "uuid"}]},
    {"type": "string", "enum": ["a", "b"]},
    {"const": 7},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 12, "maxLength": 14}}, "required": ["s"]},
    {"type": "object", "properties": {"t": {"type": "array", "items": {"$ref": "#"}}}, "required": ["t"]},
    {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "required": ["next"], "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}}},
])
def test_an_instance_is_valid_for_each_feature_of_the_structured_outputs_subset(schema: dict):
    value, _ = instance(schema, "[emulator 0123456789abcdef]")
    jsonschema.validate(value, schema)
