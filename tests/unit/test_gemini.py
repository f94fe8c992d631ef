"""Gemini called for real through Google's OpenAI compatibility layer (docs/providers.md, "Gemini"): the ``google``
endpoint the settings know, the fields the layer does not take refused per request naming them, its thinking
billed as output and its cached input at the catalog's read price, sync and through its Batch API, each against
the loopback emulator's ``google`` side through the official ``openai`` SDK. Before, Gemini had no endpoint of its
own: a run with real keys refused its requests, or simulated them."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from actors._types import Job
from engine.app.provider_setup import http_setup
from engine.core._gemini import GEMINI_OPENAI_URL
from engine.core.cost import price_usage
from engine.core.errors import ConfigError
from engine.core.request import Request, validation_context
from engine.core.settings import ProvidersSettings, Settings, load_settings
from engine.emulator import Emulator
from tests.unit.test_http_providers import (
    EMU_CANCEL_S,
    SPEED,
    VALIDATING_S,
    Rig,
    T,
    batch_key,
    billed_by_custom_id,
    fixed_turnaround_catalog,
)

FLASH = "gemini-2.5-flash"
HI = {"role": "user", "content": "Name three rivers."}


CAT = fixed_turnaround_catalog(T, ("google",))


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


def gemini_settings() -> Settings:
    return Settings(providers=ProvidersSettings(mode="http", endpoints={"google": {}}))


def ask(i: int, model: str = FLASH, **body: Any) -> Request:
    return Request.model_validate({"id": f"g-{i}", "arrival_s": 0.0, "model": model,
                                   "body": {"messages": [HI], **body}},
                                  context=validation_context(CAT, gemini_settings()))


def priced(r, req: Request, mode: str) -> float:
    u = r.usage
    return price_usage(req, CAT, mode, input_tokens=u["input_tokens"], output_tokens=u["output_tokens"],
                       cache_read=u["cache_read"], cache_write=u["cache_write"]).total


# -- configuration -------------------------------------------------------------------------------------------------
def test_an_endpoint_named_google_is_geminis_openai_compatibility_layer_with_its_own_key(monkeypatch):
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__GOOGLE__API_KEY_ENV", "GEMINI_API_KEY")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    ep = Settings().providers.endpoints["google"]
    assert (ep.api, ep.base_url, ep.api_key_env) == ("openai", GEMINI_OPENAI_URL, "GEMINI_API_KEY")
    assert ProvidersSettings(endpoints={"google": {}}).endpoints["google"] == ep
    # Not simulated beside the real ones: Google's address is no loopback.
    s = gemini_settings()
    assert not s.providers.simulates_others() and s.providers.http_providers(CAT.providers) == ["google"]
    with pytest.raises(ConfigError, match="GEMINI_API_KEY holding the API key is not set"):
        http_setup(CAT, s)
    monkeypatch.setenv("GEMINI_API_KEY", "gm-test-key")
    _, keys = http_setup(CAT, s)
    assert keys["google"].get() == "gm-test-key"


@pytest.mark.parametrize(("endpoint", "said"), [
    ({"api": "anthropic"}, "google.api is 'anthropic'"),
    ({"base_url": "https://generativelanguage.googleapis.com/v1beta/"}, GEMINI_OPENAI_URL),
])
def test_half_a_gemini_configuration_is_refused_naming_the_fix(endpoint, said):
    with pytest.raises(ValidationError, match="providers.endpoints.google") as ei:
        ProvidersSettings(mode="http", endpoints={"google": endpoint})
    assert said in str(ei.value)


GKEY = "AIzaSyD-NEVERSHOWN-gemini-0123456789abc"  # a key in Google's shape


@pytest.mark.parametrize(("name", "url"), [
    ("google", f"https://generativelanguage.googleapis.com/v1beta/openai/?key={GKEY}"),
    ("google", f"https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent?key={GKEY}"),
    ("google", f"generativelanguage.googleapis.com/v1beta/openai/?key={GKEY}"),
    ("openai", f"http://127.0.0.1:8000/v1?api_key={GKEY}"),
], ids=["layer", "native", "no-scheme", "openai"])
def test_a_base_url_with_a_query_is_refused_naming_the_fix_and_never_shows_the_key_it_holds(monkeypatch, name, url):
    """Google's own API takes its key as ``?key=``, and a user may carry it over to the layer's URL: the SDK puts
    each route after the whole URL, so every call would miss (a 404), and the start-up error printed the key (and
    pydantic's, a driver's, the end of it). Refused by name, the key shown nowhere, from the environment and from
    a driver alike."""
    env = f"SMARTBATCH_PROVIDERS__ENDPOINTS__{name.upper()}__BASE_URL"
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")
    monkeypatch.setenv(env, url)
    with pytest.raises(ConfigError) as from_env:
        load_settings()
    monkeypatch.delenv(env)
    with pytest.raises(ConfigError) as from_driver:
        Settings(providers={"mode": "http", "endpoints": {name: {"base_url": url}}})
    for ei in (from_env, from_driver):
        said = "".join(traceback.format_exception(ei.value))
        assert f"providers.endpoints.{name}.base_url" in said and "without its query" in said, said
        assert GKEY not in said and GKEY[-12:] not in said, said
    assert env in str(from_env.value)


# -- what the layer refuses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "body", "field"), [
    (FLASH, {"store": True}, "body.store"),
    (FLASH, {"modalities": ["text", "audio"]}, "body.modalities"),
    (FLASH, {"prompt_cache_key": "k"}, "body.prompt_cache_key"),
    (FLASH, {"service_tier": "default"}, "body.service_tier"),
    ("gemini-2.5-pro", {"reasoning_effort": "none"}, "body.reasoning_effort"),  # 2.5 Pro cannot stop thinking
    ("gemini-4-argon", {"reasoning_effort": "minimal"}, "body.reasoning_effort"),
    (FLASH, {"reasoning_effort": "low", "extra_body": {"google": {"thinking_config": {"thinking_budget": 512}}}},
     "body.reasoning_effort"),
    (FLASH, {"extra_body": {"google": {"cached_content": "cachedContents/abc"}}},
     "body.extra_body.google.cached_content"),
    (FLASH, {"extra_body": {"google": {"thinking_config": {"thinking_budget": "lots"}}}},
     "body.extra_body.google.thinking_config.thinking_budget"),
])
def test_a_field_geminis_layer_does_not_take_is_refused_per_request_naming_it(model, body, field):
    with pytest.raises(ValidationError) as ei:
        ask(0, model, **body)
    (err,) = ei.value.errors()
    assert field in err["msg"], err["msg"]
    # The same body is no concern of a run that simulates Gemini.
    Request.model_validate({"id": "s", "arrival_s": 0.0, "model": model, "body": {"messages": [HI], **body}},
                           context=validation_context(CAT, Settings()))


@pytest.mark.parametrize("body", [
    {"reasoning_effort": "none", "max_completion_tokens": 100, "temperature": 0.3},
    {"extra_body": {"google": {"thinking_config": {"thinking_budget": 1024, "include_thoughts": True}}}},
    {"response_format": {"type": "json_object"}, "seed": 7, "stop": ["\n\n"]},
    {"modalities": ["text"]},
])
def test_what_geminis_layer_documents_is_taken(body):
    assert ask(0, **body).body["messages"] == [HI]


def google_says(exc: openai.APIStatusError) -> str:
    """What Google's layer said in an error answer: a list of one error, whose message the SDK leaves out of its
    own text ("Error code: 400")."""
    (item,) = exc.body
    return f"{item['error']['status']}: {item['error']['message']}"


def test_the_emulators_google_side_refuses_what_the_layer_does_not_take_naming_it_unbilled(emu):
    client = openai.OpenAI(base_url=emu.base_url("google"), api_key="emulator-test-key", max_retries=0)
    for said, kw in [('INVALID_ARGUMENT: Invalid JSON payload received. Unknown name "store"',
                      {"extra_body": {"store": True}}),
                     ("Invalid reasoning_effort: none", {"model": "gemini-2.5-pro", "reasoning_effort": "none"}),
                     ("cannot be set together", {"reasoning_effort": "low", "extra_body": {"extra_body": {
                         "google": {"thinking_config": {"thinking_budget": 100}}}}})]:
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(**{"model": FLASH, "messages": [HI], **kw})
        assert said in google_says(ei.value) and str(ei.value) == "Error code: 400"
    # OpenAI's side takes what Gemini's refuses: the difference is the layer's, not the wire's.
    openai.OpenAI(base_url=emu.base_url("openai"), api_key="k", max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=[HI], extra_body={"store": True})
    assert [i.provider for i in emu.bill().items] == ["openai"]


def test_the_emulators_google_side_says_a_rate_limits_wait_in_its_body_as_google_does(emu):
    """Google's 429 is a RESOURCE_EXHAUSTED whose wait is a RetryInfo detail, with no Retry-After header (nor
    OpenAI's rate limit headers); without a wait, it says none."""
    client = openai.OpenAI(base_url=emu.base_url("google"), api_key="emulator-test-key", max_retries=0)
    emu.faults.script("google", "chat.completions", [{"status": 429, "retry_after_s": 36}])
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model=FLASH, messages=[HI])
    (item,) = ei.value.body
    assert item["error"]["status"] == "RESOURCE_EXHAUSTED" and item["error"]["code"] == 429
    assert item["error"]["details"] == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36s"}]
    assert not {h for h in ei.value.response.headers if h.startswith(("retry-after", "x-ratelimit"))}
    emu.faults.retry_after_header = False
    emu.faults.script("google", "chat.completions", [{"status": 429, "retry_after_s": 36}])
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model=FLASH, messages=[HI])
    assert "details" not in ei.value.body[0]["error"]
    assert not {h for h in ei.value.response.headers if h.startswith(("retry-after", "x-ratelimit"))}
    assert emu.bill().items == ()


# -- calls ---------------------------------------------------------------------------------------------------------
def test_a_gemini_sync_call_bills_its_thinking_as_output_and_its_cached_prefix_at_the_read_price(emu):
    """Two calls that share a 2,560-token prefix (Gemini 2.5 caches from 2,048), the second thinking hard: the layer counts the thoughts in
    total_tokens only, and the engine bills them as output; the prefix the first left in Gemini's implicit cache
    is read at 0.1x. Each result's cost is the emulator's bill for it, and no prompt_cache_key (which the layer
    refuses) was sent."""
    first = Request.model_validate({"id": "g-a", "arrival_s": 0.0, "model": FLASH, "input_tokens": 2700,
                                    "output_tokens": 40, "prompt": "q", "prefix_blocks": [5, 6, 7, 8, 9]})
    second = first.model_copy(update={"id": "g-b", "body": {"reasoning_effort": "high"}})

    async def go():
        rig = Rig(emu, "google")
        try:
            for k, r in enumerate((first, second)):
                await rig.run("sync", [Job(k, r, f"fp-g-{k}")])
                await rig.until(lambda r=r: rig.results.get(r.id), r.id)
            return rig.results, rig.calls
        finally:
            await rig.close()

    results, calls = asyncio.run(go())
    assert all("prompt_cache_key" not in job.body for job, _, _ in calls)
    items = {i.request_id: i for i in emu.bill().items}
    a, b = results["g-a"], results["g-b"]
    assert a.status == b.status == "ok" and a.real and b.real
    assert a.usage["cache_read"] == 0 and b.usage["cache_read"] == 2560
    raw = b.raw["usage"]
    thoughts = raw["total_tokens"] - raw["prompt_tokens"] - raw["completion_tokens"]
    assert thoughts > 0 and b.usage["output_tokens"] == raw["completion_tokens"] + thoughts
    assert len(b.output) == 4 * raw["completion_tokens"]  # the thoughts are billed, not shown
    for r, req in ((a, first), (b, second)):
        assert r.cost_usd == pytest.approx(items[r.provider_request_id].cost_usd, abs=1e-12)
        assert r.cost_usd == pytest.approx(priced(r, req, "sync"), abs=1e-12)
    spec = CAT.model("google", FLASH)
    assert b.cost_usd == pytest.approx((2560 * 0.1 + (2700 - 2560)) * spec.input_per_mtok / 1e6
                                       + b.usage["output_tokens"] * spec.output_per_mtok / 1e6, abs=1e-12)


def test_a_gemini_batch_is_created_polled_and_read_through_the_layer_each_member_billed_once(emu):
    reqs = [ask(i, reasoning_effort="low", max_completion_tokens=400) for i in range(4)]
    jobs = [Job(i, r, f"fp-g-{i}", claim=f"c{i}") for i, r in enumerate(reqs)]

    async def go():
        rig = Rig(emu, "google")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            return rig.results, sum(rig.budget.book.spend.values())
        finally:
            await rig.close()

    results, spent = asyncio.run(go())
    billed = billed_by_custom_id(emu)
    bill = emu.bill()
    assert len(billed) == len(bill.items) == 4 and emu.count("chat.completions", "google") == 0
    for j in jobs:
        r = results[j.req.id]
        item = billed[batch_key(j)]
        assert r.status == "ok" and r.mode == "batch_api" and r.real, r
        assert r.usage["output_tokens"] == item.usage["output_tokens"] > item.usage["thought_tokens"] > 0
        assert r.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
        assert r.cost_usd == pytest.approx(priced(r, j.req, "batch_api"), abs=1e-12)
        assert r.cost_usd == pytest.approx(priced(r, j.req, "sync") / 2, abs=1e-12)  # Gemini's batch at 50 %
    assert sum(r.cost_usd for r in results.values()) == pytest.approx(bill.total_usd, abs=1e-12)
    assert spent == pytest.approx(bill.total_usd, abs=1e-12)
