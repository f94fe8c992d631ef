"""Google's Veo through the Gemini API's own routes (a provider whose catalog entry says ``compat: gemini``):
``POST /v1beta/models/{model}:predictLongRunning`` (a long-running operation, answered at once with its name),
``GET /v1beta/{name}`` of that operation (``done`` once the video is made, its address under
``response.generateVideoResponse.generatedSamples[].video.uri``) and ``GET /v1beta/files/{id}:download`` (the MP4).
The key goes in ``x-goog-api-key`` (or ``?key=``), as Google's REST examples send it; errors are Google's one
``{"error": {"code", "message", "status"}}``.

A job runs on the emulator's clock for its model's media latency and is billed once, when it completes, at the
catalog's per-second price for the seconds and resolution it was made at, as the Videos API's jobs are
(``_videos``: the same store, bill and ``fail_videos`` faults). What the parameters may hold is Google's Veo 3.1
guide as read on 2026-12-05 (docs/providers.md, "Veo"): ``durationSeconds`` among the model's lengths, 8 at 1080p
and 4k; ``resolution`` among the resolutions the catalog prices; ``aspectRatio`` 16:9 or 9:16;
``personGeneration``, ``negativePrompt``, ``seed``; one video a request. A text prompt only: the emulator refuses an
image, a video to extend and reference images, naming them."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from engine.core.cost import price_alone
from engine.emulator._core import Core
from engine.emulator._routing import Ctx, Route, route
from engine.emulator._videos import Video, advance, mp4
from engine.emulator._wire import ApiError, Reply, json_reply

__all__ = ["ROUTES"]

_PARAMETERS = ("aspectRatio", "durationSeconds", "negativePrompt", "personGeneration", "resolution", "sampleCount",
               "seed")
_ASPECTS = ("16:9", "9:16")
_PERSONS = ("allow_all", "allow_adult", "dont_allow")
_LONG_ONLY = ("1080p", "4k")  # resolutions Google makes at 8 s only
_FAILED = (13, "Video generation failed (injected fault).")  # google.rpc code INTERNAL: ASSUMPTION, none documented
_RESPONSE_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse"


def _bad(message: str, field: str) -> ApiError:
    return ApiError(400, message, param=field)


def _instance(body: dict[str, Any]) -> str:
    instances = body.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        raise _bad("instances must be a list of one object holding the prompt, e.g. "
                   '{"instances": [{"prompt": "..."}]}', "instances")
    inst = instances[0]
    for key in inst:
        if key != "prompt":
            raise _bad(f"instances[0].{key} is not served by the emulator (a text prompt only); leave it out",
                       f"instances[0].{key}")
    prompt = inst.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad("instances[0].prompt is required: a non-empty string", "instances[0].prompt")
    return prompt


def _parameters(body: dict[str, Any], spec: Any, model: str) -> tuple[int, str]:
    """The seconds and resolution the video is made at, after checking every parameter as Google does."""
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("parameters must be an object", "parameters")
    for key in body:
        if key not in ("instances", "parameters"):
            raise _bad(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.', key)
    for key in params:
        if key not in _PARAMETERS:
            raise _bad(f'Invalid JSON payload received. Unknown name "{key}" at \'parameters\': Cannot find field. '
                       f"Veo takes {', '.join(_PARAMETERS)}.", f"parameters.{key}")
    lengths = [int(d) for d in spec.durations_s or (4, 6, 8)]
    seconds = params.get("durationSeconds", 8)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float, str)) or str(seconds) not in map(str, lengths):
        raise _bad(f"durationSeconds {seconds!r} is not supported by {model}; it takes "
                   f"{', '.join(map(str, lengths))}", "durationSeconds")
    offered = list(spec.per_second or {})
    resolution = params.get("resolution", spec.default_resolution or "720p")
    if resolution not in offered:
        raise _bad(f"resolution {resolution!r} is not supported by {model}; it takes {', '.join(offered)}",
                   "resolution")
    if resolution in _LONG_ONLY and int(seconds) != 8:
        raise _bad(f"durationSeconds must be 8 at resolution {resolution!r} (got {seconds}); give 8, or 720p",
                   "durationSeconds")
    if params.get("aspectRatio", "16:9") not in _ASPECTS:
        raise _bad(f"aspectRatio {params['aspectRatio']!r} is not supported; give one of {', '.join(_ASPECTS)}",
                   "aspectRatio")
    if params.get("personGeneration", "allow_all") not in _PERSONS:
        raise _bad(f"personGeneration {params['personGeneration']!r} is not supported; give one of "
                   f"{', '.join(_PERSONS)}", "personGeneration")
    if params.get("sampleCount", 1) != 1:
        raise _bad("sampleCount: the emulator makes one video a request; give 1 or leave it out", "sampleCount")
    if not isinstance(params.get("negativePrompt", ""), str):
        raise _bad("negativePrompt must be a string", "negativePrompt")
    return int(seconds), resolution


def _create(ctx: Ctx) -> Reply:
    core = ctx.core
    model = unquote(ctx.params["model"])
    p, spec = core.model(ctx.provider, model, "video")
    body = ctx.json()
    prompt = _instance(body)
    seconds, resolution = _parameters(body, spec, model)
    req = core.video_request(p, model, prompt, resolution, float(seconds))
    op = core.new_id("op")
    v = Video(op, ctx.provider, model, prompt, seconds, resolution, core.now(), core.image_latency_s(p, req),
              price_alone(req, core.catalog, "sync").total, ctx.request_id, ctx.headers.get("idempotency-key"),
              ctx.faults.take_video_failure(ctx.provider), route="veo")
    with core.lock:
        core.videos[v.id] = v
        core.advancers.setdefault("videos", lambda t: advance(core, t))
    return json_reply("google", 200, {"name": f"models/{model}/operations/{op}"}, ctx.request_id)


def _job(core: Core, vid: str) -> Video | None:
    with core.lock:
        advance(core, core.now())
        v = core.videos.get(vid)
    return v if v is not None and v.route == "veo" else None


def _operation(ctx: Ctx) -> Reply:
    core, model, op = ctx.core, unquote(ctx.params["model"]), unquote(ctx.params["op"])
    v = _job(core, op)
    name = f"models/{model}/operations/{op}"
    if v is None or v.model != model:
        raise ApiError(404, f"Operation {name} not found.")
    status, _ = v.status(core.now())
    out: dict[str, Any] = {"name": name}  # Google leaves ``done`` out until it is true
    if status == "failed":
        out.update(done=True, error={"code": _FAILED[0], "message": _FAILED[1]})
    elif status == "completed":
        uri = f"{ctx.origin}/{ctx.provider}/v1beta/files/{v.id}:download?alt=media"
        out.update(done=True, response={"@type": _RESPONSE_TYPE, "generateVideoResponse": {
            "generatedSamples": [{"video": {"uri": uri}}]}})
    return json_reply("google", 200, out, ctx.request_id)


def _download(ctx: Ctx) -> Reply:
    v = _job(ctx.core, unquote(ctx.params["file"]))
    if v is None or v.status(ctx.core.now())[0] != "completed":
        raise ApiError(404, "File not found, or its video is not made yet.")
    return Reply(200, {"content-type": "video/mp4", "x-request-id": ctx.request_id}, mp4(v.seconds))


ROUTES: list[Route] = [
    route("POST", "/v1beta/models/{model}:predictLongRunning", "google", "veo", _create, generating=True),
    route("GET", "/v1beta/models/{model}/operations/{op}", "google", "veo.operations", _operation),
    route("GET", "/v1beta/files/{file}:download", "google", "veo.download", _download),
]
