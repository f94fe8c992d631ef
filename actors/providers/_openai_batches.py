"""The Batch API of an OpenAI-compatible provider (``OpenAIProvider``, ``openai_http``): a JSONL file uploaded and a
batch created from it, named in its metadata so a restarted dispatcher finds a create it cut; polled with backoff,
cancelled at its hedge; its output and error files streamed a line at a time and mapped back by ``custom_id``; its
input file deleted once it is done with. A mixin, apart from the sync calls so that each module stays small: it
reads the provider's ``client`` and ``_sdk`` and maps an answered line by the provider's own ``_outcome``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from actors.providers._http import (
    BatchHandle,
    HttpBase,
    PollBackoff,
    jsonl_stream,
    whole_read,
)
from actors.providers._wire import error_message, error_of, paced
from engine.core._logkeys import get_logger
from engine.core.errors import ProviderError
from engine.core.provider_api import BatchState, CallJob, CallOutcome

__all__ = ["FIND_SCAN", "OpenAIBatches"]

log = get_logger("smartbatch.providers")

_ENDED = {"completed", "failed", "expired", "cancelled"}
_REF = "smartbatch_ref"  # the batch's metadata key naming it, so a restarted dispatcher finds a create it cut
FIND_SCAN = 1_000  # most recent batches looked through for it
# The limit token_limit_exceeded's message names: OpenAI's "Limit: 2,000,000 enqueued tokens", Azure's "the configured
# limit of 30K for the deployment".
_QUEUE_LIMIT = re.compile(r"Limit: ([\d,]+) enqueued tokens|configured limit of ([\d.,]+) ?([KM]?)\b", re.I)
_SCALE = {"": 1, "K": 1_000, "M": 1_000_000}


class OpenAIBatches(HttpBase):
    """The batch half of ``OpenAIProvider``: ``client`` and ``_sdk`` are the provider's, ``_orphans`` its deletes of
    uploads under way (awaited by its ``close``), ``_outcome`` how it reads one answer."""

    client: Any
    _sdk: Any
    _orphans: set[asyncio.Task]

    def _outcome(self, job: CallJob, route: str, raw: dict, rid: str | None, mode: str) -> CallOutcome:
        raise NotImplementedError  # the provider's (``OpenAIProvider._outcome``)

    def batch_body(self, jobs: Sequence[CallJob]) -> None:
        return None  # a batch is found again by its metadata (find_batch): a new create may send a new file

    async def find_batch(self, jobs: Sequence[CallJob], ref: str, known: frozenset[str] = frozenset()
                         ) -> BatchHandle | None:
        """The batch whose metadata names ``ref``, among the most recent ones (newest first; a restart follows
        its cut create within seconds, so it is near the top)."""
        with self._refused("batch lookup"):
            seen = 0
            async for b in self.client.batches.list(limit=100):
                if (b.metadata or {}).get(_REF) == ref:
                    handle = self._handle(b.id, jobs)
                    handle.batch = b
                    return handle
                seen += 1
                if seen >= FIND_SCAN:
                    break
        return None

    def _handle(self, bid: str, jobs: Sequence[CallJob]) -> BatchHandle:
        return BatchHandle(bid, jobs, PollBackoff(self.endpoint.poll_min_s, self.endpoint.poll_max_s))

    async def submit_batch(self, jobs: Sequence[CallJob], hedge_at: float | None, ref: str,
                           body: Any = None, wanted: Callable[[], bool] | None = None) -> Any:
        route = self.route(jobs[0])
        lines = [json.dumps({"custom_id": j.key, "method": "POST", "url": route, "body": self.body(j)},
                            ensure_ascii=False) for j in jobs]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        with self._refused("batch submission"):
            f = await self.client.files.create(file=("smartbatch.jsonl", data, "application/jsonl"),
                                               purpose="batch")
            if wanted is not None and not wanted():  # withdrawn during the upload (minutes, for 200 MB): not
                self._drop_upload(f.id)               # created from it (sent and billed, before)
                return None
            try:
                b = await self.client.batches.create(input_file_id=f.id, endpoint=route, completion_window="24h",
                                                     metadata={"origin": "smartbatch", _REF: ref})
            except self._sdk.APIStatusError as exc:
                # Refused (a 4xx: a rate limit, a bad request, no credit): no batch reads the upload, and the
                # create made again uploads anew, so each refusal left one file of prompts behind (a helper's
                # hunt). A 5xx or a cut answer may have made the batch, which the lookup follows: kept.
                if 400 <= exc.status_code < 500:
                    self._drop_upload(f.id)
                raise
        return self._handle(b.id, jobs)

    def _drop_upload(self, file_id: str) -> None:
        """Delete an upload no batch reads, beside the members (they go on at once)."""
        task = asyncio.get_running_loop().create_task(self._delete_upload(file_id))
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def _delete_upload(self, file_id: str) -> None:
        """Best effort, beside the members (they go back at once): a failure is logged; OpenAI expires the file
        30 days after its upload."""
        try:
            await self.client.files.delete(file_id)
        except Exception as exc:
            log.warning("%s: the upload %s of a refused batch could not be deleted (%s)", self.name, file_id,
                        self._redact(f"{type(exc).__name__}: {exc}")[:200])

    async def poll(self, handle: BatchHandle) -> BatchState:
        with self._refused("batch poll"):
            handle.batch = b = await self._bounded(self.client.batches.retrieve(handle.id), "batch poll")
        if b.status in _ENDED:
            return BatchState("ended", 0.0)
        status = b.status if b.status in ("cancelling", "finalizing") else "running"
        return BatchState(status, handle.backoff.next())

    async def cancel(self, handle: BatchHandle) -> BatchState | None:
        with self._refused("batch cancel"):
            handle.batch = b = await self._bounded(self.client.batches.cancel(handle.id), "batch cancel")
        return BatchState("ended", 0.0) if b.status in _ENDED else None

    async def _lines(self, file_id: str | None) -> tuple[list[dict], list[str | None]]:
        """A results file, streamed a line at a time (``jsonl_stream``: an image batch's holds a base64 image a
        line)."""
        if not file_id:
            return [], []
        with self._refused("reading a batch's results"):
            async with self.client.files.with_streaming_response.content(file_id) as resp:
                return await jsonl_stream(paced(resp.iter_bytes(), resp.headers, self.settings, self.endpoint))

    async def _results(self, b: Any, handle: BatchHandle | None = None) -> tuple[list[dict], list[str | None],
                                                                                 list[dict]]:
        """An ended batch's output lines (read, unread) and error lines. The output must hold a line per completed
        request, else the read was cut short and ``whole_read`` raises (read again: a finished member whose line was
        not read went again as never run, paid twice). Never more than the requests the error file leaves: an
        OpenAI-compatible server that counts a refused member as completed (AIBrix's batch API) was refused at every
        read, and every member went again (a review)."""
        lines, unread = await self._lines(b.output_file_id)
        errors, unread_errors = await self._lines(b.error_file_id)
        counts = b.request_counts
        expected = getattr(counts, "completed", 0) or 0
        if total := getattr(counts, "total", 0) or 0:
            expected = min(expected, total - len(errors) - len(unread_errors))
        # No output file and none completed: a batch cancelled or expired before any line was written. With some
        # completed, the view of the batch is older than its file (``fetch`` reads it again): read again.
        whole_read(lines, unread, expected, f"{self.name}: " + (f"file {b.output_file_id}" if b.output_file_id else
                                                                 f"batch {b.id} (no output file named yet)"), handle)
        return lines, unread, errors

    async def fetch(self, handle: BatchHandle) -> Mapping[str, CallOutcome]:
        out: dict[str, CallOutcome] = {}
        if handle.batch is None or handle.batch.status not in _ENDED:  # known ended by a refused cancel, not by
            await self.poll(handle)  # a poll: read it now (read as it was, or unread, every member went again)
            if handle.batch.status not in _ENDED:
                raise ProviderError(f"{self.name}: batch {handle.id} is {handle.batch.status}, not ended")
        if not handle.batch.output_file_id and getattr(handle.batch.request_counts, "completed", 0):
            # Ended with members completed, but no output file named: an older view of the batch (a replica behind
            # its end), whose members were taken for never run, sent again and paid twice (a helper's hunt). A
            # fresh read names it; while none does, the read fails and is made again. A fresh view further behind
            # (in progress, or its counts not yet written: none completed) was read as a batch that finished nothing,
            # every billed member sent again (a review): the view before it said members completed, and is kept
            # for the next try (which read the staler one alike).
            seen = handle.batch
            await self.poll(handle)
            if handle.batch.status not in _ENDED or not handle.batch.output_file_id:
                last, handle.batch = handle.batch.status, seen
                raise ProviderError(f"{self.name}: batch {handle.id} ended with members completed, and no view of "
                                    f"it names its output file yet (the last: {last}); read again")
        b = handle.batch
        route = b.endpoint
        if b.status == "failed":  # refused whole (e.g. token_limit_exceeded): every member goes back to the policy
            said = [f"{e.code}: {e.message}" for e in ((b.errors.data or []) if b.errors else [])][:3]
            log.warning("%s: batch %s failed: %s; its members did not run", self.name, handle.id,
                        self._redact("; ".join(said) or "no reason given"))
        lines, unread, errors = await self._results(b, handle)
        self._unread_members(handle, unread, out)  # an error file's are left out: its members were not billed
        keyless = sum(self._member(handle, cid) is None for cid in unread)
        for line in lines:
            job = self._member(handle, line.get("custom_id"))
            resp = line.get("response")
            code = _status(resp)
            if job is None:  # a refusal (a status but 200) billed nothing; an answer, or none told, may be billed
                keyless += code in (200, None)
                continue
            if code == 200:
                try:
                    self._put(out, job.key, self._outcome(job, route, resp.get("body") or {},
                                                          resp.get("request_id"), "batch_api"))
                except (AttributeError, KeyError, TypeError, ValueError):  # an answer of another shape: billed
                    self._unread_members(handle, [job.key], out)
            elif code is not None:
                self._put(out, job.key, self._member_error(code, resp.get("body"), line.get("error")))
            else:  # in the output file with no status: it ran, and neither its answer nor its refusal can be read
                self._unread_members(handle, [job.key], out)
        for line in errors:
            job = self._member(handle, line.get("custom_id"))
            err = line.get("error")
            # Cancelled or expired members never ran: not billed, and absent from the map so they go again.
            if job is None or error_of(err).get("code") in ("batch_cancelled", "batch_expired"):
                continue
            resp = line.get("response")
            out.setdefault(job.key, self._member_error(_status(resp) or 500, resp.get("body") if isinstance(
                resp, Mapping) else None, err))
        self._unnamed(handle, out, [*unread, *(x.get("custom_id") for x in (*lines, *errors))], keyless, "custom_id")
        return out

    def results_at(self, handle: BatchHandle) -> str:
        b = handle.batch  # None: no poll of it was answered
        return f"batch {handle.id} (output file {b and b.output_file_id}, error file {b and b.error_file_id})"

    async def discard(self, handle: BatchHandle) -> int:
        """Delete the batch's input file (its prompts; it counts against the project's file storage). Its output
        and error files stay: a resume or a take-back may read them again while the journal's archive names the
        batch (``journal.archive_s``), and OpenAI deletes a batch's files 30 days after their creation."""
        b = handle.batch
        fid = getattr(b, "input_file_id", None)
        if not fid:
            return 0
        with self._refused("deleting a batch's input file"):
            try:
                await self.client.files.delete(fid)
            except self._sdk.NotFoundError:  # deleted before: a restarted dispatcher reads its batches again
                return 0
        return 1

    def queue_refusal(self, handle: BatchHandle) -> int | None:
        """The batch queue limit a ``failed`` batch's ``token_limit_exceeded`` names ("Enqueued token limit
        reached for gpt-4o-mini in organization org-... Limit: 2,000,000 enqueued tokens. Please try again once
        some in_progress batches have been completed."; Azure: "... the configured limit of 30K for the
        deployment ..."): 0 when it names none. (Azure's went unread, and the limit was then taken for what was
        under way, for good: a review.)"""
        b = handle.batch
        if b is None or b.status != "failed" or not b.errors:
            return None
        for e in b.errors.data or []:
            if e.code == "token_limit_exceeded":
                m = _QUEUE_LIMIT.search(e.message or "")
                if m is None:
                    return 0
                figure, scale = (m.group(1), "") if m.group(1) else (m.group(2), m.group(3).upper())
                return int(float(figure.replace(",", "")) * _SCALE[scale])
        return None

    def _member_error(self, code: int, body: Any, err: Any) -> CallOutcome:
        """A member the provider refused (not billed). Its words are read from any shape: Google's layer answers
        a list, where OpenAI answers an object."""
        said = error_message(err) or error_message(body) or "failed"
        return CallOutcome(False, self.clock.now(), 0.0, error=f"{self.name} batch member HTTP {code}: "
                           f"{self._redact(said)}", retryable=code >= 500 or code == 429, real=True)


def _status(resp: Any) -> int | None:
    """A results line's HTTP status; None where the line gives none as a number."""
    code = resp.get("status_code") if isinstance(resp, Mapping) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None
