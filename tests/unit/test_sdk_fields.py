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
# (gpt-5-mini, the OpenAI model here, is a reasoning model: it takes no temperature but 1 and no max_tokens. The
# emulator plays OpenAI's own API, which refuses a server's own fields: the call fails, but only once on the wire.)
FIELDS = {"anthropic": {"temperature": 0.2, "top_p": 0.9, "top_k": 40},
          "openai": {"temperature": 1, "top_k": 40, "repetition_penalty": 1.1}}
CAP = {"anthropic": "max_tokens", "openai": "max_completion_tokens"}


@PROVIDERS
def test_a_sync_call_sends_body_fields_the_sdk_does_not_name(emu, provider):  # noqa: F811
    body = {"messages": [{"role": "user", "content": "Name three rivers."}], CAP[provider]: 64, **FIELDS[provider]}
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
            if provider == "openai":  # they reach the server: OpenAI's own API (the emulator) refuses a server's own
                assert r.status == "failed" and "Unrecognized request argument supplied: repetition_penalty" in r.error
                assert not emu.bill().items
            else:
                assert r.status == "ok" and r.mode == "sync" and r.real, r.error
                assert len(emu.bill().items) == 1 and r.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())
    (wire,) = sent
    assert {k: wire.get(k) for k in FIELDS[provider]} == FIELDS[provider]  # every field on the wire, unchanged
    assert wire["model"] == MODEL[provider] and wire["messages"] == body["messages"]


def _http_context(provider: str, catalog=None):
    from engine.core.catalog import default_catalog
    from engine.core.request import validation_context
    from engine.core.settings import ProviderEndpoint, ProvidersSettings, Settings

    s = Settings(providers=ProvidersSettings(mode="http", endpoints={
        provider: ProviderEndpoint(api=provider, api_key_env=f"{provider.upper()}_API_KEY")}))
    return validation_context(catalog or default_catalog(), s)


RESPONSES_BODY = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Name three "},
                                                         {"type": "input_text", "text": "rivers."}]}],
                  "instructions": "Be brief.", "max_output_tokens": 64, "store": False, "truncation": "disabled",
                  "tools": [], "text": {"format": {"type": "text"}}}
PARTS = [{"type": "text", "text": "Name three "}, {"type": "text", "text": "rivers."}]


@PROVIDERS
def test_a_responses_body_goes_as_messages_to_a_model_called_through_chat_or_messages(emu, provider):  # noqa: F811
    """An unchanged Responses client of the endpoint (``input``, ``instructions``, ``max_output_tokens``, and
    fields at their defaults), or a batch file's /v1/responses line, was refused for every model the default
    catalog calls through chat completions or Anthropic's Messages, where docs/service.md lists the route (a
    helper's hunt). It goes as messages now: the same text, the same cap, answered and billed once; the request
    keeps the caller's body (its errors name the caller's fields)."""
    from actors._types import Job
    from engine.core.request import Request

    r = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": MODEL[provider], "body": RESPONSES_BODY},
                               context=_http_context(provider))
    assert r.max_output_tokens == 64 and r.input_tokens > 0 and r.body == RESPONSES_BODY
    sent: list[dict] = []

    async def go():
        rig = Rig(emu, provider)
        http = rig.d.provider.client._client
        send = http.send

        async def spy(request, *a, **kw):
            sent.append(json.loads(request.content))
            return await send(request, *a, **kw)

        http.send = spy
        try:
            await rig.run("sync", [Job(0, r, "fp-r")])
            res = await rig.until(lambda: rig.results.get("r"), "the result")
            assert res.status == "ok" and res.real, res.error
            assert len(emu.bill().items) == 1 and res.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())
    (wire,) = sent
    assert not {"input", "instructions", "max_output_tokens", "truncation", "tools", "text"} & wire.keys()
    if provider == "openai":
        assert wire["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PARTS}]
        assert wire["max_completion_tokens"] == 64 and wire["store"] is False  # chat completions has store
    else:
        assert wire["messages"] == [{"role": "user", "content": PARTS}] and wire["max_tokens"] == 64
        assert wire["system"] == [{"type": "text", "text": "Be brief."}] and "store" not in wire


def test_an_answer_sent_back_to_a_claude_model_goes_as_plain_text_blocks():
    """An output message item sent back (an application's next turn) kept its output_text part's other keys
    (``annotations``), which no text block of Anthropic's has."""
    from engine.core.responses_input import as_messages

    said = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "Lima is warm.", "annotations": []}]}
    marked = {"type": "input_text", "text": "And now?", "cache_control": {"type": "ephemeral"}}
    wire = as_messages({"input": [{"role": "user", "content": "Lima?"}, said,
                                  {"role": "user", "content": [marked]}]}, "anthropic", "chat")
    assert wire["messages"][1:] == [{"role": "assistant", "content": [{"type": "text", "text": "Lima is warm."}]},
                                    {"role": "user", "content": [{"type": "text", "text": "And now?",
                                                                  "cache_control": {"type": "ephemeral"}}]}]


def test_the_system_prompts_of_a_responses_body_all_reach_the_model():
    """A ``system`` beside ``instructions`` was overwritten by it, and a non-string ``instructions`` dropped, both
    counted in the prompt's tokens (a review)."""
    from engine.core.responses_input import as_messages

    body = {"input": [{"role": "developer", "content": "D"}, {"role": "user", "content": "hi"}], "system": "S",
            "instructions": [{"type": "input_text", "text": "I"}]}
    out = as_messages(body, "anthropic", "chat")
    assert out["system"] == [{"type": "text", "text": t} for t in "SID"]
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    out = as_messages(body, "openai", "chat")
    assert [m["role"] for m in out["messages"]] == ["system", "system", "developer", "user"]
    assert as_messages(body, "openai", "responses") is body  # a model called through /v1/responses takes it as is
    # A later system or developer item stays where it is at Anthropic, as its mid-conversation system message (the
    # engine takes or refuses it by the model, test_api_fields.py): lifted to the system prompt, it changed the
    # instructions of the turns before it.
    later = {**body, "input": [*body["input"], {"role": "developer", "content": "L"}]}
    out = as_messages(later, "anthropic", "chat")
    assert out["system"] == [{"type": "text", "text": t} for t in "SID"]
    assert out["messages"] == [{"role": "user", "content": "hi"}, {"role": "system", "content": "L"}]


@pytest.mark.parametrize(("change", "field"), [
    ({"reasoning": {"effort": "low"}}, "body.reasoning"),
    ({"previous_response_id": "resp_1"}, "body.previous_response_id"),
    ({"tools": [{"type": "function", "name": "f"}]}, "body.tools"),
    ({"tools": [{"type": "web_search"}]}, "body.tools"),
    ({"instructions": 5}, "body.instructions"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c", "output": "1"}]},
     "body.input[1]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "body.input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "body.input[0].content[0]"),
    ({"input": []}, "body.input"),
    ({"input": [{"role": "system", "content": "only a system prompt"}]}, "body.input"),
])
@PROVIDERS
def test_a_responses_field_with_no_counterpart_is_refused_naming_it(provider, change, field):
    """Dropped, it would change the answer the caller pays for; refused per request with the overlay as the fix."""
    from engine.core.request import Request

    d = {"id": "r", "arrival_s": 0.0, "model": MODEL[provider], "body": {**RESPONSES_BODY, **change}}
    if provider == "openai" and change == {"input": [{"role": "system", "content": "only a system prompt"}]}:
        # chat completions takes a system message alone (Messages has nothing to answer)
        assert Request.model_validate(d, context=_http_context(provider)).body == d["body"]
        return
    if provider == "anthropic" and (change == {"tools": [{"type": "function", "name": "f"}]} or field.endswith(
            "content[0]")):
        # Messages has function tools and images: they go in its shape (engine.core._claude_tools,
        # test_endpoint_claude.py)
        assert Request.model_validate(d, context=_http_context(provider)).body == d["body"]
        return
    with pytest.raises(ValueError) as exc:
        Request.model_validate(d, context=_http_context(provider))
    assert field in str(exc.value), str(exc.value)


def test_a_responses_body_stays_one_for_a_model_called_through_responses_or_simulated():
    from engine.core.catalog import default_catalog
    from engine.core.request import Request

    cat = default_catalog()
    spec = cat.providers["openai"].models["gpt-5-mini"]
    models = {**cat.providers["openai"].models, "gpt-5-mini": spec.model_copy(update={"api": "responses"})}
    overlay = cat.model_copy(update={"providers": {**cat.providers, "openai": cat.providers["openai"].model_copy(
        update={"models": models})}})
    d = {"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "body": {"input": "Name three rivers.",
                                                                       "reasoning": {"effort": "low"}}}
    assert Request.model_validate(d, context=_http_context("openai", overlay)).body == d["body"]
    assert Request.model_validate(d).body == d["body"]  # simulated providers send nothing anywhere
    # A chat body for a model called through /v1/responses is still refused, naming messages.
    chat = {**d, "body": {"messages": [{"role": "user", "content": "x"}]}}
    with pytest.raises(ValueError, match="body.messages is a /v1/chat/completions field"):
        Request.model_validate(chat, context=_http_context("openai", overlay))


def test_a_body_nested_past_the_limit_is_refused_per_request_naming_where():
    """The endpoint's reader takes a body nested 950 deep, and the fingerprint's json.dumps (or Ray's pickling)
    then failed in the actor that carried its neighbours (a review)."""
    from engine.core._checks import MAX_DEPTH
    from engine.core.request import Request

    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    d = {"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini",
         "body": {"messages": [{"role": "user", "content": "x"}], "metadata": {"x": deep}}}
    with pytest.raises(ValueError, match=f"nested more than {MAX_DEPTH} levels"):
        Request.model_validate(d)
    ok = [[[["a json schema nests a few levels"]]]]
    assert Request.model_validate({**d, "body": {**d["body"], "metadata": {"x": ok}}}).body["metadata"]["x"] == ok


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
    base = {"id": "r", "arrival_s": 0.0, "model": "gpt-4o-mini"}
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


@pytest.mark.parametrize(("tools", "field"), [("x", "body.tools"), ([{"type": "function"}, 3], "body.tools.1")])
@PROVIDERS
def test_tools_that_are_not_a_list_of_objects_are_refused_naming_them(provider, tools, field):
    """Accepted here and refused by the provider after, with the provider's words and no field named (a helper's
    hunt of the endpoint)."""
    from engine.core.request import Request

    d = {"id": "r", "arrival_s": 0.0, "model": MODEL[provider],
         "body": {"messages": [{"role": "user", "content": "x"}], "tools": tools}}
    with pytest.raises(ValueError, match="tool") as exc:
        Request.model_validate(d, context=_http_context(provider))
    assert field in str(exc.value)


def test_a_response_format_of_no_known_type_is_refused_naming_it():
    """``{"type": "xml"}`` was accepted, reserved for and refused by the provider (the driver hunt's list)."""
    from engine.core.request import Request

    d = {"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "body": {"messages": [{"role": "user", "content": "x"}]}}
    with pytest.raises(ValueError, match="body.response_format must be an object whose type is"):
        Request.model_validate({**d, "body": {**d["body"], "response_format": {"type": "xml"}}})
    schema = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}
    assert Request.model_validate({**d, "body": {**d["body"], "response_format": schema}}).body["response_format"]


@PROVIDERS
def test_a_responses_body_nobody_checked_is_sent_as_it_is_and_fails_alone(emu, provider):  # noqa: F811
    """A ``Request`` made under other settings (a trace loaded for the simulator, then replayed live) is not
    checked against the engine's providers. Its untranslatable body raised in the provider's body builder, and at
    Anthropic failed every member of its batch (a review); it goes as it is, for the provider to refuse it alone."""
    from engine.core.provider_api import CallJob
    from engine.core.request import Request

    bad = Request.model_validate({"id": "b", "arrival_s": 0.0, "model": MODEL[provider],
                                  "body": {"input": "Name three rivers.", "reasoning": {"effort": "low"}}})
    good = Request.model_validate({"id": "g", "arrival_s": 0.0, "model": MODEL[provider], "body": RESPONSES_BODY},
                                  context=_http_context(provider))
    rig = Rig(emu, provider)
    try:
        p = rig.d.provider
        assert p.body(CallJob("kb", bad, 0.0, 0, 0))["input"] == "Name three rivers."  # as it is
        assert "messages" in p.body(CallJob("kg", good, 0.0, 0, 0))
        if provider == "anthropic":  # the batch's lines are built, each its own
            lines = p.batch_body([CallJob("kb", bad, 0.0, 0, 0), CallJob("kg", good, 0.0, 0, 0)])
            assert ["input" in x["params"] for x in lines] == [True, False]
    finally:
        asyncio.run(rig.close())


def test_what_a_responses_body_carries_reaches_the_wire_or_is_moot():
    """A ``cache_control`` breakpoint on an Anthropic system block was dropped (its cached prefix billed in full),
    an empty ``instructions`` became an empty system block, and fields that mean nothing without tools went on to
    chat completions, which refuses them (a review)."""
    from engine.core.responses_input import as_messages

    block = {"type": "text", "text": "LONG", "cache_control": {"type": "ephemeral"}}
    body = {"system": [block], "instructions": "", "input": "q", "parallel_tool_calls": True, "top_logprobs": 2,
            "metadata": {"app": "x"}, "user": "u1"}
    out = as_messages(body, "anthropic", "chat")
    assert out["system"] == [block] and out["messages"] == [{"role": "user", "content": "q"}]
    assert not {"parallel_tool_calls", "top_logprobs", "metadata", "user", "instructions"} & out.keys()
    out = as_messages(body, "openai", "chat")
    assert out["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "LONG"}]}
    assert len(out["messages"]) == 2 and out["metadata"] == {"app": "x"} and out["user"] == "u1"
    assert not {"parallel_tool_calls", "top_logprobs"} & out.keys()


def test_a_request_made_elsewhere_is_held_to_the_engines_providers_when_handed_over():
    """A trace loaded for the simulator and replayed live skipped the checks of a real call: a Responses body with
    no counterpart in chat completions went on to the provider (a review)."""
    from engine.core.catalog import default_catalog
    from engine.core.errors import RequestError
    from engine.core.request import Request, in_catalog

    http = _http_context("openai")["settings"]
    msgs = [{"role": "user", "content": "x"}]
    cases = {"body.reasoning": {"input": "x", "reasoning": {"effort": "low"}},
             "body.input[0]": {"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}}
    for field, body in cases.items():
        r = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "body": body})  # simulated
        assert in_catalog(r, default_catalog()) is r  # no settings: the model alone, as before
        with pytest.raises(RequestError) as exc:
            in_catalog(r, default_catalog(), 3, http)
        assert exc.value.field == field and exc.value.position == 3
    ok = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "body": {"messages": msgs}})
    assert in_catalog(ok, default_catalog(), 0, http) is ok
