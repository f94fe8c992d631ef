"""Google's Veo for ``OpenAIProvider`` at a ``compat: gemini`` provider: a video request is one long-running
operation made then polled inside the provider's ``call`` (a coroutine: the dispatcher's other calls go on while
it waits on the engine clock), on the Gemini API's own routes, with the same key as the provider's text calls
(docs/providers.md, "Veo").

``POST {root}/v1beta/models/{model}:predictLongRunning`` with ``{"instances": [{"prompt"}], "parameters": {...}}``,
then ``GET {root}/v1beta/{operation name}`` until ``done``: a ``response`` names the video
(``generateVideoResponse.generatedSamples[0].video.uri``), an ``error`` says why none was made (billed nothing;
made again by the engine's retry rules, as a failed OpenAI video is). ``root`` is the provider's base URL without
the compatibility layer's path (``/v1beta/openai``, or the emulator's ``/v1``). The key goes in ``x-goog-api-key``
and no ``Authorization`` header is sent: Google reads a bearer token as OAuth's.

The requests go through the ``openai`` SDK's generic ``post``/``get`` (its documented way to reach routes it has no
method for), not Google's ``google-genai``: its 3.3.0 refuses ``generate_videos`` outside Vertex ("only supported
in Gemini Enterprise Agent Platform mode"). So errors, timeouts, redaction and "possibly billed" are the text
calls' own (``HttpBase._error``), with no SDK retry.

The result's ``output`` is the video's URI (fetched with the key): the MP4 never enters the engine. Its cost is the
cost model's at the seconds and resolution sent, which are always sent (the request's, else the catalog's
defaults), since Google's answer does not repeat them.

A create whose answer was lost (sent, then a read timeout, a cut connection, an answer not Google's own: a proxy's
502 or 504) may have made a video that will be billed: Google documents no Idempotency-Key and no listing of Veo
operations, so nothing can find it again (``create_lost``). The request then fails, counted as possibly billed,
its error saying so and naming the setting that makes it again (``remake_lost_veo_creates``, or a server that
honours the key): made again, a second video was paid for (docs/providers.md, "Veo", the residual risk). A create
that never left (refused, a connect timeout) or that Google refused with its own error made nothing, and goes
again by the engine's retry rules. Before each create its intent is journaled (``CallJob.made``, no operation
yet): a dispatcher restart that cuts the create gives the intent back (``resume``), and the call made again fails
as a lost create does rather than make a second video. A poll that gives up keeps the operation's name, and the
retry polls it again: its end settles the try that gave up (``job_kept``: one video, one bound). Once a create is
answered, the name goes to the dispatcher (``CallJob.made``), which journals it and frees the call's concurrency
slot: a restarted dispatcher gives it back (``resume``), and the call made again polls it."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from actors.providers._http import _never_connected
from actors.providers._openai_video import poll_to_end
from actors.providers._sdk_key import STAND_IN, keyed
from engine.core._logkeys import get_logger
from engine.core._settings_env import ENV_PREFIX
from engine.core._within import within
from engine.core.cost import price_alone
from engine.core.provider_api import CallJob, CallOutcome, sent_key

__all__ = ["VeoCalls", "create_lost", "native_root"]

log = get_logger("smartbatch.providers")

# google.rpc codes of a failed operation no new try can help: INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION
_FINAL_CODES = frozenset({3, 7, 9})
_VERSION = re.compile(r"/v\d+(?:(?:alpha|beta)\d*)?$")


def native_root(base_url: str) -> str:
    """The Gemini API's root under a compatibility layer's base URL: ``.../v1beta/openai/`` (Google's) or
    ``.../google/v1`` (the emulator's) without that path's last version segment and ``/openai``."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/").removesuffix("/openai")
    return urlunsplit(parts._replace(path=_VERSION.sub("", path) + "/"))


def create_lost(exc: BaseException, sdk: Any) -> bool:
    """Whether a create that failed with ``exc`` (an SDK error) may have made an operation: it was sent and its
    answer lost (a timeout or a cut once connected: the SDK's error wraps the transport's as its ``__cause__``), or
    the answer is no answer of Google's (a 5xx without Google's ``error`` body: a proxy's 502 or 504, a page).
    Not when nothing was written (refused, a connect or pool timeout), nor when Google answered with its own error
    (a 429, a 400, a 503 with its google.rpc ``error`` body): no operation was made then. But Google's own
    DEADLINE_EXCEEDED (a 504) is lost: google.rpc says it "may be returned even if the operation has completed
    successfully", so the create may have made one."""
    if isinstance(exc, sdk.APIStatusError):
        return exc.status_code >= 500 and _googles_status(exc.response) in (None, "DEADLINE_EXCEEDED")
    if isinstance(exc, sdk.APIConnectionError):  # (a timeout is one)
        return not _never_connected(exc)
    return True  # answered, and not read as an answer: it may have made one


def _googles_status(resp: Any) -> str | None:
    """The ``status`` of the answer's body if it is Google's error object, ``{"error": {"code": 503, "message",
    "status"}}``; else None."""
    try:
        err = resp.json().get("error")
    except Exception:  # not JSON, not an object, or a body never read
        return None
    ok = isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("status"), str)
    return err["status"] if ok else None


class VeoCalls:
    """The Veo calls of one Gemini ``OpenAIProvider`` and the operations it polls, by the request's key."""

    def __init__(self, provider: Any):
        self.p = provider
        sdk = provider._sdk
        self._omit = sdk.Omit()
        self.client = keyed(sdk.AsyncOpenAI(api_key=STAND_IN, base_url=native_root(provider.endpoint.base_url),
                                            max_retries=0, timeout=provider.endpoint.http_timeout(sdk),
                                            default_headers={"x-goog-api-key": STAND_IN}),
                            provider._key, "x-goog-api-key")
        self._ops: dict[str, str] = {}  # key -> operation name, of a create answered whose video is not in yet
        self._replayed: set[str] = set()  # keys whose create was answered with an earlier run's operation
        # key -> creates of it whose answer was lost (each may have made a video), where it may be made again;
        # or given back by a restart from the intent of a create it cut
        self._lost: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"VeoCalls(open={len(self._ops)})"

    def progress_of(self, uids: list[str]) -> dict[str, int]:
        """None known: Google's operation says only whether it is ``done``, no figure of how far (an estimate from
        the expected latency would be the engine's guess, not Veo's)."""
        return {}

    def body(self, job: CallJob) -> dict[str, Any]:
        """Google's body: the request's own ``instances``/``parameters`` where it gives them, its ``parameters``'
        fields at the top of ``body`` otherwise; the seconds and resolution the cost model prices it at filled in."""
        r = job.req
        spec = self.p.spec.models[r.model]
        given = dict(r.body or {})
        params: dict[str, Any] = dict(given.pop("parameters", None) or {})
        instances = given.pop("instances", None) or [{"prompt": r.prompt}]
        params.update({k: v for k, v in given.items() if k != "model"})  # e.g. {"negativePrompt": "..."}
        duration = r.params.get("duration_s", spec.default_duration_s)
        params.setdefault("durationSeconds", int(duration) if float(duration).is_integer() else duration)
        params.setdefault("resolution", r.params.get("resolution", spec.default_resolution))
        return {"instances": instances, "parameters": params}

    def _headers(self, **more: str) -> dict[str, Any]:
        return {"headers": {"Authorization": self._omit, **more}}

    async def call(self, job: CallJob) -> CallOutcome:
        p, sdk = self.p, self.p._sdk
        body = job.body if job.body is not None else self.body(job)
        key = sent_key(job, body)
        name = self._ops.get(key)
        if name is None:
            if key in self._lost and not self._remakes():  # the last process's create, cut before its answer
                del self._lost[key]
                # Not maybe_billed: the restart counted that create unanswered already (its budget keeps its bound).
                return CallOutcome(False, p.clock.now(), 0.0, real=True, retryable=False, error=(
                    f"{p.name}: a create of this Veo video was under way when the dispatcher restarted, and its "
                    f"answer was lost; {self._not_again()}"))
            if job.made is not None:  # before it is sent: a restart that cuts it knows it may have made one
                await job.made({"provider": p.name, "api": "veo", "job": None, "key": key, "model": job.req.model,
                                "lost": self._lost.get(key, 0)})
            try:
                # The SDK's raw-response header (what its with_raw_response sets): its headers, then its body
                # Bounded as a whole, as any sync call's create (``HttpBase._call_bound``): an answer sent a byte
                # inside the client's timeout held the create for hours (a review); cut, its answer was lost.
                resp = await within(self.client.post(
                    f"v1beta/models/{job.req.model}:predictLongRunning", body=body, cast_to=object,
                    options=self._headers(**{"Idempotency-Key": key, "X-Stainless-Raw-Response": "true"})),
                    bound := p._call_bound())
                name = resp.parse()["name"]
            except asyncio.TimeoutError:
                return self._lost_create(key, p._unreadable(TimeoutError(
                    f"no whole answer within {bound:g} s, twice the call's timeout (a server sending it slowly)")))
            except sdk.APIError as exc:  # refused (nothing made), or lost on the way (possibly billed)
                out = p._error(exc, sdk.APIStatusError, sdk.APITimeoutError, key)
                if create_lost(exc, sdk):
                    return self._lost_create(key, out)
                if job.made is not None:  # no video to fail for after a restart: Google made none
                    await job.made({"provider": p.name, "api": "veo", "job": None, "key": key, "refused": True,
                                    "lost": self._lost.get(key, 0)})
                return out._replace(maybe_billed=False)  # (a 502 or 503 in Google's own words made none)
            except (KeyError, TypeError, ValueError) as exc:  # answered (so maybe made), its operation unreadable
                return self._lost_create(key, p._unreadable(exc))
            self._lost.pop(key, None)
            self._ops[key] = name
            # An earlier run's operation, answered again under its Idempotency-Key (a server that honours it; not
            # Google): that run counted it, and counted again here a re-run reported money the bill never held.
            if str(resp.headers.get("idempotent-replayed", "")).lower() == "true":
                self._replayed.add(key)
            else:
                self._replayed.discard(key)
        if job.made is not None:  # journaled, and the call's concurrency slot freed, before minutes of polls
            await job.made({"provider": p.name, "api": "veo", "job": name, "key": key, "model": job.req.model,
                            "cost_usd": price_alone(job.req, p.catalog, "sync").total})
        out = await self._poll(job, key, name)
        if out.ok and key in self._replayed:
            self._replayed.discard(key)
            return out._replace(replayed=True)
        return out

    def _remakes(self) -> bool:
        """A create whose answer was lost is made again: the setting says so, or the server honours the key (it
        answers with the first operation, billed once)."""
        return self.p.endpoint.remake_lost_veo_creates or self.p.honours_keys

    def _not_again(self) -> str:
        field = f"providers.endpoints.{self.p.name}.remake_lost_veo_creates"
        return ("Google may have made the video and will bill it, and documents no Idempotency-Key and no listing "
                "of Veo operations to find it by, so it was not made again (that would pay for two videos); to "
                f"make it again all the same, set {field} true ({ENV_PREFIX}{field.replace('.', '__').upper()}=true)")

    def _lost_create(self, key: str, out: CallOutcome) -> CallOutcome:
        """A create sent and its answer lost: counted possibly billed, and failed saying why, unless made again."""
        if self._remakes():
            self._lost[key] = self._lost.get(key, 0) + 1
            return out._replace(maybe_billed=True)
        self._lost.pop(key, None)
        return out._replace(maybe_billed=True, retryable=False,
                            error=f"{out.error}: the create was sent and its answer lost; {self._not_again()}")

    def resume(self, records: Any) -> None:
        """The operations a call of the last process made (``CallJob.made``'s records), by its key: the call
        made again after the restart polls its operation; and the intents of its creates cut before their
        answer: the call made again fails saying so, as a lost create does (unless ``_remakes``)."""
        for rec in records:
            if rec.get("api") != "veo" or rec.get("ended"):
                continue
            if rec.get("job") is not None:
                self._ops.setdefault(rec["key"], rec["job"])
            elif not rec.get("refused"):
                self._lost[rec["key"]] = rec.get("lost", 0) + 1

    async def poll_made(self, job: CallJob, rec: dict) -> CallOutcome:
        """The operation of a journaled record (an engine cut off made it), polled to its end: never made again."""
        self.resume([rec])
        return await self._poll(job, rec["key"], self._ops[rec["key"]])

    async def _poll(self, job: CallJob, key: str, name: str) -> CallOutcome:
        p = self.p

        def gone(said: str) -> CallOutcome:  # expired or unknown: not this engine's to find again
            self._ops.pop(key, None)
            return CallOutcome(False, p.clock.now(), 0.0, real=True, maybe_billed=True,
                               error=f"{p.name}: operation {name} is gone ({said})")

        def finished(op: Any) -> CallOutcome | None:
            if isinstance(op, dict) and op.get("done"):
                self._ops.pop(key, None)
                return self._ended(job, name, op)
            return None

        return await poll_to_end(p, job, lambda: self.client.get(f"v1beta/{name}", cast_to=object,
                                                                 options=self._headers()),
                                 finished, gone, lambda why: self._gave_up(name, why), lambda _: "not done")

    def _ended(self, job: CallJob, name: str, op: dict[str, Any]) -> CallOutcome:
        p = self.p
        err = op.get("error")
        if err is not None:  # billed nothing: a retry makes a new one
            code = err.get("code") if isinstance(err, dict) else None
            said = p._redact(str(err.get("message", "")) if isinstance(err, dict) else str(err))
            return CallOutcome(False, p.clock.now(), 0.0, real=True, provider_request_id=name,
                               retryable=code not in _FINAL_CODES,
                               error=f"{p.name}: video {name} failed: code {code}: {said[:300]}")
        gen = ((op.get("response") or {}).get("generateVideoResponse") or {})
        samples = gen.get("generatedSamples") or []
        uri = ((samples[0] or {}).get("video") or {}).get("uri") if samples else None
        if not isinstance(uri, str):  # filtered by Google's safety checks (raiMediaFilteredReasons): none made
            why = "; ".join(map(str, gen.get("raiMediaFilteredReasons") or [])) or "no video in the answer"
            return CallOutcome(False, p.clock.now(), 0.0, real=True, provider_request_id=name, retryable=False,
                               error=f"{p.name}: video {name} made no video: {p._redact(why)[:300]}")
        body = job.body if job.body is not None else self.body(job)
        made = body.get("parameters") or {}
        params = dict(job.req.params)
        if made.get("resolution") in (p.spec.models[job.req.model].per_second or {}):
            params["resolution"] = made["resolution"]
        try:
            params["duration_s"] = float(made["durationSeconds"])
        except (KeyError, TypeError, ValueError):
            pass
        cost = price_alone(job.req.model_copy(update={"params": params}), p.catalog, "sync").total
        return CallOutcome(True, p.clock.now(), cost, output=uri, provider_request_id=name, raw=op, real=True)

    def _gave_up(self, name: str, why: str) -> CallOutcome:
        """The video may still be made and billed: the retry polls it again (``_ops`` keeps its name), and its end
        settles this try's bound (``job_kept``): one video, not one more bound per try that gave up."""
        p = self.p
        return CallOutcome(False, p.clock.now(), 0.0, real=True, maybe_billed=True, job_kept=True,
                           error=f"{p.name}: video {name}: {why}; polled again on the next try")

    async def close(self) -> None:
        await self.client.close()
