"""The OpenAI wire rules the HTTP front shares: error bodies, the ``X-Smartbatch-*`` headers, JSON bodies,
ids, cursor pages, and the engine protocol the front drives."""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import json
import math
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from engine.core._checks import tenant_problem
from engine.core.batchfile import parse_window
from engine.core.catalog import Catalog
from engine.core.errors import ConfigError, EngineStopped, Overloaded, RequestError
from engine.core.request import PRIORITIES, Request, validation_context
from engine.core.response_owners import NOT_FOUND_CODES
from engine.core.result import Result
from engine.core.settings import Settings
from engine.core.trace import _problems_of

__all__ = ["HEADER_COST", "HEADER_DEADLINE", "HEADER_DEADLINE_MET", "HEADER_HIT", "HEADER_MODE", "HEADER_PRIORITY",
           "HEADER_REQUEST_ID", "HEADER_SAVING", "HEADER_TENANT", "ApiError",
           "AsyncEngine", "Validator", "checked_metadata", "completion_window_s", "cursor_page", "engine_call",
           "json_body", "new_id", "refused", "StoredFile", "smartbatch_fields", "tenant_of", "window_text"]

HEADER_DEADLINE = "X-Smartbatch-Deadline"
HEADER_PRIORITY = "X-Smartbatch-Priority"
HEADER_TENANT = "X-Smartbatch-Tenant"
HEADER_REQUEST_ID = "X-Smartbatch-Request-Id"
HEADER_MODE = "X-Smartbatch-Mode"
HEADER_COST = "X-Smartbatch-Cost-Usd"
HEADER_SAVING = "X-Smartbatch-Saving-Usd"
HEADER_HIT = "X-Smartbatch-Hit"
# "false" when the answer came after the request's deadline: it is still given (it was paid for), where a 504
# would have thrown a billed answer away.
HEADER_DEADLINE_MET = "X-Smartbatch-Deadline-Met"
_ASKED = (HEADER_DEADLINE, HEADER_PRIORITY, HEADER_TENANT, HEADER_REQUEST_ID)  # what a caller may send
_ANSWERED = (HEADER_MODE, HEADER_COST, HEADER_SAVING, HEADER_HIT, HEADER_DEADLINE_MET)
# A request field the headers set -> the header that set it, so a refused value names what the caller sent.
_HEADER_OF = {"deadline_s": HEADER_DEADLINE, "priority": HEADER_PRIORITY, "tenant": HEADER_TENANT,
              "id": HEADER_REQUEST_ID}
RETRY_AFTER_S = 1  # what a 429 for a full engine asks: room comes back as requests finish


class AsyncEngine(Protocol):
    """What the front needs of an engine: ``engine.app.driver.Engine``'s asyncio face (or a test double)."""

    settings: Settings
    gone: str | None  # why the engine went away (its open futures failed with this error); None while it runs

    async def asubmit(self, request: Mapping) -> Result: ...

    async def asubmit_many(self, requests: Iterable[Mapping]) -> list[Result]: ...

    def submit_many(self, requests: Iterable[Mapping]) -> Sequence[concurrent.futures.Future]: ...

    def as_completed(self, futures: Iterable[concurrent.futures.Future]) -> AsyncIterator[Result]: ...

    def cancel_requests(self, futures: Iterable[concurrent.futures.Future]) -> int: ...

    async def count_tokens(self, provider: str, body: Mapping[str, Any]) -> tuple[int, Any, dict[str, str]]: ...

    async def video_content(self, provider: str, url: str, variant: str = "video") -> tuple[int, Any, str]: ...

    async def video_progress(self, provider: str, uids: Sequence[str]) -> dict[str, int]: ...


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    runs_on = False  # part of the call it refuses was let in and runs on (``engine_call``, ``try_outcome``)
    # Where the SDK reads a call's id, an error's too (OpenAI's ``e.request_id``): the request's id where it had one
    # (``X-Smartbatch-Request-Id`` among the headers), else one of the answer's own. Without it, e.request_id was
    # None on every error, where an answer carried its id (a user's walkthrough).
    id_header = "x-request-id"

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        if status == 409:  # the SDKs retry a 409 (a lock's conflict at OpenAI) twice, 1.4 s on: every one here is
            # final (a cancel of an ended batch, a delete of a video being made), answered the same each time
            headers = {"x-should-retry": "false", **(headers or {})}
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.answer_headers())

    def answer_headers(self) -> dict[str, str]:
        """The error answer's headers: its own, and the call's id where the SDK reads it (``id_header``)."""
        headers = dict(self.headers or {})
        headers.setdefault(self.id_header, headers.get(HEADER_REQUEST_ID) or new_id("req_"))
        return headers


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


async def json_body(http: HttpRequest, data: bytes | None = None) -> dict[str, Any]:
    """The request's JSON object, or a 400 saying what is wrong with it; ``data``: its body, read already (a
    route that reads it no further than a limit)."""
    try:
        body = await http.json() if data is None else json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object with Content-Type: "
                            "application/json") from None
    except RecursionError:  # a plain-text 500 before, which the SDKs retried
        raise ApiError(400, "the body is nested too deeply to read; send a JSON object nested less than a few "
                            "hundred levels") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def smartbatch_fields(headers: Mapping[str, str], *, deadline: bool = True) -> dict[str, Any]:
    """The request fields the ``X-Smartbatch-*`` headers set (tenant, priority, deadline_s); an absent header
    leaves the engine's default. ``deadline=False``: the deadline comes from elsewhere (a batch's window)."""
    _known_headers(headers)
    out: dict[str, Any] = {}
    tenant = headers.get(HEADER_TENANT)
    if tenant is not None:
        if not tenant.strip():
            raise ApiError(400, f"{HEADER_TENANT} is empty; give the tenant's name, or leave the header out "
                                "for tenant 'default'", param=HEADER_TENANT)
        why = tenant_problem(tenant)
        if why is not None:  # checked here, it named a field of the request for every line of a batch
            raise ApiError(400, f"{HEADER_TENANT}: {why}; give a name of 1 to 256 characters, none of them a "
                                "control character", param=HEADER_TENANT)
        out["tenant"] = tenant
    if not deadline:
        return out
    priority = headers.get(HEADER_PRIORITY)
    if priority is not None:
        if priority not in PRIORITIES:
            raise ApiError(400, f"{HEADER_PRIORITY} {priority!r} is not a priority; use one of "
                                f"{', '.join(PRIORITIES)}", param=HEADER_PRIORITY)
        out["priority"] = priority
    text = headers.get(HEADER_DEADLINE)
    if text is not None:
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise ApiError(400, f"{HEADER_DEADLINE} {text!r} must be a number of seconds > 0 (e.g. 600): the "
                                "time the answer may take", param=HEADER_DEADLINE)
        out["deadline_s"] = seconds
    return out


def tenant_of(headers: Mapping[str, str]) -> str:
    """The caller's tenant (``X-Smartbatch-Tenant``; 'default' without it): the owner of the files, batches and
    videos it makes, which no other tenant lists, reads, cancels or deletes (OpenAI scopes them to a project)."""
    return smartbatch_fields(headers, deadline=False).get("tenant", "default")


def _known_headers(headers: Mapping[str, str]) -> None:
    """Refuse an ``X-Smartbatch-*`` header that is none of the request's: misspelt, it was ignored, and the
    request took a default unsaid (a helper's tour: ``X-Smartbatch-Dealine: 600``), as a misspelt setting is not."""
    asked = {h.lower(): h for h in _ASKED}
    answered = {h.lower(): h for h in _ANSWERED}
    for name in headers:
        low = name.lower()
        if not low.startswith("x-smartbatch-") or low in asked:
            continue
        if low in answered:
            why = (f"{answered[low]} is a header of the engine's answer, not of a request: the engine picks the "
                   f"way; {HEADER_DEADLINE} gives it the time to pick a cheaper one")
        else:
            close = difflib.get_close_matches(low, list(asked), n=1, cutoff=0.8)
            why = (f"{name} is not a header of smartbatch; " + (f"did you mean {asked[close[0]]}? " if close else "")
                   + f"a request takes {', '.join(_ASKED)}")
        raise ApiError(400, why, param=name)


class Validator:
    """Validates a request dict as the engine will (same catalog and settings), naming a refused field by
    what the caller sent: a header, or the field of the OpenAI body (``param_of``)."""

    def __init__(self, catalog: Catalog, settings: Settings):
        self._ctx = validation_context(catalog, settings, live=True)

    def request(self, d: dict[str, Any], param_of: Callable[[str], str | None]) -> Request:
        try:
            # arrival_s 0 here: the engine sets the real arrival, and no check depends on it.
            return Request.model_validate({**d, "arrival_s": 0.0}, context=self._ctx)
        except ValidationError as exc:
            field, message = next(iter(_problems_of(exc, "the request")), ("request", str(exc)))
            # OpenAI's code for a prompt past the model's window, which applications catch to shorten and retry
            code = "context_length_exceeded" if _PAST_WINDOW.search(message) else None
            raise refused(field, f"field '{field}': {message}", param_of, code) from None


_PAST_WINDOW = re.compile(r"exceeds \S+'s (context window|input limit) of")  # engine.core.request._check_window


def refused(field: str, message: str, param_of: Callable[[str], str | None], code: str | None = None) -> ApiError:
    header = _HEADER_OF.get(field)
    if header is not None:
        return ApiError(400, f"header {header}: {message}", param=header, code=code)
    # An id of a stored response that is not the caller's (``engine.core.response_owners``): OpenAI's 404.
    status = 404 if code in NOT_FOUND_CODES else 400
    return ApiError(status, message, param=param_of(field), code=code)


async def engine_call(call: Any, param_of: Callable[[str], str | None]) -> Any:
    """Await an engine call, turning the engine's refusals into OpenAI errors: ``RequestError`` 400 (naming
    the field), ``Overloaded`` 429 with ``Retry-After``, ``EngineStopped`` 503."""
    try:
        return await call
    except RequestError as exc:
        raise refused(exc.field, str(exc), param_of, code=exc.code) from None
    except Overloaded as exc:
        full = ApiError(429, f"the engine is full: {exc}", type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
        full.runs_on = exc.admitted > 0  # part of the call was let in and runs on: its retry takes it (try_outcome)
        raise full from None
    except EngineStopped as exc:
        if exc.admitted:  # parts of a call of n choices were let in and sent before the stop: a retry pays them again
            raise ApiError(502, f"{exc} ({exc.admitted} of the call's requests were let in and sent before it, and "
                                "may have been billed: send it again, under a new id, only if paying twice is "
                                "acceptable)", type="api_error", code="engine_stopped",
                           headers={"x-should-retry": "false"}) from None
        raise ApiError(503, str(exc), type="server_error", code="engine_stopped") from None


async def submit_whole(engine: AsyncEngine, subs: list[dict]) -> Sequence[concurrent.futures.Future]:
    """``engine.submit_many(subs)`` in a worker thread (it may wait for room), all or none: the engine lets a call
    larger than its room in by parts, and one that then waits in vain raises ``Overloaded`` with the parts it let
    in still running. A batch's create fails then, and nobody would read those lines: they are withdrawn (those
    not sent yet end at no cost; one already in a call runs on, billed) before the refusal goes on up."""
    try:
        return await asyncio.to_thread(engine.submit_many, subs)
    except Overloaded as exc:
        if not exc.futures:
            raise
        await asyncio.to_thread(engine.cancel_requests, exc.futures)
        # Its client reads this: the driver's "they run on, submit the same requests again" is false once they are
        # withdrawn, and a create again is a new batch, its lines new requests.
        why = str(exc).split("): ", 1)[0] + ")" if "): " in str(exc) else "no room freed in the engine"
        raise Overloaded(f"{why}: {exc.admitted:,} of the batch's {len(subs):,} lines were let in before the rest "
                         "waited in vain, and were withdrawn (billed nothing unless a call had already taken them); "
                         "no batch was created. Create it again later") from None


def cursor_page(items: list[dict], *, after: str | None, limit: str | None, default_limit: int,
                max_limit: int) -> dict[str, Any]:
    """OpenAI's cursor page over ``items`` (already in the listed order): the ``limit`` items after the one
    with id ``after``; the SDK pages on with the last id while ``has_more``."""
    try:
        n = default_limit if limit is None else int(limit)
    except ValueError:
        n = 0
    if not 1 <= n <= max_limit:
        raise ApiError(400, f"limit {limit!r} must be a whole number in [1, {max_limit}]", param="limit")
    start = 0
    if after is not None:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise ApiError(400, f"after {after!r} is not an id of this list; pass the last id of the "
                                "previous page", param="after")
        start = ids.index(after) + 1
    page = items[start:start + n]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + n < len(items)}


@dataclass(frozen=True)
class StoredFile:
    """A file of the Files API, held in the replica's memory; ``tenant``: whose it is (``tenant_of``)."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    tenant: str = "default"

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


def window_text(seconds: float) -> str:
    """A completion window in seconds as OpenAI writes one ("24h", "90m", "45s")."""
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def completion_window_s(window: Any) -> float:
    """A batch's ``completion_window`` in seconds, or a 400 naming it."""
    try:
        if not isinstance(window, str):
            raise ConfigError(f"--window {window!r}: use a string such as '24h'")
        return parse_window(window)
    except ConfigError as exc:
        raise ApiError(400, str(exc).replace("--window", "completion_window"), param="completion_window") from None


def checked_metadata(metadata: Any) -> dict | None:
    """A batch's ``metadata``, as OpenAI takes it, or a 400 naming it."""
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ApiError(400, "metadata must be an object of at most 16 string keys and string values",
                       param="metadata")
    return metadata
