"""OpenAI-compatible provider over HTTP (the official ``openai`` SDK): chat completions or the Responses API (as
the catalog's ``api`` says), image generation, and the Batch API (JSONL upload, create, poll with backoff,
output and error files mapped back by ``custom_id``). Works with any server that speaks the OpenAI API at a
``base_url``: vLLM, Ollama, Together, Groq, a LiteLLM proxy, and the project's emulator."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from actors.providers._http import (
    BatchHandle,
    HttpBase,
    PollBackoff,
    Unreadable,
    create_call,
    jsonl_stream,
    whole_read,
)
from actors.providers._openai_answers import (
    _finish_chat,
    _finish_responses,
    _text_chat,
    _text_responses,
    _usage_chat,
    _usage_responses,
)
from actors.providers._openai_video import VideoCalls
from actors.providers._veo import VeoCalls
from actors.providers._video_content import CONTENT_TIMEOUT_S, ContentAnswer, content_at, content_refusal
from actors.providers._wire import error_message, error_of, message_parts, paced
from engine.core.errors import ProviderError
from engine.core.provider_api import BatchState, CallJob, CallOutcome, Usage, idempotency_key
from engine.core.responses_input import as_messages

__all__ = ["OpenAIProvider"]

log = logging.getLogger("smartbatch.providers")

_ENDED = {"completed", "failed", "expired", "cancelled"}
_REF = "smartbatch_ref"  # the batch's metadata key naming it, so a restarted dispatcher finds a create it cut
FIND_SCAN = 1_000  # most recent batches looked through for it
# The limit token_limit_exceeded's message names: OpenAI's "Limit: 2,000,000 enqueued tokens", Azure's "the configured
# limit of 30K for the deployment".
_QUEUE_LIMIT = re.compile(r"Limit: ([\d,]+) enqueued tokens|configured limit of ([\d.,]+) ?([KM]?)\b", re.I)
_SCALE = {"": 1, "K": 1_000, "M": 1_000_000}


def _as_made(job: CallJob, raw: Mapping, spec) -> CallJob:
    """The image as the answer says it was made: a request sent without a quality (or with "auto") is billed at
    the quality the provider picked, which OpenAI's images answer reports. Priced at the catalog's default
    instead, a high-quality image picked by "auto" was counted at a quarter of its bill."""
    params = job.req.params
    made = raw.get("quality")
    if (params.get("quality") in (None, "auto") and isinstance(made, str)
            and made in (spec.per_image_quality or {})):
        return job._replace(req=job.req.model_copy(update={"params": {**params, "quality": made}}))
    return job


class OpenAIProvider(HttpBase):
    home_host, standard_tier = "api.openai.com", "default"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        import openai

        self._sdk = openai
        # max_retries=0: the engine's retry, Retry-After, backoff and circuit breaker are the only ones.
        self.client = openai.AsyncOpenAI(api_key=self._key.get() or "unset", base_url=self.endpoint.base_url,
                                         max_retries=0, timeout=self.endpoint.timeout_s)
        self._orphans: set[asyncio.Task] = set()  # deletes of uploads no batch was made from
        # A video: a job made, then polled; OpenAI's Videos API, or Google's Veo on the Gemini API's own routes
        self._videos = VeoCalls(self) if self.spec.compat == "gemini" else VideoCalls(self)
        self.takes_flex = self._flex_to()

    # -- bodies ---------------------------------------------------------------------------------------------
    def route(self, job: CallJob) -> str:
        spec = self.spec.models[job.req.model]
        if spec.kind == "image":
            return "/v1/images/generations"
        if spec.kind == "video":  # Veo's own route under the Gemini API's root (a dry run shows it)
            return (f"/v1beta/models/{job.req.model}:predictLongRunning" if isinstance(self._videos, VeoCalls)
                    else "/v1/videos")
        return "/v1/responses" if spec.api == "responses" else "/v1/chat/completions"

    def body(self, job: CallJob) -> dict[str, Any]:
        r = job.req
        route = self.route(job)
        if self.spec.models[r.model].kind == "video":
            return self._videos.body(job)
        body: dict[str, Any] = dict(r.body or {})
        if route == "/v1/chat/completions":
            body = as_messages(body, "openai", "chat")  # a Responses body, checked when the request was made
        body["model"] = r.model
        if route == "/v1/images/generations":
            body.setdefault("prompt", r.prompt)
            for k in ("size", "quality"):  # what the cost model prices it by: sent, or billed at the default
                if k in r.params:
                    body.setdefault(k, r.params[k])
            if self.spec.compat == "gemini":  # Google's example: one image, in base64 (the layer serves no url)
                body.update(n=1, response_format="b64_json")
            return body
        has_input = "messages" in body or "input" in body
        if not has_input:
            blocks, tail = message_parts(r, self.settings.prefix_block_tokens, self.settings.chars_per_token,
                                         self.settings.providers.replay)
            text = "".join(blocks) + tail
            if route == "/v1/responses":
                body["input"] = text
            else:
                body["messages"] = [{"role": "user", "content": text}]
            if blocks and self.spec.compat != "gemini":  # Gemini's layer takes no such field (it caches alone)
                # Requests that share a prefix share a cache key, so the provider routes them to one cache.
                body.setdefault("prompt_cache_key", f"sb-{r.prefix_blocks[0]}")
        if r.max_output_tokens is not None and not any(k in body for k in ("max_tokens", "max_completion_tokens",
                                                                           "max_output_tokens")):
            body["max_output_tokens" if route == "/v1/responses" else "max_completion_tokens"] = r.max_output_tokens
        return body

    # -- sync -----------------------------------------------------------------------------------------------
    def _outcome(self, job: CallJob, route: str, raw: dict, rid: str | None, mode: str) -> CallOutcome:
        now = self.clock.now()
        flex = self._served_flex(job, raw.get("service_tier"))
        mode = "flex" if flex else mode
        calls = finish = None
        if route == "/v1/images/generations":
            data = (raw.get("data") or [{}])[0]
            u = raw.get("usage") or {}  # the prompt's text tokens, billed beside the image (gpt-image-1)
            # Its output is priced per image: its image tokens would only weigh on the text models' token gate.
            usage = Usage(int((u.get("input_tokens_details") or {}).get("text_tokens") or u.get("input_tokens") or 0), 0)
            output = data.get("b64_json") or data.get("url")
            job = _as_made(job, raw, self.spec.models[job.req.model])
        elif route == "/v1/responses":
            usage, (output, calls) = _usage_responses(raw.get("usage")), _text_responses(raw)
            finish = _finish_responses(raw, calls)
        else:
            usage = _usage_chat(raw.get("usage"), self.spec.compat == "gemini")
            (output, calls), finish = _text_chat(raw), _finish_chat(raw)
        return CallOutcome(True, now, self._priced(job, usage, mode), output=output, usage=usage,
                           provider_request_id=rid or raw.get("id"), raw=raw, real=True, tool_calls=calls, finish=finish,
                           warm_blocks=self._warm_of(job, usage) if route != "/v1/images/generations" else 0, flex=flex)

    def sync_body(self, job: CallJob) -> dict[str, Any]:
        body = self.body(job)
        if self.spec.models[job.req.model].kind != "text":  # no service tier for an image or a video
            return body
        return self._pinned(self._tiered(job, body), str(self.client.base_url))

    async def call(self, job: CallJob) -> CallOutcome:
        sdk = self._sdk
        route = self.route(job)
        if self.spec.models[job.req.model].kind == "video":
            return await self._videos.call(job)
        # The dispatcher passes the body it fixed at the first try; the key names that body (idempotency_key).
        body = job.body if job.body is not None else self.sync_body(job)
        job = job._replace(flex=job.flex and body.get("service_tier") == "flex")  # a body naming its own tier
        key = idempotency_key(job.key, body)
        c = self.client
        api, verb = ((c.images, "generate") if route == "/v1/images/generations" else
                     (c.responses, "create") if route == "/v1/responses" else (c.chat.completions, "create"))
        try:
            resp, replayed = await create_call(getattr(api, verb), getattr(api.with_raw_response, verb), body, key,
                                               self._flex_wait(job))
        except sdk.APIError as exc:
            return self._flex_error(job, exc, self._error(exc, sdk.APIStatusError, sdk.APITimeoutError, key))
        except TypeError as exc:  # a field of the wrong kind for this SDK (unknown ones go in extra_body)
            return CallOutcome(False, self.clock.now(), 0.0, error=f"{self.name}: bad request body: {exc}",
                               retryable=False)
        except Unreadable as exc:
            return self._unreadable(exc)
        try:
            out = self._outcome(job, route, resp.model_dump(mode="json", exclude_none=True),
                                getattr(resp, "_request_id", None), "sync")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # an answer of another shape
            return self._unreadable(exc)
        return out._replace(replayed=True) if replayed else out

    def resume_jobs(self, records: Sequence[dict]) -> None:
        self._videos.resume(records)

    def video_progress(self, uids: list[str]) -> dict[str, int]:
        """The last polled progress (0-99) of the videos of requests ``uids`` being polled (``_openai_video``)."""
        return self._videos.progress_of(uids)

    async def video_content(self, url: str, variant: str) -> ContentAnswer:
        """The bytes of a video this provider made (its result's ``output``), fetched with its key
        (``_video_content``); Veo's are not (Google's file addresses are no Videos API's)."""
        if isinstance(self._videos, VeoCalls):
            return content_refusal(400, f"{self.name} makes Veo videos, whose content is not served through "
                                   "OpenAI's Videos API; fetch the result's output with the provider's key")
        return await content_at(self.client, self._sdk, self._key.get(), url, variant, CONTENT_TIMEOUT_S)

    async def poll_job(self, job: CallJob, record: dict) -> CallOutcome:
        """The job of a killed engine's call (its journaled record), polled to its end, never made again."""
        return await self._videos.poll_made(job, record)

    # -- batch API ------------------------------------------------------------------------------------------
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
                        self._redact(f"{type(exc).__name__}: {str(exc)[:200]}"))

    async def poll(self, handle: BatchHandle) -> BatchState:
        with self._refused("batch poll"):
            handle.batch = b = await self.client.batches.retrieve(handle.id)
        if b.status in _ENDED:
            return BatchState("ended", 0.0)
        status = b.status if b.status in ("cancelling", "finalizing") else "running"
        return BatchState(status, handle.backoff.next())

    async def cancel(self, handle: BatchHandle) -> BatchState | None:
        with self._refused("batch cancel"):
            handle.batch = b = await self.client.batches.cancel(handle.id)
        return BatchState("ended", 0.0) if b.status in _ENDED else None

    async def _lines(self, file_id: str | None) -> tuple[list[dict], list[str | None]]:
        """A results file, streamed a line at a time (``jsonl_stream``: an image batch's holds a base64 image a
        line)."""
        if not file_id:
            return [], []
        with self._refused("reading a batch's results"):
            async with self.client.files.with_streaming_response.content(file_id) as resp:
                return await jsonl_stream(paced(resp.iter_bytes(), resp.headers, self.settings, self.endpoint))

    async def _results(self, b: Any) -> tuple[list[dict], list[str | None], list[dict]]:
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
        if b.output_file_id:  # none (a batch cancelled or expired before any line was written): nothing to cut
            whole_read(lines, unread, expected, f"{self.name}: file {b.output_file_id}")
        return lines, unread, errors

    async def fetch(self, handle: BatchHandle) -> Mapping[str, CallOutcome]:
        out: dict[str, CallOutcome] = {}
        if handle.batch is None or handle.batch.status not in _ENDED:  # known ended by a refused cancel, not by
            await self.poll(handle)  # a poll: read it now (read as it was, or unread, every member went again)
            if handle.batch.status not in _ENDED:
                raise ProviderError(f"{self.name}: batch {handle.id} is {handle.batch.status}, not ended")
        b = handle.batch
        route = b.endpoint
        if b.status == "failed":  # refused whole (e.g. token_limit_exceeded): every member goes back to the policy
            said = [f"{e.code}: {e.message}" for e in ((b.errors.data or []) if b.errors else [])][:3]
            log.warning("%s: batch %s failed: %s; its members did not run", self.name, handle.id,
                        self._redact("; ".join(said) or "no reason given"))
        lines, unread, errors = await self._results(b)
        self._unread_members(handle, unread, out)  # an error file's are left out: its members were not billed
        for line in lines:
            job = self._member(handle, line.get("custom_id"))
            if job is None:
                continue
            resp = line.get("response")
            code = _status(resp)
            if code == 200:
                try:
                    out[job.key] = self._outcome(job, route, resp.get("body") or {}, resp.get("request_id"),
                                                 "batch_api")
                except (AttributeError, KeyError, TypeError, ValueError):  # an answer of another shape: billed
                    self._unread_members(handle, [job.key], out)
            elif code is not None:
                out[job.key] = self._member_error(code, resp.get("body"), line.get("error"))
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

    async def close(self) -> None:
        if self._orphans:  # a delete under way gets a moment to finish; the file expires anyway
            _, late = await asyncio.wait(list(self._orphans), timeout=5.0)
            for t in late:
                t.cancel()
        if isinstance(self._videos, VeoCalls):
            await self._videos.close()
        await self.client.close()


def _status(resp: Any) -> int | None:
    """A results line's HTTP status; None where the line gives none as a number."""
    code = resp.get("status_code") if isinstance(resp, Mapping) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None
