"""What one provider's wire format refuses that another's takes, refused per request when the request is made
(``engine.core._checks.check_api_body``): before, each was accepted, reserved for and sent, and the provider
answered 400 for that call (a helper's hunt of the emulator, whose answers now match)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.core.catalog import default_catalog
from engine.core.request import Request, validation_context
from engine.core.settings import Settings

CAT = default_catalog()
CTX = validation_context(CAT, Settings())
HI = {"role": "user", "content": "hi"}


def make(model: str, **body) -> Request:
    return Request.model_validate({"id": "r", "arrival_s": 0.0, "model": model,
                                   "body": {"messages": [HI], **body}}, context=CTX)


def refusal(model: str, **body) -> str:
    with pytest.raises(ValidationError) as ei:
        make(model, **body)
    (err,) = ei.value.errors()
    return err["msg"]


@pytest.mark.parametrize(("body", "field", "fix"), [
    ({"stop": ["\n"]}, "body.stop", "stop_sequences"),
    ({"max_completion_tokens": 50}, "body.max_completion_tokens", "max_tokens"),
    ({"response_format": {"type": "json_object"}}, "body.response_format", "output_config"),
    ({"seed": 7}, "body.seed", "leave it out"),
    ({"user": "u-1"}, "body.user", "metadata.user_id"),
    ({"metadata": {"tenant": "acme"}}, "body.metadata", "only user_id"),
    ({"speed": "fast"}, "body.speed", "other prices"),
    ({"messages": [{"role": "developer", "content": "be brief"}, HI]}, "body.messages[0].role", "top-level system"),
    ({"messages": [HI, {"role": "tool", "content": "42"}]}, "body.messages[1].role", "tool_result"),
    ({"messages": [{**HI, "name": "ola"}]}, "body.messages[0].name", "name the speaker in the content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "hi"}]}]},
     "body.messages[0].content[0].text", "empty text block"),
    ({"system": [{"type": "text", "text": ""}]}, "body.system[0].text", "empty text block"),
    ({"messages": [HI, {"role": "assistant", "content": ""}, HI]}, "body.messages[1].content", "no content"),
    ({"messages": [HI, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": []}]},
     "body.messages[2].content", "no content"),
    ({"system": [{"type": "text", "text": f"part {k}", "cache_control": {"type": "ephemeral"}} for k in range(5)]},
     "body.system.4.cache_control", "at most 4"),
])
def test_an_anthropic_request_with_what_the_messages_api_refuses_is_refused_naming_field_and_fix(body, field, fix):
    msg = refusal("claude-haiku-4-5", **({} if "max_completion_tokens" in body else {"max_tokens": 20}), **body)
    assert msg.startswith(f"Value error, {field}") and fix in msg


SAY = {"role": "system", "content": "Now answer in French."}
SAID = {"role": "assistant", "content": "Hello."}
MORE = {"role": "user", "content": "And again?"}


@pytest.mark.parametrize(("model", "messages", "field", "why"), [
    ("claude-haiku-4-5", [SAY, HI], "body.messages[0].role", "only ahead of the conversation"),
    ("claude-sonnet-4-5", [HI, SAY], "body.messages[1].role", "only ahead of the conversation"),
    ("claude-opus-5-5", [HI, SAY, SAID], "body.messages[1].role", "only ahead of the conversation"),
    # At a model that takes one mid-conversation: never first, right after a user turn, then last or before an
    # assistant turn (the placement rules of Anthropic's mid-conversation system messages).
    ("claude-fable-5-1", [SAY, HI], "body.messages[0].role", "opens the conversation"),
    ("claude-fable-5-1", [HI, SAID, SAY], "body.messages[2].role", "follows no user turn"),
    ("claude-fable-5", [HI, SAY, MORE], "body.messages[1].role", "followed by a 'user' message"),
    ("claude-sonnet-5-5", [HI, SAY, SAY], "body.messages[1].role", "followed by a 'system' message"),
    ("claude-sonnet-5-5", [HI, {"role": "system", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://example.com/a.png"}}]}], "body.messages[1].content[0]", "text block"),
])
def test_a_system_message_among_the_messages_is_refused_where_anthropic_refuses_it(model, messages, field, why):
    # Anthropic's system prompt is the top-level system; a message of role system was accepted at every Claude
    # model, reserved for and perhaps batched, and the provider refused the call ("Unexpected role \"system\"").
    msg = refusal(model, max_tokens=20, messages=messages)
    assert msg.startswith(f"Value error, {field}") and why in msg, msg
    assert field.endswith("content[0]") or "top-level system field" in msg and "user message" in msg


def test_a_mid_conversation_system_message_passes_at_a_model_that_takes_one():
    assert CAT.model("anthropic", "claude-fable-5-1").mid_conversation_system
    assert not CAT.model("anthropic", "claude-haiku-4-5").mid_conversation_system
    for messages in ([HI, SAY], [HI, SAY, SAID, MORE], [HI, SAID, MORE, {**SAY, "content": [
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]}]):
        assert make("claude-fable-5-1", max_tokens=20, messages=messages).body["messages"] == messages
    # A Responses body: its leading system and developer items go as the system prompt at any Claude model; a
    # later one stays where it is, refused (naming the caller's item) where the model takes none there.
    later = {"input": [{"role": "developer", "content": "Be brief."}, HI, {"role": "developer", "content": "French."}]}
    r = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "claude-fable-5", "max_output_tokens": 20,
                                "body": later}, context=CTX)
    assert r.body == later
    with pytest.raises(ValidationError) as ei:
        Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "claude-haiku-4-5", "max_output_tokens": 20,
                                "body": later}, context=CTX)
    assert ei.value.errors()[0]["msg"].startswith("Value error, body.input[2].role: a system message")


def test_a_final_assistant_message_may_be_empty_at_anthropic():
    # Anthropic: "all messages must have non-empty content except for the optional final assistant message".
    assert make("claude-haiku-4-5", max_tokens=20, messages=[HI, {"role": "assistant", "content": ""}]).body


@pytest.mark.parametrize("stops", [["\n"], ["END", ""], [" \t\n"]])
def test_a_blank_stop_sequence_is_refused_for_an_anthropic_model_only(stops):
    # Anthropic refuses one ("stop_sequences: each stop sequence must contain non-whitespace"); a chat client's
    # stop: "\n", renamed by the endpoint, was accepted, reserved for and batched, and the provider refused the
    # call (a review). OpenAI takes it.
    msg = refusal("claude-haiku-4-5", max_tokens=20, stop_sequences=stops)
    assert msg.startswith("Value error, body.stop_sequences must be") and "whitespace" in msg, msg
    assert make("gpt-4o-mini", stop=stops).body["stop"] == stops


IMAGE_URL = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
IMAGE = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}


@pytest.mark.parametrize(("model", "part", "fix"), [
    ("claude-haiku-4-5", IMAGE_URL, "{'type': 'image', 'source'"),
    ("claude-haiku-4-5", {"type": "input_text", "text": "hi"}, "{'type': 'text'"),
    ("gpt-4o-mini", IMAGE, "{'type': 'image_url'"),
    ("gpt-4o-mini", {"type": "tool_result", "tool_use_id": "t1", "content": "42"}, "role 'tool'"),
])
def test_a_content_part_of_the_other_providers_api_is_refused_naming_its_counterpart(model, part, fix):
    cap = {"max_tokens": 20} if model.startswith("claude") else {}
    msg = refusal(model, messages=[{"role": "user", "content": [{"type": "text", "text": "Describe it."}, part]}],
                  **cap)
    assert msg.startswith("Value error, body.messages[0].content[1].type") and fix in msg
    # Its own format's part passes, and so does a Responses body's, which goes as messages (translated).
    own = IMAGE if model.startswith("claude") else IMAGE_URL
    assert make(model, messages=[{"role": "user", "content": [own]}], **cap).body["messages"][0]["content"] == [own]
    if model.startswith("claude"):
        r = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": model, "max_output_tokens": 20, "body": {
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}}, context=CTX)
        assert r.body["input"][0]["content"][0]["type"] == "input_text"


def test_what_anthropic_takes_passes_and_the_same_fields_pass_at_openai():
    ok = make("claude-haiku-4-5", max_tokens=20, stop_sequences=["\n\nHuman:"], metadata={"user_id": "u-1"},
              system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}])
    assert ok.body["stop_sequences"] == ["\n\nHuman:"] and ok.body["metadata"] == {"user_id": "u-1"}
    # The four marks Anthropic allows pass.
    four = [{"type": "text", "text": f"part {k}", "cache_control": {"type": "ephemeral"}} for k in range(4)]
    assert len(make("claude-haiku-4-5", max_tokens=20, system=four).body["system"]) == 4
    # OpenAI's own fields, at a model that is not a reasoning one.
    r = make("gpt-4o-mini", stop=["\n"], seed=7, user="u-1", max_tokens=20, temperature=0.2,
             messages=[{"role": "developer", "content": "be brief"}, HI])
    assert r.body["seed"] == 7 and r.max_output_tokens == 20


def test_an_openai_reasoning_model_refuses_max_tokens_and_a_temperature_other_than_1():
    assert CAT.model("openai", "gpt-5-mini").reasoning and not CAT.model("openai", "gpt-4o-mini").reasoning
    msg = refusal("gpt-5-mini", max_tokens=50)
    assert msg.startswith("Value error, body.max_tokens") and "max_completion_tokens" in msg
    msg = refusal("gpt-5-mini", max_tokens=50, max_completion_tokens=50)  # it said to give the one given
    assert msg.startswith("Value error, body.max_tokens") and "leave it out" in msg and "give max_completion" not in msg
    msg = refusal("gpt-5", temperature=0.2)
    assert msg.startswith("Value error, body.temperature") and "must be 1 or left out" in msg
    assert "body.top_p" in refusal("gpt-5", top_p=0.5)
    r = make("gpt-5-mini", max_completion_tokens=50, temperature=1)
    assert r.max_output_tokens == 50


def test_gpt_5_4_takes_a_temperature_at_effort_none_its_default_and_refuses_it_while_it_reasons():
    for model in ("gpt-5.4", "gpt-5.4-mini"):
        assert make(model, temperature=0.2, top_p=0.9).body["temperature"] == 0.2
        assert make(model, temperature=0.2, reasoning_effort="none").body["temperature"] == 0.2
        msg = refusal(model, temperature=0.2, reasoning_effort="high")
        assert msg.startswith("Value error, body.temperature") and "unless the reasoning effort is 'none'" in msg
        assert "max_completion_tokens" in refusal(model, max_tokens=50)  # a reasoning model's cap, at any effort
    assert "body.temperature" in refusal("gpt-5-mini", temperature=0.2, reasoning_effort="none")  # no such effort


def test_gpt_6_2_sol_refuses_effort_none_and_so_any_temperature_and_gpt_6_luna_takes_one_only_at_none():
    for body in ({"reasoning_effort": "none"}, {"reasoning": {"effort": "none"}}):
        msg = refusal("gpt-6.2-sol", **body)
        assert "effort 'none' is refused" in msg and "low, medium, high, xhigh, max" in msg
    assert "body.reasoning.effort" in refusal("gpt-6.2-sol", reasoning={"effort": "minimal"})
    assert make("gpt-6.2-sol", reasoning_effort="max").body["reasoning_effort"] == "max"
    msg = refusal("gpt-6.2-sol", temperature=0.2)
    assert msg.startswith("Value error, body.temperature") and "none" not in msg  # no effort takes it
    assert "unless the reasoning effort is 'none'" in refusal("gpt-6-luna", temperature=0.2)  # medium by default
    assert make("gpt-6-luna", temperature=0.2, reasoning_effort="none").body["temperature"] == 0.2


@pytest.mark.parametrize("model", ["claude-sonnet-5-5", "claude-opus-5-5", "claude-fable-5-1", "claude-fable-5"])
def test_a_claude_model_that_thinks_adaptively_only_refuses_a_manual_budget_and_sampling_but_the_default(model):
    assert "thinks adaptively only" in refusal(model, max_tokens=50, thinking={"type": "enabled", "budget_tokens": 1024})
    for key, value in (("temperature", 0.5), ("top_p", 0.9), ("top_k", 40)):
        assert refusal(model, max_tokens=50, **{key: value}).startswith(f"Value error, body.{key} is refused")
    ok = make(model, max_tokens=50, temperature=1, thinking={"type": "adaptive"})
    assert ok.body["thinking"] == {"type": "adaptive"}
    assert make("claude-haiku-4-5", max_tokens=50, temperature=0.5, top_k=40).body["top_k"] == 40  # as before


def test_claude_fable_5_1_refuses_a_forced_tool_and_fable_5_takes_one():
    tools = [{"name": "lookup", "description": "find a word", "input_schema": {"type": "object"}}]
    for choice in ({"type": "any"}, {"type": "tool", "name": "lookup"}):
        msg = refusal("claude-fable-5-1", max_tokens=50, tools=tools, tool_choice=choice)
        assert msg.startswith("Value error, body.tool_choice") and "forces a tool" in msg and "'auto'" in msg
        assert make("claude-fable-5", max_tokens=50, tools=tools, tool_choice=choice).body["tool_choice"] == choice
    for choice in ({"type": "auto"}, {"type": "none"}):
        assert make("claude-fable-5-1", max_tokens=50, tools=tools, tool_choice=choice).body["tool_choice"] == choice


def test_one_bad_line_of_a_file_fails_alone_and_its_neighbours_load(tmp_path):
    from engine.core.trace import load_trace

    good = '{"id": "a", "arrival_s": 0, "model": "claude-haiku-4-5", "max_tokens": 9, "messages": [%s]}'
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join([good % '{"role": "user", "content": "hi"}',
                            '{"id": "b", "arrival_s": 0, "model": "claude-haiku-4-5", "stop": ["x"], '
                            '"messages": [{"role": "user", "content": "hi"}]}',
                            good.replace('"a"', '"c"') % '{"role": "user", "content": "yo"}']) + "\n")
    trace = load_trace(p, catalog=CAT, skip_invalid=True)
    assert [r.id for r in trace.requests] == ["a", "c"] and trace.skipped == 1
    (problem,) = trace.problems
    assert "body.stop" in str(problem) and "stop_sequences" in str(problem)


def test_a_responses_body_is_checked_as_it_goes_on_the_wire():
    """A Responses body goes to a Claude model as messages, with the fields Messages cannot carry dropped: checked
    as given, a Responses client's metadata and user were refused, and a fifth cache mark passed (a review)."""
    def responses(**body) -> Request:
        return Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "claude-haiku-4-5",
                                       "max_output_tokens": 20, "body": body}, context=CTX)

    r = responses(input="hi", metadata={"tenant": "acme"}, user="u-1", parallel_tool_calls=True)
    assert r.body["metadata"] == {"tenant": "acme"}  # kept as given; as_messages drops it on the way out
    parts = [{"type": "input_text", "text": f"part {k}", "cache_control": {"type": "ephemeral"}} for k in range(5)]
    with pytest.raises(ValidationError, match="mark 5 of 5"):
        responses(input=[{"role": "user", "content": parts}])
    assert len(responses(input=[{"role": "user", "content": parts[:4]}]).body["input"][0]["content"]) == 4


def test_a_cap_under_another_endpoints_name_is_refused_naming_the_endpoints_own():
    """A chat body's max_output_tokens (the Responses API's cap) went to /v1/chat/completions unchanged, where it
    caps nothing: the budget reserved 20 tokens a call and each ran to 256, a hard budget overrun tenfold (a
    helper's hunt). At Anthropic the cap is max_tokens."""
    msg = refusal("gpt-5-mini", max_output_tokens=20)
    assert msg.startswith("Value error, body.max_output_tokens") and "give max_completion_tokens" in msg
    msg = refusal("claude-haiku-4-5", max_output_tokens=20)
    assert msg.startswith("Value error, body.max_output_tokens") and "max_tokens" in msg
    assert make("gpt-5-mini", max_completion_tokens=20).max_output_tokens == 20
    assert make("gpt-4o-mini", max_tokens=20).max_output_tokens == 20
    # A Responses body goes as messages, its cap as the endpoint's (as_messages): it passes.
    r = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini",
                                "body": {"input": "hi", "max_output_tokens": 20}}, context=CTX)
    assert r.max_output_tokens == 20
    # A model called through /v1/responses takes max_output_tokens and nothing else.
    cat = CAT.model_copy(deep=True)
    cat.providers["openai"].models["gpt-5-mini"] = cat.model("openai", "gpt-5-mini").model_copy(
        update={"api": "responses"})
    ctx = validation_context(cat, Settings())
    with pytest.raises(ValidationError, match="body.max_completion_tokens is not a cap of this model's endpoint"):
        Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini",
                                "body": {"input": "hi", "max_completion_tokens": 20}}, context=ctx)
    assert Request.model_validate({"id": "r", "arrival_s": 0.0, "model": "gpt-5-mini", "body": {
        "input": "hi", "max_output_tokens": 20}}, context=ctx).max_output_tokens == 20


TOOLS = [{"name": "lookup", "description": "find a word", "input_schema": {"type": "object"}}]


@pytest.mark.parametrize(("body", "field", "fix"), [
    # Anthropic's top_k is an integer >= 0 (its API reference); each was accepted and the call refused after.
    ({"top_k": 40.0}, "body.top_k", "a whole number >= 0"),
    ({"top_k": -1}, "body.top_k", "a whole number >= 0"),
    ({"top_k": "40"}, "body.top_k", "a whole number >= 0"),
    # A content block of a type no Anthropic message takes ("Input tag ... does not match").
    ({"messages": [{"role": "user", "content": [{"type": "txt", "text": "hi"}]}]}, "body.messages[0].content[0].type",
     "not a content block Anthropic takes"),
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "body.messages[0].content[0].type",
     "not a content block Anthropic takes"),
    # A manual thinking budget: >= 1,024, and below max_tokens (extended thinking's documented rules).
    ({"max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 2000}}, "body.thinking.budget_tokens",
     "raise body.max_tokens above it"),
    ({"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 512}}, "body.thinking.budget_tokens",
     ">= 1024"),
    ({"max_tokens": 4000, "thinking": {"type": "enabled"}}, "body.thinking.budget_tokens", ">= 1024"),
    # A field the Messages API does not have ("Extra inputs are not permitted"), named with its fix.
    ({"top_kk": 40}, "body.top_kk", "check its spelling"),
    ({"reasoning": {"effort": "high"}}, "body.reasoning", "leave it out"),
])
def test_what_anthropic_refuses_in_a_native_body_is_refused_naming_field_and_fix(body, field, fix):
    msg = refusal("claude-haiku-4-5", **{"max_tokens": 20, **body})
    assert msg.startswith(f"Value error, {field}") and fix in msg, msg


def test_what_anthropic_takes_of_these_passes():
    """Precision first: each valid form of the same fields passes (a valid body must never be refused)."""
    thinking = {"type": "enabled", "budget_tokens": 1024}
    assert make("claude-haiku-4-5", max_tokens=1025, thinking=thinking).body["thinking"] == thinking
    # With tools, interleaved thinking lets the budget reach past max_tokens (the context window is its limit).
    assert make("claude-haiku-4-5", max_tokens=1024, thinking={"type": "enabled", "budget_tokens": 8000},
                tools=TOOLS).body["tools"] == TOOLS
    assert make("claude-haiku-4-5", max_tokens=20, thinking={"type": "disabled"}, top_k=0).body["top_k"] == 0
    blocks = [{"type": "text", "text": "Look:"},
              {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}},
              {"type": "search_result", "source": "https://e.com", "title": "t",
               "content": [{"type": "text", "text": "x"}]}]
    turns = [{"role": "user", "content": blocks},
             {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s1", "name": "web_search",
                                                "input": {}},
                                               {"type": "web_search_tool_result", "tool_use_id": "s1", "content": []},
                                               {"type": "tool_use", "id": "t1", "name": "lookup", "input": {}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}]
    assert make("claude-haiku-4-5", max_tokens=20, tools=TOOLS, messages=turns).body["messages"] == turns
    ok = make("claude-haiku-4-5", max_tokens=20, stream=False, service_tier="auto", cache_control={
        "type": "ephemeral"}, container="c1", output_config={"effort": "low"}, inference_geo="us")
    assert ok.body["container"] == "c1"
    # At an OpenAI model, neither rule applies (top_k -1 is an OpenAI-compatible server's "off").
    assert make("gpt-4o-mini", top_k=-1).body["top_k"] == -1
