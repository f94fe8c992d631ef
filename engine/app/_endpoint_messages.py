"""Anthropic's Messages route, ``POST /v1/messages``: an application written against Anthropic's SDK changes only
its ``base_url`` (``anthropic.Anthropic(base_url="http://host:port")``). Before, the endpoint served OpenAI's
routes alone, and such an application could not use it at all.

The body is Anthropic's own, for a model the catalog calls through Anthropic's Messages API: it goes to the engine
as it came (without ``stream``), the driver's path for an Anthropic-native body, with that path's per-request
checks. The answer is an Anthropic Message (the provider's own body, or one built from the result: a copy from the
cache), and every error is Anthropic's ``{"type": "error", "error": {"type", "message"}}`` at the chat route's
status, its message beginning with the field or header to change. ``stream: true`` answers in Anthropic's
server-sent events once the whole answer is in, as the chat route streams: the engine reads whole answers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from fastapi.responses import JSONResponse

from engine.app._endpoint_claude import wire_of
from engine.app._endpoint_wire import ApiError
from engine.core._api_fields import anthropic_role_problem
from engine.core.catalog import Catalog
from engine.core.settings import Settings

__all__ = ["AnthropicError", "claude_model", "error_type", "in_anthropic_shape", "message_events", "messages_body"]

CHAT_URL = "/v1/chat/completions"
# Anthropic's error type of an HTTP status (its API reference, "Errors"); any other 4xx is invalid_request_error.
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
_BETA = "anthropic-beta"
_FIELD = re.compile(r"^field '([^']*)': ")
_BODY = re.compile(r"\bbody\.")  # the engine's name of a body field (body.temperature)


def error_type(status: int) -> str:
    """Anthropic's error type of an HTTP status."""
    return _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


class AnthropicError(ApiError):
    """An error answered in Anthropic's shape, at the same status and with the same headers as the chat route's
    (the call's id where Anthropic's SDK reads it)."""

    id_header = "request-id"

    def response(self) -> JSONResponse:
        kind = error_type(self.status)
        return JSONResponse({"type": "error", "error": {"type": kind, "message": self.message}},
                            status_code=self.status, headers=self.answer_headers())


def in_anthropic_shape(exc: ApiError) -> AnthropicError:
    """``exc`` as Anthropic's error. Its body has no ``param``, so the message begins with the field the caller
    sent (``temperature: ...``), named as the caller wrote it (the engine's ``body.`` prefix left out)."""
    message = _BODY.sub("", exc.message)
    if exc.param:
        # (the chat route's "header X-Smartbatch-Request-Id: ..." names it once more: it read twice, a tour)
        message = _FIELD.sub("", message.removeprefix(f"header {exc.param}: "))
        if not message.startswith(exc.param):
            message = f"{exc.param}: {message}"
    return AnthropicError(exc.status, message, param=exc.param, code=exc.code, type=exc.type, headers=exc.headers)


def claude_model(body: dict[str, Any], headers: Any, catalog: Catalog, settings: Settings) -> str:
    """The model of an Anthropic body, after the checks the Anthropic routes share: no ``anthropic-beta`` header, a
    model named, and, when the catalog knows it, one it calls through Anthropic's Messages API (a 400 naming the
    field and the fix)."""
    if headers.get(_BETA) is not None:  # a beta feature changes the answer, and the header goes no further
        raise ApiError(400, f"the {_BETA} header {headers[_BETA]!r} asks for a beta feature the engine does not "
                            "pass on; leave it out", param=_BETA)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: the name of a Claude model, such as claude-sonnet-4-5",
                       param="model")
    api, spec = wire_of(model, catalog, settings)
    if spec is not None and api != "anthropic":
        raise ApiError(400, f"model {model!r} is not called through Anthropic's Messages API, the only one this "
                            f"route speaks; send it to {CHAT_URL} (OpenAI's chat completions), or name a Claude "
                            "model", param="model")
    return model


def messages_body(body: dict[str, Any], headers: Any, catalog: Catalog,
                  settings: Settings) -> tuple[dict[str, Any], bool]:
    """The body the engine gets (without ``stream``), and whether the caller asked for a stream; a 400 naming
    the field for what Anthropic's API requires and is missing, or a model not called through it (one the catalog
    does not know is the engine's 404, as Anthropic answers it)."""
    claude_model(body, headers, catalog, settings)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream {stream!r} must be true or false", param="stream")
    if body.get("max_tokens") is None:  # Anthropic's API requires it; the engine would fill in the model's maximum
        raise ApiError(400, "max_tokens is required: the most tokens the answer may take, such as 1024",
                       param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages is required: a non-empty list such as [{\"role\": \"user\", \"content\": "
                            "\"...\"}]", param="messages")
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        # Here, where the body is Anthropic's: the engine's own check, for a body of either API, named OpenAI's
        # roles (system, developer, tool, function), which this route does not take (a user's walkthrough). A
        # system message mid-conversation is the engine's to judge, per model.
        if role not in ("user", "assistant", "system") and isinstance(m, dict):
            raise ApiError(400, anthropic_role_problem(role, f"messages[{k}].role"), param=f"messages[{k}].role")
    return {k: v for k, v in body.items() if k != "stream"}, bool(stream)


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'))}\n\n".encode()


def message_events(done: dict[str, Any]) -> Iterator[bytes]:
    """Anthropic's server-sent events of ``done``, a whole Message: ``message_start`` (no content yet), each
    content block whole in one delta between its start and stop, ``message_delta`` with the stop reason and the
    usage, then ``message_stop``. The SDK's stream helper builds the same Message from them."""
    usage = dict(done.get("usage") or {})
    yield _event("message_start", {"message": {**done, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": {**usage, "output_tokens": 0}}})
    for index, block in enumerate(done.get("content") or []):
        kind = block.get("type")
        if kind == "text":
            start, deltas = {**block, "text": ""}, [{"type": "text_delta", "text": block.get("text", "")}]
        elif kind == "tool_use":
            start = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})}]
        elif kind == "thinking":
            start = {**block, "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")},
                      {"type": "signature_delta", "signature": block.get("signature", "")}]
        else:  # a block that has no delta of its own (redacted thinking ...) comes whole in its start
            start, deltas = block, []
        yield _event("content_block_start", {"index": index, "content_block": start})
        for delta in deltas:
            yield _event("content_block_delta", {"index": index, "delta": delta})
        yield _event("content_block_stop", {"index": index})
    yield _event("message_delta", {"delta": {"stop_reason": done.get("stop_reason"),
                                             "stop_sequence": done.get("stop_sequence")}, "usage": usage})
    yield _event("message_stop", {})
