"""The emulator refuses what the real APIs refuse, with their status codes, so a test that passes here would
pass against them: each case below was answered 200 and billed before (a helper's hunt)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.unit.test_emulator import (  # noqa: F401  (emu, sdk: the fixtures)
    Emulator,
    Sdk,
    anthropic_requests,
    emu,
    ended,
    real_time,
    sdk,
    user,
    wait_for,
)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


def words(tokens: int) -> str:
    return "x" * (4 * tokens)  # the emulator's convention: 4 characters a token


def test_a_prompt_past_the_context_window_is_a_400_before_the_cache_or_the_bill_sees_it(emu: Emulator, sdk: Sdk):  # noqa: F811
    claude = sdk.anthropic()
    big = [{"role": "user", "content": [{"type": "text", "text": words(190_000), "cache_control": {"type": "ephemeral"}}]}]
    # 190k of input fits claude-haiku-4-5's 200k window; 20k of max_tokens beside it does not.
    with pytest.raises(anthropic.BadRequestError, match="maximum context length is 200000"):
        claude.messages.create(model="claude-haiku-4-5", max_tokens=20_000, messages=big)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.openai().chat.completions.create(model="gpt-4o-mini", messages=user(words(130_000)))
    assert err.value.code == "context_length_exceeded"
    assert not emu.bill().items
    # The refused call wrote nothing to the cache: the same prompt with room to answer writes it now.
    ok = claude.messages.create(model="claude-haiku-4-5", max_tokens=100, messages=big)
    assert ok.usage.cache_read_input_tokens == 0 and ok.usage.cache_creation_input_tokens > 0
    # Without a cap, OpenAI counts only the input against the window (gpt-5-mini's default cap is 128k).
    sdk.openai().chat.completions.create(model="gpt-5-mini", messages=user(words(200_000)))
    assert len(emu.bill().items) == 2


def test_a_batch_member_past_the_window_errors_alone_and_is_not_billed(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.anthropic()
    reqs = anthropic_requests(2, "w")
    reqs[1]["params"]["messages"] = user(words(210_000))
    done = ended(client, client.messages.batches.create(requests=reqs).id)
    assert done.request_counts.succeeded == 1 and done.request_counts.errored == 1
    results = {r.custom_id: r.result for r in client.messages.batches.results(done.id)}
    assert results["w1"].type == "errored" and results["w1"].error.error.type == "invalid_request_error"
    assert [i.custom_id for i in emu.bill().items] == ["w0"]


def test_a_message_batch_custom_id_must_match_whole(emu: Emulator, sdk: Sdk):  # noqa: F811
    """A pattern's $ also matches before a final newline: "a\\n" passed as a custom_id, which Anthropic refuses."""
    client = sdk.anthropic()
    for bad in ("a\n", "a b", "x" * 65):
        reqs = anthropic_requests(2, "c")
        reqs[1]["custom_id"] = bad
        with pytest.raises(anthropic.BadRequestError, match="requests.1.custom_id"):
            client.messages.batches.create(requests=reqs)
    assert emu.bill().items == ()


@pytest.mark.parametrize(("kw", "words_in_error"), [
    ({"messages": [{"role": "developer", "content": "be brief"}, *user("hi")]}, "messages[0].role"),
    ({"messages": [*user("hi"), {"role": "tool", "content": "42"}]}, "messages[1].role"),
    ({"system": [{"type": "text", "text": "Be brief."},
                 {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}, "system.1"),
    ({"messages": [{"role": "system", "content": "be brief"}, *user("hi")]}, 'Unexpected role "system"'),
    ({"messages": [*user("hi"), {"role": "system", "content": "be brief"}]}, 'Unexpected role "system"'),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]}]},
     "Input tag 'image_url'"),
    ({"extra_body": {"seed": 7}}, "seed: Extra inputs are not permitted"),
    ({"messages": [{"role": "user", "content": "hi", "name": "ola"}]}, "messages.0.name: Extra inputs"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "must be non-empty"),
    ({"stop_sequences": ["END", "\n"]}, "each stop sequence must contain non-whitespace"),
    ({"metadata": {"user_id": "u", "tenant": "acme"}}, "only user_id"),
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "persistent"}}]}, "cache_control"),
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "10m"}}]},
     "cache_control"),
    ({"system": [{"type": "text", "text": f"s{k}", "cache_control": {"type": "ephemeral"}} for k in range(5)]},
     "A maximum of 4 blocks with cache_control"),
])
def test_anthropic_refuses_what_the_messages_api_refuses(emu: Emulator, sdk: Sdk, kw, words_in_error):  # noqa: F811
    kw = {"messages": user("hi"), **kw}
    with pytest.raises(anthropic.BadRequestError, match=words_in_error.replace("[", r"\[").replace("]", r"\]")):
        sdk.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=20, **kw)
    assert not emu.bill().items


def test_anthropic_takes_what_the_messages_api_takes(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.anthropic()
    system = [{"type": "text", "text": f"s{k}", "cache_control": {"type": "ephemeral", "ttl": "5m"}} for k in range(4)]
    client.messages.create(model="claude-haiku-4-5", max_tokens=20, system=system, metadata={"user_id": "u"},
                           messages=user("hi"), extra_body={"temperature": 0.2, "top_k": 40})
    assert len(emu.bill().items) == 1


SAY = {"role": "system", "content": "Now answer in French."}
SAID = {"role": "assistant", "content": "Hello."}


@pytest.mark.parametrize(("messages", "words_in_error"), [
    ([SAY, *user("hi")], "top-level `system` parameter"),
    ([*user("hi"), SAID, SAY], "must follow a 'user' message"),
    ([*user("hi"), SAY, *user("again")], "must precede an 'assistant' message or end the array"),
    ([*user("hi"), {"role": "system", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://example.com/a.png"}}]}], "must be a text block"),
])
def test_a_mid_conversation_system_message_is_taken_where_anthropic_takes_it(emu: Emulator, sdk: Sdk,  # noqa: F811
                                                                             messages, words_in_error):
    # Anthropic's mid-conversation system message: at a model that takes one, right after a user turn, then last
    # or before an assistant turn, text alone; the emulator took a message of role system anywhere, at any model.
    client = sdk.anthropic()
    with pytest.raises(anthropic.BadRequestError, match=words_in_error):
        client.messages.create(model="claude-fable-5-1", max_tokens=20, messages=messages)
    assert not emu.bill().items
    for ok in ([*user("hi"), SAY], [*user("hi"), SAY, SAID, *user("again")]):
        client.messages.create(model="claude-fable-5-1", max_tokens=20, messages=ok)
    assert len(emu.bill().items) == 2


@real_time
def test_a_top_level_cache_control_marks_the_last_block(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.anthropic()
    long = user(words(5_000))
    first = client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=long,
                                   extra_body={"cache_control": {"type": "ephemeral"}})
    again = client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=long,
                                   extra_body={"cache_control": {"type": "ephemeral"}})
    assert first.usage.cache_creation_input_tokens == 5_000 and again.usage.cache_read_input_tokens == 5_000
    plain = client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=user(words(5_000) + "!"))
    assert plain.usage.cache_creation_input_tokens == 0  # unmarked: nothing is written


@pytest.mark.parametrize(("model", "kw", "code"), [
    ("gpt-5-mini", {"max_tokens": 50}, "unsupported_parameter"),
    ("gpt-5-mini", {"temperature": 0.2}, "unsupported_value"),
    ("gpt-5.4-mini", {"temperature": 0.2, "reasoning_effort": "low"}, "unsupported_value"),
    ("gpt-5.4", {"max_tokens": 50}, "unsupported_parameter"),
    ("gpt-6.2-sol", {"reasoning_effort": "none"}, "unsupported_value"),
    ("gpt-6.2-sol", {"temperature": 0.2}, "unsupported_value"),
    ("gpt-6-luna", {"temperature": 0.2}, "unsupported_value"),
    ("gpt-4o-mini", {"temperature": 2.5}, "invalid_value"),
    ("gpt-4o-mini", {"messages": [{"role": "banana", "content": "hi"}]}, None),
    ("gpt-4o-mini", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"}}]}]}, None),
])
def test_openai_refuses_what_chat_completions_refuses(emu: Emulator, sdk: Sdk, model, kw, code):  # noqa: F811
    kw = {"messages": user("hi"), **kw}
    with pytest.raises(openai.BadRequestError) as err:
        sdk.openai().chat.completions.create(model=model, **kw)
    assert err.value.code == code
    sdk.openai().chat.completions.create(model="gpt-4o-mini", max_tokens=50, temperature=0.2, messages=user("hi"))
    sdk.openai().chat.completions.create(model="gpt-5-mini", max_completion_tokens=50, messages=user("hi"))
    # gpt-5.4's family samples as a chat model at its default effort, none
    sdk.openai().chat.completions.create(model="gpt-5.4-mini", temperature=0.2, messages=user("hi"))
    sdk.openai().chat.completions.create(model="gpt-6-luna", temperature=0.2, reasoning_effort="none",
                                         messages=user("hi"))
    sdk.openai().chat.completions.create(model="gpt-6.2-sol", reasoning_effort="low", messages=user("hi"))
    assert len(emu.bill().items) == 5


@pytest.mark.parametrize(("kw", "param"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"temperature": 0.5}, "temperature"), ({"top_p": 0.9}, "top_p"), ({"top_k": 40}, "top_k")])
def test_claude_sonnet_5_5_answers_400_to_a_manual_budget_and_to_sampling_but_the_default(emu: Emulator, sdk: Sdk,  # noqa: F811
                                                                                          kw, param):
    claude = sdk.anthropic()  # (the SDK names no sampling key any more: the API still takes them, as extra_body)
    with pytest.raises(anthropic.BadRequestError, match=param):
        claude.messages.create(model="claude-sonnet-5-5", max_tokens=50, messages=user("hi"), extra_body=kw)
    assert not emu.bill().items
    claude.messages.create(model="claude-sonnet-5-5", max_tokens=50, messages=user("hi"),
                           extra_body={"temperature": 1, "thinking": {"type": "adaptive"}})
    # it takes them (a budget below max_tokens, as Anthropic takes one)
    claude.messages.create(model="claude-haiku-4-5", max_tokens=2048, messages=user("hi"), extra_body=kw)
    assert len(emu.bill().items) == 2


def test_claude_fable_5_1_answers_400_to_a_forced_tool_and_fable_5_calls_it(emu: Emulator, sdk: Sdk):  # noqa: F811
    claude = sdk.anthropic()
    tools = [{"name": "lookup", "description": "find a word", "input_schema": {"type": "object"}}]
    for choice in ({"type": "any"}, {"type": "tool", "name": "lookup"}):
        with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
            claude.messages.create(model="claude-fable-5-1", max_tokens=50, messages=user("hi"), tools=tools,
                                   tool_choice=choice)
    assert not emu.bill().items
    ok = claude.messages.create(model="claude-fable-5", max_tokens=50, messages=user("hi"), tools=tools,
                                tool_choice={"type": "any"})
    assert [b.name for b in ok.content if b.type == "tool_use"] == ["lookup"]
    claude.messages.create(model="claude-fable-5-1", max_tokens=50, messages=user("hi"), tools=tools,
                           tool_choice={"type": "auto"})
    assert len(emu.bill().items) == 2


def test_anthropic_tool_use_is_refused_and_answered_as_the_messages_api_does(emu: Emulator, sdk: Sdk):  # noqa: F811
    # The emulator took a tool with no input_schema and tool results that answered nothing, and answered a forced
    # call with text before it and an empty input: an endpoint's translation that broke these passed here.
    claude = sdk.anthropic()
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]},
                                               "days": {"type": "integer"}}, "required": ["city", "unit"]}
    tools = [{"name": "get_weather", "input_schema": schema}]
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "unit": "C"}}
    answer = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"}
    for bad, match in (
            (dict(tools=[{"name": "get_weather"}]), "input_schema: Field required"),
            (dict(tools=[{"name": "f", "input_schema": {"type": "array"}}]), "input_schema.type"),
            (dict(messages=[*user("weather?"), {"role": "assistant", "content": [use]}, *user("and?")]),
             "`tool_use` ids were found without `tool_result` blocks immediately after: toolu_1"),
            (dict(messages=[*user("weather?"), {"role": "assistant", "content": [use]}]), "toolu_1"),
            (dict(messages=[*user("weather?"), {"role": "user", "content": [answer]}]), "unexpected `tool_use_id`")):
        with pytest.raises(anthropic.BadRequestError, match=match):
            claude.messages.create(model="claude-sonnet-4-5", max_tokens=500, **{"messages": user("hi"), **bad})
    assert not emu.bill().items
    # Results in the next turn, two user messages of it too (the API combines consecutive turns of a role).
    turns = [*user("weather?"), {"role": "assistant", "content": [use]},
             {"role": "user", "content": [answer]}, *user("Thanks.")]
    assert claude.messages.create(model="claude-sonnet-4-5", max_tokens=500, messages=turns, tools=tools)
    forced = claude.messages.create(model="claude-sonnet-4-5", max_tokens=500, messages=user("hi"), tools=tools,
                                    tool_choice={"type": "tool", "name": "get_weather"})
    (call,) = forced.content  # the call alone: no text before a forced one
    assert call.type == "tool_use" and forced.stop_reason == "tool_use"
    # What the schema requires, as a model fills it (its free-form string seeded by the prompt, as lorem text is).
    assert call.input["unit"] == "C" and call.input["city"].startswith("[emulator ") and "days" not in call.input


def test_a_gpt_6_cache_write_is_billed_at_1_25x_its_input_price(emu: Emulator, sdk: Sdk):  # noqa: F811
    shared = words(1250)  # a cacheable prefix (>= 1024 tokens)
    first = sdk.openai().chat.completions.create(model="gpt-6.2-sol", messages=user(shared + "A question"))
    det = first.usage.prompt_tokens_details
    write = 1250 // 128 * 128
    assert (det.cached_tokens, det.model_dump().get("cache_write_tokens")) == (0, write)
    (item,) = emu.bill().items
    plain, out = first.usage.prompt_tokens - write, first.usage.completion_tokens
    assert item.cost_usd == pytest.approx((plain * 2.0 + write * 2.0 * 1.25 + out * 10.0) / 1e6, rel=1e-12)


@pytest.mark.parametrize("emu", [1000.0], indirect=True, ids=["speedup1e3"])
def test_an_anthropic_one_hour_cache_write_is_billed_at_2x_and_outlives_the_5_minute_one(emu: Emulator,  # noqa: F811
                                                                                         sdk: Sdk):  # noqa: F811
    """Anthropic bills a ``ttl: "1h"`` entry's write at 2x the input price (1.25x for 5 minutes) and keeps it an
    hour. The emulator billed it as a 5-minute write (a $0.0290 call at $0.0182 in a money audit) and let it go
    after five minutes; the engine refuses the TTL, so only a caller of the emulator's own API met it."""
    client = sdk.anthropic()

    def call(ttl: str, prefix: str):
        system = [{"type": "text", "text": prefix + words(1500), "cache_control": {"type": "ephemeral", "ttl": ttl}}]
        return client.messages.create(model="claude-sonnet-4-5", max_tokens=10, system=system, messages=user("Q"))

    hour, five = call("1h", "a"), call("5m", "b")
    written = hour.usage.cache_creation_input_tokens
    assert hour.usage.cache_creation.model_dump() == {"ephemeral_1h_input_tokens": written,
                                                      "ephemeral_5m_input_tokens": 0}
    assert five.usage.cache_creation.ephemeral_5m_input_tokens == five.usage.cache_creation_input_tokens == written
    first, second = emu.bill().items
    out = hour.usage.output_tokens * 15.0
    assert first.cost_usd == pytest.approx((hour.usage.input_tokens * 3.0 + written * 3.0 * 2.0 + out) / 1e6)
    assert second.cost_usd == pytest.approx((five.usage.input_tokens * 3.0 + written * 3.0 * 1.25 + out) / 1e6)
    t0 = emu.now()
    wait_for(lambda: emu.now() > t0 + 300.0, "the 5-minute TTL to pass at 1e3x")
    assert call("1h", "a").usage.cache_read_input_tokens == written  # the hour's entry is still warm
    assert call("5m", "b").usage.cache_read_input_tokens == 0


def test_a_batch_with_more_metadata_than_openai_takes_is_a_400(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.openai()
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", ' \
           b'"messages": [{"role": "user", "content": "hi"}]}}\n'
    f = client.files.create(file=("in.jsonl", line), purpose="batch")
    for meta in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(openai.BadRequestError, match="metadata"):
            client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata=meta)
    ok = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={f"k{i}": "v" * 512 for i in range(16)})
    assert ok.status in ("validating", "in_progress")


@pytest.mark.parametrize(("kw", "words_in_error"), [
    ({"extra_body": {"top_k": 40.5}}, "top_k: Input should be an integer"),
    ({"extra_body": {"top_k": -1}}, "top_k: Input should be an integer"),
    ({"messages": [{"role": "user", "content": [{"type": "txt", "text": "hi"}]}]}, "Input tag 'txt'"),
    ({"max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 2000}},
     "`max_tokens` must be greater than `thinking.budget_tokens`"),
    ({"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 512}}, "greater than or equal to 1024"),
    ({"extra_body": {"top_kk": 40}}, "top_kk: Extra inputs are not permitted"),
])
def test_anthropic_refuses_a_bad_top_k_an_unknown_block_and_a_budget_out_of_its_range(emu: Emulator, sdk: Sdk,  # noqa: F811
                                                                                       kw, words_in_error):
    kw = {"messages": user("hi"), "max_tokens": 20, **kw}
    with pytest.raises(anthropic.BadRequestError, match=words_in_error):
        sdk.anthropic().messages.create(model="claude-haiku-4-5", **kw)
    assert not emu.bill().items


def test_anthropic_takes_a_budget_in_range_and_past_the_cap_with_tools(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.anthropic()
    tools = [{"name": "lookup", "description": "find a word", "input_schema": {"type": "object"}}]
    client.messages.create(model="claude-haiku-4-5", max_tokens=1025, messages=user("hi"),
                           thinking={"type": "enabled", "budget_tokens": 1024}, extra_body={"top_k": 0})
    client.messages.create(model="claude-haiku-4-5", max_tokens=1024, messages=user("hi"), tools=tools,
                           thinking={"type": "enabled", "budget_tokens": 4000})
    client.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=[{"role": "user", "content": [
        {"type": "search_result", "source": "https://e.com", "title": "t", "content": [{"type": "text", "text": "x"}]},
        {"type": "text", "text": "hi"}]}])
    assert len(emu.bill().items) == 3
