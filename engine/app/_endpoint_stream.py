"""``stream: true`` on the chat completions route: the whole answer, once the engine has it, sent as OpenAI's
server-sent chunks (``chat.completion.chunk``, then ``data: [DONE]``), so an application that streams reads it
with its usual loop. It was a 400: an application whose code streams (chat UIs, agents) could not change only its
``base_url`` (a helper's tour).

The engine hands over whole answers (a batch API has no streams; a sync Claude call streams from the provider,
but is read whole, its usage with it, before anything uses it), so the answer comes in one content chunk, then
one with its ``finish_reason``. Nothing is sent before the answer is in: a refusal or a failure is still an error
with its status, as OpenAI answers one found before its stream starts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from engine.app._endpoint_wire import ApiError

__all__ = ["sse_chunks", "stream_wanted"]


def stream_wanted(body: dict[str, Any]) -> tuple[bool, bool]:
    """Whether ``body`` asks for a stream, and for its usage chunk (``stream_options.include_usage``); a 400
    naming the field it cannot read. The caller takes both fields out of the body the engine gets."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream {stream!r} must be true or false", param="stream")
    if options is None:
        return bool(stream), False
    if not stream:  # as OpenAI answers it
        raise ApiError(400, "stream_options is only allowed when stream is true; leave it out, or send "
                            "stream=true", param="stream_options")
    usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(usage, bool):
        raise ApiError(400, f"stream_options {options!r} must be an object such as {{\"include_usage\": true}}",
                       param="stream_options")
    return True, usage


def sse_chunks(done: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """The server-sent events of ``done``, a whole ``chat.completion`` body."""
    head = {"id": done.get("id"), "object": "chat.completion.chunk", "created": done.get("created", 0),
            "model": done.get("model")}
    head.update({k: done[k] for k in ("service_tier", "system_fingerprint") if done.get(k) is not None})
    if include_usage:  # every chunk but the last has it null, as OpenAI's
        head["usage"] = None
    said, ends = [], []
    for choice in done.get("choices") or []:
        msg, index = choice.get("message") or {}, choice.get("index", 0)
        delta: dict[str, Any] = {"role": msg.get("role", "assistant"), "content": msg.get("content")}
        if msg.get("refusal") is not None:
            delta["refusal"] = msg["refusal"]
        if msg.get("tool_calls"):  # each call whole, at its place in the list
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(msg["tool_calls"])]
        said.append({"index": index, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None})
        ends.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")})
    events = [{**head, "choices": said}, {**head, "choices": ends}]
    if include_usage:
        events.append({**head, "choices": [], "usage": done.get("usage")})
    for event in events:
        yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
