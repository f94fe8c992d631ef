"""``stream: true`` on the chat completions route, read with the official SDK's streaming loop and helpers, over
the tests' fake engine under uvicorn (no Ray): it was a 400, so an application whose code streams could not change
only its ``base_url`` (a helper's tour)."""

from __future__ import annotations

import json

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from engine.app import endpoint
from engine.app._endpoint_stream import sse_chunks
from tests.unit.test_endpoint import fake_endpoint

ASK = [{"role": "user", "content": "Name a river."}]


@pytest.fixture(scope="module")
def streamed():
    with fake_endpoint() as (eng, client):
        yield eng, client


def test_a_streamed_completion_is_the_whole_answer_in_openais_chunks(streamed):
    eng, client = streamed
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=ASK, stream=True, stream_options={"include_usage": True},
        extra_headers={endpoint.HEADER_REQUEST_ID: "s1"})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers[endpoint.HEADER_MODE] == "batch_api" and raw.headers[endpoint.HEADER_REQUEST_ID] == "s1"
    chunks = list(raw.parse())
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: Name a river."
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 7 and chunks[-1].usage.total_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    # The engine reads whole answers: it got the body without the stream's fields, as a call without them.
    assert "stream" not in eng.seen["s1"]["body"] and "stream_options" not in eng.seen["s1"]["body"]
    whole = client.chat.completions.create(model="gpt-5-mini", messages=ASK,
                                           extra_headers={endpoint.HEADER_REQUEST_ID: "s1"})
    assert whole.choices[0].message.content == "echo: Name a river."  # the same id and body: the same request
    with client.chat.completions.stream(model="gpt-5-mini", messages=ASK) as stream:  # the SDK's helper
        assert stream.get_final_completion().choices[0].message.content == "echo: Name a river."


def test_a_streamed_answer_with_tool_calls_reads_back_whole_in_the_sdk():
    done = {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "gpt-5-mini",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    events = [e.removeprefix(b"data: ").strip() for e in sse_chunks(done, include_usage=False)]
    assert events[-1] == b"[DONE]"
    state = ChatCompletionStreamState()
    for e in events[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(e)))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
        [("call_a", "f", "{\"x\": 1}"), ("call_b", "g", "{}")]


def test_a_streamed_call_that_fails_or_is_refused_is_an_error_with_its_status(streamed):
    _, client = streamed
    with pytest.raises(openai.APIStatusError) as exc:  # failed at the provider: its status, not a broken stream
        list(client.chat.completions.create(model="gpt-5-mini", messages=ASK, stream=True,
                                            extra_headers={endpoint.HEADER_REQUEST_ID: "s2-boom"}))
    assert exc.value.status_code == 503 and exc.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.BadRequestError) as exc:  # as OpenAI answers it
        client.chat.completions.create(model="gpt-5-mini", messages=ASK, stream_options={"include_usage": True})
    assert exc.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gpt-5-mini", messages=ASK, extra_body={"stream": "yes"})
    assert exc.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gpt-5-mini", messages=[], stream=True)
    assert exc.value.param == "messages"
