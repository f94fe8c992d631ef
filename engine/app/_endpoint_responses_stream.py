"""``stream: true`` on the Responses route: the whole response, once the engine has it, sent as the Responses API's
server-sent events, so ``client.responses.create(stream=True)`` and ``client.responses.stream(...)`` of the
official SDK read it. It was a 400 while chat completions streamed (a helper's tour).

As on the chat route (``_endpoint_stream``), nothing is sent before the answer is in: a refusal or a failure is an
error with its status. The events are OpenAI's, in its order: ``response.created`` and ``response.in_progress``
(the response with no output yet), for each output item ``response.output_item.added``, its content
(``response.content_part.added``, one ``response.output_text.delta`` with the whole text,
``response.output_text.done``, ``response.content_part.done``; for a function call one
``response.function_call_arguments.delta`` and ``.done``), ``response.output_item.done``; then
``response.completed``, or ``response.incomplete`` for an answer cut at its cap, as OpenAI ends one (the SDK's
``get_final_response`` then raises, as it does against OpenAI). Every event carries its ``sequence_number``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from engine.app._endpoint_wire import ApiError

__all__ = ["response_events", "responses_stream_wanted"]


def responses_stream_wanted(body: dict[str, Any]) -> bool:
    """Whether a Responses ``body`` asks for a stream; a 400 naming the field it cannot read. The caller takes
    ``stream`` and ``stream_options`` out of the body the engine gets (its ``include_obfuscation`` pads deltas
    against a side channel of token-by-token streams: one delta holds the whole text here)."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream {stream!r} must be true or false", param="stream")
    if options is not None and not stream:  # as OpenAI answers it
        raise ApiError(400, "stream_options is only allowed when stream is true; leave it out, or send "
                            "stream=true", param="stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, f"stream_options {options!r} must be an object such as {{\"include_obfuscation\": "
                            "false}", param="stream_options")
    return bool(stream)


def _item_events(k: int, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The events of output item ``k`` between its ``added`` and its ``done``."""
    kind, item_id = item.get("type"), item.get("id") or item.get("call_id") or f"item_{k}"
    if kind == "message":
        for j, part in enumerate(item.get("content") or []):
            empty = {**part, "text": ""} if part.get("type") == "output_text" else part
            yield {"type": "response.content_part.added", "item_id": item_id, "output_index": k,
                   "content_index": j, "part": empty}
            if part.get("type") == "output_text":
                at = {"item_id": item_id, "output_index": k, "content_index": j, "logprobs": []}
                yield {"type": "response.output_text.delta", **at, "delta": part.get("text", "")}
                yield {"type": "response.output_text.done", **at, "text": part.get("text", "")}
            yield {"type": "response.content_part.done", "item_id": item_id, "output_index": k,
                   "content_index": j, "part": part}
    elif kind == "function_call":
        at = {"item_id": item_id, "output_index": k}
        yield {"type": "response.function_call_arguments.delta", **at, "delta": item.get("arguments", "")}
        yield {"type": "response.function_call_arguments.done", **at, "arguments": item.get("arguments", ""),
               "name": item.get("name")}


def _opened(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` as its ``output_item.added`` shows it: under way, with nothing generated yet."""
    if item.get("type") == "message":
        return {**item, "status": "in_progress", "content": []}
    if item.get("type") == "function_call":
        return {**item, "status": "in_progress", "arguments": ""}
    return item


def response_events(done: dict[str, Any]) -> Iterator[bytes]:
    """The server-sent events of ``done``, a whole ``response`` body."""
    output = list(done.get("output") or [])
    start = {**done, "status": "in_progress", "output": [], "incomplete_details": None, "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": start},
                                    {"type": "response.in_progress", "response": start}]
    for k, item in enumerate(output):
        events.append({"type": "response.output_item.added", "output_index": k, "item": _opened(item)})
        events.extend(_item_events(k, item))
        events.append({"type": "response.output_item.done", "output_index": k, "item": item})
    end = "response.incomplete" if done.get("status") == "incomplete" else "response.completed"
    events.append({"type": end, "response": done})
    for n, event in enumerate(events):
        event["sequence_number"] = n
        yield (f"event: {event['type']}\ndata: ".encode() + json.dumps(event, separators=(",", ":")).encode()
               + b"\n\n")
