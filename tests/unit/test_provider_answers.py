"""What the engine reads from a provider's answer, driven through a ``Dispatcher`` against the loopback emulator:

- answers sent (and billed) that cannot be read, a batch result line or a sync body cut short (the emulator's
  ``garble_members`` and ``cut_body`` faults). Such a call ran, so it may be on the bill: it is never sent again
  as if it had not, and its budget keeps its upper bound (docs/reliability.md);
- tool calls, which reach ``Result.tool_calls`` whichever API made them, survive a reuse from the cache, and are
  answered in the caller's API shape (docs/providers.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from actors import ResultCache, ResultHub
from actors._types import Job
from actors.providers._http import jsonl_records
from engine.core.batchfile import response_body
from engine.core.clock import ManualClock
from engine.core.cost import reserve_bound
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.emulator import Emulator
from tests.unit.test_http_providers import (
    CAT,
    EMU_CANCEL_S,
    PROVIDERS,
    ROUTE,
    SPEED,
    VALIDATING_S,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    jobs_of,
)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
MODEL_OF = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


@pytest.fixture
def emu() -> Iterator[Emulator]:  # as test_http_providers' own
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


@PROVIDERS
def test_a_batch_member_whose_result_line_is_cut_short_fails_at_its_bound_and_the_others_are_not_sent_again(
        emu, provider):
    """One line cut short failed the whole results file: after five reads, every member went back to be sent
    again, the three finished ones paid twice, and the watch that should count them failed for a day (a hunt)."""
    jobs = jobs_of(provider, claims=True)
    garbled = jobs[1]
    emu.faults.garble_members = {batch_key(garbled)}

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []  # nothing sent again
            billed = billed_by_custom_id(emu)  # every member ran and was billed once
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                if j is not garbled:
                    assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            r = rig.results[garbled.req.id]
            bound = reserve_bound(garbled.req, CAT, "batch_api", None)
            assert r.status == "failed" and "not JSON" in r.error and f"${bound:.6f}" in r.error
            assert bound >= billed[batch_key(garbled)].cost_usd  # an upper bound of what it was billed
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            spend = sum(rig.budget.book.spend.values())
            assert spend == pytest.approx(sum(rig.results[j.req.id].cost_usd for j in jobs) + bound, abs=1e-12)
            assert spend >= emu.bill().total_usd  # the ledger never under the bill
            stats = await rig.d.stats()
            assert stats["possibly_billed"] == 1 and stats["possibly_billed_usd"] == pytest.approx(bound, abs=1e-6)
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
@pytest.mark.parametrize("keys", [True, False], ids=["keys-honoured", "keys-not-honoured"])
def test_a_sync_answer_cut_short_is_retried_and_its_budget_never_counts_less_than_the_bill(emu, provider, keys):
    """A 200 whose body was cut short failed as an engine error, settled at $0 though the provider billed it (a
    hunt). It is now an unanswered call: retried under its key. A provider that honours the key answers the
    retry from the first call (billed once); one that does not bills both, and the budget keeps the first
    call's upper bound."""
    emu.honour_keys = keys
    emu.faults.script(provider, ROUTE[provider], [{"cut_body": True}])

    async def go():
        rig = Rig(emu, provider)
        try:
            (j,) = jobs_of(provider, 1, claims=True)
            await rig.reserve([j])
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok", r
            (_, _, first), (_, _, second) = rig.calls
            assert not first.ok and first.maybe_billed and "could not be read" in first.error and second.ok
            bill = emu.bill()
            assert len(bill.items) == (1 if keys else 2)  # the cut answer ran: billed
            assert r.cost_usd == pytest.approx(bill.items[-1].cost_usd, abs=1e-12)
            await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
            spend = sum(rig.budget.book.spend.values())
            bound = 0.0 if keys else reserve_bound(j.req, CAT, "sync", None)
            assert spend == pytest.approx(r.cost_usd + bound, abs=1e-12)
            assert spend >= bill.total_usd - 1e-12  # the ledger never under the bill
        finally:
            await rig.close()
    asyncio.run(go())


def test_results_lines_are_read_one_by_one_and_an_unreadable_one_names_its_member():
    text = ('{"custom_id": "a", "response": {"status_code": 200}}\n'
            '{"id": "batch_req_1", "custom_id": "b", "response": {"status_co\n'
            '\n'
            'garbage with no id\n'
            '{"custom_id": "c", "note": "a line separator \u2028 inside"}\n')
    records, unread = jsonl_records(text)
    assert [r["custom_id"] for r in records] == ["a", "c"]
    assert unread == ["b", None]


# -- tool calls ----------------------------------------------------------------------------------------------------
TOOL = {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
FORCED = {  # a body that makes the model call the tool (the emulator then answers with the text and one call)
    "openai-chat": {"tools": [{"type": "function", "function": TOOL}], "tool_choice": "required"},
    "openai-responses": {"tools": [{"type": "function", **TOOL}], "tool_choice": "required"},
    "anthropic": {"tools": [{"name": TOOL["name"], "description": TOOL["description"],
                             "input_schema": TOOL["parameters"]}], "tool_choice": {"type": "any"}},
}


def tool_job(provider: str, api: str, mode: str) -> Job:
    model = "gpt-5-mini" if provider == "openai" else "claude-sonnet-4-5"
    say = [{"role": "user", "content": "What is the weather in Oslo?"}]
    body = {**({"input": say} if api == "responses" else {"messages": say}), "max_tokens": 50,
            **FORCED["openai-responses" if api == "responses" else f"{provider}-chat" if provider == "openai"
                     else "anthropic"]}
    if provider == "openai":
        body.pop("max_tokens")
    r = Request.model_validate({"id": f"{provider}-{api}-{mode}", "arrival_s": 0.0, "model": model, "body": body,
                                "output_tokens": 20})
    return Job(0, r, fingerprint(r), claim=None)


@pytest.mark.parametrize("mode", ["sync", "batch_api"])
@pytest.mark.parametrize("provider,api", [("openai", "chat"), ("anthropic", "messages")])
def test_a_tool_call_reaches_the_result_beside_the_text(emu, provider, api, mode):
    """The answer's tool calls were dropped: Anthropic kept only its text blocks, OpenAI chat kept its calls only
    when there was no text, and the Responses API's ``function_call`` items were never read (a hunt)."""
    j = tool_job(provider, api, mode)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.run(mode, [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok" and r.mode == mode, r
            (call,) = r.tool_calls
            name = call["function"]["name"] if provider == "openai" else call["name"]
            assert name == "get_weather"
            if provider == "openai":
                assert r.output and not r.output.startswith("[{")  # the text stays the output
            else:  # Anthropic writes no text before a forced call: the answer is the call (its JSON the output)
                assert json.loads(r.output) == r.tool_calls and call["input"] == {}  # the schema requires nothing
        finally:
            await rig.close()
    asyncio.run(go())


def test_an_anthropic_answer_of_text_and_tool_use_keeps_both():
    from actors.providers.anthropic_http import _text

    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    assert _text({"content": [{"type": "text", "text": "Let me look."}, use]}) == ("Let me look.", [use])


def test_a_responses_function_call_is_read_and_an_answer_of_calls_alone_carries_them_as_json():
    from actors.providers.openai_http import _text_responses

    calls = [{"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Oslo"}', "status": "completed"}]
    output, got = _text_responses({"output": calls})
    assert got == calls and json.loads(output) == calls
    output, got = _text_responses({"output": [{"type": "web_search_call", "id": "ws_1", "status": "completed"},
                                              {"type": "message", "content": [{"type": "output_text", "text": "hi"}]}]})
    assert (output, got) == ("hi", None)  # the provider's own tool ran it: a result, not a call to make


def test_a_reused_answer_keeps_its_tool_calls():
    """A copy answered from the cache got the output alone: an answer of tool calls came back empty."""
    calls = [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]

    async def go():
        hub = ResultHub()
        cache = ResultCache(ReuseSettings(exact=True, in_flight=True, near=False), hub, ManualClock(5.0))
        first, again = (tool_job("anthropic", "messages", "sync") for _ in range(2))
        again = Job(1, again.req.model_copy(update={"id": "again"}), again.fp)
        assert await cache.lookup([first]) == [0]
        done = Result(id=first.req.id, status="ok", output=json.dumps(calls), tool_calls=calls, cost_usd=0.01,
                      mode="sync", provider="anthropic", model=first.req.model, done_s=1.0)
        await cache.complete([(first.fp, done)])
        await hub.pull(0.01)
        assert await cache.lookup([again]) == []  # served from the cache
        (hit,) = await hub.pull(0.01)
        return hit

    hit = asyncio.run(go())
    assert hit.status == "reused" and hit.tool_calls == calls and json.loads(hit.output) == calls


@pytest.mark.parametrize("source", ["anthropic", "openai-chat", "openai-responses"])
def test_tool_calls_are_answered_in_the_shape_of_the_api_the_caller_used(source):
    """A reused or translated result carries no body in the caller's shape: the endpoint built one from the
    output alone, so an OpenAI client got the calls as the message's text, and no ``tool_calls``."""
    calls = {"anthropic": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}],
             "openai-chat": [{"id": "toolu_1", "type": "function",
                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
             "openai-responses": [{"type": "function_call", "id": "fc_9", "call_id": "toolu_1",
                                   "name": "get_weather", "arguments": '{"city": "Oslo"}'}]}[source]
    req = Request.model_validate({"id": "q", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "weather?"})
    res = Result(id="q", status="reused", output=json.dumps(calls), tool_calls=calls)
    chat = response_body("/v1/chat/completions", req, res)["choices"][0]
    assert chat["finish_reason"] == "tool_calls" and chat["message"]["content"] is None
    (c,) = chat["message"]["tool_calls"]
    assert c["id"] == "toolu_1" and c["function"]["name"] == "get_weather"
    assert json.loads(c["function"]["arguments"]) == {"city": "Oslo"}
    (f,) = response_body("/v1/responses", req, res)["output"]  # no text: no message item, as the API answers
    assert (f["type"], f["call_id"], f["name"]) == ("function_call", "toolu_1", "get_weather")
    assert json.loads(f["arguments"]) == {"city": "Oslo"}
    with_text = res.model_copy(update={"output": "Let me look."})
    assert response_body("/v1/chat/completions", req, with_text)["choices"][0]["message"]["content"] == "Let me look."


# -- the service tier ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider,home,standard", [("openai", "https://api.openai.com/v1", "default"),
                                                    ("anthropic", "https://api.anthropic.com", "standard_only")])
def test_a_sync_call_to_the_providers_own_api_asks_for_the_standard_tier_the_catalog_prices(
        emu, provider, home, standard):
    """At "auto", both providers' default, a project with priority capacity is billed priority prices, which the
    catalog does not hold: a call answered at "priority" was counted at the standard price (a hunt). A server
    that only speaks the wire format (the emulator here, vLLM, Groq) is sent no tier: it may not know the value."""
    from tests.unit.test_http_providers import direct, job_of

    p = direct(emu, provider)
    j = job_of(tool_job(provider, "chat" if provider == "openai" else "messages", "sync").req)
    try:
        assert "service_tier" not in p.sync_body(j)  # the emulator's address
        p.client.base_url = home
        assert p.sync_body(j)["service_tier"] == standard
        asked = j._replace(req=j.req.model_copy(update={"body": {**j.req.body, "service_tier": "auto"}}))
        assert p.sync_body(asked)["service_tier"] == standard  # "auto" is the default that bills priority
        assert "service_tier" not in p.body(j)  # a batch member's tier is the batch's
    finally:
        asyncio.run(p.close())


def test_an_answer_served_at_a_tier_the_catalog_does_not_price_is_told_once(emu, caplog):
    from tests.unit.test_http_providers import direct, job_of

    p = direct(emu, "openai")
    j = job_of(tool_job("openai", "chat", "sync").req)
    raw = {"id": "c1", "service_tier": "priority", "usage": {"prompt_tokens": 10, "completion_tokens": 2},
           "choices": [{"message": {"role": "assistant", "content": "hi"}}]}
    try:
        with caplog.at_level("WARNING", logger="smartbatch.providers"):
            for _ in range(3):
                out = p._outcome(j, "/v1/chat/completions", raw, None, "sync")
            p._outcome(j, "/v1/chat/completions", {**raw, "service_tier": "default"}, None, "sync")
        told = [r.getMessage() for r in caplog.records if "service tier" in r.getMessage()]
        assert len(told) == 1 and "'priority'" in told[0] and out.ok
    finally:
        asyncio.run(p.close())


def test_a_batch_the_provider_failed_whole_says_why_and_hands_every_member_back(emu, caplog):
    """A batch refused whole (OpenAI's ``failed``, e.g. the enqueued-token limit) sent its members back with
    nothing logged, not even its ``errors``."""
    from openai.types import Batch
    from openai.types.batch import Errors
    from openai.types.batch_error import BatchError

    from tests.unit.test_http_providers import direct, job_of

    p = direct(emu, "openai")
    j = job_of(tool_job("openai", "chat", "batch_api").req)
    handle = p._handle("batch_1", [j])
    handle.batch = Batch.model_construct(id="batch_1", status="failed", endpoint="/v1/chat/completions",
                                         output_file_id=None, error_file_id=None, errors=Errors(data=[BatchError(
                                             code="token_limit_exceeded", message="Enqueued token limit reached")]))
    try:
        with caplog.at_level("WARNING", logger="smartbatch.providers"):
            assert asyncio.run(p.fetch(handle)) == {}  # none answered: every member goes back
        (said,) = [r.getMessage() for r in caplog.records if "batch_1 failed" in r.getMessage()]
        assert "token_limit_exceeded: Enqueued token limit reached" in said
    finally:
        asyncio.run(p.close())


# -- how an answer ended -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_an_answer_cut_at_its_cap_says_so_and_so_does_a_copy_of_it_from_the_cache(emu, provider):
    """The endpoint answered "stop" (Responses: "completed") for answers cut at their cap whenever it built the
    body itself: from another provider's answer, and for every copy from the cache, which had no end to carry. An
    application that continues a cut answer kept it (a hunt with the SDK)."""
    model = MODEL_OF[provider]
    body = {"messages": [{"role": "user", "content": "tell me everything"}],
            ("max_completion_tokens" if provider == "openai" else "max_tokens"): 5}
    r = Request.model_validate({"id": f"cut-{provider}", "arrival_s": 0.0, "model": model, "body": body,
                                "output_tokens": 5})
    j = Job(0, r, fingerprint(r))

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.run("sync", [j])
            return await rig.until(lambda: rig.results.get(r.id), "the result")
        finally:
            await rig.close()

    res = asyncio.run(go())
    assert res.status == "ok" and res.finish == "length", res
    copy = res.model_copy(update={"status": "reused", "raw": None})  # as the cache hands it out
    chat = response_body("/v1/chat/completions", r, copy)["choices"][0]
    assert chat["finish_reason"] == "length"
    asked = r.model_copy(update={"body": {"input": "tell me everything", "max_output_tokens": 16,
                                          "instructions": "be brief"}})
    resp = response_body("/v1/responses", asked, copy)
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert (resp["instructions"], resp["max_output_tokens"]) == ("be brief", 16)  # echoed, as the API does
    done = copy.model_copy(update={"finish": "stop"})
    assert response_body("/v1/responses", asked, done)["status"] == "completed"
    assert response_body("/v1/chat/completions", r, done)["choices"][0]["finish_reason"] == "stop"


def test_a_reused_answer_keeps_how_it_ended_in_flight_and_from_the_store():
    async def go():
        hub = ResultHub()
        cache = ResultCache(ReuseSettings(exact=True, in_flight=True, near=False), hub, ManualClock(5.0))
        first = tool_job("anthropic", "messages", "sync")
        follower, again = (Job(k, first.req.model_copy(update={"id": name}), first.fp)
                           for k, name in ((1, "follower"), (2, "again")))
        assert await cache.lookup([first]) == [0]
        assert await cache.lookup([follower]) == []  # follows the first, in flight
        await cache.complete([(first.fp, Result(id=first.req.id, status="ok", output="cut sho", finish="length",
                                                cost_usd=0.01, mode="sync", provider="anthropic",
                                                model=first.req.model, done_s=1.0))])
        (followed,) = [r for r in await hub.pull(0.01) if r.id == "follower"]
        assert await cache.lookup([again]) == []
        (hit,) = await hub.pull(0.01)
        return followed, hit

    followed, hit = asyncio.run(go())
    assert (followed.hit, followed.finish) == ("in_flight", "length")
    assert (hit.hit, hit.status, hit.finish) == ("exact", "reused", "length")


def test_the_responses_apis_end_is_read_a_cut_or_filtered_answer_as_incomplete():
    from actors.providers.openai_http import _finish_responses

    cut = {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    assert _finish_responses(cut, None) == "length"
    assert _finish_responses({**cut, "incomplete_details": {"reason": "content_filter"}}, None) == "content_filter"
    assert _finish_responses({"status": "completed"}, [{"type": "function_call"}]) == "tool_calls"
    assert _finish_responses({"status": "completed"}, None) == "stop"
    req = Request.model_validate({"id": "q", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "hi"})
    filtered = response_body("/v1/responses", req, Result(id="q", status="reused", output="", finish="content_filter"))
    assert filtered["status"] == "incomplete" and filtered["incomplete_details"] == {"reason": "content_filter"}


@pytest.mark.parametrize("body", [
    {"input": "hi", "instructions": "be brief", "tools": [{"type": "function", "name": "f", "parameters": {}}],
     "tool_choice": {"type": "function", "name": "f"}},  # the Responses API's own shapes: echoed
    {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},  # a chat body
    {"input": "hi", "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"}},
    {"input": "hi", "instructions": [{"type": "input_text", "text": "be brief"}]},  # text parts
])
def test_a_responses_body_echoes_only_what_its_type_reads(body):
    """Echoing the request's tools and instructions as given made the body fail the SDK's ``Response`` type for
    a chat body, Anthropic tools or text parts as instructions (a review)."""
    from openai.types.responses import Response

    req = Request.model_validate({"id": "q", "arrival_s": 0.0, "model": "gpt-5-mini", "body": body})
    out = response_body("/v1/responses", req, Result(id="q", status="ok", output="hello", finish="stop"))
    parsed = Response.model_validate(out)
    own = "messages" not in body and "input_schema" not in str(body) and "tools" in body
    assert (len(parsed.tools) == 1) == own and parsed.output_text == "hello"
    assert parsed.instructions == (body["instructions"] if isinstance(body.get("instructions"), str) else None)
