"""One video of the endpoint's Videos API (``_endpoint_videos``): its request, its result once in, what a retrieve
answers of it and what the state directory keeps; and how far an open one is (``VideoProgress``).

``progress`` is what the provider's own polls of the video read last (OpenAI's video object carries 0-100), kept
by the engine's dispatcher of its provider (``Engine.video_progress``: nothing more is asked of the provider). The
endpoint asks the engine for it when a retrieve or a listing shows an open video, for every open video of that
provider at once, at most every ``PROGRESS_EVERY_S`` per provider (calls under way are shared), and keeps the most it
was told: it never goes back (a new try after a failed video starts again at 0 at the provider), and says 100
only once the video has completed or failed. A video still queued in the engine, or whose provider says nothing of
how far it is (Google's Veo operation has no such figure; a simulated provider), stays at 0: no estimate is made.
Before, an open video answered 0 until it ended. The figure lives in the replica's memory only: a restarted
endpoint starts again from what the provider's next poll reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.app._endpoint_retries import retry_key_of
from engine.app._endpoint_wire import ApiError, AsyncEngine, Validator
from engine.core._logkeys import get_logger
from engine.core.request import Request
from engine.core.result import ANSWERED, ID_TAKEN, Result, why_not

__all__ = ["PROGRESS_EVERY_S", "VideoJob", "VideoProgress", "param_of"]

PROGRESS_EVERY_S = 1.0  # real seconds: how often at most one provider's open videos are asked about
log = get_logger("smartbatch.endpoint")

# The error code of a video that failed, by its result's status (ASSUMPTION: OpenAI's reference names no codes).
_FAILED_CODE = {"failed": "video_generation_failed", "rejected": "request_rejected", "expired": "deadline_expired"}
# The request field a refusal names -> the create's field.
_PARAM = {"body.seconds": "seconds", "params.duration_s": "seconds", "body.size": "size", "params.resolution": "size",
          "params.size": "size", "body.prompt": "prompt", "provider": "model", "kind": "model"}


def param_of(field_: str) -> str | None:
    """The create's field a refusal of the engine's request names (``field_``: the request's)."""
    return _PARAM.get(field_, field_.removeprefix("body.").removeprefix("params."))


@dataclass(eq=False)
class VideoJob:
    """One video: the request the engine was given, and its result once in. Changed only on the event loop."""

    id: str
    req: Request  # as validated, its ``id`` the engine's request id
    created_at: int
    result: Result | None = None
    completed_at: int | None = None
    created_ns: int = field(default_factory=time.time_ns)  # the order videos are listed in, across restarts
    task: asyncio.Task | None = None
    admitted: asyncio.Future | None = None  # resolved once the engine has it (True) or refused it (False)
    progress: int = 0  # the most the provider's polls said while it is made, 0-99 (``VideoProgress``)
    retry_key: str | None = None  # what an SDK's retry of its create repeats (``SdkRetries.key``), kept on disk

    @property
    def asked(self) -> tuple[str, str, str, str]:
        b = self.req.body
        return self.req.model, self.req.prompt or "", str(b["seconds"]), str(b["size"])

    def view(self, queued: bool = False) -> dict[str, Any]:
        model, prompt, seconds, size = self.asked
        res, status, error, expires = self.result, "queued" if queued else "in_progress", None, None
        progress = 0 if queued else min(self.progress, 99)
        if res is not None and res.status in ANSWERED:
            raw = res.raw or {}
            status, progress, expires = "completed", 100, raw.get("expires_at")
            seconds, size = str(raw.get("seconds", seconds)), str(raw.get("size", size))  # as it was made
        elif res is not None:
            status, progress = "failed", 100
            code = ID_TAKEN if res.reason == ID_TAKEN else _FAILED_CODE.get(res.status, "video_generation_failed")
            error = {"code": code, "message": why_not(res)}
        return {"id": self.id, "object": "video", "model": model, "status": status, "progress": progress,
                "prompt": prompt, "seconds": seconds, "size": size, "created_at": self.created_at,
                "completed_at": self.completed_at, "expires_at": expires, "error": error,
                "remixed_from_video_id": None}

    def record(self) -> dict[str, Any]:
        """What the state directory keeps of it (``EndpointState.save_video``); ``from_record`` reads it."""
        return {"id": self.id, "request": self.req.model_dump(mode="json", exclude={"arrival_s"}),
                "created_at": self.created_at, "created_ns": self.created_ns, "completed_at": self.completed_at,
                "result": self.result.model_dump(mode="json") if self.result is not None else None,
                "retry_h": self.retry_key}

    @classmethod
    def from_record(cls, rec: dict[str, Any], validator: Validator,
                    keyed: Callable[[str], str] = str) -> tuple[VideoJob, str | None]:
        """The job ``rec`` keeps, and why its request is no longer one this engine takes (its catalog or its
        providers changed since; None: it is). Such a job is kept all the same, as it was: it may have been made
        and billed, and read as unreadable it was set aside, a 404 from then on."""
        refused = None
        try:
            req = validator.request(rec["request"], param_of)
        except ApiError as exc:
            d = rec["request"]  # as validated when it was kept (JSON has no tuple)
            req, refused = Request.model_construct(**{**d, "prefix_blocks": tuple(d["prefix_blocks"])}), exc.message
        res = Result.model_validate(rec["result"]) if rec["result"] is not None else None
        job = cls(rec["id"], req, rec["created_at"], res, rec["completed_at"], rec["created_ns"],
                  retry_key=retry_key_of(rec, keyed))
        job.view(), job.record(), req.id, req.tenant  # one that cannot be answered is unreadable after all
        return job, refused

    def __repr__(self) -> str:
        return f"VideoJob({self.id}, {self.view()['status']}, request={self.req.id!r}, tenant={self.req.tenant!r})"


class VideoProgress:
    """The progress of a replica's open videos, asked of the engine in one call per provider (see the module
    docstring); ``now``: the clock (real seconds) the asks are spaced on."""

    def __init__(self, engine: AsyncEngine, now: Callable[[], float] = time.monotonic):
        self.engine, self._now = engine, now
        self._asked_at: dict[str, float] = {}  # provider -> when its open videos were last asked about
        self._asking: dict[str, asyncio.Task] = {}  # provider -> its ask under way, shared by who needs it
        self.asks = 0  # calls made to the engine (for tests and the replica's repr)

    def __repr__(self) -> str:
        return f"VideoProgress(asks={self.asks}, under way={len(self._asking)})"

    async def refresh(self, shown: Iterable[VideoJob], every: Iterable[VideoJob]) -> None:
        """Bring the figures of ``every`` open video up to date for each provider of an open video of ``shown``
        whose last ask is ``PROGRESS_EVERY_S`` old; wait for those asks (never failing: a figure is a hint)."""
        wanted = {j.req.provider for j in shown if _open(j)}
        if not wanted:
            return
        now, waits = self._now(), []
        for provider in wanted:
            task = self._asking.get(provider)
            if task is None and now - self._asked_at.get(provider, float("-inf")) >= PROGRESS_EVERY_S:
                jobs = [j for j in every if _open(j) and j.req.provider == provider]
                self._asked_at[provider], self.asks = now, self.asks + 1
                task = self._asking[provider] = asyncio.ensure_future(self._ask(provider, jobs))
                task.add_done_callback(lambda _, p=provider: self._asking.pop(p, None))
            if task is not None:
                waits.append(task)
        if waits:
            await asyncio.wait(waits)  # (a client that leaves cancels only its own wait, never the shared ask)

    async def close(self) -> None:
        """Stop the asks under way (the endpoint stops)."""
        tasks = list(self._asking.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask(self, provider: str, jobs: list[VideoJob]) -> None:
        try:
            got = await self.engine.video_progress(provider, [j.req.uid for j in jobs])
        except Exception as exc:  # noqa: BLE001 (busy, restarting, stopped: the figures stay as they were)
            log.debug("endpoint: the progress of %d %s video(s) was not read (%s)", len(jobs), provider, exc)
            return
        for j in jobs:
            if isinstance(seen := got.get(j.req.uid), int):
                j.progress = max(j.progress, min(seen, 99))  # never back, never 100 before it has ended


def _open(job: VideoJob) -> bool:
    return job.result is None and job.admitted is not None and job.admitted.done() and job.admitted.result()
