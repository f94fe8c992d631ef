"""Google's native Batch API of the Gemini API with inline requests, for an image model of a ``compat: gemini``
provider whose catalog lists ``image`` in ``batch_api.kinds``: ``POST /v1beta/models/{model}:batchGenerateContent``,
``GET /v1beta/batches/{id}``, ``GET /v1beta/batches`` and ``POST /v1beta/batches/{id}:cancel``.

Wire shapes, as Google's own SDK sends and reads them (googleapis/python-genai ``google/genai/batches.py``:
``_CreateBatchJobParameters_to_mldev``, ``_InlinedRequest_to_mldev``, ``_BatchJob_from_mldev``,
``_InlinedResponse_from_mldev``, the ``batches/{name}`` and ``batches/{name}:cancel`` paths, its ``BATCH_STATE_*``
names) and the reference https://ai.google.dev/api/batch-mode (read 2026-12-06): the create body is
``{"batch": {"displayName", "inputConfig": {"requests": {"requests": [{"request": GenerateContentRequest,
"metadata": {"key": ...}}]}}}}``; every answer is an operation ``{"name": "batches/...", "metadata": the batch,
"done"}`` whose batch holds ``state`` (``BATCH_STATE_PENDING``, ``_RUNNING``, ``_SUCCEEDED``, ``_FAILED``,
``_CANCELLED``, ``_EXPIRED``), ``batchStats`` and, once ended, ``output.inlinedResponses.inlinedResponses``: one
``{"response": GenerateContentResponse, "metadata"}`` or ``{"error": google.rpc.Status, "metadata"}`` a member, the
request's own ``metadata`` given back. The image is a part ``{"inlineData": {"mimeType", "data"}}`` (base64). The
batch guide (https://ai.google.dev/gemini-api/docs/batch-mode, its zh-CN and de copies, read 2026-12-06): inline
requests while "the total request size stays under 20 MB", "50% of the standard cost", "target turnaround time is
24 hours".

ASSUMPTIONS (not in what could be read): a create body over 20 MiB is a 400 in Google's generic words; a cancelled or
expired batch gives the responses of the members that finished (the others absent), as OpenAI's and Anthropic's
do; the state stays ``RUNNING`` during the emulator's ``cancel_s`` (Google names no cancelling state); ``done`` and
``response`` (the output again, as the guide's REST example reads it) once the batch has ended. The list and
the get honour the ``fields`` system parameter Google's APIs share (a partial response, ``_parse_mask``), as the
engine's lookup asks for names and states alone, its polls for states and counts.

Timing, failures and expiry are the OpenAI batches' (``Schedule``, ``draw_turnaround``, ``fail_members``,
``expire_batches``); each member that succeeds is billed once, at the catalog's batch price (mode ``batch_api``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from engine.core._gemini import GEMINI_ASPECTS
from engine.emulator._batches import Schedule
from engine.emulator._bill import BilledItem
from engine.emulator._core import Core
from engine.emulator._faults import FaultPlan
from engine.emulator._openai import image_result
from engine.emulator._routing import Ctx, Route, route
from engine.emulator._wire import ApiError, Reply, json_reply, rfc3339

__all__ = ["INLINE_LIMIT_BYTES", "ROUTES", "GeminiBatch"]

INLINE_LIMIT_BYTES = 20 * 2**20  # "under 20 MB" (ASSUMPTION: MiB, Google's payload limits' unit)
_IMAGE_TOKENS = 1290  # Gemini 2.5 Flash Image's output tokens an image (Google's image page)
_FAILED = (13, "INTERNAL", "The request could not be processed (injected member fault).")
_FINAL = ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED")
_REQUEST_FIELDS = ("model", "contents", "generationConfig")
_CONFIG_FIELDS = ("responseModalities", "imageConfig")
_BY_ASPECT = {aspect: size for size, aspect in GEMINI_ASPECTS.items()}  # imageConfig.aspectRatio: the size made


def _bad(message: str, where: str) -> ApiError:
    return ApiError(400, message, param=where)


@dataclass(eq=False)
class GeminiBatch:
    id: str  # "batches/..."
    provider: str
    model: str
    display_name: str
    members: list[tuple[dict, dict]]  # (metadata, the old images body the member is made from)
    created_at: float
    schedule: Schedule
    expire_at: float
    cancel_s: float
    cancelling_at: float | None = None
    done: int = 0
    responses: list[dict] = field(default_factory=list)
    failed: int = 0

    def _cutoff(self) -> float:
        if self.cancelling_at is not None:
            return min(self.cancelling_at + self.cancel_s, self.expire_at)
        return self.expire_at

    def state(self, now: float) -> str:
        s = self.schedule
        if self.cancelling_at is not None and now >= self.cancelling_at + self.cancel_s:
            return "BATCH_STATE_CANCELLED"
        if self.expire_at < s.end and now >= self.expire_at:
            return "BATCH_STATE_EXPIRED"
        if now >= s.end and self.cancelling_at is None:
            return "BATCH_STATE_SUCCEEDED"
        return "BATCH_STATE_PENDING" if now < s.start else "BATCH_STATE_RUNNING"

    def advance(self, core: Core, faults: FaultPlan, now: float) -> None:
        """Run (and bill) the members due by ``now``. Called under ``core.lock``."""
        limit = min(now, self._cutoff())
        while self.done < len(self.members) and self.schedule.finish(self.done) <= limit:
            meta, body = self.members[self.done]
            self.responses.append(_run(core, faults, self, meta, body))
            self.done += 1

    def view(self, now: float) -> dict[str, Any]:
        state = self.state(now)
        final = state in _FINAL
        batch: dict[str, Any] = {
            "model": f"models/{self.model}", "displayName": self.display_name, "state": state,
            "createTime": rfc3339(self.created_at), "updateTime": rfc3339(now),
            # int64 counts are strings in proto3's JSON
            "batchStats": {"requestCount": str(len(self.members)),
                           "successfulRequestCount": str(len(self.responses) - self.failed),
                           "failedRequestCount": str(self.failed),
                           "pendingRequestCount": str(0 if final else len(self.members) - self.done)}}
        out: dict[str, Any] = {"name": self.id, "metadata": batch}
        if final:
            output = {"inlinedResponses": {"inlinedResponses": list(self.responses)}}
            batch.update(endTime=rfc3339(min(now, self._end())), output=output)
            out.update(done=True, response=output)
        return out

    def _end(self) -> float:
        return min(self.schedule.end, self._cutoff())


def _run(core: Core, faults: FaultPlan, batch: GeminiBatch, meta: dict, body: dict) -> dict:
    """A member run: its response, with the request's ``metadata`` (without it for ``keyless_members``)."""
    key = str(meta.get("key", ""))
    return faults.keyed(key, _response(core, faults, batch, meta, body, key), "metadata")


def _response(core: Core, faults: FaultPlan, batch: GeminiBatch, meta: dict, body: dict, key: str) -> dict:
    rid = core.new_id("req_")
    if faults.member_fails(key):
        batch.failed += 1
        return {"error": {"code": _FAILED[0], "message": _FAILED[2], "status": _FAILED[1]}, "metadata": meta}
    try:
        image, out = image_result(core, batch.provider, body, "batch_api")
    except ApiError as err:
        batch.failed += 1
        return {"error": {"code": 3, "message": err.message, "status": "INVALID_ARGUMENT"}, "metadata": meta}
    core.bill(BilledItem(provider=batch.provider, model=batch.model, mode="batch_api", route="gemini.batches",
                         request_id=rid, custom_id=key, usage=image.usage(), cost_usd=image.cost_usd))
    text = image.req.input_tokens
    return {"metadata": meta, "response": {
        "candidates": [{"content": {"role": "model", "parts": [{"inlineData": {
            "mimeType": "image/png", "data": out["data"][0]["b64_json"]}}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": text, "candidatesTokenCount": _IMAGE_TOKENS,
                          "totalTokenCount": text + _IMAGE_TOKENS,
                          "promptTokensDetails": [{"modality": "TEXT", "tokenCount": text}],
                          "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": _IMAGE_TOKENS}]},
        "modelVersion": batch.model, "responseId": rid}}


def _member(model: str, i: int, item: Any) -> tuple[dict, dict]:
    """One inline request as the old images body the emulator makes it from, after Google's checks."""
    where = f"batch.inputConfig.requests.requests[{i}]"
    if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
        raise _bad(f"{where} must be an object holding a request (a GenerateContentRequest)", where)
    meta = item.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _bad(f"{where}.metadata must be an object", f"{where}.metadata")
    req = item["request"]
    for k in req:
        if k not in _REQUEST_FIELDS:
            raise _bad(f"{where}.request.{k} is not served by the emulator (it takes {', '.join(_REQUEST_FIELDS)})",
                       f"{where}.request.{k}")
    if req.get("model") not in (None, model, f"models/{model}"):
        raise _bad(f"{where}.request.model {req['model']!r} differs from the batch's model {model!r}",
                   f"{where}.request.model")
    contents = req.get("contents")
    texts = [p.get("text") for c in contents or [] if isinstance(c, dict) for p in c.get("parts") or []
             if isinstance(p, dict)] if isinstance(contents, list) else []
    if not texts or not all(isinstance(t, str) for t in texts) or not "".join(texts).strip():
        raise _bad(f"{where}.request.contents must hold the prompt as text parts (the emulator takes text only)",
                   f"{where}.request.contents")
    cfg = req.get("generationConfig") or {}
    for k in cfg:
        if k not in _CONFIG_FIELDS:
            raise _bad(f"{where}.request.generationConfig.{k} is not served by the emulator", f"{where}.{k}")
    if "IMAGE" not in (cfg.get("responseModalities") or ["IMAGE"]):
        raise _bad(f"{where}.request.generationConfig.responseModalities must include IMAGE", f"{where}.modalities")
    aspect = (cfg.get("imageConfig") or {}).get("aspectRatio", "1:1")
    if aspect not in _BY_ASPECT:
        raise _bad(f"aspectRatio {aspect!r} is not supported; give one of {', '.join(_BY_ASPECT)}",
                   f"{where}.aspectRatio")
    return meta, {"model": model, "prompt": "".join(texts), "n": 1, "size": _BY_ASPECT[aspect],
                  "response_format": "b64_json"}


def _create(ctx: Ctx) -> Reply:
    core, model = ctx.core, unquote(ctx.params["model"]).removeprefix("models/")
    if len(ctx.body) > INLINE_LIMIT_BYTES:
        raise ApiError(400, f"Request payload size exceeds the limit: {INLINE_LIMIT_BYTES} bytes.")
    p, _ = core.model(ctx.provider, model, "image")
    if p.compat != "gemini" or p.batch_api is None or not p.supports_batch_api("image", model):
        raise ApiError(400, f"model {model} of provider {ctx.provider} rides no batch API in the catalog "
                       "(batch_api.kinds, batch_api.media_models)", param="model")
    batch = ctx.json().get("batch")
    if not isinstance(batch, dict):
        raise _bad('the body must be {"batch": {"displayName", "inputConfig": {"requests": {"requests": [...]}}}}',
                   "batch")
    items = ((batch.get("inputConfig") or {}).get("requests") or {}).get("requests")
    if not isinstance(items, list) or not items:
        raise _bad("batch.inputConfig.requests.requests must be a non-empty list (inline requests; the emulator "
                   "takes no input file)", "batch.inputConfig")
    members = [_member(model, i, x) for i, x in enumerate(items)]
    with core.lock:
        now = core.now()
        start = now + core.validating_s
        turnaround = core.draw_turnaround(p)
        fraction = ctx.faults.take_expiry()
        nominal = now + p.batch_api.completion_window_s
        b = GeminiBatch(core.new_id("batches/"), ctx.provider, model, str(batch.get("displayName") or ""), members,
                        now, Schedule(start, turnaround, len(members), core.members_together),
                        nominal if fraction is None else start + turnaround * fraction, core.cancel_s)
        core.batches[b.id] = b
        core.advancers[b.id] = lambda t: b.advance(core, ctx.faults, t)
        return json_reply("google", 200, b.view(now), ctx.request_id)


def _batch(ctx: Ctx) -> GeminiBatch:
    name = "batches/" + unquote(ctx.params["batch"])
    b = ctx.core.batches.get(name)
    if not isinstance(b, GeminiBatch) or b.provider != ctx.provider:
        raise ApiError(404, f"Batch {name} not found.")
    return b


def _get(ctx: Ctx) -> Reply:
    fields = ctx.params.get("fields")  # a partial response: a poll's state and counts, without the images
    with ctx.core.lock:  # one advance at a time: a member is never run (or billed) twice
        b, now = _batch(ctx), ctx.core.now()
        b.advance(ctx.core, ctx.faults, now)
        return json_reply("google", 200, _mask(b.view(now), _parse_mask(fields) if fields else None), ctx.request_id)


def _cancel(ctx: Ctx) -> Reply:
    with ctx.core.lock:
        b, now = _batch(ctx), ctx.core.now()
        b.advance(ctx.core, ctx.faults, now)
        state = b.state(now)
        if state in _FINAL:  # ASSUMPTION: google.rpc FAILED_PRECONDITION, as a cancel of an ended operation
            raise ApiError(400, f"Batch {b.id} is {state}; only a pending or running batch can be cancelled.")
        if b.cancelling_at is None:
            b.cancelling_at = now
        return json_reply("google", 200, {}, ctx.request_id)


def _mask(value: Any, paths: dict[str, Any] | None) -> Any:
    """``value`` cut to the field mask ``paths`` (``_parse_mask``); a list's items each. None: all of it."""
    if paths is None:
        return value
    if isinstance(value, list):
        return [_mask(v, paths) for v in value]
    if not isinstance(value, dict):
        return value
    return {k: _mask(value[k], sub) for k, sub in paths.items() if k in value}


def _parse_mask(text: str) -> dict[str, Any]:
    """Google's ``fields`` system parameter (a partial response: ``a,b(c,d(e)),f.g``) as nested paths, a leaf None
    (all of it). Unbalanced parentheses are a 400, as a mask Google cannot read."""
    pos = 0

    def merge(tree: dict[str, Any], parts: list[str], sub: dict[str, Any] | None) -> None:
        head, rest = parts[0], parts[1:]
        if head in tree and tree[head] is None:  # all of it already
            return
        if rest:
            merge(tree.setdefault(head, {}), rest, sub)
        elif sub is None:
            tree[head] = None
        else:
            node = tree.setdefault(head, {})
            for k, v in sub.items():
                merge(node, [k], v)

    def group(depth: int) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while True:
            start = pos
            while pos < len(text) and text[pos] not in ",()":
                pos += 1
            path, sub = text[start:pos].strip(), None
            if pos < len(text) and text[pos] == "(":
                pos += 1
                sub = group(depth + 1)
            if path:
                merge(out, path.split("."), sub)
            if pos >= len(text):
                if depth:
                    raise _bad(f"fields {text!r}: a '(' is not closed", "fields")
                return out
            pos += 1
            if text[pos - 1] == ")":
                if not depth:
                    raise _bad(f"fields {text!r}: a ')' closes nothing", "fields")
                return out

    return group(0)


def _list(ctx: Ctx) -> Reply:
    """Newest first, ``pageSize`` (1 to 100, default 20) after ``pageToken`` (a batch's name)."""
    try:
        size = int(ctx.params.get("pageSize", 20))
    except ValueError:
        raise _bad("pageSize must be an integer from 1 to 100", "pageSize") from None
    if not 1 <= size <= 100:
        raise _bad(f"pageSize must be from 1 to 100, got {size}", "pageSize")
    core, after = ctx.core, ctx.params.get("pageToken")
    with core.lock:
        now = core.now()
        mine = [b for b in reversed(core.batches.values()) if isinstance(b, GeminiBatch) and b.provider == ctx.provider]
        if after:
            names = [b.id for b in mine]
            mine = mine[names.index(after) + 1:] if after in names else []
        page = mine[:size]
        for b in page:
            b.advance(core, ctx.faults, now)
        out: dict[str, Any] = {"operations": [b.view(now) for b in page]}
        if len(mine) > size:
            out["nextPageToken"] = page[-1].id
        fields = ctx.params.get("fields")  # a partial response: a page of ended batches without their images
        return json_reply("google", 200, _mask(out, _parse_mask(fields) if fields else None), ctx.request_id)


ROUTES: list[Route] = [
    route("POST", "/v1beta/models/{model}:batchGenerateContent", "google", "gemini.batches.create", _create),
    route("GET", "/v1beta/batches", "google", "gemini.batches.list", _list),
    route("POST", "/v1beta/batches/{batch}:cancel", "google", "gemini.batches.cancel", _cancel),
    route("GET", "/v1beta/batches/{batch}", "google", "gemini.batches.get", _get),
]
