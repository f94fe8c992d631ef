"""A top-level body field the provider's route does not take is refused when the request is made, naming it: at
OpenAI where the endpoint is OpenAI's own API (or says it refuses such fields, ``strict_fields``: the emulator
does), at Anthropic always, beta fields included (the engine sends no beta header). The provider answers it 400 for
that call alone, after the request was accepted, reserved for and perhaps batched; before, the emulator took any
OpenAI field, so a typo passed every test and failed only against the real API. A wire-format-only server (vLLM)
still gets its own fields (``top_k``) as given."""

from __future__ import annotations

import openai
import pytest
from pydantic import ValidationError

from engine.app.endpoint import make_app
from engine.core.catalog import default_catalog
from engine.core.request import Request, validation_context
from engine.core.settings import ProviderEndpoint, ProvidersSettings, Settings
from tests.unit.test_endpoint import FakeEngine, serving

CAT = default_catalog()
HI = {"role": "user", "content": "hi"}


@pytest.fixture(autouse=True)
def _openai_host(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)  # the default endpoint is OpenAI's own API


def settings(mode: str = "http", **openai_endpoint) -> Settings:
    """Calls over HTTP (a simulated run sends nothing, and a vLLM-style body is a trace's to carry); OpenAI's
    endpoint as given (by default its own API)."""
    ep = ProviderEndpoint(api="openai", api_key_env="OPENAI_API_KEY", **openai_endpoint)
    anthropic = ProviderEndpoint(api="anthropic", api_key_env="ANTHROPIC_API_KEY")
    return Settings(providers=ProvidersSettings(mode=mode, endpoints={"openai": ep, "anthropic": anthropic}))


def make(model: str, body: dict, s: Settings | None = None) -> Request:
    ctx = validation_context(CAT, s or settings())
    return Request.model_validate({"id": "r", "arrival_s": 0.0, "model": model, "body": body}, context=ctx)


def refusal(model: str, body: dict, s: Settings | None = None) -> str:
    with pytest.raises(ValidationError) as ei:
        make(model, body, s)
    (err,) = ei.value.errors()
    return err["msg"]


@pytest.mark.parametrize(("model", "body", "field", "says"), [
    ("gpt-5-mini", {"messages": [HI], "max_complettion_tokens": 20}, "body.max_complettion_tokens",
     "/v1/chat/completions"),
    ("gpt-5-mini", {"messages": [HI], "stop_sequences": ["x"]}, "body.stop_sequences", "Anthropic's Messages API"),
    ("gpt-5-mini", {"messages": [HI], "reasoning": {"effort": "low"}}, "body.reasoning", "OpenAI's Responses API"),
    ("gpt-image-1", {"prompt": "a fox", "qualty": "high"}, "body.qualty", "/v1/images/generations"),
    ("sora-2", {"prompt": "a fox", "sizee": "1280x720"}, "body.sizee", "/v1/videos"),
])
def test_a_field_openais_route_does_not_take_is_refused_naming_it(model, body, field, says):
    msg = refusal(model, body)
    assert msg.startswith(f"Value error, {field} is not a field of OpenAI's") and says in msg
    assert "check its spelling" in msg


def test_a_responses_model_takes_the_responses_fields():
    spec = CAT.model("openai", "gpt-5-mini").model_copy(update={"api": "responses"})
    cat = CAT.model_copy(update={"providers": {**CAT.providers, "openai": CAT.providers["openai"].model_copy(
        update={"models": {**CAT.providers["openai"].models, "gpt-5-mini": spec}})}})
    ctx = validation_context(cat, settings())
    ok = {"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "body": {"input": "hi", "reasoning": {"effort": "low"},
                                                                         "truncation": "auto"}}
    assert Request.model_validate(ok, context=ctx).body["truncation"] == "auto"
    with pytest.raises(ValidationError, match="body.truncatoin is not a field of OpenAI's /v1/responses"):
        Request.model_validate({**ok, "body": {"input": "hi", "truncatoin": "auto"}}, context=ctx)


def test_a_wire_format_server_gets_its_own_fields_and_strict_fields_says_otherwise():
    vllm = {"messages": [HI], "top_k": 5}
    assert make("gpt-5-mini", vllm, settings(mode="sim")).body["top_k"] == 5  # a simulated run sends nothing
    assert make("gpt-5-mini", vllm, settings(base_url="http://127.0.0.1:8000/v1")).body["top_k"] == 5
    assert "body.top_k" in refusal("gpt-5-mini", vllm, settings(base_url="http://127.0.0.1:8000/v1",
                                                               strict_fields=True))
    assert make("gpt-5-mini", vllm, settings(strict_fields=False)).body["top_k"] == 5


@pytest.mark.parametrize("url", ["http://127.0.0.1:8765/openai/v1", "http://localhost:8765/openai/v1/"])
def test_the_emulators_address_refuses_a_misspelt_field_without_strict_fields(url):
    # The README's run against `smartbatch emulate` sets no strict_fields: the emulator refused the typo at call
    # time, after the request was accepted and reserved for.
    typo = {"messages": [HI], "temprature": 0.2}
    assert "body.temprature" in refusal("gpt-5-mini", typo, settings(base_url=url))
    assert make("gpt-5-mini", typo, settings(base_url=url, strict_fields=False)).body["temprature"] == 0.2


def test_the_emulators_address_read_from_openai_base_url(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8765/openai/v1")
    assert "body.temprature" in refusal("gpt-5-mini", {"messages": [HI], "temprature": 0.2})


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "http://10.0.0.5:8765/openai/v1",
                                 "http://127.0.0.1:8765/openai/v1/extra"])
def test_another_server_is_not_taken_for_the_emulator(url):
    vllm = {"messages": [HI], "top_k": 5}
    assert make("gpt-5-mini", vllm, settings(base_url=url)).body["top_k"] == 5


def test_what_openai_takes_passes():
    body = {"messages": [HI], "max_completion_tokens": 20, "stream": False, "seed": 3, "prompt_cache_key": "k",
            "metadata": {"a": "b"}, "response_format": {"type": "text"}, "logprobs": False}
    assert make("gpt-5-mini", body).body["seed"] == 3
    assert make("gpt-image-1", {"prompt": "a fox", "quality": "high", "size": "1024x1024"}).body["quality"] == "high"


def test_the_endpoint_answers_a_misspelt_field_with_a_400_naming_it():
    eng = FakeEngine()
    eng.settings = settings()
    eng._ctx = validation_context(CAT, eng.settings)  # an engine whose OpenAI calls go to OpenAI's own API
    with serving(make_app(eng, catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="gpt-5-mini", messages=[HI], extra_body={"max_complettion_tokens": 5})
        assert "max_complettion_tokens" in (exc.value.param or "") and "check its spelling" in exc.value.message
        assert not eng.submitted


@pytest.mark.parametrize("field, value", [("context_management", {"edits": []}), ("betas", ["x-2025"]),
                                          ("output_format", {"type": "json_schema", "schema": {}})])
def test_an_anthropic_beta_field_is_refused_as_the_api_refuses_it_without_its_header(field, value):
    """The engine calls ``messages.create`` with no ``anthropic-beta`` header: a beta field passed its check and
    the API answered "context_management: Extra inputs are not permitted" (the emulator's set is the SDK's too)."""
    msg = refusal("claude-haiku-4-5", {"messages": [HI], "max_tokens": 20, field: value}, settings(mode="sim"))
    assert msg.startswith(f"Value error, body.{field} is not a field of Anthropic's Messages API")
    if field != "output_format":  # an older beta's, no longer in the SDK's beta params
        assert "beta field" in msg
    ok = make("claude-haiku-4-5", {"messages": [HI], "max_tokens": 20, "temperature": 0.2, "top_k": 5,
                                   "output_config": {"effort": "low"}}, settings(mode="sim"))
    assert ok.body["top_k"] == 5
