"""What goes on the wire: replies, the two providers' error shapes, request ids and timestamps."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

from engine.core.errors import SmartbatchError

__all__ = [
    "GOOGLE_STATUS",
    "ApiError",
    "Dropped",
    "Family",
    "Reply",
    "error_object",
    "error_reply",
    "json_reply",
    "request_id_header",
    "rfc3339",
]

Family = Literal["openai", "anthropic", "google"]  # google: the Gemini API's own routes (Veo)


class Reply(NamedTuple):
    """One HTTP answer. ``drop``: close the connection without answering (a fault, or the emulator stopping).
    ``trickle_s``: send the body a byte every that many real seconds (``FaultSpec.trickle_s``). ``parts``: a
    stream's (server-sent events), sent chunked, each part as (the body's offset it ends at, real seconds after
    the answer began that it is sent). ``cut_at``: a stream broken there, its connection closed (a fault)."""

    status: int
    headers: dict[str, str]
    body: bytes
    drop: bool = False
    trickle_s: float = 0.0
    parts: tuple[tuple[int, float], ...] = ()
    cut_at: int | None = None


class ApiError(SmartbatchError):
    """An error answer of the emulated provider. It never leaves the emulator as an exception: the app turns
    it into the route family's error body (it subclasses ``SmartbatchError`` only to keep one hierarchy)."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s, self.kind = retry_after_s, kind  # kind: the body's error.type, else the status's


class Dropped(SmartbatchError):
    """The connection is to be closed without an answer (the emulator is stopping mid-call)."""


def request_id_header(family: Family) -> str:
    return "x-request-id" if family == "openai" else "request-id"


# The google.rpc status Google's errors name beside their HTTP status.
GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"

# The types each provider puts in its error body for a status (OpenAI's 429 for request limits is "requests").
_OPENAI_TYPE = {401: "invalid_request_error", 429: "requests"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   504: "timeout_error", 529: "overloaded_error"}


def _error_body(family: Family, err: ApiError, request_id: str) -> dict[str, Any]:
    if family == "google":  # one object (the compatibility layer answers a list of one: ``_gemini``)
        body: dict[str, Any] = {"code": err.status, "message": err.message,
                                "status": GOOGLE_STATUS.get(err.status, "INTERNAL" if err.status >= 500 else "UNKNOWN")}
        if err.retry_after_s is not None:  # Google says the wait in the body, never in a Retry-After header
            body["details"] = [{"@type": RETRY_INFO, "retryDelay": f"{_format_seconds(err.retry_after_s)}s"}]
        return {"error": body}
    if family == "openai":
        kind = err.kind or _OPENAI_TYPE.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error")
        return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    kind = err.kind or _ANTHROPIC_TYPE.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}, "request_id": request_id}


def _format_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


def json_reply(family: Family, status: int, body: Any, request_id: str,
               headers: dict[str, str] | None = None) -> Reply:
    h = {"content-type": "application/json", request_id_header(family): request_id, **(headers or {})}
    return Reply(status, h, json.dumps(body, separators=(",", ":")).encode())


def error_reply(family: Family, err: ApiError, request_id: str) -> Reply:
    headers = {}
    if err.retry_after_s is not None and family != "google":
        headers["retry-after"] = _format_seconds(err.retry_after_s)
    return json_reply(family, err.status, _error_body(family, err, request_id), request_id, headers)


def error_object(family: Family, err: ApiError, request_id: str) -> dict[str, Any]:
    """The error body alone, as batch results embed it."""
    return _error_body(family, err, request_id)


def rfc3339(t: float) -> str:
    """Anthropic's timestamp format, from emulator (virtual unix) seconds."""
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")
