"""OpenAI's Videos API on the HTTP front (``/v1/videos``: create, retrieve, content, list, delete), run through the
engine: an application of the ``openai`` SDK's ``client.videos`` works against the endpoint unchanged.

A create (the SDK's multipart form: ``prompt``, ``model``, ``seconds``, ``size``) is checked as the engine will
check it (a bad field is a 400 naming it, nothing admitted), admitted as one request of the engine (a driver's
submit, as a batch's lines are) and answered at once with the video ``queued``; a task waits for its result.
Retrieve answers from that result: ``in_progress`` until there is one, its ``progress`` what the provider's own
polls last read (``_endpoint_video_job``), then ``completed`` (with the ``X-Smartbatch-*`` headers of the other
routes: its cost, mode, saving) or ``failed`` with its ``error``. It never submits again. Content asks the engine's dispatcher of the video's provider to fetch the bytes at the result's
``output`` with the provider's key (``Engine.video_content``): the key stays in the engine, never in a response.

Paying once: ``X-Smartbatch-Request-Id`` (or ``Idempotency-Key``) names the create; the same name again (from the
same tenant) answers the same video, and the video's id is made from it, so a create retried after a restart
finds it too. Without one, each create is a new video, but an SDK's retry of it (``x-stainless-retry-count`` above
0, the same tenant and fields), which takes the video of the try it repeats while that try is under way or was
answered within ``ANSWERED_KEEP_S`` (``_endpoint_retries``; with a state directory, across a restart too: the
job keeps its ``retry_key``, keyed by the state directory's secret). The engine itself answers a request id it
holds without generating it again.

Jobs live where the batches do (``_endpoint_batches``): in the replica's memory and, with a state directory, on
disk (``EndpointState``, ``videos/<id>.json``): a restarted replica takes them back, an open one asked of the engine
again under the same request id (never made twice while the engine holds it, or its journal does).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from engine.app._driver_stop import ended_by_stop
from engine.app._endpoint_job import cut_by_cancel
from engine.app._endpoint_retries import ANSWERED_KEEP_S, RETRY_COUNT, SdkRetries, try_outcome
from engine.app._endpoint_state import EndpointState
from engine.app._endpoint_video_job import VideoJob, VideoProgress, param_of
from engine.app._endpoint_wire import (
    HEADER_REQUEST_ID,
    ApiError,
    AsyncEngine,
    Validator,
    cursor_page,
    engine_call,
    json_body,
    new_id,
    smartbatch_fields,
    tenant_of,
)
from engine.core._logkeys import get_logger, words
from engine.core.catalog import Catalog, ModelSpec
from engine.core.errors import CatalogError, EngineStopped, ProviderError
from engine.core.request import Request
from engine.core.result import ANSWERED, ID_TAKEN, Result
from engine.core.video_sizes import OPENAI_VIDEO_SIZES

__all__ = ["VIDEOS_URL", "VideoJob", "VideoRoutes"]

VIDEOS_URL = "/v1/videos"
_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")
DEFAULTS = {"model": "sora-2", "seconds": "4", "size": "720x1280"}  # OpenAI's, when the create leaves them out
VARIANTS = ("video", "thumbnail", "spritesheet")
log = get_logger("smartbatch.endpoint")
IDEMPOTENCY_KEY = "Idempotency-Key"
DELETED_KEPT = 1000  # deleted videos whose place in the list an ``after`` may still name (a page's worth, and more)
class VideoRoutes:
    """The videos of one replica (see the module docstring) and their routes. ``headers_of(req, res)``: the
    ``X-Smartbatch-*`` headers of an answer, as the other routes give them; ``state``: the batches' state
    directory, or None (memory only)."""

    def __init__(self, engine: AsyncEngine, catalog: Catalog, *, headers_of: Callable[[Request, Result], dict],
                 state: EndpointState | None = None, speedup: float = 1.0, now: Callable[[], float] = time.time,
                 retries: SdkRetries | None = None):
        self.engine, self.catalog, self.state, self.speedup, self._now = engine, catalog, state, speedup, now
        self.retries = retries if retries is not None else SdkRetries()  # an SDK's retry of a create is its try's
        self.headers_of, self.validator = headers_of, Validator(catalog, engine.settings)
        self.jobs: dict[str, VideoJob] = {}
        self.progress = VideoProgress(engine)  # how far the open ones are, asked of the engine in batches
        # A deleted video's tenant and created_ns, the newest DELETED_KEPT (``list_videos``)
        self._deleted: dict[str, tuple[str, int]] = {}
        self._detached: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"VideoRoutes({len(self.jobs)} videos, {sum(j.result is None for j in self.jobs.values())} open)"

    def router(self) -> APIRouter:
        r = APIRouter()
        for path, route, method in ((VIDEOS_URL, self.create, "POST"), (VIDEOS_URL, self.list_videos, "GET"),
                                    (VIDEOS_URL + "/{video_id}", self.retrieve, "GET"),
                                    (VIDEOS_URL + "/{video_id}", self.delete, "DELETE"),
                                    (VIDEOS_URL + "/{video_id}/content", self.content, "GET")):
            r.add_api_route(path, route, methods=[method])
        return r

    # -- create ---------------------------------------------------------------------------------------------
    async def create(self, http: HttpRequest) -> JSONResponse:
        body = await _fields(http)
        req = self._checked(http, body)
        key = http.headers.get(HEADER_REQUEST_ID) or http.headers.get(IDEMPOTENCY_KEY)
        if key is not None:
            return await self._create(req, key, "video_" + hashlib.sha256(
                f"{len(req.tenant)}:{req.tenant}/{key}".encode()).hexdigest()[:24])
        # An SDK's retry (its try's answer lost: a timeout, a cut connection, a 5xx) takes the video of the try it
        # repeats, as a batch create's does (``SdkRetries``): each try was a video, made and billed (a hunt).
        once = self.retries.keyed(SdkRetries.key(req.tenant, VIDEOS_URL, {**smartbatch_fields(http.headers),
                                                                          "body": body}))
        vid = self.retries.request_id(once, http.headers, lambda: new_id("video_"))
        sdk = http.headers.get(RETRY_COUNT, "").isdigit()  # a try the table keeps: its key goes on record
        with try_outcome(self.retries, once, vid, ApiError):
            return await self._create(req, None, vid, once if sdk else None)

    async def _create(self, req: Request, key: str | None, vid: str, retry_key: str | None = None) -> JSONResponse:
        """The video ``vid`` of create ``req`` (``key``: the caller's name of it; ``retry_key``: what an SDK's retry
        of it repeats, kept for one after a restart): made, or, made already (the same create again), as it is."""
        while (job := self.jobs.get(vid)) is not None:  # the same create again: the same video, never a second
            if job.asked != VideoJob(vid, req, 0).asked or job.req.tenant != req.tenant:
                raise ApiError(400, f"{HEADER_REQUEST_ID} {key!r} named another video (its model, prompt, seconds "
                                    "or size differ); give each video an id of its own", param=HEADER_REQUEST_ID,
                               code=ID_TAKEN)
            if job.admitted is None or await asyncio.shield(job.admitted):
                return JSONResponse(job.view(), headers=_id_headers(job))
        job = VideoJob(vid, req.model_copy(update={"id": key or vid}), int(self._now()), retry_key=retry_key)
        job.admitted = asyncio.get_running_loop().create_future()
        self.jobs[vid] = job  # before the engine has it: a create again meanwhile waits for this one
        # A task of its own: a client that leaves mid-create cancels only its wait, never a video admitted and
        # paid for with no job on record.
        task = asyncio.ensure_future(self._admit(job))
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error reaches the waiting client
        await asyncio.shield(task)
        return JSONResponse(job.view(queued=True), headers=_id_headers(job))

    def _checked(self, http: HttpRequest, body: dict[str, Any]) -> Request:
        """The create as the engine's request, or a 400 naming the field and the fix."""
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}; the Videos API takes {', '.join(_FIELDS)}",
                           param=unknown[0], code="unknown_parameter")
        if "input_reference" in body:
            raise ApiError(400, "input_reference is not supported by this endpoint; send a text prompt only",
                           param="input_reference")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt is required: a non-empty string describing the video", param="prompt")
        # OpenAI's default for a field left out (or null) only: "" or 0 is a value, refused below (as a default,
        # a video the client had not asked for was made and billed)
        model = DEFAULTS["model"] if body.get("model") is None else body["model"]
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string such as 'sora-2'", param="model")
        served = self._served()
        try:
            provider, spec = self.catalog.find_model(model)
        except CatalogError as exc:
            raise ApiError(400, f"field 'model': {exc}; this route makes {', '.join(served)}", param="model",
                           code="model_not_found") from None
        if spec.kind != "video":
            where = {"image": "/v1/images/generations"}.get(spec.kind, "/v1/chat/completions or /v1/responses")
            raise ApiError(400, f"model {model!r} makes {spec.kind}, not video; send it to {where}, or name a video "
                                f"model here: {', '.join(served)}", param="model")
        if model not in served:
            # The Sora models' shutdown said with them: named bare, they read as the fix to a user whose provider
            # refuses them (a stop 82 tour; the catalog's day, so no clock is read for a message). Read from the
            # specs served: looked up by name alone, a name two providers offer raised, the 400 a 500 (a review).
            days = sorted({f"{m} on {s.shutdown}" for m, s in self._served_specs() if s.shutdown})
            gone = (f" (shut down at OpenAI: {', '.join(days)}; a server that still offers the Videos API makes "
                    "them)") if days else ""
            raise ApiError(400, f"model {model!r} ({provider}) is not made through OpenAI's Videos API; name one "
                                f"of {', '.join(served)}{gone}, or send it from a driver script (Engine.connect(name)."
                                "submit, docs/providers.md \"Video\")", param="model")
        fields = smartbatch_fields(http.headers)
        # A video takes minutes, and the create answers at once: the priority's own deadline, never the client's
        # read timeout (the chat routes' cap).
        fields.setdefault("deadline_s", getattr(self.engine.settings.deadlines, fields.get("priority", "normal")))
        seconds, size = (DEFAULTS[k] if body.get(k) is None else str(body[k]) for k in ("seconds", "size"))
        d = {"id": "check", **fields, "model": model, "prompt": prompt, "body": {"seconds": seconds, "size": size}}
        return self.validator.request(d, param_of)  # seconds or a size the model refuses: a 400 naming it

    def _served(self) -> list[str]:
        """The catalog's video models made through OpenAI's Videos API (Veo has its own route, Gemini's)."""
        return [m for m, _ in self._served_specs()]

    def _served_specs(self) -> list[tuple[str, ModelSpec]]:
        return [(m, s) for p in self.catalog.providers.values() if p.compat is None for m, s in p.models.items()
                if s.kind == "video" and set(s.per_second or {}) & set(OPENAI_VIDEO_SIZES)]

    async def _admit(self, job: VideoJob, deadline_s: float | None = None) -> None:
        """Hand ``job``'s request to the engine (on disk first, with a state directory), and wait for its result
        in a task of its own; ``deadline_s``: what is left of its deadline, after a restart (its record is kept
        if the engine refuses it then, and ``resume`` ends it failed, saying why: never asked again)."""
        assert job.admitted is not None
        try:
            if self.state is not None and deadline_s is None:  # on disk before the engine has it: a crash then
                try:                                             # loses nothing it took
                    self.state.save_video(job.record(), strict=True)
                except OSError as exc:
                    raise self.state.no_room(exc, "the video") from None
            sub = {**job.req.model_dump(exclude={"arrival_s"}),
                   **({} if deadline_s is None else {"deadline_s": deadline_s})}
            # submit_many may wait for room in the engine: in a worker thread, never on the loop
            futs = await engine_call(asyncio.to_thread(self.engine.submit_many, [sub]), param_of)
        except BaseException:
            if deadline_s is None:
                self.jobs.pop(job.id, None)
                if self.state is not None:
                    self.state.drop_video(job.id)
            job.admitted.set_result(deadline_s is not None)  # (a taken-back one stays listed, to fail in ``resume``)
            raise
        job.admitted.set_result(True)
        job.task = asyncio.create_task(self._collect(job, futs), name=f"smartbatch-{job.id}")

    async def _collect(self, job: VideoJob, futs: list) -> None:
        try:
            async for res in self.engine.as_completed(futs):
                if self.state is not None and (cut_by_cancel(res) or ended_by_stop(res, self.engine.gone)):
                    # Ended by the engine's stop, not answered: asked again at the next start (kept open on disk)
                    log.warning("endpoint: video %s stays open for the next start: %s", job.id, res.error)
                    return
                job.result, job.completed_at = res.model_copy(update={"id": job.req.id}), int(self._now())
        except Exception as exc:  # the engine gave no result (it went away): the video failed, billed nothing here
            job.result = Result(id=job.req.id, tenant=job.req.tenant, status="failed",
                                error=f"the engine gave no result: {type(exc).__name__}: {words(exc)}")
            job.completed_at = int(self._now())
        if self.state is not None:
            self.state.save_video(job.record())

    # -- reads ----------------------------------------------------------------------------------------------
    def _job(self, video_id: str, http: HttpRequest) -> VideoJob:
        """The caller's tenant's video; another tenant's is answered as one that does not exist."""
        job = self.jobs.get(video_id)
        if job is None or job.admitted is not None and not job.admitted.done() or \
                job.req.tenant != tenant_of(http.headers):
            raise ApiError(404, f"Video with id '{video_id}' not found.", param="video_id", code="video_not_found")
        return job

    def _headers(self, job: VideoJob) -> dict[str, str]:
        res = job.result
        if res is not None and res.status in ANSWERED:
            try:
                return self.headers_of(job.req, res)
            except CatalogError:  # its model left the catalog since it was made: no list price to say a saving by
                pass
        return _id_headers(job)

    async def retrieve(self, http: HttpRequest, video_id: str) -> JSONResponse:
        job = self._job(video_id, http)
        await self.progress.refresh([job], self.jobs.values())
        return JSONResponse(job.view(), headers=self._headers(job))

    async def content(self, http: HttpRequest, video_id: str, variant: str = "video") -> Response:
        job = self._job(video_id, http)
        status = job.view()["status"]
        if status != "completed":  # OpenAI's answer while a video is made
            raise ApiError(404 if status != "failed" else 400, f"Video is not ready yet; its status is "
                           f"'{status}'. Poll GET /v1/videos/{video_id} until it is 'completed'.",
                           param="video_id", code="video_not_ready")
        if variant not in VARIANTS:
            raise ApiError(400, f"variant {variant!r} must be one of {', '.join(VARIANTS)}", param="variant")
        res = job.result
        assert res is not None and res.provider is not None and res.output is not None
        try:
            code, data, kind = await self.engine.video_content(res.provider, res.output, variant)
        except EngineStopped as exc:
            raise ApiError(503, str(exc), type="server_error", code="engine_stopped") from None
        except ProviderError as exc:
            raise ApiError(502, str(exc), type="server_error") from None
        if code != 200:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise ApiError(code, f"video {video_id}: {err.get('message') or 'the download failed'}",
                           param=err.get("param"), code=err.get("code"), type=err.get("type") or "api_error")
        return Response(data, media_type=kind, headers=self._headers(job))

    async def list_videos(self, http: HttpRequest, after: str | None = None, limit: str | None = None,
                          order: str = "desc") -> dict:
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order {order!r} must be 'asc' or 'desc'", param="order")
        tenant = tenant_of(http.headers)
        jobs = sorted((j for j in self.jobs.values() if (j.admitted is None or j.admitted.done())
                       and j.req.tenant == tenant),
                      key=lambda j: j.created_ns, reverse=order == "desc")
        # Only the caller's own: another tenant's deleted id answered a page where an unknown one is a 400, which
        # told that the other tenant had made and deleted it (a review)
        gone = self._deleted.get(after) if after is not None and after not in self.jobs else None
        if gone is not None and gone[0] == tenant:
            # Deleted since the page that ended with it (a loop that deletes what it lists, as the SDK pages
            # on): the next page starts where it was listed, where "not an id of this list" ended the loop.
            at = gone[1]
            jobs, after = [j for j in jobs if (j.created_ns < at if order == "desc" else j.created_ns > at)], None
        await self.progress.refresh(jobs, self.jobs.values())
        return cursor_page([j.view() for j in jobs], after=after, limit=limit, default_limit=20, max_limit=100)

    async def delete(self, http: HttpRequest, video_id: str) -> dict:
        job = self._job(video_id, http)
        if job.result is None:  # in the engine: it is made and billed whatever this job does
            raise ApiError(409, f"video {video_id} is still being made (in_progress): it is billed when it "
                                "completes; delete it once it has completed or failed", param="video_id")
        del self.jobs[video_id]  # the provider keeps the video itself until it expires (about an hour)
        self._deleted.pop(video_id, None)  # (one made again under its request id and deleted again: the newest)
        self._deleted[video_id] = (job.req.tenant, job.created_ns)
        if len(self._deleted) > DELETED_KEPT:
            del self._deleted[next(iter(self._deleted))]
        if self.state is not None:
            self.state.drop_video(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    # -- restart --------------------------------------------------------------------------------------------
    async def resume(self) -> None:
        """Take back the videos the state directory holds: an ended one as it was, an open one asked of the
        engine again under the same request id (an engine that holds it answers without making it again)."""
        if self.state is None:
            return
        for rec in self.state.videos():
            try:
                job, why = VideoJob.from_record(rec, self.validator, self.retries.keyed)
            except Exception as exc:  # one bad record never keeps the endpoint from starting
                self.state.set_aside_video(str(rec.get("id")), exc)
                continue
            self.jobs[job.id] = job
            if rec.get("retry_key") is not None:  # its plain hash, by the version before: written again keyed
                self.state.save_video(job.record())
            age = self._now() - job.created_at
            if job.retry_key is not None and 0 <= age < ANSWERED_KEEP_S:  # its create's retry may come after it
                self.retries.remember(job.retry_key, job.id, age)
            if job.result is None and why is None:
                left = (job.req.deadline_s or 0.0) - (self._now() - job.created_at) * self.speedup
                job.admitted = asyncio.get_running_loop().create_future()
                try:
                    await self._admit(job, max(left, 1.0))
                except Exception as exc:  # the engine refused it (stopped, full, the request no longer valid)
                    why = exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {words(exc)}"
            if job.result is None and why is not None:
                # It ends, saying why, as an open batch does: left open, it stayed in_progress for this
                # endpoint's life, and was refused again at every start (a review of stop 67).
                log.error("endpoint: video %s could not be asked of the engine again: %s", job.id, why)
                job.result = Result(id=job.req.id, tenant=job.req.tenant, status="failed",
                                    error=f"the endpoint restarted and the engine refused this video: {why} "
                                          "(one under way before the restart may have been billed)")
                job.completed_at = int(self._now())
                self.state.save_video(job.record())

    async def shutdown(self) -> None:
        """Stop waiting (the engine's requests run on); an open video stays open on disk, for the next start."""
        await asyncio.gather(*self._detached, return_exceptions=True)
        await self.progress.close()
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _fields(http: HttpRequest) -> dict[str, Any]:
    """The create's fields: a multipart form, as the ``openai`` SDK sends it, or a JSON object."""
    kind = http.headers.get("content-type", "")
    if kind.startswith("application/json"):
        return await json_body(http)
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(400, f"POST {VIDEOS_URL} takes multipart/form-data (or a JSON object) with 'prompt', and "
                            "optionally 'model', 'seconds' and 'size'")
    async with http.form(max_files=1, max_fields=len(_FIELDS) + 4) as form:
        return {k: ("<file>" if isinstance(v, UploadFile) else v) for k, v in form.items()}


def _id_headers(job: VideoJob) -> dict[str, str]:
    """The video's request id, also where the OpenAI SDK reads a call's id (``_request_id``), as a finished one's
    headers (``_smartbatch_headers``) and every other route's answers say it: it was None on a create (a review)."""
    return {HEADER_REQUEST_ID: job.req.id, "x-request-id": job.req.id}
