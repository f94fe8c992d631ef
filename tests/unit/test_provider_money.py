"""What an HTTP provider's answer costs, and what a request may carry, where the bill could outrun the count (a
helper's fault hunt on the providers' money paths, stop 45). Each case failed on the code before it."""

from __future__ import annotations

import httpx2
import openai
import pytest
from pydantic import ValidationError

from actors.providers._http import _never_connected
from actors.providers.openai_http import OpenAIProvider
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.cost import input_bound, price_usage, reserve_bound
from engine.core.provider_api import CallJob, Secret
from engine.core.request import Request, validation_context
from engine.core.settings import ProviderEndpoint, Settings

CAT = default_catalog()
CTX = validation_context(CAT)


def make(**fields) -> Request:
    return Request.model_validate({"id": "r", "arrival_s": 0.0, **fields}, context=CTX)


def test_an_image_sent_without_a_quality_is_reserved_at_the_dearest_and_billed_at_the_quality_made():
    """OpenAI makes an image asked at no quality at "auto", its pick. It was reserved and counted at medium
    ($0.042) whatever the answer said it made: a high-quality image billed $0.167 was counted at a quarter."""
    by_quality = CAT.model("openai", "gpt-image-1").per_image_quality
    provider = OpenAIProvider("openai", CAT, Settings(), ProviderEndpoint(api="openai", api_key_env="X",
                                                                          base_url="http://127.0.0.1:9/v1"),
                              Secret("k"), ManualClock(0.0))

    def counted(params: dict, made: str | None) -> float:
        r = make(model="gpt-image-1", prompt="a red fox", params=params)
        raw = {"created": 1, "data": [{"b64_json": "AAAA"}], "size": "1024x1024"}
        if made is not None:
            raw["quality"] = made
        return provider._outcome(CallJob("k", r, 0.0, 0, 0), "/v1/images/generations", raw, None, "sync").cost

    # each beside the prompt's text tokens (an answer without usage: the request's estimate, 3 tokens)
    prompt = make(model="gpt-image-1", prompt="a red fox").input_tokens * 5.0 / 1e6
    for asked in ({}, {"quality": "auto"}):
        # reserved with the prompt at one token a byte at most, as text is (the estimate is no bound; a review)
        bound = input_bound(make(model="gpt-image-1", prompt="a red fox"), CAT.model("openai", "gpt-image-1"))
        assert reserve_bound(make(model="gpt-image-1", prompt="a red fox", params=asked), CAT, "sync") == \
            pytest.approx(by_quality["high"]["1024x1024"] + bound * 5.0 / 1e6)
        assert counted(asked, "high") == pytest.approx(by_quality["high"]["1024x1024"] + prompt)
        assert counted(asked, "low") == pytest.approx(by_quality["low"]["1024x1024"] + prompt)
    # A quality asked is the one billed, whatever the answer's field; an answer that names none keeps the price
    # the request was given.
    assert counted({"quality": "low"}, "high") == pytest.approx(by_quality["low"]["1024x1024"] + prompt)
    assert counted({}, None) == pytest.approx(by_quality["medium"]["1024x1024"] + prompt)
    # The answer's usage counts the prompt's text tokens: those are billed (a 3,000-token prompt was left out, a
    # bill 27 % short; a hunt).
    r = make(model="gpt-image-1", prompt="a red fox", params={"quality": "medium"})
    raw = {"created": 1, "data": [{"b64_json": "AAAA"}], "usage": {"input_tokens": 3000, "output_tokens": 1056,
                                                                   "input_tokens_details": {"text_tokens": 3000}}}
    out = provider._outcome(CallJob("k", r, 0.0, 0, 0), "/v1/images/generations", raw, None, "sync")
    assert out.cost == pytest.approx(by_quality["medium"]["1024x1024"] + 3000 * 5.0 / 1e6)
    assert out.usage.input_tokens == 3000


@pytest.mark.parametrize(("model", "body", "field"), [
    ("claude-sonnet-4-5", {"tools": [{"name": "f", "input_schema": {"type": "object"}},
                                     {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]},
     "body.tools.1.type"),
    ("claude-sonnet-4-5", {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
     "body.tools.0.type"),
    ("claude-sonnet-4-5", {"mcp_servers": [{"type": "url", "url": "https://example.com", "name": "x"}]},
     "body.mcp_servers"),
    ("gpt-5-mini", {"web_search_options": {}}, "body.web_search_options"),
    ("gpt-5-mini", {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "body.tools.0.type"),
])
def test_a_tool_the_provider_runs_and_bills_per_use_is_refused_naming_it(model, body, field):
    """Anthropic's web search bills $10 per 1,000 searches on top of the tokens, and no catalog price covers it:
    a request with it was counted $0.024 for a $0.074 call, and reserved a ninth of its bill."""
    with pytest.raises(ValidationError) as refused:
        make(model=model, max_tokens=100, body={"messages": [{"role": "user", "content": "news today?"}], **body})
    assert field in str(refused.value) and "bills per use" in str(refused.value)


def test_tools_the_caller_runs_pass():
    client = make(model="claude-sonnet-4-5", max_tokens=100, body={
        "messages": [{"role": "user", "content": "list the files"}],
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}},
                  {"type": "custom", "name": "other", "input_schema": {"type": "object"}},
                  {"type": "bash_20250124", "name": "bash"}, {"type": "text_editor_20250728", "name": "edit"}]})
    assert len(client.body["tools"]) == 4
    fn = make(model="gpt-5-mini", max_completion_tokens=100, body={
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]})
    assert fn.body["tools"][0]["type"] == "function"


def test_an_openai_function_tool_for_a_claude_model_is_refused_naming_anthropics_shape():
    """A chat completions call to a Claude model, with its tools in OpenAI's shape, was refused as "a tool the
    provider runs and bills per use", which a function tool is not (a helper's tour of the endpoint)."""
    with pytest.raises(ValidationError) as refused:
        make(model="claude-haiku-4-5", max_tokens=100, body={
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]})
    said = str(refused.value)
    assert "body.tools.0" in said and "OpenAI function tool" in said and "input_schema" in said
    assert "bills per use" not in said


def test_a_bare_prompt_sent_as_it_is_reserves_for_its_bytes():
    """A body's text was bounded by its bytes (stop 44), a bare prompt not: 4,200 Chinese characters, estimated
    at 1,050 tokens, were reserved at a quarter of what they may tokenize to. A placeholder prompt far shorter
    than its token count (a trace replay, sent as filler of that size) keeps its count."""
    spec = CAT.model("anthropic", "claude-haiku-4-5")
    text = "预算不能超支。" * 600
    bare = make(model="claude-haiku-4-5", prompt=text, max_output_tokens=5)
    assert bare.input_tokens < len(text) and input_bound(bare, spec) >= len(text)
    as_body = make(model="claude-haiku-4-5", max_tokens=5, body={"messages": [{"role": "user", "content": text}]})
    assert reserve_bound(bare, CAT, "sync") == pytest.approx(reserve_bound(as_body, CAT, "sync"), rel=0.02)
    replay = make(model="claude-haiku-4-5", prompt="mooncake prompt 1f2e", input_tokens=3000, max_output_tokens=5)
    assert input_bound(replay, spec) == 3000
    # Whatever chars_per_token estimated it at (a review: at 3 the bound fell back to the estimate, a third of
    # the bytes), and a label beside a body counts the body's text, not the label's.
    with pytest.raises(ValidationError, match="chars_per_token"):  # below 1 no prompt tells from a placeholder
        Settings(chars_per_token=0.5)
    for cpt in (1.0, 2.0, 3.0):
        ctx = validation_context(CAT, Settings(chars_per_token=cpt))
        dense = Request.model_validate({"id": "d", "arrival_s": 0.0, "model": "claude-haiku-4-5", "prompt": text},
                                       context=ctx)
        assert input_bound(dense, spec) >= len(text.encode())
    labelled = make(model="claude-haiku-4-5", prompt="label-17", max_tokens=5,
                    body={"messages": [{"role": "user", "content": text}]})
    assert input_bound(labelled, spec) == input_bound(as_body, spec)


def test_a_timeout_before_any_connection_was_made_is_not_possibly_billed():
    """A connect timeout (a full listen backlog) or a pool timeout sent nothing; it was counted as a call that
    may have been billed, holding the call's upper bound on the budget and in ``possibly_billed``."""
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

    def timeout(cause: Exception) -> openai.APITimeoutError:
        exc = openai.APITimeoutError(request=request)
        exc.__cause__ = cause
        return exc

    assert _never_connected(timeout(httpx2.ConnectTimeout("connect", request=request)))
    assert _never_connected(timeout(httpx2.PoolTimeout("pool", request=request)))
    assert not _never_connected(timeout(httpx2.ReadTimeout("read", request=request)))  # it may have run
    assert _never_connected(timeout(httpx2.LocalProtocolError("Illegal header value")))  # never on the wire
    provider = OpenAIProvider("openai", CAT, Settings(), ProviderEndpoint(api="openai", api_key_env="X",
                                                                          base_url="http://127.0.0.1:9/v1"),
                              Secret("k"), ManualClock(0.0))
    unsent = provider._error(timeout(httpx2.ConnectTimeout("connect", request=request)), openai.APIStatusError,
                             openai.APITimeoutError)
    cut = provider._error(timeout(httpx2.ReadTimeout("read", request=request)), openai.APIStatusError,
                          openai.APITimeoutError)
    assert not unsent.ok and not unsent.maybe_billed and cut.maybe_billed


def test_a_prompt_beside_a_body_without_text_is_sent_as_the_question_not_as_filler():
    """Beside a system prompt or instructions, the estimate holds both texts, and the question read as a trace's
    placeholder: filler of its size went to the provider in its place (a review). Sent as it is now, at both
    providers; a Responses prompt template object beside it is no text of its own, so the prompt keys the result."""
    from actors.providers.anthropic_http import AnthropicProvider
    from engine.core.features import fingerprint

    ask = {"arrival_s": 0.0, "model": "claude-haiku-4-5", "system": "Answer in one word.", "max_tokens": 20}
    fr = make(**ask, prompt="Capital of France?")
    anthropic = AnthropicProvider("anthropic", CAT, Settings(), ProviderEndpoint(api="anthropic", api_key_env="X",
                                                                                 base_url="http://127.0.0.1:9"),
                                  Secret("k"), ManualClock(0.0))
    sent = anthropic.body(CallJob("k", fr, 0.0, 0, 0))
    assert sent["messages"][-1]["content"][-1]["text"] == "Capital of France?" and sent["system"] == ask["system"]
    # Tools beside it too (the estimate holds them): the next review's case.
    tool = {"name": "get_weather", "description": "The current weather for a city, in Celsius, with wind.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    weather = make(**ask, prompt="What's the weather in Paris?", tools=[tool])
    sent = anthropic.body(CallJob("k", weather, 0.0, 0, 0))
    assert sent["messages"][-1]["content"][-1]["text"] == "What's the weather in Paris?" and sent["tools"] == [tool]
    raw = CAT.model_dump()
    raw["providers"]["openai"]["models"]["gpt-5-mini"]["api"] = "responses"
    cat = type(CAT).model_validate(raw)
    ctx = validation_context(cat)
    template = {"prompt": {"id": "pmpt_support", "version": "3"}, "instructions": "Answer in one word"}
    reqs = [Request.model_validate({"id": f"r{k}", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": q,
                                    "body": template}, context=ctx)
            for k, q in enumerate(("Capital of France?", "Capital of Spain?"))]
    openai_ = OpenAIProvider("openai", cat, Settings(), ProviderEndpoint(api="openai", api_key_env="X",
                                                                       base_url="http://127.0.0.1:9/v1"),
                             Secret("k"), ManualClock(0.0))
    assert [openai_.body(CallJob("k", r, 0.0, 0, 0))["input"] for r in reqs] == [r.prompt for r in reqs]
    assert fingerprint(reqs[0]) != fingerprint(reqs[1])


def test_an_image_quality_the_model_does_not_offer_is_refused_naming_it():
    """"ultra" was accepted, reserved and counted at the dearest quality, and sent to a provider that answers it
    with a 400 (a helper's hunt); the catalog's qualities and "auto" pass."""
    with pytest.raises(ValidationError, match="params.quality 'ultra' is not offered by 'gpt-image-1'"):
        make(model="gpt-image-1", kind="image", prompt="a cat", params={"quality": "ultra"})
    assert make(model="gpt-image-1", kind="image", prompt="a cat", params={"quality": "high"}).params["quality"] == "high"
    assert make(model="gpt-image-1", kind="image", prompt="a cat", body={"prompt": "a cat", "quality": "auto"})


@pytest.mark.parametrize("prompt,tokens_given", [("猫" * 8000, None), ("7" * 20000, None), ("a" * 20000, 1)])
def test_an_images_prompt_is_reserved_at_no_less_than_its_answer_can_count(prompt, tokens_given):
    """gpt-image-1's prompt tokens are counted from the answer: reserved on the estimate (a quarter of the
    characters, or the caller's own count), dense prompts were counted up to 10x what was reserved (a review)."""
    d = {"model": "gpt-image-1", "prompt": prompt, "params": {"quality": "low"}}
    r = make(**d, **({} if tokens_given is None else {"input_tokens": tokens_given}))
    worst = len(prompt.encode())  # at most one token per byte, whatever the tokenizer
    counted = price_usage(r, CAT, "sync", input_tokens=worst, output_tokens=0).total
    assert reserve_bound(r, CAT, "sync") >= counted
