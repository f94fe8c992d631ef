"""Anthropic's streamed Messages answer (``stream: true``): the same Message as the whole answer, sent as the
server-sent events the API sends (``message_start``, a ``ping``, each content block's start, deltas and stop,
``message_delta`` with the stop reason and the usage, ``message_stop``), so the SDK's ``messages.stream(...)`` and
``create(stream=True)`` read it into the Message ``create()`` returns.

Timed as the whole answer: of its drawn latency, the catalog's ``base_s`` share comes before ``message_start``
(the prefill), and the rest, the output's, is spread over the deltas, so a long answer keeps its events flowing
where the whole one sends nothing until it is done. Billed once, as ``message_start`` leaves, with the row a whole
answer bills (its call, usage, cost, request id and Idempotency-Key): a stream cut after that is billed as a whole
answer cut on the way is, and kept under its key the same way (``App._idempotent``: a retry is sent it again, at
once, billed nothing more).
"""

from __future__ import annotations

import json
from typing import Any

from engine.emulator._core import Core, TextCall
from engine.emulator._routing import Ctx
from engine.emulator._wire import Reply, request_id_header

__all__ = ["DELTA_CHARS", "message_events", "stream_reply"]

DELTA_CHARS = 40  # a delta's text: ~10 tokens at the emulator's 4 characters a token, as the API sends a few


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()


def _pieces(text: str) -> list[str]:
    return [text[i:i + DELTA_CHARS] for i in range(0, len(text), DELTA_CHARS)] or [""]


def message_events(out: dict[str, Any]) -> tuple[list[bytes], list[bool]]:
    """The events of ``out``, a whole Message, and which of them are deltas (spread over the output's time)."""
    usage = out["usage"]
    events = [_event("message_start", {"message": {**out, "content": [], "stop_reason": None, "stop_sequence": None,
                                                   "usage": {**usage, "output_tokens": min(usage["output_tokens"], 1)}}}),
              _event("ping", {})]
    deltas = [False, False]
    for index, block in enumerate(out["content"]):
        if block["type"] == "tool_use":
            start, parts = {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": p}
                                                     for p in _pieces(json.dumps(block["input"]))]
        else:
            start, parts = {**block, "text": ""}, [{"type": "text_delta", "text": p} for p in _pieces(block["text"])]
        events.append(_event("content_block_start", {"index": index, "content_block": start}))
        events += [_event("content_block_delta", {"index": index, "delta": d}) for d in parts]
        events.append(_event("content_block_stop", {"index": index}))
        deltas += [False, *[True] * len(parts), False]
    # Counts on a message_delta are the call's totals (the SDK takes them over message_start's).
    events.append(_event("message_delta", {
        "delta": {"stop_reason": out["stop_reason"], "stop_sequence": out["stop_sequence"]},
        "usage": {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                                        "output_tokens")}}))
    events.append(_event("message_stop", {}))
    return events, [*deltas, False, False]


def stream_reply(core: Core, ctx: Ctx, call: TextCall, out: dict[str, Any], latency_s: float) -> Reply:
    """The streamed answer of ``call`` (``out``, its Message), ``latency_s`` emulator seconds in all; billed as
    its first event leaves. Raises ``Dropped`` (unbilled) if the emulator stops during the prefill."""
    lat = core.catalog.provider(call.provider).sync_latency
    median = lat.base_s + lat.per_output_token_s * call.output_tokens
    prefill = latency_s * (lat.base_s / median if median > 0 else 1.0)
    core.wait(prefill)
    core.bill_text(call, "sync", ctx.route, ctx.request_id, idempotency_key=ctx.headers.get("idempotency-key"))
    events, is_delta = message_events(out)
    rest = core.clock.real_delay(max(latency_s - prefill, 0.0)) * core.latency_scale
    n, seen, end, parts = sum(is_delta), 0, 0, []
    for event, delta in zip(events, is_delta, strict=True):
        seen += delta
        end += len(event)
        parts.append((end, rest * seen / n if n else 0.0))
    headers = {"content-type": "text/event-stream", "cache-control": "no-cache",
               request_id_header("anthropic"): ctx.request_id}
    return Reply(200, headers, b"".join(events), parts=tuple(parts))
