"""OpenAI-compatible provider over HTTP (the official ``openai`` SDK): chat completions or the Responses API (as
the catalog's ``api`` says), image generation, and the Batch API (JSONL upload, create, poll with backoff,
output and error files mapped back by ``custom_id``: ``_openai_batches``). Works with any server that speaks the
OpenAI API at a ``base_url``: vLLM, Ollama, Together, Groq, a LiteLLM proxy, and the project's emulator."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from actors.providers._http import Unreadable, create_call
from actors.providers._openai_answers import (
    _finish_chat,
    _finish_responses,
    _text_chat,
    _text_responses,
    _usage_chat,
    _usage_responses,
)
from actors.providers._openai_batches import FIND_SCAN as FIND_SCAN  # where it was read before the split
from actors.providers._openai_batches import OpenAIBatches
from actors.providers._openai_video import VideoCalls
from actors.providers._sdk_key import STAND_IN, keyed
from actors.providers._veo import VeoCalls
from actors.providers._video_content import CONTENT_TIMEOUT_S, ContentAnswer, content_at, content_refusal
from actors.providers._wire import message_parts
from engine.core.provider_api import CallJob, CallOutcome, Usage, sent_key
from engine.core.responses_input import as_messages

__all__ = ["OpenAIProvider"]


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


class OpenAIProvider(OpenAIBatches):
    home_host, standard_tier = "api.openai.com", "default"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        import openai

        self._sdk = openai
        # max_retries=0: the engine's retry, Retry-After, backoff and circuit breaker are the only ones.
        self.client = keyed(openai.AsyncOpenAI(api_key=STAND_IN, base_url=self.endpoint.base_url, max_retries=0,
                                               timeout=self.endpoint.http_timeout(openai)), self._key)
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
        key = sent_key(job, body)
        c = self.client
        api, verb = ((c.images, "generate") if route == "/v1/images/generations" else
                     (c.responses, "create") if route == "/v1/responses" else (c.chat.completions, "create"))
        try:
            wait = self._flex_wait(job)
            resp, replayed = await create_call(getattr(api, verb), getattr(api.with_raw_response, verb), body, key,
                                               wait, self._call_bound(wait))
        except sdk.APIError as exc:
            return self._flex_error(job, exc, self._error(exc, sdk.APIStatusError, sdk.APITimeoutError, key))
        except TypeError as exc:  # a field of the wrong kind for this SDK (unknown ones go in extra_body)
            return CallOutcome(False, self.clock.now(), 0.0, error=f"{self.name}: bad request body: {exc}",
                               retryable=False)
        except Unreadable as exc:
            return self._flex_error(job, exc, self._unreadable(exc))
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
        return await content_at(self.client, self._sdk, self._key, url, variant, CONTENT_TIMEOUT_S)

    async def poll_job(self, job: CallJob, record: dict) -> CallOutcome:
        """The job of a killed engine's call (its journaled record), polled to its end, never made again."""
        return await self._videos.poll_made(job, record)

    async def close(self) -> None:
        if self._orphans:  # a delete under way gets a moment to finish; the file expires anyway
            _, late = await asyncio.wait(list(self._orphans), timeout=5.0)
            for t in late:
                t.cancel()
        if isinstance(self._videos, VeoCalls):
            await self._videos.close()
        await self.client.close()
