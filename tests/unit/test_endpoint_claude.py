"""A Claude model asked through ``/v1/chat/completions`` with the official ``openai`` SDK: the endpoint under uvicorn,
an engine stand-in that makes one sync call through the real Anthropic HTTP provider, and the emulator's Anthropic
side behind it (no Ray). OpenAI's ``stop``, ``max_completion_tokens`` and ``user`` were refused ("Anthropic's is
stop_sequences"), so an application could not change only its ``model`` (a helper's tour)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.core.request import Request, validation_context
from engine.core.result import Result
from engine.emulator import Emulator
from tests.unit.test_endpoint import serving
from tests.unit.test_http_providers import CAT, SPEED, direct, http_settings, job_of

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
MODEL = "claude-sonnet-4-5"


class OneCallEngine:
    """The engine's asyncio face, each request one sync call through the Anthropic provider alone; keeps the body
    each call sent on the wire. The provider is made on the serving loop, where its client lives."""

    def __init__(self, emu: Emulator):
        self.emu, self.settings, self.gone = emu, http_settings(emu), None
        self._ctx = validation_context(CAT, self.settings, live=True)
        self.wire: dict[str, dict] = {}
        self.provider, self.loop = None, None

    async def asubmit(self, d: dict) -> Result:
        req = Request.model_validate({**d, "arrival_s": 0.0}, context=self._ctx)
        if self.provider is None:
            self.provider, self.loop = direct(self.emu, "anthropic"), asyncio.get_running_loop()
        job = job_of(req)
        job = job._replace(body=self.provider.sync_body(job))
        self.wire[req.id] = job.body
        out = await self.provider.call(job)
        assert out.ok, out.error
        return Result(id=req.id, tenant=req.tenant, status="ok", output=out.output, tool_calls=out.tool_calls,
                      finish=out.finish, usage=out.usage.as_dict(), raw=out.raw, real=True, cost_usd=out.cost,
                      mode="sync", provider=req.provider, model=req.model)

    async def asubmit_many(self, ds: list[dict]) -> list[Result]:
        return [await self.asubmit(d) for d in ds]

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
    assert wire["messages"][0] == {"role": "system", "content": "Be brief."}
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
