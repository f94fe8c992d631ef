"""The endpoint's errors in the caller's API's shape: OpenAI's (or Anthropic's, for the Anthropic SDK) for a
refused body, an unknown route and a bug, and a generation's error under the id its request took. Split from
``engine.app.endpoint`` (the app and its generation routes), which installs them."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.app._endpoint_internal import internal_error
from engine.app._endpoint_messages import AnthropicError
from engine.app._endpoint_models import anthropic_caller
from engine.app._endpoint_wire import HEADER_REQUEST_ID, ApiError, new_id

__all__ = ["_carrying_id", "_errors_in_openai_shape"]


# An application of Google's Veo routes got a bare 404 (a helper's tour); OpenAI's Videos API is served.
_NO_VEO_ROUTE = (". This endpoint has no Veo route: send a Veo request from a driver script, "
                 "Engine.connect(name).submit({'model': ..., 'prompt': ..., 'params': {'duration_s': ..., "
                 "'resolution': ...}}), whose result's output is the video's address (docs/service.md)")


def _errors_in_openai_shape(app: FastAPI) -> None:
    async def api_error(_: HttpRequest, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(http: HttpRequest, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        where = f"{http.method} {http.url.path}"
        msg = {404: f"Unknown request URL: {where}", 405: f"Method not allowed: {where}"}.get(exc.status_code,
                                                                                           str(exc.detail))
        if exc.status_code == 404 and ":predictLongRunning" in where:
            msg += _NO_VEO_ROUTE
        return (AnthropicError if anthropic_caller(http) else ApiError)(exc.status_code, msg).response()

    async def invalid(_: HttpRequest, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = next(iter(exc.errors()), {})
        param = str(err.get("loc", ("", ""))[-1]) or None
        return ApiError(400, f"{param}: {err.get('msg', 'invalid')}", param=param).response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)

    @app.middleware("http")
    async def no_anthropic_files(http: HttpRequest, call_next):
        # The Anthropic SDK's Files API (beta) shares OpenAI's paths: served by the OpenAI route, an upload was
        # kept as a batch input no message can name, and its answers were not in the shape the SDK reads.
        path = http.url.path
        anthropic = anthropic_caller(http)
        if (path == "/v1/files" or path.startswith("/v1/files/")) and anthropic:
            return AnthropicError(404, "Anthropic's Files API (beta) is not served by this endpoint: put the "
                                       "document or image in the message itself (a base64 or URL source)").response()
        try:
            answer = await call_next(http)
        except Exception as exc:  # a bug's: Starlette's plain-text 500 had no id (``_endpoint_internal``)
            # A generation's bug past its answer (rendering it) is under the id its request took and was billed
            # under, as one within it is (``_carrying_id``): a fresh id named no line of that request (a review).
            rid = getattr(http.state, "generation_id", None)
            error = internal_error(exc, rid or new_id("req_"), f"{http.method} {path}",
                                   AnthropicError if anthropic else ApiError)
            error.headers = {**({HEADER_REQUEST_ID: rid} if rid else {}), **(error.headers or {})}
            return error.response()
        # A route that makes no request (models, files, batches) answers with an id of its own where the SDK reads
        # one, as the others do: its `_request_id` was None (a review).
        answer.headers.setdefault("request-id" if anthropic else "x-request-id", new_id("req_"))
        return answer


@contextlib.contextmanager
def _carrying_id(request_id: str, url: str):
    """An error of the generation ``request_id`` answers with that id (``ApiError.id_header``), as its answer would
    have: the SDKs' ``e.request_id`` was None (a user's walkthrough); a bug's too, as a 500 logged under it."""
    try:
        yield
    except ApiError as exc:
        exc.headers = {HEADER_REQUEST_ID: request_id, **(exc.headers or {})}
        raise
    except Exception as exc:
        error = internal_error(exc, request_id, f"POST {url}")
        error.headers = {HEADER_REQUEST_ID: request_id, **(error.headers or {})}
        error.runs_on = True  # no refusal: the work may run on, billed, and the SDK's retry must take it (try_outcome)
        raise error from exc
