"""OpenAI's Files and Batches on the HTTP front (``/v1/files``, ``/v1/batches``), run through the engine.

A batch's valid lines are submitted to the engine at once, each with the completion window as its deadline
(the engine then picks per line: reuse, a provider's batch API, sync); a background task collects the results
as they finish and, when the last one is in, writes the output and error files with ``engine.core.batchfile``
(the lines ``smartbatch batch`` writes). Invalid lines are answered in the error file (``invalid_request``).

State is per replica: files and batches live in this process's dicts and, given a directory (``state_dir``,
``smartbatch serve --state-dir``), on disk (``engine.app._endpoint_state``). Without one, a restart forgets them
while their requests run on in the engine. With one, a restarted replica takes them back (``resume``): an ended
batch as it was, an open one by asking the engine again for the lines it had no result for, under the same
request ids, so an engine that still holds a line hands its result over without generating it again (replicas do
not share them: behind a load balancer, keep a client on one replica).

Cancel follows OpenAI: the lines not sent yet end at once, billed nothing, and a provider batch of its lines
alone is cancelled (``Engine.cancel_requests``); ``cancelling`` while the others finish, up to ``cancel_wait_s``
("up to 10 minutes"), then ``cancelled``: finished lines in the output, the others in the error file
(``batch_cancelled``; those still in a provider call or a shared provider batch then are billable).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest

from engine.app._endpoint_batch_end import BatchEnds
from engine.app._endpoint_batch_once import OnceCreated
from engine.app._endpoint_files import MAX_FILE_BYTES, FileRoutes
from engine.app._endpoint_job import OPEN, BatchJob, for_endpoint, submission, withdraw_open
from engine.app._endpoint_msgbatches import MessageBatchRoutes
from engine.app._endpoint_responses import OwnedResponses
from engine.app._endpoint_resume import TakeBack
from engine.app._endpoint_retries import SdkRetries
from engine.app._endpoint_state import EndpointState
from engine.app._endpoint_wire import (
    ApiError,
    AsyncEngine,
    StoredFile,
    checked_metadata,
    completion_window_s,
    cursor_page,
    engine_call,
    json_body,
    submit_whole,
    tenant_of,
    window_text,
)
from engine.core._logkeys import get_logger
from engine.core._request_fields import BATCH_LINE_URLS
from engine.core.answer_body import MESSAGES_URL
from engine.core.batchfile import parse_batch_file
from engine.core.catalog import Catalog
from engine.core.request import Request

__all__ = ["FilesAndBatches", "MAX_FILE_BYTES"]

CANCEL_WAIT_S = 600.0  # real seconds a cancelling batch waits for its running lines (OpenAI: up to 10 minutes)
# Unfinished batch lines the endpoint keeps in the engine at once. Past it a new batch fails, as OpenAI's does past
# its enqueued-token limit: lines riding a 24-hour window hold the engine's max_pending places (100,000) for hours,
# and chat calls, which share them, waited 60 s for room and got a 429 (a review).
MAX_OPEN_LINES = 50_000
log = get_logger("smartbatch.endpoint")
# A batch's endpoint: OpenAI's line urls (Anthropic's Messages lines come through ``/v1/messages/batches``).
_OPENAI_URLS = [u for u in BATCH_LINE_URLS if u != MESSAGES_URL]


class FilesAndBatches(BatchEnds, TakeBack, OnceCreated, FileRoutes, MessageBatchRoutes):
    """The in-memory files and batches of one replica (see the module docstring), and their routes (Anthropic's
    Message Batches too, jobs of the same kind: ``_endpoint_msgbatches``)."""

    def __init__(self, engine: AsyncEngine, catalog: Catalog, *, window_default_s: float,
                 now: Callable[[], float] = time.time, cancel_wait_s: float = CANCEL_WAIT_S,
                 max_open_lines: int = MAX_OPEN_LINES, state_dir: Path | None = None, speedup: float = 1.0,
                 retries: SdkRetries | None = None):
        self.engine, self.catalog, self._now, self.speedup = engine, catalog, now, speedup
        self.state = EndpointState(state_dir) if state_dir is not None else None
        # Whose each response id is: its engine driver's record, kept under the state directory (a restart knows it)
        self.responses = OwnedResponses(getattr(engine, "responses", None), state_dir,
                                        getattr(engine, "know_owners", None))
        self.window_default_s, self.cancel_wait_s, self.max_open_lines = window_default_s, cancel_wait_s, max_open_lines
        self.files: dict[str, StoredFile] = self.state.files() if self.state is not None else {}
        self.batches: dict[str, BatchJob] = {}
        self.message_counts: dict[str, dict[str, int]] = {}  # an ended Message Batch's counts, read once
        # Creates and cancels under way, each a task of its own (``_detach``), and the lines the creates bring.
        self._detached: set[asyncio.Task] = set()
        self._admitting: Counter[str] = Counter()  # lines being admitted, per tenant
        self._init_once(retries)  # an SDK's retry of a create answers the batch of the try it repeats

    def __repr__(self) -> str:
        running = sum(b.status in OPEN or b.status == "cancelling" for b in self.batches.values())
        return f"FilesAndBatches({len(self.files)} files, {len(self.batches)} batches, {running} running)"

    def router(self) -> APIRouter:
        r = APIRouter()
        for path, route, method in (
                ("/v1/files", self.create_file, "POST"), ("/v1/files", self.list_files, "GET"),
                ("/v1/files/{file_id}", self.get_file, "GET"), ("/v1/files/{file_id}", self.delete_file, "DELETE"),
                ("/v1/files/{file_id}/content", self.file_content, "GET"),
                ("/v1/batches", self.create_batch, "POST"), ("/v1/batches", self.list_batches, "GET"),
                ("/v1/batches/{batch_id}", self.get_batch, "GET"),
                ("/v1/batches/{batch_id}/cancel", self.cancel_batch, "POST"),
                ("/v1/batches/{batch_id}/smartbatch_report", self.batch_report, "GET")):
            r.add_api_route(path, route, methods=[method])
        self.add_message_batch_routes(r)
        return r

    async def shutdown(self) -> None:
        """Stop collecting (the engine's requests run on); a batch still open stays as it is, with every answer its
        lines have by then, taken or not yet by its collector: a ``serve`` stop cancels the engine's work and waits
        for what its provider batches finished to reach this driver first. Left untaken, such an answer (billed)
        was asked again at the next start, and paid twice."""
        # A create under way ends first: its batch is then on record, and its collector among those stopped below.
        await asyncio.gather(*self._detached, return_exceptions=True)
        tasks = [b.task for b in self.batches.values() if b.task is not None and not b.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self.batches.values():
            if job.status in OPEN and job.bf is not None and job.final is None:
                self._take_done(job)
        if self.state is not None:
            self.state.close()

    # -- batches --------------------------------------------------------------------------------------------
    def _batch(self, batch_id: str, http: HttpRequest) -> BatchJob:
        """The batch ``batch_id`` of the caller's tenant; another tenant's is answered as one that does not exist."""
        job = self.batches.get(batch_id)
        if job is None or job.tenant != tenant_of(http.headers):
            raise ApiError(404, f"No such Batch object: {batch_id}", param="batch_id")
        return job

    async def create_batch(self, http: HttpRequest) -> dict:
        body = await json_body(http)
        return await self._create_once(http, "/v1/batches", body, "batch_",
                                       lambda bid, key: self._create_batch(body, tenant_of(http.headers), bid, key),
                                       BatchJob.view)

    async def _create_batch(self, body: dict, tenant: str, bid: str, retry_key: str | None) -> dict:
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise ApiError(400, "input_file_id is required: the id of a file uploaded with purpose 'batch'",
                           param="input_file_id")
        src = self._file(file_id, tenant, "input_file_id")  # the create's field (it named the files route's path)
        if src.purpose != "batch":
            raise ApiError(400, f"file {file_id} has purpose {src.purpose!r}; a batch reads a file uploaded "
                                "with purpose 'batch'", param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in _OPENAI_URLS:
            raise ApiError(400, f"endpoint {endpoint!r} is not supported; use one of {_OPENAI_URLS}",
                           param="endpoint")
        window = body.get("completion_window")
        window = window_text(self.window_default_s) if window is None else window
        window_s, metadata = completion_window_s(window), checked_metadata(body.get("metadata"))
        job = BatchJob(bid, endpoint, file_id, window, window_s, metadata, tenant, int(self._now()),
                       speedup=self.speedup, retry_key=retry_key)
        bf = parse_batch_file(src.data, source=file_id, window_s=window_s, tenant=tenant,
                              catalog=self.catalog, settings=self.engine.settings, live=True)
        job.bf = await self.responses.alines(for_endpoint(bf, endpoint), tenant)  # another tenant's response id: that line
        problems = bf.file_problems or ([] if bf.lines else [(file_id, 0, "file", "the file has no lines")])
        if not problems and (over := self._over_limit(job)) is not None:
            problems = [(file_id, 0, "limit", over)]
        if problems:  # lines that cannot be answered by custom_id: the batch fails validation, as OpenAI's
            code = {"custom_id": "invalid_custom_id", "limit": "request_limit_exceeded"}
            job.errors = [{"code": code.get(fld, "invalid_line"), "message": msg, "param": None if fld == "limit"
                           else fld, "line": no or None} for _, no, fld, msg in problems]
            self._enter(job, "failed")
            job.bf = None  # counted 0 / 0 / 0, as OpenAI counts a batch that failed validation
            job.release()  # ended too: its counts and errors stay, its lines go
            self.batches[job.id] = job
            self._save(job)
            return job.view()
        await self._open(job, file_id)
        return job.view()  # before the collector runs: status in_progress

    def _over_limit(self, job: BatchJob) -> str | None:
        """Why ``job``'s lines would hold too many places in the engine (``max_open_lines``), or None. The limit is
        the engine's, so shared by every tenant; the message quotes the caller's own lines only, as what other
        tenants hold is theirs to know."""
        assert job.bf is not None
        held = Counter(self._admitting)
        for b in self.batches.values():
            if b.final is None:
                held[b.tenant] += sum(cid not in b.results for cid in b.futures)
        adds = len(job.bf.requests)
        if sum(held.values()) + adds <= self.max_open_lines:
            return None
        mine = held[job.tenant]
        return (f"this batch adds {adds:,} lines to the {self.max_open_lines:,} unfinished batch lines the endpoint "
                f"keeps in the engine at once, shared by every tenant (kept so that chat calls find room), and too "
                f"few are free; your earlier batches hold {mine:,} of them. Create it again once earlier batches "
                "have ended")

    async def _open(self, job: BatchJob, file_id: str, drop_input: bool = False) -> None:
        """Put ``job`` (its lines parsed from file ``file_id``) on record and its lines in the engine;
        ``drop_input``: the file is the job's alone (a Message Batch's requests), gone once the job keeps it."""
        assert job.bf is not None
        # Counted from now until the batch is on record (``_admit``), whether or not its client waits: two creates
        # at once, or one whose client left, cannot both pass the limit.
        self._admitting[job.tenant] += len(job.bf.requests)
        await self._detach(self._admit(job, file_id, drop_input))

    async def _detach(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task of its own and wait for it. A client that leaves mid-call (Serve then cancels
        its handler) cancels only the wait: a create's lines were taken and billed with no batch on record, and
        a cancel left its batch cancelling for its whole window (a helper's hunt)."""
        task = asyncio.ensure_future(work)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        # Its error reaches the client that waits, and the log (``_admit``) whether one waits or not.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(task)

    async def _admit(self, job: BatchJob, file_id: str, drop_input: bool = False) -> None:
        assert job.bf is not None
        n = len(job.bf.requests)
        try:
            if self.state is not None:  # on disk before the engine has a line: a crash then loses nothing it took
                self.state.take_batch(job.id, file_id, job.record())
            try:
                await self._submit(job, job.bf.requests)
            except Exception as exc:
                log.warning("endpoint: batch %s was not created: %s: %s", job.id, type(exc).__name__, exc)
                if self.state is not None:
                    self.state.forget_batch(job.id)
                raise
            self.batches[job.id] = job
            self._save(job)
            job.task = asyncio.create_task(self._collect(job), name=f"smartbatch-{job.id}")
        finally:
            self._admitting[job.tenant] -= n
            if drop_input:  # (its batch keeps a link to its bytes on disk: ``EndpointState.keep_input``)
                self.files.pop(file_id, None)
                if self.state is not None:
                    self.state.drop_file(file_id)

    async def _submit(self, job: BatchJob, reqs: list[Request], deadline_s: float | None = None) -> None:
        """Hand ``reqs`` (lines of ``job``) to the engine, each under the request id ``<batch id>/<custom_id>``
        (a custom_id may repeat across batches); ``deadline_s``: what is left of the window, after a restart."""
        subs = [submission(req, f"{job.id}/{req.id}", deadline_s) for req in reqs]
        futs = []
        if subs:  # submit_many may wait for room in the engine: in a worker thread, never on the loop
            futs = await engine_call(submit_whole(self.engine, subs), lambda _: None)
        if len(futs) != len(subs):
            raise ApiError(500, f"the engine gave {len(futs)} futures for {len(subs)} requests",
                           type="server_error")
        for req, sub, fut in zip(reqs, subs, futs, strict=True):
            job.futures[req.id], job.custom_ids[sub["id"]] = fut, req.id
        self._enter(job, "in_progress")

    def _save(self, job: BatchJob) -> None:
        if self.state is not None:
            self.state.save_batch(job.record())

    def _enter(self, job: BatchJob, status: str) -> None:
        if status == "finalizing" and job.status == "cancelling":  # a cancelled batch goes on cancelling
            return
        job.status = status
        job.at.setdefault(status, int(self._now()))

    async def list_batches(self, http: HttpRequest, limit: str | None = None, after: str | None = None) -> dict:
        tenant = tenant_of(http.headers)
        items = [b.view() for b in reversed(self.batches.values())  # newest first, as OpenAI lists them
                 if b.endpoint != MESSAGES_URL and b.tenant == tenant]  # Anthropic's, listed on its own route
        return cursor_page(items, after=after, limit=limit, default_limit=20, max_limit=100)

    async def get_batch(self, http: HttpRequest, batch_id: str) -> dict:
        return self._batch(batch_id, http).view()

    async def cancel_batch(self, http: HttpRequest, batch_id: str) -> dict:
        return await self._cancel_job(self._batch(batch_id, http))

    async def _cancel_job(self, job: BatchJob) -> dict:
        batch_id = job.id
        if job.status == "cancelling":  # a cancel again (its client left mid-call, and retries): under way
            return job.view()
        if job.status not in OPEN:
            raise ApiError(409, f"Cannot cancel batch {batch_id}: its status is {job.status!r}",
                           param="batch_id")
        self._enter(job, "cancelling")
        self._save(job)
        shown = job.view()  # OpenAI answers a cancel with the batch cancelling
        await self._detach(self._cancel(job))
        return shown

    async def _cancel(self, job: BatchJob) -> None:
        await withdraw_open(self.engine, job)
        task = job.task
        if job.status != "cancelling":  # its last lines ended with the withdrawal, and the collector ended it
            return
        if task is None or task.done():
            self._finish(job)
            return
        # A collector cancelled before it ran wrote no files: then this does.
        task.add_done_callback(lambda _: self._finish(job) if job.status == "cancelling" else None)
        # The collector ends the batch when its last line is in, or when the wait is over (cancelled).
        asyncio.get_running_loop().call_later(self.cancel_wait_s, task.cancel)

    async def batch_report(self, http: HttpRequest, batch_id: str) -> dict:
        """smartbatch's extension: every line's cost against its list price, the totals and the modes used."""
        job = self._batch(batch_id, http)
        if job.report is None:
            raise ApiError(409, f"batch {batch_id} is {job.status}; its report exists once it is completed "
                                "or cancelled", param="batch_id")
        return job.report
