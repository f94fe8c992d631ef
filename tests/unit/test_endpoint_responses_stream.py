"""``stream: true`` on the Responses route, read with the official SDK (``responses.create(stream=True)`` and the
``responses.stream`` helper) over the tests' fake engine under uvicorn (no Ray): it was a 400 while chat completions
streamed (a helper's tour)."""

from __future__ import annotations

import json

import openai
import pytest
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from engine.app import endpoint
from engine.app._endpoint_responses_stream import response_events
from tests.unit.test_endpoint import fake_endpoint

EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def streamed():
    with fake_endpoint() as (eng, client):
        yield eng, client


def parsed(events) -> list:
    """Each server-sent event of ``events`` (bytes) read strictly as the SDK's event type its name gives."""
    out = []
    for raw in events:
        head, data = raw.decode().strip().split("\n")
        event = EVENT.validate_python(json.loads(data.removeprefix("data: ")), strict=False)
        assert head == f"event: {event.type}"
        out.append(event)
    return out


def test_a_streamed_response_reads_through_the_sdk_as_openais_events(streamed):
    eng, client = streamed
    raw = client.responses.with_raw_response.create(model="gpt-5-mini", input="Name a river.", stream=True,
                                                     extra_headers={endpoint.HEADER_REQUEST_ID: "r1"})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers[endpoint.HEADER_MODE] == "batch_api" and raw.headers[endpoint.HEADER_REQUEST_ID] == "r1"
    events = list(raw.parse())
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for e in events:  # every field each event type requires (the SDK's own parse is lenient)
        assert EVENT.validate_python(e.to_dict()).type == e.type
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[4].delta == "echo: Name a river." and events[-1].response.output_text == "echo: Name a river."
    assert events[-1].response.usage.input_tokens == 7 and events[-1].response.usage.output_tokens == 3
    assert "stream" not in eng.seen["r1"]["body"]  # the engine reads whole answers: a call without it
    with client.responses.stream(model="gpt-5-mini", input="Name a river.") as stream:  # the SDK's helper
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert texts == ["echo: Name a river."] and final.output_text == "echo: Name a river."
    again = client.responses.create(model="gpt-5-mini", input="Name a river.",
                                    extra_headers={endpoint.HEADER_REQUEST_ID: "r1"})
    assert again.output_text == "echo: Name a river."  # the same id and body: the same request, unstreamed


def test_function_calls_and_a_cut_answer_stream_as_openai_ends_them():
    done = {"id": "resp_1", "object": "response", "created_at": 5, "model": "gpt-5-mini", "status": "completed",
            "error": None, "incomplete_details": None, "instructions": None, "metadata": {},
            "parallel_tool_calls": True, "temperature": None, "top_p": None, "tools": [], "tool_choice": "auto",
            "output": [{"type": "function_call", "id": "fc_0", "call_id": "call_a", "name": "f",
                        "arguments": "{\"x\": 1}", "status": "completed"}],
            "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}}
    state = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    for event in parsed(response_events(done)):
        state.handle_event(event)
    call = state._completed_response.output[0]
    assert (call.type, call.call_id, call.name, call.arguments) == ("function_call", "call_a", "f", "{\"x\": 1}")
    cut = {**done, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}, "output": [
        {"type": "message", "id": "msg_1", "status": "incomplete", "role": "assistant",
         "content": [{"type": "output_text", "text": "half", "annotations": []}]}]}
    events = parsed(response_events(cut))
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == \
        "max_output_tokens"


def test_a_streamed_response_that_fails_or_is_refused_is_an_error_with_its_status(streamed):
    _, client = streamed
    with pytest.raises(openai.APIStatusError) as exc:
        list(client.responses.create(model="gpt-5-mini", input="x", stream=True,
                                     extra_headers={endpoint.HEADER_REQUEST_ID: "r2-boom"}))
    assert exc.value.status_code == 503 and exc.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="gpt-5-mini", input="x", extra_body={"stream": "yes"})
    assert exc.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="gpt-5-mini", input="x", extra_body={"stream_options": {}})
    assert exc.value.param == "stream_options"
