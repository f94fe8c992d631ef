"""A request's body goes on the wire unchanged when it goes sync, whatever fields the installed SDK names as
arguments: the fields it does not name ride in ``extra_body``, as a batch line carries them (JSON, as it is)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.unit.test_http_providers import MODEL, PROVIDERS, Rig, emu, jobs_of  # noqa: F401  (emu: the fixture)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

# Fields the providers take that an SDK may not name: anthropic 2.x dropped temperature, top_p and top_k from
# ``messages.create``; no SDK names a server's own (vLLM's top_k and repetition_penalty on the OpenAI API).
FIELDS = {"anthropic": {"temperature": 0.2, "top_p": 0.9, "top_k": 40},
          "openai": {"temperature": 0.2, "top_k": 40, "repetition_penalty": 1.1}}


@PROVIDERS
def test_a_sync_call_sends_body_fields_the_sdk_does_not_name(emu, provider):  # noqa: F811
    body = {"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 64, **FIELDS[provider]}
    (j,) = jobs_of(provider, 1, body=body)
    sent: list[dict] = []

    async def go():
        rig = Rig(emu, provider)
        http = rig.d.provider.client._client  # the SDK's httpx client
        send = http.send

        async def spy(request, *a, **kw):  # the request as it leaves for the wire
            sent.append(json.loads(request.content))
            return await send(request, *a, **kw)

        http.send = spy
        try:
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            # Before: "bad request body: AsyncMessages.create() got an unexpected keyword argument 'temperature'",
            # for a request that the batch API sent unchanged (a fifth of the sync Anthropic calls of a workload).
            assert r.status == "ok" and r.mode == "sync" and r.real, r.error
            assert len(emu.bill().items) == 1 and r.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())
    (wire,) = sent
    assert {k: wire.get(k) for k in FIELDS[provider]} == FIELDS[provider]  # every field on the wire, unchanged
    assert wire["model"] == MODEL[provider] and wire["messages"] == body["messages"]


def test_a_body_in_the_shape_of_another_openai_endpoint_is_refused_naming_the_field():
    """A Responses body (``input``) for a model called through chat completions was reserved for, dispatched, and
    failed by the SDK ("Missing required arguments ... 'messages'"); it is refused per request instead."""
    from engine.core.catalog import default_catalog
    from engine.core.request import Request, validation_context
    from engine.core.settings import ProviderEndpoint, ProvidersSettings, Settings

    s = Settings(providers=ProvidersSettings(mode="http", endpoints={
        "openai": ProviderEndpoint(api="openai", api_key_env="OPENAI_API_KEY")}))
    ctx = validation_context(default_catalog(), s)
    bad = {"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "body": {"input": "Name three rivers."}}
    with pytest.raises(ValueError, match="body.input is a /v1/responses field"):
        Request.model_validate(bad, context=ctx)
    ok = {**bad, "body": {"messages": [{"role": "user", "content": "Name three rivers."}]}}
    assert Request.model_validate(ok, context=ctx).input_tokens > 0
    # Simulated providers (the default mode) send nothing anywhere: accepted.
    assert Request.model_validate(bad).input_tokens > 0
    # At Anthropic, whose Messages API has no input: it went beside made-up messages, for a 400 (a review).
    s = Settings(providers=ProvidersSettings(mode="http", endpoints={
        "anthropic": ProviderEndpoint(api="anthropic", api_key_env="ANTHROPIC_API_KEY")}))
    with pytest.raises(ValueError, match="body.input is an OpenAI Responses field"):
        Request.model_validate({**bad, "model": "claude-haiku-4-5"}, context=validation_context(default_catalog(), s))


def test_a_body_field_named_like_an_sdk_option_is_a_field_not_the_option():
    import openai

    from actors.providers._http import sdk_kwargs

    create = openai.AsyncOpenAI(api_key="unused").chat.completions.create
    kw = sdk_kwargs(create, {"model": "m", "messages": [], "timeout": 0.001})
    assert "timeout" not in kw and kw["extra_body"] == {"timeout": 0.001}  # not a 1 ms client timeout


def test_a_body_cap_other_than_the_requests_cap_is_refused_naming_it():
    """``max_output_tokens`` 5 beside ``body.max_tokens`` 4000: the budget reserved 5 tokens and the provider
    was sent 4000 (a hard budget overrun threefold, a helper's tour). One cap, or the same cap twice, is fine."""
    from engine.core.request import Request

    msgs = [{"role": "user", "content": "Say hi."}]
    base = {"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini"}
    with pytest.raises(ValueError, match="body.max_tokens 4000 differs from the request's output cap 5"):
        Request.model_validate({**base, "max_output_tokens": 5, "body": {"messages": msgs, "max_tokens": 4000}})
    with pytest.raises(ValueError, match="body.max_tokens 9 differs"):  # two caps in the body
        Request.model_validate({**base, "body": {"messages": msgs, "max_completion_tokens": 5, "max_tokens": 9}})
    assert Request.model_validate({**base, "body": {"messages": msgs, "max_tokens": 7}}).max_output_tokens == 7
    assert Request.model_validate({**base, "max_output_tokens": 7,
                                   "body": {"messages": msgs, "max_tokens": 7}}).max_output_tokens == 7


def test_a_field_given_beside_the_body_and_in_it_with_other_values_is_refused():
    """The value beside the body was sent and the body's silently dropped (a helper's tour)."""
    from engine.core.request import Request

    base = {"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini"}
    with pytest.raises(ValueError, match="messages is given beside the body and in it"):
        Request.model_validate({**base, "body": {"messages": [{"role": "user", "content": "AAA"}]},
                                "messages": [{"role": "user", "content": "BBB"}]})
    same = [{"role": "user", "content": "AAA"}]
    assert Request.model_validate({**base, "body": {"messages": same}, "messages": same}).body == {"messages": same}
