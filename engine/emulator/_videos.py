"""OpenAI's Videos API: ``POST /v1/videos`` (a job, answered at once ``queued``), ``GET /v1/videos/{id}`` (its
status, moving on the emulator's clock), ``GET /v1/videos`` (newest first, paged by ``after``),
``GET /v1/videos/{id}/content`` (the MP4, once completed) and ``DELETE /v1/videos/{id}``.

A job runs its model's media latency from the catalog (``media_latency``: ``video_base_s`` plus
``video_per_second_s`` a second of video, the lognormal's ``sigma``): queued for its first tenth, then
``in_progress`` with its ``progress`` growing, then ``completed``, billed once then at the catalog's per-second
price for the seconds and size it was made at (``engine.core.cost``). A job the fault plan fails
(``fail_videos``) ends ``failed`` with an ``error`` instead, billed nothing. Jobs are brought up to date on every
read and by the bill (``Core.advancers``), so a job nobody polls is billed when it completes, as a provider's is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from engine.core.cost import price_alone
from engine.core.video_sizes import OPENAI_VIDEO_SIZES, resolution_of
from engine.emulator._bill import BilledItem
from engine.emulator._core import Core
from engine.emulator._fields import check_fields
from engine.emulator._openai import form_names, multipart
from engine.emulator._routing import Ctx, Route, route
from engine.emulator._wire import ApiError, Reply, json_reply

__all__ = ["FAILED_CODE", "ROUTES", "Video", "advance", "mp4"]

_MAX_PROMPT = 32_000  # OpenAI's schema: a prompt of 1 to 32,000 characters
_QUEUED_SHARE = 0.1  # of a job's latency spent queued (ASSUMPTION: OpenAI says nothing of it)
_KEEP_S = 3600.0  # a completed video's content is kept this long (expires_at; OpenAI: "about 1 hour")
FAILED_CODE = "video_generation_failed"  # ASSUMPTION: OpenAI's reference names no failure codes


def mp4(seconds: int) -> bytes:
    """A tiny MP4: an ``ftyp`` box and an empty ``mdat``, enough for a reader to see the container. Not playable."""
    ftyp = b"isom" + struct.pack(">I", 512) + b"isomiso2avc1mp41"
    note = f"smartbatch emulator video, {seconds} s".encode()
    return (struct.pack(">I", 8 + len(ftyp)) + b"ftyp" + ftyp
            + struct.pack(">I", 8 + len(note)) + b"mdat" + note)


@dataclass
class Video:
    id: str
    provider: str
    model: str
    prompt: str
    seconds: int
    size: str
    created_at: float
    run_s: float  # the whole job, queue included (emulator seconds)
    cost_usd: float
    request_id: str
    idempotency_key: str | None
    fails: bool
    billed: bool = False
    deleted: bool = False
    route: str = "videos"  # the bill's route: "veo" for Google's (``_veo``), whose ``size`` is a resolution

    def status(self, now: float) -> tuple[str, int]:
        t = now - self.created_at
        if t >= self.run_s:
            return ("failed" if self.fails else "completed"), 100
        queued = self.run_s * _QUEUED_SHARE
        if t < queued:
            return "queued", 0
        return "in_progress", min(int(100 * (t - queued) / (self.run_s - queued)), 99)

    def view(self, now: float) -> dict[str, Any]:
        status, progress = self.status(now)
        done = self.created_at + self.run_s
        out: dict[str, Any] = {"id": self.id, "object": "video", "model": self.model, "status": status,
                               "progress": progress, "prompt": self.prompt, "seconds": str(self.seconds),
                               "size": self.size, "created_at": int(self.created_at), "completed_at": None,
                               "expires_at": None, "error": None, "remixed_from_video_id": None}
        if status == "completed":
            out["completed_at"], out["expires_at"] = int(done), int(done + _KEEP_S)
        elif status == "failed":
            out["error"] = {"code": FAILED_CODE, "message": "The video could not be generated (injected fault)."}
        return out


def advance(core: Core, now: float) -> None:
    """Bill every job that completed by ``now`` and is not billed yet (under ``core.lock``)."""
    for v in core.videos.values():
        if not v.billed and not v.fails and now >= v.created_at + v.run_s:
            v.billed = True
            made = {"seconds": v.seconds, ("resolution" if v.route == "veo" else "size"): v.size}
            core.ledger.add(BilledItem(provider=v.provider, model=v.model, mode="sync", route=v.route,
                                       request_id=v.request_id, idempotency_key=v.idempotency_key,
                                       usage=made, cost_usd=v.cost_usd))


def _fields(ctx: Ctx) -> dict[str, Any]:
    """The create's fields: a multipart form, as the ``openai`` SDK sends it, or a JSON object."""
    if ctx.headers.get("content-type", "").startswith("application/json"):
        body = ctx.json()
        check_fields("videos", body, "openai")
        return body
    form = multipart(ctx, "POST /v1/videos takes multipart/form-data (or a JSON object) with 'prompt', and "
                          "optionally 'model', 'seconds' and 'size'")
    check_fields("videos", form_names(form), "openai")
    return {k: (data if filename is not None else data.decode(errors="replace")) for k, (filename, data) in
            form.items()}


def _create(ctx: Ctx) -> Reply:
    core = ctx.core
    if core.catalog.providers[ctx.provider].compat == "gemini":  # Google's layer has no Videos API: Veo is native
        raise ApiError(404, "Google's OpenAI compatibility layer serves no Videos API; Veo is made through the "
                       "Gemini API's own route, POST /v1beta/models/{model}:predictLongRunning", code="not_found")
    body = _fields(ctx)
    if "input_reference" in body:
        raise ApiError(400, "input_reference is not supported by the emulator; send a text prompt only",
                       param="input_reference")
    model = "sora-2" if body.get("model") is None else body["model"]  # the default for one left out, not for ""
    p, spec = core.model(ctx.provider, model, "video")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "Missing required parameter: 'prompt' (a non-empty string).", param="prompt",
                       code="missing_required_parameter")
    if len(prompt) > _MAX_PROMPT:
        raise ApiError(400, f"Invalid 'prompt': string too long. Expected at most {_MAX_PROMPT} characters, got "
                       f"{len(prompt)}.", param="prompt", code="string_above_max_length")
    lengths = [int(d) for d in spec.durations_s or (4, 8, 12)]
    seconds = "4" if body.get("seconds") is None else str(body["seconds"])  # a form carries text; 4 s by default
    if not seconds.isdigit() or int(seconds) not in lengths:
        raise ApiError(400, f"Invalid value: '{seconds}'. 'seconds' must be one of "
                       f"{', '.join(repr(str(d)) for d in lengths)} (a string).", param="seconds",
                       code="invalid_value")
    offered = [s for res in (spec.per_second or {}) for s in OPENAI_VIDEO_SIZES.get(res, ())]
    size = "720x1280" if body.get("size") is None else str(body["size"])
    if size not in offered:
        raise ApiError(400, f"Invalid value: '{size}'. 'size' must be one of {', '.join(offered)} for {model}.",
                       param="size", code="invalid_value")
    req = core.video_request(p, model, prompt, resolution_of(size), float(seconds))
    now = core.now()
    # media latency: the same draw an image takes, at the video's base and per-second terms
    v = Video(core.new_id("video_"), ctx.provider, model, prompt, int(seconds), size, now,
               core.image_latency_s(p, req), price_alone(req, core.catalog, "sync").total, ctx.request_id,
               ctx.headers.get("idempotency-key"), ctx.faults.take_video_failure(ctx.provider))
    with core.lock:
        core.videos[v.id] = v
        core.advancers.setdefault("videos", lambda t: advance(core, t))
    return json_reply("openai", 200, v.view(now), ctx.request_id)


def _video(ctx: Ctx) -> Video:
    core = ctx.core
    vid = unquote(ctx.params["video_id"])
    with core.lock:
        advance(core, core.now())
        v = core.videos.get(vid)
    if v is None or v.deleted or v.route != "videos":
        raise ApiError(404, f"Video with id '{vid}' not found.", param="video_id", code="video_not_found")
    return v


def _retrieve(ctx: Ctx) -> Reply:
    return json_reply("openai", 200, _video(ctx).view(ctx.core.now()), ctx.request_id)


def _content(ctx: Ctx) -> Reply:
    v = _video(ctx)
    status, _ = v.status(ctx.core.now())
    if status != "completed":  # OpenAI answers a 404 while a job is queued or in progress
        raise ApiError(404 if status != "failed" else 400, f"Video is not ready yet; its status is '{status}'. "
                       "Poll GET /v1/videos/{video_id} until it is 'completed'.", code="video_not_ready")
    if ctx.params.get("variant", "video") != "video":
        raise ApiError(400, "the emulator serves variant 'video' only", param="variant")
    return Reply(200, {"content-type": "video/mp4", "x-request-id": ctx.request_id}, mp4(v.seconds))


def _list(ctx: Ctx) -> Reply:
    core = ctx.core
    try:
        limit = int(ctx.params.get("limit", 20))
    except ValueError:
        raise ApiError(400, "limit must be an integer in [1, 100]", param="limit") from None
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be an integer in [1, 100]", param="limit")
    with core.lock:
        advance(core, core.now())
        jobs = [v for v in core.videos.values() if not v.deleted and v.route == "videos"]
    if ctx.params.get("order", "desc") == "desc":
        jobs.reverse()
    after = ctx.params.get("after")
    if after:
        ids = [v.id for v in jobs]
        jobs = jobs[ids.index(after) + 1:] if after in ids else []
    page, now = jobs[:limit], core.now()
    return json_reply("openai", 200, {"object": "list", "data": [v.view(now) for v in page],
                                      "first_id": page[0].id if page else None,
                                      "last_id": page[-1].id if page else None,
                                      "has_more": len(jobs) > limit}, ctx.request_id)


def _delete(ctx: Ctx) -> Reply:
    v = _video(ctx)
    with ctx.core.lock:
        v.deleted = True
    return json_reply("openai", 200, {"id": v.id, "object": "video.deleted", "deleted": True}, ctx.request_id)


ROUTES: list[Route] = [
    route("POST", "/v1/videos", "openai", "videos", _create, generating=True),
    route("GET", "/v1/videos", "openai", "videos.list", _list),
    route("GET", "/v1/videos/{video_id}", "openai", "videos.retrieve", _retrieve),
    route("GET", "/v1/videos/{video_id}/content", "openai", "videos.content", _content),
    route("DELETE", "/v1/videos/{video_id}", "openai", "videos.delete", _delete),
]
