"""OpenAI Batch API: create (validating the input file), retrieve, list, cancel; output and error files."""

from __future__ import annotations

import json
from typing import Any

from engine.core.catalog import ProviderSpec
from engine.emulator._batches import MemberOutcome, OpenAIBatch, Schedule, newest_first
from engine.emulator._bill import BilledItem
from engine.emulator._core import Core
from engine.emulator._faults import FaultPlan
from engine.emulator._fields import check_fields
from engine.emulator._openai import chat_result, image_result, responses_result
from engine.emulator._routing import Ctx, Route, route
from engine.emulator._text import chat_prompt, responses_prompt, tokens
from engine.emulator._wire import ApiError, Reply, error_object, json_reply

__all__ = ["ROUTES"]

_ENDPOINTS = {"/v1/chat/completions": chat_result, "/v1/responses": responses_result,
              "/v1/images/generations": image_result}
_IMAGES = "/v1/images/generations"


def _kind(endpoint: str) -> str:
    """The kind of model a batch's endpoint runs (one batch file, one endpoint)."""
    return "image" if endpoint == _IMAGES else "text"


def _problem(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "line": line, "param": param}


def _parse_lines(data: bytes, endpoint: str, provider: ProviderSpec
                 ) -> tuple[list[tuple[str, dict]], list[dict], str | None]:
    """Members, validation problems and the one model of a batch input file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [_problem("invalid_file", "the input file is not UTF-8 JSONL")], None
    members: list[tuple[str, dict]] = []
    problems: list[dict] = []
    seen: set[str] = set()
    model: str | None = None
    for no, raw in enumerate(text.split("\n"), 1):  # JSONL: U+2028 and kin may sit raw inside a string
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            problems.append(_problem("invalid_json_line", f"line {no} is not valid JSON", no))
            continue
        if not isinstance(obj, dict):
            problems.append(_problem("invalid_json_line", f"line {no} must be a JSON object", no))
            continue
        cid, body = obj.get("custom_id"), obj.get("body")
        if not isinstance(cid, str) or not cid:
            problems.append(_problem("missing_required_parameter", "custom_id must be a non-empty string", no,
                                     "custom_id"))
            continue
        if cid in seen:
            problems.append(_problem("duplicate_custom_id", f"custom_id {cid!r} appears more than once; each "
                                     "request of a batch needs its own custom_id", no, "custom_id"))
            continue
        seen.add(cid)
        if obj.get("method") != "POST":
            problems.append(_problem("invalid_method", "method must be 'POST'", no, "method"))
        elif obj.get("url") != endpoint:
            problems.append(_problem("invalid_url", f"url {obj.get('url')!r} must be the batch's endpoint "
                                     f"{endpoint!r}", no, "url"))
        elif not isinstance(body, dict):
            problems.append(_problem("invalid_request", "body must be a JSON object", no, "body"))
        elif body.get("model") not in provider.models or provider.models[body["model"]].kind != _kind(endpoint):
            what = "an image" if endpoint == _IMAGES else "a text"
            problems.append(_problem("model_not_found", f"model {body.get('model')!r} is not {what} model of "
                                     f"{provider.name} (the batch's endpoint is {endpoint})", no, "body.model"))
        elif model is not None and body["model"] != model:
            problems.append(_problem("mismatched_model", f"a batch holds one model: line {no} uses "
                                     f"{body['model']!r} after {model!r}", no, "body.model"))
        else:
            model = body["model"]
            members.append((cid, body))
    if not members and not problems:
        problems.append(_problem("empty_file", "the input file holds no requests"))
    ba = provider.batch_api
    if ba is not None and len(members) > ba.max_requests:
        problems.append(_problem("too_many_requests", f"{len(members)} requests; a batch holds at most "
                                 f"{ba.max_requests}"))
    return members, problems, model


def _input_tokens(endpoint: str, body: dict) -> int:
    """A member's input tokens as the batch queue counts them (a body the prompt reader refuses: its JSON's; an
    image's: its prompt's)."""
    if endpoint == _IMAGES:
        prompt = body.get("prompt")
        return tokens(len(prompt if isinstance(prompt, str) else json.dumps(body)))
    try:
        return (responses_prompt if endpoint == "/v1/responses" else chat_prompt)(body).tokens
    except (ApiError, AttributeError, TypeError, ValueError):
        return tokens(len(json.dumps(body)))


_QUEUED = ("validating", "in_progress", "finalizing")  # a batch holds its tokens in the queue until it ends


def _queue_problem(core: Core, faults: FaultPlan, provider: str, model: str | None, endpoint: str,
                   members: list[tuple[str, dict]], now: float) -> tuple[int, list[dict]]:
    """The batch's input tokens, and the refusal of a batch that would pass its model's batch queue limit
    (``FaultPlan.batch_queue_limits``), in the words of OpenAI's (openai-python issue 2084)."""
    mine = sum(_input_tokens(endpoint, body) for _, body in members)
    limit = faults.queue_limit(model)
    if limit is None:
        return mine, []
    held = sum(b.queued_tokens for b in core.batches.values() if isinstance(b, OpenAIBatch)  # (under core.lock)
               and b.provider == provider and b.model == model and b.status(now) in _QUEUED)
    if held + mine <= limit:
        return mine, []
    return 0, [_problem("token_limit_exceeded", f"Enqueued token limit reached for {model} in organization "
                        f"org-emulator. Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
                        "batches have been completed.")]


def _check_metadata(meta: object) -> None:
    """``BatchCreateParams.metadata``: at most 16 pairs, keys of at most 64 characters, string values of at
    most 512."""
    if meta is None:
        return
    if not isinstance(meta, dict) or len(meta) > 16:
        raise ApiError(400, "metadata: at most 16 key-value pairs", param="metadata")
    for k, v in meta.items():
        if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise ApiError(400, f"metadata.{k[:64]}: keys are strings of at most 64 characters and values "
                           "strings of at most 512", param="metadata")


def _create(ctx: Ctx) -> Reply:
    body, core = ctx.json(), ctx.core
    check_fields("batches.create", body, "openai")
    endpoint, window = body.get("endpoint"), body.get("completion_window")
    if endpoint not in _ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {sorted(_ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    if window != "24h":
        raise ApiError(400, f"completion_window must be '24h', got {window!r}", param="completion_window")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(400, "input_file_id is required: upload the JSONL with purpose 'batch' first",
                       param="input_file_id")
    rec = core.file(file_id)
    if rec.purpose != "batch":
        raise ApiError(400, f"file {file_id} has purpose {rec.purpose!r}; upload it with purpose 'batch'",
                       param="input_file_id")
    p = core.catalog.provider(ctx.provider)
    if p.batch_api is None or _kind(endpoint) not in p.batch_api.kinds:
        raise ApiError(400, f"provider {ctx.provider} declares no batch API for {_kind(endpoint)} models in the "
                       f"catalog (batch_api.kinds)", param="endpoint")
    if p.compat == "gemini" and _kind(endpoint) != "text":  # the layer's batches are of chat completions only
        raise ApiError(400, "Google's OpenAI compatibility layer batches chat completions only; an image model "
                       "batches through models/{model}:batchGenerateContent", param="endpoint")
    _check_metadata(body.get("metadata"))
    members, problems, model = _parse_lines(rec.data, endpoint, p)
    if model is not None and not p.supports_batch_api(_kind(endpoint), model):
        raise ApiError(400, f"model {model} of provider {ctx.provider} rides no batch API in the catalog "
                       f"(batch_api.media_models)", param="endpoint")
    with core.lock:  # the queue's count and this batch's place in it at once
        now = core.now()
        turnaround = core.draw_turnaround(p)
        start = now + core.validating_s
        queued = 0
        if not problems:
            queued, problems = _queue_problem(core, ctx.faults, ctx.provider, model, endpoint, members, now)
        fraction = None if problems else ctx.faults.take_expiry()
        nominal = now + p.batch_api.completion_window_s
        batch = OpenAIBatch(
            id=core.new_id("batch_"), provider=ctx.provider, endpoint=endpoint, input_file_id=rec.id,
            completion_window=window, metadata=body.get("metadata"), model=model, members=members,
            errors=problems, created_at=now, schedule=Schedule(start, turnaround, max(len(members), 1), core.members_together),
            expire_at=nominal if fraction is None else start + turnaround * fraction, expires_at=nominal,
            finalizing_s=core.finalizing_s, cancel_s=core.cancel_s, queued_tokens=queued)
        core.batches[batch.id] = batch
        core.advancers[batch.id] = lambda t: _advance(core, ctx.faults, batch, t)
        return json_reply("openai", 200, batch.view(now), ctx.request_id)


def _advance(core: Core, faults: FaultPlan, batch: OpenAIBatch, now: float) -> None:
    """Run the members due by ``now`` and close the batch once final. Called under ``core.lock``."""
    result = _ENDPOINTS[batch.endpoint]

    def run(cid: str, body: dict, at: float) -> MemberOutcome:
        rid = core.new_id("req_")
        if faults.member_fails(cid):
            err = ApiError(500, "The server had an error processing this request (injected member fault).",
                           code="server_error")
            return MemberOutcome(False, 500, error_object("openai", err, rid), rid, "server_error", err.message)
        try:
            if batch.endpoint == _IMAGES:  # priced at the batch API's discount, billed once, as a text line
                image, out = image_result(core, batch.provider, body, "batch_api")
                core.bill(BilledItem(provider=batch.provider, model=image.req.model, mode="batch_api",
                                     route="batches", request_id=rid, custom_id=cid, usage=image.usage(),
                                     cost_usd=image.cost_usd))
                return MemberOutcome(True, 200, out, rid, input_tokens=image.req.input_tokens)
            call, out = result(core, batch.provider, body, "batch_api", at)
        except ApiError as err:
            return MemberOutcome(False, err.status, error_object("openai", err, rid), rid,
                                 err.code or "invalid_request", err.message)
        core.bill_text(call, "batch_api", "batches", rid, cid)
        return MemberOutcome(True, 200, out, rid, input_tokens=call.input_tokens, cached_tokens=call.split.read,
                             output_tokens=call.output_tokens)

    def close(b: OpenAIBatch) -> None:
        for lines, attr in ((b.outputs, "output_file_id"), (b.failures, "error_file_id")):
            if lines:
                data = "".join(faults.result_line(x.get("custom_id"), json.dumps(
                    faults.keyed(x.get("custom_id"), x, "custom_id"), separators=(",", ":"), ensure_ascii=False)) + "\n"
                               for x in lines).encode()
                kind = "output" if attr == "output_file_id" else "error"
                setattr(b, attr, core.add_file(f"{b.id}_{kind}.jsonl", "batch_output", data).id)

    batch.advance(now, run, close, lambda: core.new_id("batch_req_"))


def _batch(ctx: Ctx) -> OpenAIBatch:
    batch = ctx.core.batches.get(ctx.params["batch_id"])
    if not isinstance(batch, OpenAIBatch) or batch.provider != ctx.provider:
        raise ApiError(404, f"No batch found with id '{ctx.params['batch_id']}'", code="not_found")
    return batch


def _retrieve(ctx: Ctx) -> Reply:
    with ctx.core.lock:  # one advance at a time, so a member is never run (or billed) twice
        batch, now = _batch(ctx), ctx.core.now()
        _advance(ctx.core, ctx.faults, batch, now)
        return json_reply("openai", 200, batch.view(now), ctx.request_id)


def _cancel(ctx: Ctx) -> Reply:
    with ctx.core.lock:
        batch, now = _batch(ctx), ctx.core.now()
        _advance(ctx.core, ctx.faults, batch, now)
        status = batch.status(now)
        if status in ("cancelling", "cancelled"):
            return json_reply("openai", 200, batch.view(now), ctx.request_id)
        if not batch.cancellable(now):
            raise ApiError(400, f"Cannot cancel a batch with status '{status}'.", code="invalid_state")
        batch.cancelling_at = now
        _advance(ctx.core, ctx.faults, batch, now)
        return json_reply("openai", 200, batch.view(now), ctx.request_id)


def _list(ctx: Ctx) -> Reply:
    """Newest first, up to 100 at a time after the cursor ``after`` (a batch id)."""
    data, more = newest_first(ctx, OpenAIBatch, "after", 100, _advance)
    return json_reply("openai", 200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                      "last_id": data[-1]["id"] if data else None, "has_more": more}, ctx.request_id)


ROUTES: list[Route] = [
    route("POST", "/v1/batches", "openai", "batches.create", _create),
    route("GET", "/v1/batches", "openai", "batches.list", _list),
    route("GET", "/v1/batches/{batch_id}", "openai", "batches.retrieve", _retrieve),
    route("POST", "/v1/batches/{batch_id}/cancel", "openai", "batches.cancel", _cancel),
]
