"""Gemini over HTTP: ``OpenAIProvider`` at Google's OpenAI compatibility layer (text, images and its chat batches),
with the batches of the image models the catalog names (``batch_api.media_models``) sent through Google's native
Batch API instead, whose inline requests take ``generateContent`` bodies: the layer's own Batch API documents chat
completions only (docs/providers.md, "Gemini").

The wire (``engine.emulator._gemini_batch`` gives the sources): ``POST v1beta/models/{model}:batchGenerateContent``
with ``{"batch": {"displayName": ref, "inputConfig": {"requests": {"requests": [{"request", "metadata":
{"key"}}]}}}}``; ``GET v1beta/batches/{id}`` (an operation whose ``metadata`` is the batch: its ``state``, and once
ended ``output.inlinedResponses.inlinedResponses``, each with the ``metadata`` it was sent with); ``GET
v1beta/batches`` (``operations``) to find a create whose answer was lost, by its display name;
``POST v1beta/batches/{id}:cancel``. Members are read back by ``metadata.key`` (the call key), never by position;
a response without it (python-genai #2008) fails each member no response names, possibly billed (``_unnamed``).
Lookups and polls ask for a partial response (``fields``: names, states, counts), so the images, which an ended
batch's operation holds, are read once, by ``fetch``, within the dispatcher's results slot (a poll's or a
lookup's answer is read as it arrives, the images passed over, should Google answer them despite the mask).
The key goes in ``x-goog-api-key`` (as Veo's calls send it), never in a URL or a log line."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from actors.providers._gemini_read import OPERATION_DROPPED, PAGE_DROPPED, STREAMED, read_operation
from actors.providers._http import BatchHandle, PollBackoff
from actors.providers._openai_batches import FIND_SCAN
from actors.providers._sdk_key import STAND_IN, keyed
from actors.providers._veo import native_root
from actors.providers.openai_http import OpenAIProvider
from engine.core._gemini import GEMINI_ASPECTS
from engine.core._logkeys import get_logger
from engine.core.errors import ProviderError
from engine.core.provider_api import BatchState, CallJob, CallOutcome, Usage

__all__ = ["GeminiProvider", "NativeHandle"]

log = get_logger("smartbatch.providers")

_ENDED = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"})
_FINAL_CODES = frozenset({3, 7, 9})  # google.rpc INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION
# What a lookup reads of each listed batch, and a poll of its batch (Google's ``fields`` system parameter, a partial
# response): an ended batch's operation holds its images, twice (``metadata.output`` and ``response``). A page of 100
# held them all; a poll that saw the end held them outside the dispatcher's results slot (``fetch`` reads them whole).
_LISTED = "operations(name,metadata(displayName,state)),nextPageToken"
_POLLED = "name,done,error,metadata(displayName,state,batchStats)"


class NativeHandle(BatchHandle):
    """A batch of Google's native Batch API. ``batch``: the last operation read, without its responses, which an
    ended batch's read keeps in ``output`` (not journaled: a restart reads them again)."""

    __slots__ = ("output",)

    def __init__(self, bid: str, jobs: Sequence[CallJob], backoff: PollBackoff):
        super().__init__(bid, jobs, backoff)
        self.output: list | None = None

    def __getstate__(self) -> tuple[None, dict[str, Any]]:
        return None, {k: getattr(self, k) for k in ("backoff", "batch", "id", "jobs")} | {"output": None}


def _state(op: Mapping) -> str:
    return str((op.get("metadata") or {}).get("state") or "") if isinstance(op, Mapping) else ""


def _listed(page: Any) -> bool:
    """A lookup's page holds what its mask (``_LISTED``) names: each operation's name, display name and state."""
    ops = page.get("operations") or [] if isinstance(page, dict) else None
    return isinstance(ops, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str) and _state(o)
                                         and (o.get("metadata") or {}).get("displayName") is not None for o in ops)


class GeminiProvider(OpenAIProvider):
    """``OpenAIProvider`` for a ``compat: gemini`` provider, its media batches on Google's native routes."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._native = keyed(self._sdk.AsyncOpenAI(api_key=STAND_IN, base_url=native_root(self.endpoint.base_url),
                                                   max_retries=0, timeout=self.endpoint.http_timeout(self._sdk),
                                                   default_headers={"x-goog-api-key": STAND_IN}),
                             self._key, "x-goog-api-key")
        # Google reads a bearer token as OAuth's: the SDK's own Authorization header is left out
        self._opts = {"headers": {"Authorization": self._sdk.Omit()}}
        self._partial = True  # partial responses asked for (``_get``) until Google refuses or ignores one

    def native(self, jobs: Sequence[CallJob]) -> bool:
        """Whether these members ride the native Batch API: a model of ``batch_api.media_models``."""
        ba = self.spec.batch_api
        return bool(jobs) and ba is not None and jobs[0].req.model in (ba.media_models or ())

    # -- bodies ---------------------------------------------------------------------------------------------
    def inline_request(self, job: CallJob) -> dict[str, Any]:
        """One member: the request's prompt as a text part, the image it asks for by its aspect ratio (the size the
        cost model prices it at), and its call key in ``metadata``, by which its response is read back."""
        r = job.req
        body = r.body or {}
        prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else r.prompt
        size = body.get("size") or r.params.get("size") or self.spec.models[r.model].default_size
        config = {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": GEMINI_ASPECTS.get(size, "1:1")}}
        return {"request": {"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config},
                "metadata": {"key": job.key}}

    # -- batch API ------------------------------------------------------------------------------------------
    async def submit_batch(self, jobs: Sequence[CallJob], hedge_at: float | None, ref: str,
                           body: Any = None, wanted: Callable[[], bool] | None = None) -> Any:
        if not self.native(jobs):
            return await super().submit_batch(jobs, hedge_at, ref, body, wanted)
        sent = {"batch": {"displayName": ref, "inputConfig": {"requests": {
            "requests": [self.inline_request(j) for j in jobs]}}}}
        with self._refused("batch submission"):
            op = await self._native.post(f"v1beta/models/{jobs[0].req.model}:batchGenerateContent", body=sent,
                                         cast_to=object, options=self._opts)
        return self._native_handle(op, jobs)

    def reattach(self, bid: str, jobs: Sequence[CallJob], hedge_at: float | None,
                 model: str | None = None) -> BatchHandle:
        ba = self.spec.batch_api
        # With no members (the engine's stop cancels it), by the model: taken for a layer's batch, a native one's
        # cancel went by the OpenAI-compatible route, refused, and it ran on, billed (a review)
        if not (self.native(jobs) if jobs else ba is not None and model in (ba.media_models or ())):
            return super().reattach(bid, jobs, hedge_at)
        return NativeHandle(bid, jobs, PollBackoff(self.endpoint.poll_min_s, self.endpoint.poll_max_s))

    def _native_handle(self, op: Any, jobs: Sequence[CallJob], whole: bool = True) -> NativeHandle:
        if not isinstance(op, dict) or not isinstance(op.get("name"), str):
            raise ProviderError(f"{self.name}: a batch create was answered without a batch name")
        handle = NativeHandle(op["name"], jobs, PollBackoff(self.endpoint.poll_min_s, self.endpoint.poll_max_s))
        self._keep(handle, op, whole)
        return handle

    def _keep(self, handle: NativeHandle, op: dict, whole: bool, members: list | None = None) -> None:
        """The operation read, its responses apart (``NativeHandle.output``) once it has ended. ``whole``: ``op`` is
        the batch read whole; a lookup's or a poll's (``_LISTED``, ``_POLLED``) is not, and an ended batch's output
        taken from it would be none (every member sent again): ``fetch`` reads it. ``members``: the responses a
        streamed read took out of ``op`` (``read_operation``), where it found them."""
        meta = dict(op.get("metadata") or {})
        out = meta.pop("output", None)
        handle.batch = {**{k: v for k, v in op.items() if k != "response"}, "metadata": meta}
        ended = whole and _state(op) in _ENDED
        if members is None:
            members = ((out or {}).get("inlinedResponses") or {}).get("inlinedResponses")
        handle.output = (members or []) if ended else None

    async def find_batch(self, jobs: Sequence[CallJob], ref: str, known: frozenset[str] = frozenset()) -> Any:
        if not self.native(jobs):
            return await super().find_batch(jobs, ref, known)
        token, seen = None, 0
        with self._refused("batch lookup"):
            while seen < FIND_SCAN:
                page = await self._get("v1beta/batches", {"pageSize": 100, **({"pageToken": token} if token else {})},
                                       _LISTED, _listed, "batch lookup", PAGE_DROPPED)
                ops = (page.get("operations") or []) if isinstance(page, dict) else []
                for op in ops:
                    if (op.get("metadata") or {}).get("displayName") == ref and op.get("name") not in known:
                        return self._native_handle(op, jobs, whole=False)
                seen += len(ops)
                token = page.get("nextPageToken") if isinstance(page, dict) else None
                if not token or not ops:
                    break
        return None

    async def poll(self, handle: Any) -> BatchState:
        if not isinstance(handle, NativeHandle):
            return await super().poll(handle)
        op = await self._read(handle, _POLLED)
        if _state(op) in _ENDED:
            return BatchState("ended", 0.0)
        return BatchState("running", handle.backoff.next())

    async def _read(self, handle: NativeHandle, fields: str | None) -> dict:
        """``GET v1beta/batches/{id}``: its state and counts (``_POLLED``), or whole (``fields`` None), its images in it
        once ended: read by ``fetch``, within the dispatcher's results slot (``_results_slot``)."""
        members = None
        if fields:  # streamed, its responses passed over: a server that ignores the mask answers them all
            op = await self._get(f"v1beta/{handle.id}", {}, fields, lambda o: bool(_state(o)), "batch poll",
                                 OPERATION_DROPPED)
        else:  # read as it arrives, a member at a time (``_gemini_read``): parsed whole, 6 times its images
            with self._refused("reading a batch's results"):
                op, members = await self._streamed(f"v1beta/{handle.id}", self._opts, True, OPERATION_DROPPED)
        if not isinstance(op, dict):
            raise ProviderError(f"{self.name}: a read of {handle.id} was answered with no batch")
        self._keep(handle, op, fields is None, members)
        return op

    async def _streamed(self, path: str, options: dict, members: bool, dropped: tuple) -> tuple[Any, list | None]:
        """``GET path`` read as it arrives (``read_operation``): ``dropped`` (an operation's ``response``, a page's
        responses) never held, and an operation's members parsed one at a time (``members``) or passed over too (a
        poll's read, which keeps none)."""
        got = await self._native.get(path, cast_to=object, options={
            **options, "headers": {**options["headers"], **STREAMED}})
        try:
            return await read_operation(got.iter_bytes(), members, dropped)
        finally:
            await got.close()

    async def _get(self, path: str, params: dict, fields: str, complete: Callable[[Any], bool], what: str,
                   dropped: tuple) -> Any:
        """``GET path`` asking for a partial response (``fields``), read whole instead where Google refuses the mask
        or answers without what it names (a mask that does not reach into the operation's metadata, an ``Any``):
        taken as it came, a batch would read as never ending, and a lookup would find none, its batch made again.
        Read as it arrives (``_streamed``), ``dropped`` passed over: an ended batch's images are never held, whether
        the mask is honoured, refused or ignored (then the answer holds them all, a page every listed batch's)."""
        async def read(options: dict) -> Any:
            return (await self._streamed(path, options, False, dropped))[0]

        if self._partial:
            try:
                with self._refused(what):
                    got = await read({**self._opts, "params": {**params, "fields": fields}})
                if complete(got):
                    return got
                self._partial = False  # answered without what the mask names: ignored, so whole from now on
                log.warning("%s: Google answered a partial response (fields=%s) without its fields; its batches are "
                            "read whole from now on", self.name, fields)
            except ProviderError as exc:  # refused (the mask, or the read itself, which the whole read tells)
                if exc.maybe_done or exc.retry_after_s is not None or exc.quota:  # no refusal of the mask
                    raise
        with self._refused(what):
            return await read({**self._opts, "params": params})

    async def cancel(self, handle: Any) -> BatchState | None:
        if not isinstance(handle, NativeHandle):
            return await super().cancel(handle)
        try:
            with self._refused("batch cancel"):  # answered with nothing: the polls tell when it has stopped
                await self._native.post(f"v1beta/{handle.id}:cancel", body={}, cast_to=object, options=self._opts)
        except ProviderError:  # refused: most often it ended just before its hedge, which a poll says in Google's
            if (await self.poll(handle)).status == "ended":  # states (its refusal's words are not documented)
                return BatchState("ended", 0.0)
            raise
        return None

    async def fetch(self, handle: Any) -> Mapping[str, CallOutcome]:
        if not isinstance(handle, NativeHandle):
            return await super().fetch(handle)
        if handle.output is None:  # polls read no responses: read it whole now
            await self._read(handle, None)
            if handle.output is None:
                raise ProviderError(f"{self.name}: batch {handle.id} is {_state(handle.batch)}, not ended")
        responses, state = handle.output, _state(handle.batch)
        stats = (handle.batch.get("metadata") or {}).get("batchStats") or {}
        answered = sum(int(stats.get(k) or 0) for k in ("successfulRequestCount", "failedRequestCount"))
        if len(responses) < answered:  # a finished member left unread would be sent again, paid twice
            handle.output = None  # read again by the next try: kept, every try re-checked this short answer
            raise ProviderError(f"{self.name}: batch {handle.id}: {len(responses)} response(s) read of the "
                                f"{answered} it answered; read again")
        if state == "BATCH_STATE_FAILED":
            log.warning("%s: batch %s failed: %s; its members did not run", self.name, handle.id,
                        self._redact(str(handle.batch.get("error") or "no reason given"))[:300])
        out: dict[str, CallOutcome] = {}
        named, keyless = [], 0
        for item in responses:
            key = (item.get("metadata") or {}).get("key") if isinstance(item, dict) else None
            named.append(key)
            job = self._member(handle, key)
            if job is None:  # an error billed nothing; anything else may be a member's answer, billed
                keyless += not (isinstance(item, dict) and item.get("error") is not None)
                continue
            try:  # named twice (a response written again): a refusal never replaces its billed answer
                self._put(out, job.key, self._native_outcome(job, item))
            except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # ran, and may be billed
                self._unread_members(handle, [job.key], out)
        self._unnamed(handle, out, named, keyless, "metadata.key")
        handle.output = None  # handed on: the images are not held past their read
        return out

    def _native_outcome(self, job: CallJob, item: dict) -> CallOutcome:
        now = self.clock.now()
        err = item.get("error")
        if err is not None:  # refused or failed inside the batch: billed nothing
            code = err.get("code") if isinstance(err, dict) else None
            said = self._redact(str(err.get("message", "")) if isinstance(err, dict) else str(err))
            return CallOutcome(False, now, 0.0, real=True, retryable=code not in _FINAL_CODES,
                               error=f"{self.name} batch member: code {code}: {said[:300]}")
        resp = item["response"]
        u = resp.get("usageMetadata") or {}
        usage = Usage(int(u.get("promptTokenCount") or 0), 0)  # the image is priced per image, as a sync one
        cand = (resp.get("candidates") or [{}])[0]
        image = next((p["inlineData"]["data"] for p in (cand.get("content") or {}).get("parts") or []
                      if isinstance(p, dict) and isinstance(p.get("inlineData"), dict)), None)
        if not isinstance(image, str):  # it ran and made no image (a safety block): its answer says why
            why = cand.get("finishReason") or (resp.get("promptFeedback") or {}).get("blockReason") or "no image"
            return CallOutcome(False, now, 0.0, real=True, retryable=False, raw=resp,
                               error=f"{self.name} batch member made no image: {self._redact(str(why))[:200]}")
        return CallOutcome(True, now, self._priced(job, usage, "batch_api"), output=image, usage=usage,
                           provider_request_id=resp.get("responseId"), raw=resp, real=True)

    def results_at(self, handle: Any) -> str:
        if not isinstance(handle, NativeHandle):
            return super().results_at(handle)
        return f"batch {handle.id} (its inline responses: GET v1beta/{handle.id})"

    async def discard(self, handle: Any) -> int:
        """Nothing for a native batch: it holds its responses beside its requests, which a resume or a take-back
        reads again while the journal's archive names it."""
        return 0 if isinstance(handle, NativeHandle) else await super().discard(handle)

    def queue_refusal(self, handle: Any) -> int | None:
        return None if isinstance(handle, NativeHandle) else super().queue_refusal(handle)

    async def close(self) -> None:
        await self._native.close()
        await super().close()
