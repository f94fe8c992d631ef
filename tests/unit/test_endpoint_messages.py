"""Anthropic's Messages route, ``POST /v1/messages``, with the official ``anthropic`` SDK: an application written
against Anthropic's API changes only its ``base_url``. The endpoint under uvicorn, the engine stand-in of
``test_endpoint_claude`` (one sync call through the real Anthropic HTTP provider) and the emulator's Anthropic side
behind it (no Ray). Before, the endpoint served OpenAI's routes alone: the SDK's call was a 404."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request

import anthropic
import pytest

from engine.app import endpoint
from engine.app._endpoint_messages import in_anthropic_shape
from engine.app._endpoint_wire import refused
from engine.app.endpoint import make_app
from engine.core.request import Request
from engine.core.result import Result
from engine.emulator import Emulator
from tests.unit.test_endpoint import serving
from tests.unit.test_endpoint_claude import OneCallEngine
from tests.unit.test_http_providers import CAT, SPEED

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
MODEL = "claude-sonnet-4-5"
WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
BROKE = "broke"  # the tenant whose budget is spent (the stand-in refuses its requests as the budgets do)


class BudgetedEngine(OneCallEngine):
    """``OneCallEngine`` whose budgets refuse tenant ``broke``, as the engine's budget check answers a request."""

    async def asubmit(self, d: dict) -> Result:
        if d.get("tenant") == BROKE:
            req = Request.model_validate({**d, "arrival_s": 0.0}, context=self._ctx)
            self.reqs[req.id] = req
            return Result(id=req.id, tenant=req.tenant, status="rejected", error="budget_exhausted",
                          reason=f"budget tenant={BROKE}/1d has $0.000000 left")
        return await super().asubmit(d)


@pytest.fixture(scope="module")
def messages():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = BudgetedEngine(emu)
        with serving(make_app(eng, catalog=CAT)) as url, \
                anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0,
                                    timeout=20) as client:
            try:
                yield eng, client, emu
            finally:
                eng.close()


def test_an_anthropic_sdk_call_is_answered_as_a_message_with_the_smartbatch_headers(messages):
    eng, client, emu = messages
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=300, system="Be brief.", stop_sequences=["\n\nHuman:"], extra_body={"temperature": 0.2},
        messages=[{"role": "user", "content": "Name three rivers."}],
        extra_headers={endpoint.HEADER_DEADLINE: "600", endpoint.HEADER_REQUEST_ID: "m1",
                       endpoint.HEADER_TENANT: "acme", endpoint.HEADER_PRIORITY: "urgent"})
    msg = raw.parse()
    req, wire = eng.reqs["m1"], eng.wire["m1"]
    # The Anthropic body went to the engine as it came (no stream field), and on to the provider unchanged.
    assert (req.tenant, req.priority, req.deadline_s) == ("acme", "urgent", 600.0)
    assert wire["system"] == "Be brief." and wire["stop_sequences"] == ["\n\nHuman:"] and wire["max_tokens"] == 300
    assert wire["messages"] == [{"role": "user", "content": "Name three rivers."}] and "stream" not in req.body
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.content[0].type == "text" and msg.content[0].text and msg.stop_reason == "end_turn"
    (bill,) = [i for i in emu.bill().items if i.model == MODEL and i.mode == "sync"]
    assert msg.usage.output_tokens == bill.usage["output_tokens"] > 0
    assert msg.usage.input_tokens == bill.usage["input_tokens"] > 0
    assert msg.usage.cache_read_input_tokens == bill.usage.get("cache_read_input_tokens", 0)
    assert msg.usage.cache_creation_input_tokens == bill.usage.get("cache_creation_input_tokens", 0)
    assert raw.headers[endpoint.HEADER_REQUEST_ID] == "m1" and raw.headers[endpoint.HEADER_MODE] == "sync"
    assert float(raw.headers[endpoint.HEADER_COST]) == pytest.approx(bill.cost_usd)
    assert float(raw.headers[endpoint.HEADER_SAVING]) == pytest.approx(0.0, abs=1e-9)  # sync: list price
    assert raw.headers[endpoint.HEADER_HIT] == "none" and raw.request_id == "m1"


def test_a_tool_use_round_trip_and_the_same_call_again_from_the_cache(messages):
    eng, client, _ = messages
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    kw = dict(model=MODEL, max_tokens=1000, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    first = client.messages.create(messages=ask, **kw, extra_headers={endpoint.HEADER_REQUEST_ID: "t1"})
    assert eng.wire["t1"]["tools"] == [WEATHER]
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and call.name == "get_weather" and isinstance(call.input, dict)
    # The same call again: the cache's copy (no provider body) is built in Messages' shape, the call's id kept.
    again = client.messages.with_raw_response.create(messages=ask, **kw)
    assert again.headers[endpoint.HEADER_MODE] == "reuse"
    (copy,) = [b for b in again.parse().content if b.type == "tool_use"]
    assert (copy.id, copy.name, copy.input) == (call.id, call.name, call.input)
    assert again.parse().stop_reason == "tool_use" and again.parse().id.startswith("msg_")
    # The tool's result goes back as Anthropic's tool_result block, and the model answers in text.
    done = client.messages.create(model=MODEL, max_tokens=300, tools=[WEATHER], messages=[
        *ask, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12 C, rain"}]}],
        extra_headers={endpoint.HEADER_REQUEST_ID: "t2"})
    assert eng.wire["t2"]["messages"][2]["content"][0]["tool_use_id"] == call.id
    assert done.stop_reason == "end_turn" and done.content[0].type == "text"


def test_a_streamed_answer_is_read_by_the_sdks_stream_helper(messages):
    eng, client, _ = messages
    with client.messages.stream(model=MODEL, max_tokens=1000, tools=[WEATHER], tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Bergen?"}],
                                extra_headers={endpoint.HEADER_REQUEST_ID: "s1"}) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert "stream" not in eng.reqs["s1"].body
    # The same request, not streamed, answers the same message (from the cache): the stream carried all of it.
    whole = client.messages.create(model=MODEL, max_tokens=1000, tools=[WEATHER], tool_choice={"type": "any"},
                                   messages=[{"role": "user", "content": "Weather in Bergen?"}])
    assert streamed.stop_reason == whole.stop_reason == "tool_use"
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    assert streamed.usage.output_tokens == whole.usage.output_tokens > 0
    assert streamed.usage.input_tokens == whole.usage.input_tokens > 0
    # A text answer cut at its cap streams its text and says max_tokens.
    with client.messages.stream(model=MODEL, max_tokens=1,
                                messages=[{"role": "user", "content": "Write a long story."}]) as stream:
        text = "".join(stream.text_stream)
        cut = stream.get_final_message()
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 1 and text == cut.content[0].text


@pytest.mark.parametrize(("kw", "field"), [
    (dict(extra_body={"temperature": 1.5}), "temperature"),
    (dict(extra_body={"seed": 3}), "seed"),
    (dict(max_tokens=10**7), "max_tokens"),
    (dict(messages=[]), "messages"),
    # A number was accepted, rode its deadline, and Anthropic refused the call (a hunt with the SDK).
    (dict(metadata={"user_id": 42}), "metadata.user_id"),
])
def test_a_bad_field_is_an_anthropic_400_naming_it_and_its_neighbour_is_answered(messages, kw, field):
    _, client, _ = messages
    ask = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "x"}], **kw}
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(**ask)
    body = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    assert re.match(rf"{field}\b", body["error"]["message"]), body  # Anthropic's error has no param: the message
    assert "body." not in body["error"]["message"], body
    assert client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "y"}]).content


def test_a_model_not_called_through_anthropic_is_refused_naming_model_and_the_chat_route(messages):
    _, client, _ = messages
    for model in ("gpt-5-mini", "gemini-2.5-flash"):
        with pytest.raises(anthropic.BadRequestError) as exc:
            client.messages.create(model=model, max_tokens=50, messages=[{"role": "user", "content": "x"}])
        message = exc.value.body["error"]["message"]
        assert message.startswith(f"model {model!r}") and "/v1/chat/completions" in message, message
    with pytest.raises(anthropic.NotFoundError) as exc:  # as Anthropic answers a model it does not know
        client.messages.create(model="claude-nope-9", max_tokens=50, messages=[{"role": "user", "content": "x"}])
    assert exc.value.body["error"]["type"] == "not_found_error" and "claude-nope-9" in str(exc.value.body)


def test_a_budget_rejection_is_the_chat_routes_429_in_anthropics_shape_not_retried(messages):
    _, client, _ = messages
    with pytest.raises(anthropic.RateLimitError) as exc:
        client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"}],
                               extra_headers={endpoint.HEADER_TENANT: BROKE})
    err = exc.value
    assert err.status_code == 429 and err.response.headers["x-should-retry"] == "false"
    assert err.body["type"] == "error" and err.body["error"]["type"] == "rate_limit_error"
    assert "budget_exhausted" in err.body["error"]["message"] and BROKE in err.body["error"]["message"]


def test_a_bad_header_and_a_bad_body_are_400s_in_anthropics_shape(messages):
    _, client, _ = messages
    ask = dict(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(**ask, extra_headers={endpoint.HEADER_DEADLINE: "soon"})
    assert exc.value.body["error"]["message"].startswith(endpoint.HEADER_DEADLINE)
    with pytest.raises(anthropic.NotFoundError) as exc:  # a route not served: said so, in Anthropic's shape
        client.post("/v1/complete", cast_to=object, body={"model": MODEL, "prompt": "x"})
    assert exc.value.body["type"] == "error" and "/v1/complete" in exc.value.body["error"]["message"]
    post = urllib.request.Request(str(client.base_url).rstrip("/") + "/v1/messages", data=b"{not json",
                                  headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as got:
        urllib.request.urlopen(post, timeout=10)
    body = json.loads(got.value.read())
    assert got.value.code == 400 and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"], body


def test_an_endpoint_that_asks_for_a_key_takes_it_as_the_anthropic_sdks_send_it(messages):
    # Anthropic's API reads the key from x-api-key, which its SDKs send (this SDK's version sends Authorization:
    # Bearer, as OpenAI's): both pass, and a wrong key is a 401 in Anthropic's shape.
    eng, _, _ = messages
    ask = dict(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"}],
               extra_body={"temperature": 2.0})  # refused by the route: no provider call on this server's loop
    with serving(make_app(eng, catalog=CAT, api_key_sha256=hashlib.sha256(b"sk-right").hexdigest())) as url:
        base = url.removesuffix("/v1")
        for key, error in (("sk-right", anthropic.BadRequestError), ("sk-wrong", anthropic.AuthenticationError)):
            with anthropic.Anthropic(base_url=base, api_key=key, max_retries=0) as client, \
                    pytest.raises(error) as exc:
                client.messages.create(**ask)
            assert exc.value.body["type"] == "error", exc.value.body
        assert exc.value.body["error"]["type"] == "authentication_error" and "x-api-key" in str(exc.value.body)
        for key, status in (("sk-right", 400), ("sk-wrong", 401)):
            body = {"model": MODEL, "max_tokens": 50, "messages": ask["messages"], "temperature": 2.0}
            post = urllib.request.Request(base + "/v1/messages", data=json.dumps(body).encode(), headers={
                "content-type": "application/json", "x-api-key": key, "anthropic-version": "2023-06-01"})
            with pytest.raises(urllib.error.HTTPError) as got:
                urllib.request.urlopen(post, timeout=10)
            assert got.value.code == status and json.loads(got.value.read())["type"] == "error"


def test_a_refused_header_is_named_once():
    """The chat route's refusal of a header reads "header X-Smartbatch-Request-Id: ...", and Anthropic's shape put
    the header before it again ("X-Smartbatch-Request-Id: header X-Smartbatch-Request-Id: ...", a live tour of an
    id sent again with another body)."""
    exc = refused("id", "field 'id': tenant 'default' already submitted id 'a' with other content", lambda f: None)
    said = in_anthropic_shape(exc).message
    assert exc.param == endpoint.HEADER_REQUEST_ID and said.startswith(f"{exc.param}: ")
    assert said.count(exc.param) == 1 and said.endswith("with other content"), said


@pytest.mark.parametrize(("role", "fix"), [("robot", "use user or assistant"),
                                           ("tool", "give a tool's output as a tool_result block in a user message"),
                                           ("developer", "give it as the top-level system field")])
def test_a_bad_role_is_named_with_anthropics_roles_not_openais(messages, role, fix):
    """A walkthrough: role "robot" on /v1/messages was told "one of system, developer, user, assistant, tool,
    function", OpenAI's roles, most of which this route refuses."""
    _, client, _ = messages
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"},
                                                                     {"role": role, "content": "y"}])
    said = exc.value.body["error"]["message"]
    assert said == f"messages[1].role {role!r} is not one of Anthropic's (user, assistant); {fix}", said


def test_an_error_answer_carries_the_request_id_where_the_sdk_reads_it_as_an_answer_does(messages):
    """A walkthrough: the SDK's ``e.request_id`` was None on every error (the answers carried ``request-id``). A
    refusal of the engine's carries the request's own id; one before the request was made, an id of its own."""
    _, client, _ = messages
    with pytest.raises(anthropic.RateLimitError) as exc:
        client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"}],
                               extra_headers={endpoint.HEADER_TENANT: BROKE, endpoint.HEADER_REQUEST_ID: "m-broke"})
    assert exc.value.request_id == "m-broke" == exc.value.response.headers[endpoint.HEADER_REQUEST_ID]
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"}],
                               extra_body={"temperature": 1.5})
    assert exc.value.request_id and exc.value.request_id.startswith("req_")
    with pytest.raises(anthropic.BadRequestError) as exc:  # refused before any request: an id all the same
        client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "robot", "content": "x"}])
    assert exc.value.request_id and exc.value.request_id.startswith("req_")
