"""Anthropic's Message Batches on the HTTP front (``/v1/messages/batches``: create, list, retrieve, cancel, results,
delete), a mixin of ``FilesAndBatches``: an application written against Anthropic's SDK
(``client.messages.batches``) changes only its ``base_url``, and the engine decides each request as it does an
OpenAI batch's lines.

A Message Batch is a job of the OpenAI Batches route (``_endpoint_job``), not a second machine: its requests are
written as the lines of a batch file of url ``/v1/messages`` (their bodies Anthropic's own), with a 24-hour window
(``window_default_s``; ``X-Smartbatch-Deadline`` sets another, in seconds) as every line's deadline. It shares that
route's progress, cancel (requests not sent yet end ``canceled``, billed nothing; those answered are kept), open-line
limit, and state directory (a restart takes it back). The file is the job's alone: kept with the job on disk, never
listed. Its output and error files are read back as Anthropic's results (``_endpoint_msgbatch_shape``), and every
error here is in Anthropic's shape."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import Response

from engine.app._endpoint_job import OPEN, BatchJob, for_endpoint
from engine.app._endpoint_messages import AnthropicError, in_anthropic_shape
from engine.app._endpoint_msgbatch_shape import (
    batch_lines,
    checked_requests,
    ended_counts,
    live_counts,
    refused_line,
    results_of,
    view,
)
from engine.app._endpoint_wire import ApiError, json_body, smartbatch_fields, tenant_of, window_text
from engine.core.answer_body import MESSAGES_URL
from engine.core.batchfile import parse_batch_file
from engine.core.settings import MAX_DEADLINE_S

__all__ = ["MessageBatchRoutes"]

BATCHES_URL = MESSAGES_URL + "/batches"
MAX_BATCH_BYTES = 256 * 1024 * 1024  # Anthropic's limit of one Message Batch (with its 100,000 requests)
_ENDED = ("completed", "cancelled", "expired", "failed")


def _in_anthropic_shape(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def answer(*args: Any, **kw: Any) -> Any:
        try:
            return await route(*args, **kw)
        except AnthropicError:
            raise
        except ApiError as exc:
            raise in_anthropic_shape(exc) from None

    answer.__signature__ = inspect.signature(route)  # FastAPI reads the route's parameters from it
    answer.__name__ = route.__name__
    return answer


async def _bounded_body(http: HttpRequest) -> bytes:
    """The create's body, read no further than ``MAX_BATCH_BYTES``: before, any size was read whole into memory
    and taken (a helper's hunt), where Anthropic answers 413."""
    def too_large(size: str) -> AnthropicError:
        return AnthropicError(413, f"requests: the batch is {size}, past the {MAX_BATCH_BYTES:,} bytes of one "
                                   "Message Batch; split its requests into several batches", param="requests")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BATCH_BYTES:  # refused before a byte of it is read
        raise too_large(f"{int(declared):,} bytes")
    parts, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > MAX_BATCH_BYTES:
            raise too_large(f"more than {MAX_BATCH_BYTES:,} bytes")
        parts.append(chunk)
    return b"".join(parts)


class MessageBatchRoutes:
    """Needs what ``FilesAndBatches`` has: ``batches``, ``files``, ``state``, ``engine``, ``catalog``,
    ``window_default_s``, ``message_counts``, ``_now``, ``_enter``, ``_save``, ``_add_file``, ``_over_limit``,
    ``_open``, ``_cancel_job`` and ``_create_once``."""

    def add_message_batch_routes(self, r: APIRouter) -> None:
        for path, route, method in (
                (BATCHES_URL, self.create_message_batch, "POST"), (BATCHES_URL, self.list_message_batches, "GET"),
                (BATCHES_URL + "/{message_batch_id}", self.get_message_batch, "GET"),
                (BATCHES_URL + "/{message_batch_id}", self.delete_message_batch, "DELETE"),
                (BATCHES_URL + "/{message_batch_id}/cancel", self.cancel_message_batch, "POST"),
                (BATCHES_URL + "/{message_batch_id}/results", self.message_batch_results, "GET")):
            r.add_api_route(path, _in_anthropic_shape(route), methods=[method])

    def _message_batch(self, batch_id: str, http: HttpRequest) -> BatchJob:
        """The Message Batch ``batch_id`` of the caller's tenant; another tenant's is answered as one that does not
        exist (before, any caller read, cancelled and deleted every tenant's)."""
        job = self.batches.get(batch_id)
        if job is None or job.endpoint != MESSAGES_URL or job.tenant != tenant_of(http.headers):
            raise AnthropicError(404, f"message_batch_id: no Message Batch {batch_id!r}; GET {BATCHES_URL} lists "
                                      "them", param="message_batch_id")
        return job

    def _results(self, job: BatchJob) -> list[dict]:
        rows = []
        for fid in (job.output_file_id, job.error_file_id):
            f = self.files.get(fid) if fid is not None else None
            rows += [json.loads(line) for line in f.data.splitlines() if line.strip()] if f is not None else []
        return results_of(rows, job.errors)

    def _message_view(self, job: BatchJob, http: HttpRequest) -> dict[str, Any]:
        if job.status not in _ENDED:
            counts = live_counts(job)
        elif (counts := self.message_counts.get(job.id)) is None:
            counts = self.message_counts[job.id] = ended_counts(self._results(job))
        return view(job, counts, str(http.base_url))

    async def create_message_batch(self, http: HttpRequest) -> dict:
        raw = await _bounded_body(http)
        body = await json_body(http, raw)
        fields = smartbatch_fields(http.headers)  # the tenant, and the deadline of every request
        # What an SDK's retry repeats: the body as sent (up to 256 MB: its digest), and the deadline.
        content = {**fields, "body": hashlib.sha256(raw).hexdigest()}
        return await self._create_once(http, BATCHES_URL, content, "msgbatch_",
                                       lambda bid, key: self._create_message_batch(http, body, fields, bid, key),
                                       lambda job: self._message_view(job, http))

    async def _create_message_batch(self, http: HttpRequest, body: dict, fields: dict, bid: str,
                                    retry_key: str | None) -> dict:
        tenant, window_s = fields.get("tenant", "default"), fields.get("deadline_s", self.window_default_s)
        if window_s > MAX_DEADLINE_S:
            raise AnthropicError(400, f"X-Smartbatch-Deadline: {window_s:,.0f} s is past the longest deadline, "
                                      f"{MAX_DEADLINE_S:,.0f} s (366 days)", param="X-Smartbatch-Deadline")
        data, errors = batch_lines(checked_requests(body), self.catalog, self.engine.settings)
        fid = f"file-{bid}-input"
        job = BatchJob(bid, MESSAGES_URL, fid, window_text(window_s), window_s, None, tenant, int(self._now()),
                       speedup=self.speedup, retry_key=retry_key)
        job.errors = errors
        if not data:  # every request refused: nothing for the engine, the batch has ended
            self._enter(job, "completed")
            job.release()
            self.batches[bid] = job
            self._save(job)
            return self._message_view(job, http)
        bf = parse_batch_file(data, source=fid, window_s=window_s, tenant=tenant, catalog=self.catalog,
                              settings=self.engine.settings, live=True)
        job.bf = for_endpoint(bf, MESSAGES_URL)
        # The engine's own checks of a line (the catalog's model, a field's value ...), named under params.
        job.errors += [refused_line(ln.custom_id, *(ln.problem or ("params", "invalid")), sent=True)
                       for ln in job.bf.invalid]
        if (over := self._over_limit(job)) is not None:
            raise AnthropicError(429, over)
        try:
            self._add_file(f"{bid}_requests.jsonl", "batch", data, fid, tenant=tenant)
        except OSError as exc:
            self.files.pop(fid, None)
            raise self.state.no_room(exc, "the batch") from None
        await self._open(job, fid, drop_input=True)
        return self._message_view(job, http)

    async def list_message_batches(self, http: HttpRequest, limit: str | None = None, after_id: str | None = None,
                                   before_id: str | None = None) -> dict:
        """Newest first, as Anthropic lists them; a page of ``limit`` after ``after_id`` or before ``before_id``."""
        try:
            n = 20 if limit is None else int(limit)
        except ValueError:
            n = 0
        if not 1 <= n <= 1000:
            raise AnthropicError(400, f"limit: {limit!r} must be a whole number from 1 to 1000", param="limit")
        tenant = tenant_of(http.headers)
        jobs = [b for b in reversed(self.batches.values()) if b.endpoint == MESSAGES_URL and b.tenant == tenant]
        ids = [b.id for b in jobs]
        for name, given in (("after_id", after_id), ("before_id", before_id)):
            if given is not None and given not in ids:
                raise AnthropicError(400, f"{name}: {given!r} is not the id of a Message Batch of this list; pass "
                                          "the first_id or last_id of a page", param=name)
        if after_id is not None:
            start = ids.index(after_id) + 1
            page, more = jobs[start:start + n], start + n < len(jobs)
        elif before_id is not None:
            end = ids.index(before_id)
            page, more = jobs[max(0, end - n):end], end - n > 0
        else:
            page, more = jobs[:n], n < len(jobs)
        data = [self._message_view(b, http) for b in page]
        return {"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    async def get_message_batch(self, http: HttpRequest, message_batch_id: str) -> dict:
        return self._message_view(self._message_batch(message_batch_id, http), http)

    async def cancel_message_batch(self, http: HttpRequest, message_batch_id: str) -> dict:
        job = self._message_batch(message_batch_id, http)
        if job.status in _ENDED:
            raise AnthropicError(409, f"message_batch_id: Message Batch {job.id} has ended; there is nothing left "
                                      "to cancel (its results are at its results_url)", param="message_batch_id")
        if job.status in OPEN:
            await self._cancel_job(job)  # the OpenAI route's cancel: what is not sent yet ends at once
        return self._message_view(job, http)

    async def message_batch_results(self, http: HttpRequest, message_batch_id: str) -> Response:
        job = self._message_batch(message_batch_id, http)
        if job.status not in _ENDED:
            raise AnthropicError(400, f"message_batch_id: Message Batch {job.id} is still processing; its results "
                                      "are there once its processing_status is 'ended'", param="message_batch_id")
        lines = [json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in self._results(job)]
        return Response(b"".join(lines), media_type="application/binary")

    async def delete_message_batch(self, http: HttpRequest, message_batch_id: str) -> dict:
        job = self._message_batch(message_batch_id, http)
        if job.status not in _ENDED:
            raise AnthropicError(400, f"message_batch_id: Message Batch {job.id} is still processing; cancel it, "
                                      "and delete it once it has ended", param="message_batch_id")
        del self.batches[job.id]
        self.message_counts.pop(job.id, None)
        for fid in (job.output_file_id, job.error_file_id):
            if fid is not None and self.files.pop(fid, None) is not None and self.state is not None:
                self.state.drop_file(fid)
        if self.state is not None:
            self.state.forget_batch(job.id)
        return {"id": job.id, "type": "message_batch_deleted"}
