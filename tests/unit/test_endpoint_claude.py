"""A Claude model asked through ``/v1/chat/completions`` with the official ``openai`` SDK: the endpoint under uvicorn,
an engine stand-in that makes one sync call through the real Anthropic HTTP provider, and the emulator's Anthropic
side behind it (no Ray). OpenAI's ``stop``, ``max_completion_tokens`` and ``user`` were refused ("Anthropic's is
stop_sequences"), so an application could not change only its ``model`` (a helper's tour); so were its function
tools, tool calls and tool messages, and its images."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import openai
import pytest

from actors._count_tokens import count_by
from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.core.request import Request, validation_context
from engine.core.result import Result
from engine.emulator import Emulator
from engine.emulator._text import anthropic_prompt
from engine.runtime.outcomes import reused_result
from tests.unit.test_body_tokens import TOOL_USE_PROMPT
from tests.unit.test_endpoint import serving
from tests.unit.test_http_providers import CAT, SPEED, direct, http_settings, job_of

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
MODEL = "claude-sonnet-4-5"


class OneCallEngine:
    """The engine's asyncio face, each request one sync call through the Anthropic provider alone; keeps the body
    each call sent on the wire and each request. The provider is made on the serving loop, where its client lives.
    A body answered before is answered again from that answer, as the cache's exact hit (``reused_result``)."""

    def __init__(self, emu: Emulator):
        self.emu, self.settings, self.gone = emu, http_settings(emu), None
        self._ctx = validation_context(CAT, self.settings, live=True)
        self.wire: dict[str, dict] = {}
        self.reqs: dict[str, Request] = {}
        self.answered: dict[str, Result] = {}  # by the body's JSON
        self.provider, self.loop = None, None

    async def asubmit(self, d: dict) -> Result:
        req = Request.model_validate({**d, "arrival_s": 0.0}, context=self._ctx)
        self.reqs[req.id] = req
        seen = self.answered.get(json.dumps(req.body, sort_keys=True))
        if seen is not None and req.reuse != "none":
            return reused_result(req, at=0.0, hit="exact", source_id=seen.id, output=seen.output,
                                 tool_calls=seen.tool_calls, finish=seen.finish, usage=seen.usage)
        job = job_of(req)
        job = job._replace(body=self._provider().sync_body(job))
        self.wire[req.id] = job.body
        out = await self._provider().call(job)
        assert out.ok, out.error
        res = Result(id=req.id, tenant=req.tenant, status="ok", output=out.output, tool_calls=out.tool_calls,
                     finish=out.finish, usage=out.usage.as_dict(), raw=out.raw, real=True, cost_usd=out.cost,
                     mode="sync", provider=req.provider, model=req.model)
        self.answered[json.dumps(req.body, sort_keys=True)] = res
        return res

    async def asubmit_many(self, ds: list[dict]) -> list[Result]:
        return [await self.asubmit(d) for d in ds]

    async def count_tokens(self, provider: str, body: dict):
        """As the engine's: the count asked by the provider the dispatcher holds, with its key (``count_by``)."""
        return await count_by(self._provider(), provider, self.settings, body)

    def _provider(self):
        if self.provider is None:
            self.provider, self.loop = direct(self.emu, "anthropic"), asyncio.get_running_loop()
        return self.provider

    def close(self) -> None:
        if self.provider is not None:
            asyncio.run_coroutine_threadsafe(self.provider.close(), self.loop).result(10)


@pytest.fixture(scope="module")
def claude():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = OneCallEngine(emu)
        with serving(make_app(eng, catalog=CAT)) as url, \
                openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=20) as client:
            try:
                yield eng, client, emu
            finally:
                eng.close()


def test_a_claude_model_answers_an_openai_chat_call_translated_to_messages(claude):
    eng, client, emu = claude
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0.2, stop=["\n\nHuman:"], max_completion_tokens=4000, user="u-7",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}],
        extra_headers={endpoint.HEADER_REQUEST_ID: "k1"})
    done = raw.parse()
    wire = eng.wire["k1"]  # what Anthropic's Messages API got: its own names, nothing it refuses
    assert wire["stop_sequences"] == ["\n\nHuman:"] and wire["max_tokens"] == 4000
    assert wire["metadata"] == {"user_id": "u-7"} and wire["temperature"] == 0.2
    assert not {"stop", "max_completion_tokens", "user", "n"} & set(wire)
    assert wire["system"] == "Be brief." and wire["messages"] == [{"role": "user", "content": "Name three rivers."}]
    assert done.object == "chat.completion" and done.model == MODEL and done.choices[0].finish_reason == "stop"
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
    # Anthropic's usage, in OpenAI's words; the cost the provider billed.
    (bill,) = [i for i in emu.bill().items if i.model == MODEL and i.mode == "sync"]
    assert done.usage.completion_tokens == bill.usage["output_tokens"] > 0
    assert done.usage.prompt_tokens == sum(bill.usage.get(k, 0) for k in (
        "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")) > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert float(raw.headers[endpoint.HEADER_COST]) == pytest.approx(bill.cost_usd)
    assert raw.headers[endpoint.HEADER_MODE] == "sync"


def test_a_claude_answer_cut_at_its_cap_is_finish_reason_length_and_streams(claude):
    _, client, _ = claude
    cut = client.chat.completions.create(model=MODEL, max_tokens=1, stop="END",
                                         messages=[{"role": "user", "content": "Write a long story."}])
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=1, stream=True, n=2,
                                                 messages=[{"role": "user", "content": "Write a long story."}]))
    assert sorted(ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason) == ["length"] * 2


def test_what_messages_cannot_carry_is_a_400_naming_the_callers_field(claude):
    _, client, _ = claude
    ask = [{"role": "user", "content": "x"}]
    for kw, param in ((dict(seed=3), "seed"), (dict(store=True), "store"), (dict(stop=[1]), "stop"),
                      (dict(max_tokens=5, max_completion_tokens=5), "max_completion_tokens"),
                      (dict(max_completion_tokens=0), "max_completion_tokens"), (dict(temperature=1.5), "temperature")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=ask, **kw)
        assert exc.value.param == param, (kw, exc.value.message)


def test_a_renamed_field_the_engine_refuses_is_named_in_the_message_as_the_caller_sent_it(claude):
    # The param was the caller's, but the message read "field 'body.max_tokens': body.max_tokens 10000000 is over
    # ...": a field the caller never sent (a review).
    _, client, _ = claude
    ask = [{"role": "user", "content": "x"}]
    for cap in (10**7, 0, "5"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=ask, max_completion_tokens=cap)
        message = exc.value.body["message"]
        assert exc.value.param == "max_completion_tokens", message
        assert message.startswith("field 'max_completion_tokens': max_completion_tokens ") and "max_tokens" not in \
            message.replace("max_completion_tokens", ""), message


def test_a_blank_stop_is_a_400_naming_stop_before_anything_is_sent(claude):
    # OpenAI takes stop: "\n"; Anthropic refuses it as a stop sequence, after the request was accepted (a review).
    eng, client, emu = claude
    sent = len(emu.bill().items)
    for stop in ("\n", ["END", "  "]):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stop=stop,
                                           max_tokens=5)
        message = exc.value.body["message"]
        assert exc.value.param == "stop" and message.startswith("field 'stop': stop must be") and \
            "whitespace" in message and "stop_sequences" not in message, message
    assert len(emu.bill().items) == sent


# -- function calling ----------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False},
    "strict": True}}


def billed_input(item) -> int:
    return sum(int(item.usage.get(k, 0)) for k in ("input_tokens", "cache_read_input_tokens",
                                                   "cache_creation_input_tokens"))


def test_a_function_calling_app_switches_to_a_claude_model_changing_only_its_model(claude):
    # OpenAI's tools, tool_choice, an assistant's tool_calls and tool messages were refused for a Claude model
    # ("refused, not translated"): an application that calls functions could not switch.
    eng, client, emu = claude
    ask = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is the weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    sent = len(emu.bill().items)
    first = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice=named,
                                           parallel_tool_calls=False, max_completion_tokens=300,
                                           extra_headers={endpoint.HEADER_REQUEST_ID: "fc1"})
    wire, fn = eng.wire["fc1"], WEATHER["function"]
    assert wire["tools"] == [{"name": "get_weather", "description": fn["description"],
                              "input_schema": fn["parameters"], "strict": True}]
    assert wire["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert "parallel_tool_calls" not in wire
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.type == "function" and call.function.name == "get_weather" and args["unit"] == "C" and \
        isinstance(args["city"], str)
    # The tools are billed as input, and Anthropic's tool-use prompt for a forced call before them; the estimate
    # the budget reserves on counted both.
    bill = emu.bill().items[sent]
    assert billed_input(bill) == anthropic_prompt(wire).tokens + TOOL_USE_PROMPT["tool"]
    assert first.usage.prompt_tokens == billed_input(bill) <= eng.reqs["fc1"].input_tokens

    # The application sends the assistant's message back as the SDK gave it, and the tool's result.
    again = [*ask, choice.message, {"role": "tool", "tool_call_id": call.id, "content": "12 C, clear"}]
    final = client.chat.completions.create(model=MODEL, messages=again, tools=[WEATHER], tool_choice="auto",
                                           max_completion_tokens=300, extra_headers={endpoint.HEADER_REQUEST_ID: "fc2"})
    assert eng.wire["fc2"]["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": "get_weather", "input": args}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12 C, clear"}]}]
    assert eng.wire["fc2"]["tool_choice"] == {"type": "auto"}
    done = final.choices[0]
    assert done.finish_reason == "stop" and done.message.content and not done.message.tool_calls
    assert final.usage.prompt_tokens == billed_input(emu.bill().items[sent + 1]) <= eng.reqs["fc2"].input_tokens


def test_a_claude_tool_call_streams_and_comes_back_from_the_cache_in_the_chat_shape(claude):
    eng, client, emu = claude
    ask = [{"role": "user", "content": "Weather in Bergen, please."}]
    kw = dict(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=1000)
    chunks = list(client.chat.completions.create(stream=True, extra_headers={endpoint.HEADER_REQUEST_ID: "st1"},
                                                 **kw))
    assert eng.wire["st1"]["tool_choice"] == {"type": "any"}
    (call,) = [c for ch in chunks for d in ch.choices for c in d.delta.tool_calls or ()]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] == "C"
    assert [d.finish_reason for ch in chunks for d in ch.choices if d.finish_reason] == ["tool_calls"]
    sent = len(emu.bill().items)
    raw = client.chat.completions.with_raw_response.create(extra_headers={endpoint.HEADER_REQUEST_ID: "st2"}, **kw)
    hit = raw.parse().choices[0]  # the same body: answered from the first answer, nothing sent
    assert raw.headers[endpoint.HEADER_MODE] == "reuse" and len(emu.bill().items) == sent and "st2" not in eng.wire
    assert hit.finish_reason == "tool_calls" and hit.message.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in hit.message.tool_calls] == \
        [(call.id, "get_weather", call.function.arguments)]


def png(width: int, height: int) -> str:
    """A PNG's header (all the engine and the emulator read of it), as base64."""
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" +
                            struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00").decode()


def test_an_image_part_goes_to_a_claude_model_as_an_image_block_and_is_reserved_for(claude):
    eng, client, emu = claude
    data = png(750, 400)  # 400 tokens by Anthropic's area rule
    content = [{"type": "text", "text": "Which is sunnier?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}", "detail": "high"}},
               {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}}]
    sent = len(emu.bill().items)
    done = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=50, extra_headers={endpoint.HEADER_REQUEST_ID: "im1"})
    assert eng.wire["im1"]["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}}]
    # Billed by the image rule (a URL at its largest), and the reservation counted as much.
    assert done.usage.prompt_tokens == billed_input(emu.bill().items[sent]) >= 400 + 1600
    assert eng.reqs["im1"].input_tokens >= done.usage.prompt_tokens


CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
ASKED = {"role": "user", "content": "Weather in Oslo and Rome?"}


def result(cid: str, content="12 C") -> dict:
    return {"role": "tool", "tool_call_id": cid, "content": content}


def with_call(**change) -> dict:
    call = {**CALLED["tool_calls"][0], **change}
    return {**CALLED, "tool_calls": [call, CALLED["tool_calls"][1]]}


@pytest.mark.parametrize(("kw", "param"), [
    (dict(messages=[ASKED, with_call(function={"name": "get_weather", "arguments": '{"city": "Oslo"'}),
                    result("call_1"), result("call_2")]), "messages.1.tool_calls.0.function.arguments"),
    (dict(messages=[ASKED, with_call(function={"name": "get_weather", "arguments": '["Oslo"]'}),
                    result("call_1"), result("call_2")]), "messages.1.tool_calls.0.function.arguments"),
    (dict(messages=[ASKED, CALLED, result("call_1"), result("call_9")]), "messages.3.tool_call_id"),
    (dict(messages=[ASKED, CALLED, result("call_1"), result("call_1")]), "messages.3.tool_call_id"),
    (dict(messages=[ASKED, CALLED, result("call_2"), ASKED]), "messages.1.tool_calls.0"),
    (dict(messages=[ASKED, CALLED]), "messages.1.tool_calls.0"),
    (dict(messages=[ASKED, result("call_1")]), "messages.1"),
    (dict(messages=[ASKED, with_call(id="call:1"), result("call:1"), result("call_2")]), "messages.1.tool_calls.0.id"),
    # A pattern's $ also matches before a final newline: the whole name and id must match.
    (dict(messages=[ASKED, with_call(id="call_1\n"), result("call_1\n"), result("call_2")]),
     "messages.1.tool_calls.0.id"),
    (dict(messages=[ASKED], tools=[{"type": "function", "function": {**WEATHER["function"], "name": "get_weather\n"}}]),
     "tools.0.function.name"),
    (dict(messages=[ASKED, with_call(type="custom"), result("call_1"), result("call_2")]),
     "messages.1.tool_calls.0.type"),
    (dict(messages=[ASKED], tool_choice={"type": "function", "function": {"name": "get_time"}}),
     "tool_choice.function.name"),
    (dict(messages=[ASKED], tools=None, tool_choice="required"), "tool_choice"),
    (dict(messages=[ASKED], tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}),
     "tool_choice"),
    (dict(messages=[ASKED], parallel_tool_calls="no"), "parallel_tool_calls"),
    (dict(messages=[ASKED], tools=[{"type": "custom", "custom": {"name": "sql"}}]), "tools.0.type"),
    (dict(messages=[ASKED], tools=[{"type": "function", "function": {**WEATHER["function"], "name": "get weather"}}]),
     "tools.0.function.name"),
    (dict(messages=[ASKED], tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "tools.0.function.parameters"),
    (dict(messages=[ASKED], tools=[{"type": "function", "function": {"name": "f", "examples": []}}]),
     "tools.0.function.examples"),
    (dict(messages=[ASKED], functions=[WEATHER["function"]]), "functions"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png",
                                                                                    "detail": "low"}}]}]),
     "messages.0.content.0.image_url.detail"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, {
        "type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]), "messages.0.content.1.image_url.url"),
])
def test_function_calling_a_claude_model_cannot_take_is_a_400_naming_the_callers_field(claude, kw, param):
    _, client, emu = claude
    sent = len(emu.bill().items)
    kw = {"tools": [WEATHER], **kw}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, max_tokens=50, **{k: v for k, v in kw.items() if v is not None})
    assert exc.value.param == param and exc.value.body["message"].startswith(param), exc.value.body["message"]
    assert len(emu.bill().items) == sent


def test_a_refusal_the_engine_finds_in_a_translated_message_names_the_callers_message(claude):
    # The engine reads the body as Anthropic gets it (the tool messages merged into one user message): its
    # refusal named that message, "body.messages[2].content[1].content[0].text", which the caller never sent.
    _, client, emu = claude
    messages = [ASKED, CALLED, result("call_1"), result("call_2", [{"type": "text", "text": 7}])]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, max_tokens=50, messages=messages, tools=[WEATHER])
    message = exc.value.body["message"]
    assert exc.value.param == "messages[3].content[0].text" and "'messages[3].content[0].text'" in message, message
    assert "body." not in message, message
    with pytest.raises(openai.BadRequestError) as exc:  # a forced tool where the model refuses one, in OpenAI's words
        client.chat.completions.create(model="claude-fable-5-1", max_tokens=50, messages=[ASKED], tools=[WEATHER],
                                       tool_choice="required")
    assert exc.value.param == "tool_choice" and "'auto'" in exc.value.body["message"]


def test_a_responses_app_calls_functions_on_a_claude_model_too(claude):
    # The Responses API's function tools and function_call / function_call_output items were refused for a Claude
    # model ("a Responses API field this model's API cannot carry"): the same translation takes them now.
    eng, client, emu = claude
    tool = {"type": "function", **WEATHER["function"]}
    ask = [{"role": "user", "content": "What is the weather in Lima?"}]
    sent = len(emu.bill().items)
    first = client.responses.create(model=MODEL, input=ask, tools=[tool], parallel_tool_calls=False,
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=300,
                                    extra_headers={endpoint.HEADER_REQUEST_ID: "rs1"})
    wire = eng.wire["rs1"]
    assert wire["tools"] == [{"name": "get_weather", "description": tool["description"],
                              "input_schema": tool["parameters"], "strict": True}]
    assert wire["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    (call,) = first.output
    args = json.loads(call.arguments)
    assert call.type == "function_call" and call.name == "get_weather" and args["unit"] == "C"
    assert first.usage.input_tokens == billed_input(emu.bill().items[sent]) <= eng.reqs["rs1"].input_tokens
    # The application sends the output back, and the function's result.
    again = [*ask, *first.output, {"type": "function_call_output", "call_id": call.call_id, "output": "19 C"}]
    final = client.responses.create(model=MODEL, input=again, tools=[tool], max_output_tokens=300,
                                    extra_headers={endpoint.HEADER_REQUEST_ID: "rs2"})
    assert eng.wire["rs2"]["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.call_id, "name": "get_weather",
                                           "input": args}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.call_id, "content": "19 C"}]}]
    assert final.status == "completed" and final.output_text and not [o for o in final.output
                                                                      if o.type == "function_call"]
    for bad, param in (([*ask, *first.output], "input[1]"),
                       ([*ask, {"type": "function_call_output", "call_id": call.call_id, "output": "x"}],
                        "input[1].call_id"),
                       ([*ask, *first.output, {"type": "function_call_output", "call_id": "call_9", "output": "x"}],
                        "input[2].call_id")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=MODEL, input=bad, tools=[tool], max_output_tokens=300)
        assert exc.value.param == param, exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input=ask, tools=[{"type": "web_search"}], max_output_tokens=300)
    assert exc.value.param == "tools[0]", exc.value.body["message"]


def test_a_developer_message_goes_to_a_claude_model_as_its_system_message(claude):
    # OpenAI's newer models take their instructions as a developer message; it was a 400 ("use 'system'"), so an
    # application written for them could not change only its model to a Claude one.
    eng, client, emu = claude
    billed = len(emu.bill().items)
    done = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        extra_headers={endpoint.HEADER_REQUEST_ID: "dev1"})
    assert eng.wire["dev1"]["system"] == "Be brief." and eng.wire["dev1"]["messages"][0]["role"] == "user"
    assert done.choices[0].message.content and len(emu.bill().items) == billed + 1
    # A participant's name has no field in an Anthropic message: the provider would refuse the call.
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi", "name": "ola"}])
    assert exc.value.param == "messages[0].name" and "name the speaker in the content" in exc.value.body["message"]
    assert len(emu.bill().items) == billed + 1


def test_an_assistant_message_sent_back_as_the_sdk_dumps_it_goes_to_a_claude_model(claude):
    # ``messages.append(choice.message.model_dump())`` sends every field of the SDK's message, unset ones as null
    # (tool_calls, refusal, audio, function_call, annotations), and an answer of OpenAI's own carries
    # ``"annotations": []``: each was a 400 ("not a field of an Anthropic message"), though OpenAI takes them and
    # they say nothing; a null was let pass only beside tool calls, and an empty annotations list nowhere.
    eng, client, emu = claude
    ask = [{"role": "user", "content": "Name a river."}]
    first = client.chat.completions.create(model=MODEL, messages=ask, max_completion_tokens=50)
    dumped = first.choices[0].message.model_dump()
    assert dumped["tool_calls"] is None and dumped["refusal"] is None  # as the SDK gives it
    openai_own = {"role": "assistant", "content": "The Nile.", "refusal": None, "annotations": []}
    for k, said in enumerate((dumped, openai_own, {**CALLED, "refusal": None, "annotations": [], "name": None})):
        rest = [result("call_1"), result("call_2")] if said.get("tool_calls") else []
        billed = len(emu.bill().items)
        client.chat.completions.create(
            model=MODEL, max_completion_tokens=50, tools=[WEATHER],
            messages=[*ask, said, *rest, {"role": "user", "content": "And another?"}],
            extra_headers={endpoint.HEADER_REQUEST_ID: f"dump{k}"})
        sent = eng.wire[f"dump{k}"]["messages"][1]
        assert set(sent) == {"role", "content"} and sent["role"] == "assistant", sent
        assert len(emu.bill().items) == billed + 1


def test_the_leading_system_messages_go_as_the_top_level_system_prompt(claude):
    # They went among the messages as role "system", which Anthropic takes only mid-conversation, after a user turn
    # and at few models: every Claude call of an application with a system prompt was refused by the provider.
    eng, client, emu = claude
    marked = {"type": "text", "text": "Rules: be brief.", "cache_control": {"type": "ephemeral"}}
    messages = [{"role": "system", "content": [marked]}, {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut."},
                {"role": "user", "content": "Again"}]
    billed = len(emu.bill().items)
    done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=50,
                                          extra_headers={endpoint.HEADER_REQUEST_ID: "sys1"})
    wire = eng.wire["sys1"]
    assert wire["system"] == [marked, {"type": "text", "text": "Answer in French."}]
    assert [m["role"] for m in wire["messages"]] == ["user", "assistant", "user"]
    assert done.usage.prompt_tokens == billed_input(emu.bill().items[billed]) <= eng.reqs["sys1"].input_tokens
    # A refusal in a lifted message names it as the caller sent it; a system prompt alone has nothing to answer.
    for bad, param in (([{"role": "system", "content": [{"type": "text", "text": ""}]}, ASKED],
                        "messages[0].content[0].text"),
                       ([{"role": "system", "content": "Be brief.", "name": "ops"}, ASKED], "messages.0.name"),
                       ([{"role": "system", "content": "Be brief."}], "messages")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=bad, max_tokens=50)
        assert exc.value.param == param, exc.value.body["message"]
    assert len(emu.bill().items) == billed + 1


def test_a_later_system_message_goes_mid_conversation_where_the_model_takes_one_and_is_a_400_elsewhere(claude):
    # A system or developer message later in the conversation went among the messages as role system at every
    # Claude model, and the provider refused the call after it was accepted (Anthropic takes one there only at a
    # few models, right after a user turn); lifted to the system prompt (the Responses route), it changed the
    # instructions of the turns before it.
    eng, client, emu = claude
    lead, hi, said = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Salut."})
    billed = len(emu.bill().items)
    for model, given, param in (
            (MODEL, [lead, hi, said, ASKED, {"role": "system", "content": "Now in English."}], "messages[4].role"),
            (MODEL, [lead, hi, {"role": "developer", "content": "Now in English."}, said, ASKED], "messages[2].role"),
            ("claude-fable-5-1", [hi, said, {"role": "system", "content": "Now in English."}, ASKED],
             "messages[2].role")):  # a model that takes one, but after an assistant turn
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=model, messages=given, max_tokens=50)
        message = exc.value.body["message"]
        assert exc.value.param == param and f"{param}: a system message" in message, message
        assert "put the system instructions first" in message and "user message" in message, message
    for given, param in (([lead, hi, {"role": "developer", "content": "Now in English."}], "input[2].role"),
                         ([hi, said, ASKED, {"role": "system", "content": "French."}], "input[3].role")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=MODEL, input=given, max_output_tokens=50)
        assert exc.value.param == param and "put the system instructions first" in exc.value.body["message"]
    assert len(emu.bill().items) == billed
    # At a model that takes one (Fable 5.1), right after a user turn, it stays where it is, as Anthropic's
    # mid-conversation system message: the instructions apply from there on, and the cached prefix before it holds.
    later = {"role": "developer", "content": "Now in English."}
    client.chat.completions.create(model="claude-fable-5-1", messages=[lead, hi, later, said, ASKED], max_tokens=50,
                                   extra_headers={endpoint.HEADER_REQUEST_ID: "mid1"})
    client.responses.create(model="claude-fable-5-1", input=[lead, hi, said, ASKED, later], max_output_tokens=50,
                            extra_headers={endpoint.HEADER_REQUEST_ID: "mid2"})
    for rid, roles in (("mid1", ["user", "system", "assistant", "user"]),
                       ("mid2", ["user", "assistant", "user", "system"])):
        wire = eng.wire[rid]
        assert wire["system"] in ("Be brief.", [{"type": "text", "text": "Be brief."}]), wire["system"]
        assert [m["role"] for m in wire["messages"]] == roles
        assert {"role": "system", "content": "Now in English."} in wire["messages"]
    assert len(emu.bill().items) == billed + 2


def test_the_input_a_claude_call_read_or_wrote_in_the_prompt_cache_is_in_openais_usage(claude):
    # Anthropic's cache_read_input_tokens and cache_creation_input_tokens were counted in prompt_tokens and said
    # nowhere else: a chat answer had no prompt_tokens_details (an application reading its cached_tokens, which
    # OpenAI always sends, failed), and a Responses answer said cache_write_tokens 0.
    eng, client, emu = claude
    rules = {"type": "text", "text": "Answer as a careful agent would. " * 400, "cache_control": {"type": "ephemeral"}}
    ask = [{"role": "system", "content": [rules]}, {"role": "user", "content": "Hi"}]
    billed = len(emu.bill().items)
    wrote = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=20)
    read = client.chat.completions.create(model=MODEL, messages=[*ask, {"role": "assistant", "content": "Hello."},
                                                                 {"role": "user", "content": "Again"}],
                                          max_tokens=20, stream=True, stream_options={"include_usage": True})
    (used,) = [c.usage for c in read if c.usage is not None]
    first, second = (b.usage for b in emu.bill().items[billed:])
    assert first["cache_write_tokens"] > 0 and second["cache_read_tokens"] > 0
    assert wrote.usage.prompt_tokens_details.cached_tokens == first["cache_read_tokens"]
    assert wrote.usage.prompt_tokens_details.cache_write_tokens == first["cache_write_tokens"]
    assert used.prompt_tokens_details.cached_tokens == second["cache_read_tokens"]
    assert used.prompt_tokens_details.cache_write_tokens == second["cache_write_tokens"]
    marked = {"type": "input_text", "text": "Lima's weather, in full detail. " * 400,
              "cache_control": {"type": "ephemeral"}}
    done = client.responses.create(model=MODEL, input=[{"role": "user", "content": [marked]}], max_output_tokens=20)
    third = emu.bill().items[billed + 2].usage
    assert third["cache_write_tokens"] > 0
    assert done.usage.input_tokens_details.cache_write_tokens == third["cache_write_tokens"]
    assert done.usage.input_tokens_details.cached_tokens == third["cache_read_tokens"]


def test_an_empty_claude_answer_sent_back_is_left_out_and_the_conversation_goes_on(claude):
    # A Claude answer of no text (end_turn, no content) comes back as content "" (a Responses output_text of ""),
    # and an agent appends it: Anthropic refuses a message with no content but a final assistant one, so its next
    # turn went to the provider and was refused there (chat), or was a 400 naming messages[1].content[0].text, a
    # field the caller never sent (Responses).
    eng, client, emu = claude
    billed = len(emu.bill().items)
    said = [{"role": "assistant", "content": ""}, {"role": "assistant", "content": None},
            {"role": "assistant", "content": [{"type": "text", "text": " "}], "refusal": None}]
    for k, empty in enumerate(said):
        client.chat.completions.create(model=MODEL, max_tokens=20, messages=[ASKED, empty, {
            "role": "user", "content": "Again?"}], extra_headers={endpoint.HEADER_REQUEST_ID: f"empty{k}"})
        assert [m["role"] for m in eng.reqs[f"empty{k}"].body["messages"]] == ["user", "user"]
    assert len(emu.bill().items) == billed + 1  # one conversation, called once: the others are its exact copies
    item = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "", "annotations": []}]}
    done = client.responses.create(model=MODEL, max_output_tokens=2000, input=[ASKED, item, {
        "role": "user", "content": "Again?"}], extra_headers={endpoint.HEADER_REQUEST_ID: "empty_r"})
    assert done.status == "completed" and [m["role"] for m in eng.wire["empty_r"]["messages"]] == ["user", "user"]
    assert len(emu.bill().items) == billed + 2
    # A user message of nothing is the caller's to fix: refused before anything is sent, naming it.
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, max_tokens=20, messages=[ASKED, {"role": "user", "content": ""}])
    assert exc.value.param == "messages[1].content" and "no content" in exc.value.body["message"]
    assert len(emu.bill().items) == billed + 2


def test_a_responses_app_sends_images_to_a_claude_model_in_messages_and_in_tool_outputs(claude):
    # An input_image part was a 400 for a Claude model ("only text passes to Anthropic's Messages API"), where the
    # same image through chat completions went as an image block: a Responses app that sends a picture, or a tool
    # whose output is a screenshot, could not switch.
    eng, client, emu = claude
    tool = {"type": "function", **WEATHER["function"]}
    data = png(750, 400)  # 400 tokens by Anthropic's area rule
    ask = [{"role": "user", "content": [{"type": "input_text", "text": "Which city is this?"},
                                        {"type": "input_image", "image_url": f"data:image/png;base64,{data}",
                                         "detail": "auto"}]}]
    call = {"type": "function_call", "call_id": "call_7", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    shot = {"type": "function_call_output", "call_id": "call_7", "output": [
        {"type": "input_text", "text": "A radar map:"}, {"type": "input_image", "image_url": "https://example.com/r.png"}]}
    billed = len(emu.bill().items)
    done = client.responses.create(model=MODEL, input=[*ask, call, shot], tools=[tool], max_output_tokens=2000,
                                   extra_headers={endpoint.HEADER_REQUEST_ID: "img_r"})
    wire = eng.wire["img_r"]["messages"]
    assert wire[0]["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                 "data": data}}
    assert wire[2]["content"] == [{"type": "tool_result", "tool_use_id": "call_7", "content": [
        {"type": "text", "text": "A radar map:"}, {"type": "image", "source": {"type": "url",
                                                                              "url": "https://example.com/r.png"}}]}]
    # Billed by the image rule (a URL at its largest), and the reservation counted as much.
    assert done.usage.input_tokens == billed_input(emu.bill().items[billed]) >= 400 + 1600
    assert eng.reqs["img_r"].input_tokens >= done.usage.input_tokens
    for part, param in (({"type": "input_image", "image_url": "https://x/a.png", "detail": "low"}, "input[0].content[0].detail"),
                        ({"type": "input_image", "file_id": "file-1"}, "input[0].content[0].file_id"),
                        ({"type": "input_file", "file_id": "file-1"}, "input[0].content[0]")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=MODEL, input=[{"role": "user", "content": [part]}], max_output_tokens=50)
        assert exc.value.param == param, exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:  # Anthropic takes no image in a system prompt
        client.responses.create(model=MODEL, max_output_tokens=50, input=[
            {"role": "developer", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]}, *ask])
    assert exc.value.param == "input[0].content[0]", exc.value.body["message"]
    assert len(emu.bill().items) == billed + 1


def test_a_refusal_of_a_translated_responses_body_names_the_callers_input_item(claude):
    # The engine checks a Responses body as it goes on the wire, as messages: its refusal named a field the caller
    # never sent ("messages[0].content[0].text" for input[1].content[0].text, a developer item lifted to the
    # system prompt before it), as the chat route's did until its translation recorded where each field went.
    _, client, emu = claude
    billed = len(emu.bill().items)
    lead = {"role": "developer", "content": "Be brief."}
    marks = [{"type": "input_text", "text": f"part {k}", "cache_control": {"type": "ephemeral"}} for k in range(5)]
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}
    out = {"type": "function_call_output", "call_id": "call_1", "output": "12 C"}
    for given, param in (
            ([lead, {"role": "user", "content": [{"type": "input_text", "text": ""}]}], "input[1].content[0].text"),
            ([lead, ASKED, {"role": "assistant", "content": "Well."}, {"role": "user", "content": ""}],
             "input[3].content"),
            ([lead, ASKED, call, out, {"role": "user", "content": marks}], "input.4.content.4.cache_control")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=MODEL, input=given, tools=[{"type": "function", **WEATHER["function"]}],
                                    max_output_tokens=50)
        message = exc.value.body["message"]
        assert exc.value.param == param and f"'body.{param}'" in message and "messages" not in message, message
    assert len(emu.bill().items) == billed
    # To chat completions (an OpenAI model) the instructions go first, as a system message.
    from engine.core.responses_input import as_messages
    came: dict[str, str] = {}
    as_messages({"instructions": "Be brief.", "input": "Hi"}, "openai", "chat", came)
    assert came == {"messages.0.content": "instructions", "messages.1": "input", "messages.1.content": "input"}


def test_an_openai_sdk_reads_the_request_id_of_an_answer_and_of_an_error(claude):
    """A walkthrough: the OpenAI SDK's ``e.request_id`` (``x-request-id``) was None on every error, and an answer's
    ``_request_id`` too (only X-Smartbatch-Request-Id carried it). A request's error carries its own id."""
    _, client, _ = claude
    done = client.chat.completions.create(model=MODEL, max_completion_tokens=20, messages=[
        {"role": "user", "content": "Name a river."}], extra_headers={endpoint.HEADER_REQUEST_ID: "rid-ok"})
    assert done._request_id == "rid-ok"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, max_completion_tokens=20, messages=[
            {"role": "robot", "content": "x"}], extra_headers={endpoint.HEADER_REQUEST_ID: "rid-bad"})
    assert exc.value.request_id == "rid-bad" and "messages[0].role" in exc.value.message
    with pytest.raises(openai.NotFoundError) as exc:  # refused before any request: an id of its own
        client.chat.completions.create(model="claude-nope-9", messages=[{"role": "user", "content": "x"}])
    assert exc.value.request_id and exc.value.request_id.startswith("req_")
    # The routes that make no request (models, files, batches) answer with an id of their own (a review: None).
    seen = client.models.retrieve(MODEL)._request_id
    assert seen and seen.startswith("req_") and client.models.retrieve(MODEL)._request_id != seen
