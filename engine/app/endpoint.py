"""An OpenAI-compatible HTTP front for the engine, as a plain FastAPI app: the official ``openai`` SDK works
against it unchanged (``OpenAI(base_url="http://host:port/v1")``), and smartbatch decides per request how it
is sent (reuse, a provider's batch API, sync) within the deadline the caller gives.

Routes (OpenAI's shapes): ``POST /v1/chat/completions``, ``POST /v1/responses``, ``POST /v1/images/generations``, ``/v1/files``
(upload, list, retrieve, content, delete), ``/v1/batches`` (create, list, retrieve, cancel), ``/v1/models``
(Anthropic's Models API for the Anthropic SDK, ``_endpoint_models``); Anthropic's ``POST /v1/messages`` for a
Claude model, in Anthropic's shapes (``_endpoint_messages``), its token count, ``/v1/messages/count_tokens``, asked
of the provider by its dispatcher (``_endpoint_count``), and its Message Batches, ``/v1/messages/batches``
(``_endpoint_msgbatches``, jobs of the OpenAI batch route); OpenAI's Videos API, ``/v1/videos`` (create, retrieve,
content, list, delete; ``_endpoint_videos``); and one of ours, ``GET /v1/batches/{id}/smartbatch_report`` (each line's cost against its list price).

``stream: true`` answers in OpenAI's chunks (chat completions, ``_endpoint_stream``) or the Responses API's events
(``_endpoint_responses_stream``) once the whole answer is in; ``n`` > 1 on chat completions is n requests
(``_endpoint_choices``).

Request headers (all optional; absent, the engine's defaults apply):

* ``X-Smartbatch-Deadline``: seconds the answer may take (a float > 0); the longer, the cheaper it may ride.
  Without it, the priority's default, but never past the client's own read timeout, which the official SDKs
  send as ``X-Stainless-Read-Timeout`` (600 s by default): a deadline of an hour let the SDK give up at 600 s
  and retry, twice, each retry a new request (``CLIENT_TIMEOUT_SHARE`` of it is the deadline);
* ``X-Smartbatch-Priority``: ``urgent``, ``normal`` or ``background``;
* ``X-Smartbatch-Tenant``: who the request is for (budgets, cache); also the tenant of a batch's lines, and the
  owner of the files, batches and videos a call makes: no other tenant lists, reads or deletes them (``tenant_of``).
  A tenant key's call is its key's tenant, the header filled in; naming another is a 403 (``_endpoint_keys``);
* ``X-Smartbatch-Request-Id``: the idempotency key (the same id and body again gets the same answer, never a
  second call); without it each call gets a fresh id, but an SDK's own retry of a call takes that call's
  (``_endpoint_retries``), and that of a batch create answers the batch its try made (``_endpoint_batch_once``).

Response headers of a generation: ``X-Smartbatch-Mode`` (sync, flex, batch_api, gpu_batch, reuse),
``X-Smartbatch-Cost-Usd``, ``X-Smartbatch-Saving-Usd`` (list price minus cost), ``X-Smartbatch-Hit`` (exact,
in_flight, near or none) and ``X-Smartbatch-Request-Id``.

With ``api_key_sha256`` or ``tenant_keys`` every route asks for ``Authorization: Bearer <key>`` (the SDK's
``api_key``; or ``x-api-key``) whose SHA-256 is one of those digests, and answers any other with a 401
``invalid_api_key``; the keys themselves are never held. ``api_key_sha256``'s key may name any tenant; a tenant
key acts for its tenant alone (``_endpoint_keys``). Without either (the default, for a loopback bind) anyone who
reaches the port spends the engine's provider keys.

A ``previous_response_id`` or ``conversation`` is taken only if it is the caller's tenant's: an answer given to
that tenant carried it (``_endpoint_responses``); any other is OpenAI's 404 for an unknown id.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``; a bad header or body field is a
400 whose ``param`` names it. Files, batches and videos are held in memory per replica (``_endpoint_batches``),
per tenant.
Serving it (uvicorn, Ray Serve) is the caller's business: this module starts nothing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.app._endpoint_batches import CANCEL_WAIT_S, MAX_FILE_BYTES, MAX_OPEN_LINES, FilesAndBatches
from engine.app._endpoint_choices import choices_wanted, fan_out, merged_body, merged_headers
from engine.app._endpoint_claude import for_messages_api, in_callers_words
from engine.app._endpoint_count import count_router
from engine.app._endpoint_errors import _carrying_id, _errors_in_openai_shape
from engine.app._endpoint_failure import NO_RETRY, failure
from engine.app._endpoint_keys import EndpointKeys
from engine.app._endpoint_messages import in_anthropic_shape, message_events, messages_body
from engine.app._endpoint_models import models_router
from engine.app._endpoint_responses_stream import response_events, responses_stream_wanted
from engine.app._endpoint_retries import SdkRetries, try_outcome
from engine.app._endpoint_retry_log import KeptTries
from engine.app._endpoint_stream import sse_chunks, stream_wanted
from engine.app._endpoint_videos import VideoRoutes
from engine.app._endpoint_wire import (
    HEADER_COST,
    HEADER_DEADLINE,
    HEADER_DEADLINE_MET,
    HEADER_HIT,
    HEADER_MODE,
    HEADER_PRIORITY,
    HEADER_REQUEST_ID,
    HEADER_SAVING,
    HEADER_TENANT,
    ApiError,
    AsyncEngine,
    Validator,
    engine_call,
    json_body,
    new_id,
    smartbatch_fields,
)
from engine.core._callers import callers_field
from engine.core.answer_body import MESSAGES_URL, response_body
from engine.core.batchfile import list_price_usd
from engine.core.catalog import Catalog
from engine.core.errors import CatalogError
from engine.core.request import Request
from engine.core.result import Result

__all__ = ["HEADER_COST", "HEADER_DEADLINE", "HEADER_HIT", "HEADER_DEADLINE_MET", "HEADER_MODE", "HEADER_PRIORITY",
           "HEADER_REQUEST_ID", "HEADER_SAVING", "HEADER_TENANT", "MAX_FILE_BYTES", "AsyncEngine", "make_app"]

CHAT_URL = "/v1/chat/completions"
RESPONSES_URL = "/v1/responses"
IMAGES_URL = "/v1/images/generations"
CLIENT_TIMEOUT = "X-Stainless-Read-Timeout"
CLIENT_TIMEOUT_SHARE = 0.9  # of the client's read timeout, the deadline when none is given: the answer must be back


def make_app(engine: AsyncEngine, *, catalog: Catalog, window_default_s: float = 86400.0,
             api_key_sha256: str | None = None, cancel_wait_s: float = CANCEL_WAIT_S,
             max_open_batch_lines: int = MAX_OPEN_LINES, state_dir: Path | None = None,
             tenant_keys: Mapping[str, str] | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (anything with ``Engine``'s asyncio API: ``asubmit``,
    ``submit_many``, ``as_completed`` and ``settings``). ``catalog`` validates requests, lists models and
    prices the saving; ``window_default_s`` is a batch's completion window when the create call gives none;
    ``api_key_sha256``: the hex SHA-256 of the key a caller must send (None: no key asked); ``cancel_wait_s``: how
    long a cancelling batch waits for its running lines (real seconds); ``max_open_batch_lines``: unfinished batch
    lines held in the engine at once, past which a new batch fails (room left for chat calls); ``state_dir``: where
    files, batches, videos and the SDK tries of generations are kept on disk, taken back at the next start (None:
    in memory only); ``tenant_keys``: the hex SHA-256 of a key -> the one tenant it acts for (``_endpoint_keys``;
    a bad entry is a ``ConfigError``)."""
    keys = EndpointKeys(api_key_sha256, tenant_keys)  # first: a bad entry is refused before anything is opened
    # The client's timeout and the time a batch waited are real seconds; deadlines are engine seconds (a
    # compressed clock in demos and tests).
    speedup = float(getattr(getattr(engine, "clock", None), "speedup", 1.0))
    retries = SdkRetries()  # an SDK's retry of a call (a batch create too) is that call's, never a second one
    store = FilesAndBatches(engine, catalog, window_default_s=window_default_s, cancel_wait_s=cancel_wait_s,
                            max_open_lines=max_open_batch_lines, state_dir=state_dir, speedup=speedup,
                            retries=retries)
    tries = KeptTries(retries)  # a generation's: on disk too with a state directory, for a retry after a restart
    videos = VideoRoutes(engine, catalog, headers_of=lambda req, res: _smartbatch_headers(req, res, catalog),
                         state=store.state, speedup=speedup, retries=retries)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Each opened part is closed on every way out, last opened first: a start that failed half way, or a
        # shutdown step that raised, skipped the closes after it (the log's fsync thread and files left open).
        async with contextlib.AsyncExitStack() as opened:
            opened.push_async_callback(store.shutdown)  # (closes the state directory: last)
            opened.push_async_callback(tries.close)  # while the directory is still this endpoint's
            tries.resume(None if store.state is None else store.state.root)  # the SDK tries of before a restart
            opened.push_async_callback(videos.shutdown)
            await store.resume()  # the batches a state directory holds, from before a restart
            await videos.resume()  # and its videos
            yield

    app = FastAPI(title="smartbatch", summary="OpenAI-compatible front of the smartbatch engine",
                  lifespan=lifespan)
    app.state.smartbatch = store  # per-replica state, for inspection
    _errors_in_openai_shape(app)
    keys.guard(app)  # asks a key where one is set; drops the caller's key headers either way
    validator = Validator(catalog, engine.settings)
    known = {m for p in catalog.providers.values() for m in p.models}

    async def generate(http: HttpRequest, body: dict[str, Any], url: str) -> JSONResponse:
        done, headers = await answer(http, body, url)
        return JSONResponse(done, headers=headers)

    async def answer(http: HttpRequest, body: dict[str, Any], url: str, n: int = 1,
                     came: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
        """The answer's body in ``url``'s shape, and the smartbatch headers; ``n`` > 1: a chat body of n choices,
        each a request of its own (``_endpoint_choices``); ``came``: the caller's name of a renamed body field."""
        model = body.get("model")
        if isinstance(model, str) and model and model not in known:  # as OpenAI answers: apps fall back on it
            try:
                catalog.find_model(model)
            except CatalogError as exc:  # its message names the close matches and the catalog overlay
                raise ApiError(404, f"field 'model': {exc}", param="model", code="model_not_found") from None
        fields = smartbatch_fields(http.headers)
        rid = http.headers.get(HEADER_REQUEST_ID)
        if rid is not None and not rid.strip():
            raise ApiError(400, f"{HEADER_REQUEST_ID} is empty; give an id, or leave the header out for a "
                                "fresh one", param=HEADER_REQUEST_ID)
        if "deadline_s" not in fields and (waits := _client_waits(http.headers)) is not None:
            default = getattr(engine.settings.deadlines, fields.get("priority", "normal"))
            fields["deadline_s"] = min(default, waits * CLIENT_TIMEOUT_SHARE * speedup)
        if rid is not None:
            http.state.generation_id = rid  # a bug after the answer is built is under it too (the middleware)
            with _carrying_id(rid, url):
                return await _generation({"id": rid, **fields, "body": body}, url, n, came, own_id=True)
        tenant = fields.get("tenant", "default")
        key = retries.key(tenant, url, {**fields, "body": body, "n": n})
        d = {"id": tries.request_id(tenant, key, http.headers, lambda: new_id("req_")), **fields, "body": body}
        http.state.generation_id = d["id"]
        with try_outcome(tries, key, d["id"], ApiError), _carrying_id(d["id"], url):
            return await _generation(d, url, n, came)

    async def _generation(d: dict[str, Any], url: str, n: int, came: dict[str, str] | None,
                          own_id: bool = False) -> tuple[dict, dict[str, str]]:
        body = d["body"]
        param_of = _param_in(body, came)
        req = validator.request(d, param_of)
        want = "image" if url == IMAGES_URL else "text"
        if req.kind != want:
            where = {"image": IMAGES_URL, "text": f"{CHAT_URL} or {RESPONSES_URL}"}.get(req.kind, "the engine")
            raise ApiError(400, f"model {req.model!r} makes {req.kind}, not {want}; send it to {where}",
                           param="model")
        # A response id another tenant's request made (or none did) is not sent on to continue its conversation.
        await store.responses.acheck(req.tenant, req.body)
        if n == 1:
            res: Result = await engine_call(engine.asubmit(d), param_of)
            if res.status not in ("ok", "reused"):
                raise failure(res, engine.gone, own_id)
            done = response_body(url, req, res, int(time.time()))
            if res.status == "ok" and url == RESPONSES_URL:  # its id is the tenant's (a copy's is its source's)
                store.responses.learn(req.tenant, [done])
            return done, _smartbatch_headers(req, res, catalog)
        # One submission, in choice order: choice 0 reaches the cache first, so it never follows a later choice.
        results: list[Result] = await engine_call(engine.asubmit_many(fan_out(d, n)), param_of)
        failed = [failure(r, engine.gone, own_id) for r in results if r.status not in ("ok", "reused")]
        if failed:  # the others are billed all the same; the same request id again gets them back
            # A final answer first: a choice a stop cut unsent (a 503) beside one it cut under way was retried whole.
            exc = next((e for e in failed if "Retry-After" not in (e.headers or {})), failed[0])
            if billed := sum(r.status == "ok" for r in results):
                # A stop's 503 invited the SDK's retry, a new request that paid for the billed choices again.
                exc.headers = {**(exc.headers or {}), **NO_RETRY}
                exc.message += f" ({billed} of the {n} choices were answered and billed: sent again, they are again)"
            raise exc
        now, reqs = int(time.time()), [req.model_copy(update={"id": r.id}) for r in results]
        return (merged_body([response_body(url, q, r, now) for q, r in zip(reqs, results, strict=True)]),
                merged_headers([_smartbatch_headers(q, r, catalog) for q, r in zip(reqs, results, strict=True)],
                               cost=HEADER_COST, saving=HEADER_SAVING, mode=HEADER_MODE, hit=HEADER_HIT,
                               met=HEADER_DEADLINE_MET))

    @app.post(CHAT_URL)
    async def chat_completions(http: HttpRequest) -> Response:
        body = await json_body(http)
        stream, usage = stream_wanted(body)  # the engine gets the body without them: it reads whole answers
        n = choices_wanted(body)  # nor n: each of its requests makes one output
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n")}
        body, came = for_messages_api(body, catalog, engine.settings)  # a Claude model: Messages' names
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages is required: a non-empty list such as [{\"role\": \"user\", "
                                "\"content\": \"...\"}]", param="messages")
        try:
            done, headers = await answer(http, body, CHAT_URL, n, came)  # whole before a byte: errors keep a status
        except ApiError as exc:
            raise in_callers_words(exc, came) from None
        if not stream:
            return JSONResponse(done, headers=headers)
        return StreamingResponse(sse_chunks(done, usage), media_type="text/event-stream", headers=headers)

    @app.post(RESPONSES_URL)
    async def responses(http: HttpRequest) -> Response:
        body = await json_body(http)
        stream = responses_stream_wanted(body)  # the engine gets the body without it, as on the chat route
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        if not body.get("input"):
            raise ApiError(400, "input is required: a string, or a list of input items", param="input")
        done, headers = await answer(http, body, RESPONSES_URL)  # whole before a byte: an error keeps its status
        if not stream:
            return JSONResponse(done, headers=headers)
        return StreamingResponse(response_events(done), media_type="text/event-stream", headers=headers)

    @app.post(MESSAGES_URL)
    async def messages(http: HttpRequest) -> Response:
        try:
            body, stream = messages_body(await json_body(http), http.headers, catalog, engine.settings)
            done, headers = await answer(http, body, MESSAGES_URL)  # whole before a byte, as on the chat route
        except ApiError as exc:
            raise in_anthropic_shape(exc) from None
        headers["request-id"] = headers.pop("x-request-id")  # where the Anthropic SDK reads a call's id
        if not stream:
            return JSONResponse(done, headers=headers)
        return StreamingResponse(message_events(done), media_type="text/event-stream", headers=headers)

    @app.post(IMAGES_URL)
    async def images_generations(http: HttpRequest) -> JSONResponse:
        body = await json_body(http)
        if body.get("stream"):
            raise ApiError(400, "stream=true is not supported for images; leave it out", param="stream")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt is required: a non-empty string describing the image", param="prompt")
        n = body.get("n", 1)
        if n != 1 or isinstance(n, bool):
            raise ApiError(400, f"n={n!r}: only n=1 is supported; send n requests for n images", param="n")
        return await generate(http, body, IMAGES_URL)

    app.include_router(models_router(catalog, engine.settings))
    app.include_router(count_router(engine, catalog, engine.settings))
    app.include_router(store.router())
    app.include_router(videos.router())
    return app


def _param_in(body: dict, came: dict[str, str] | None = None) -> Callable[[str], str | None]:
    """The OpenAI body field behind a refused request field (``body.messages`` -> ``messages``; a field the
    endpoint renamed or moved, ``came``, by the caller's name)."""
    cap = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), "max_tokens")
    text = "prompt" if "prompt" in body else "messages"
    by_field = {"max_output_tokens": cap, "output_tokens": cap, "input_tokens": text, "prompt": text,
                "provider": "model", "kind": "model", "params.size": "size", "line": None}

    def param_of(field: str) -> str | None:
        param = by_field.get(field, field.removeprefix("body.").removeprefix("params."))
        return callers_field(param, came or {}) if param is not None else None

    return param_of


def _client_waits(headers) -> float | None:
    """Seconds the client waits for an answer (the SDKs' read timeout), or None if it did not say."""
    text = headers.get(CLIENT_TIMEOUT)
    try:
        seconds = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _smartbatch_headers(req: Request, res: Result, catalog: Catalog) -> dict[str, str]:
    saving = list_price_usd(req, res, catalog) - res.cost_usd
    return {HEADER_MODE: res.mode or "none", HEADER_COST: f"{res.cost_usd:.10f}",
            HEADER_SAVING: f"{saving:.10f}", HEADER_HIT: res.hit or "none", HEADER_REQUEST_ID: req.id,
            HEADER_DEADLINE_MET: "false" if res.deadline_met is False else "true",
            "x-request-id": req.id}  # where the OpenAI SDK reads a call's id (``_request_id``), as an error's
