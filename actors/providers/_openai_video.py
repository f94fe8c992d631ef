"""OpenAI's Videos API for ``OpenAIProvider``: a video request is one job made then polled, inside the
provider's ``call`` (a coroutine: the dispatcher's other calls go on while it waits on the engine clock).

Create (``POST /v1/videos``), then ``GET /v1/videos/{id}`` until ``completed`` or ``failed``. A completed video is
priced by the cost model at the seconds and size its answer reports; a failed one billed nothing, and goes
again by the engine's retry rules (a new job). The result's ``output`` is the video's content address
(``GET {base_url}/videos/{id}/content``, with the provider's key; OpenAI keeps it about an hour): the MP4 is
never read into the engine, as an image's URL is not fetched.

A create whose answer was lost (a timeout, a reset) may have made a video that will be billed. OpenAI documents
no Idempotency-Key (the header is sent all the same, for a server that honours it) and a video carries no
metadata, so the retry first looks for it: the videos listed newer than the newest one seen before the first
create (``snapshot``), of the same model, prompt, seconds and size, that no other request of this provider holds.
Found, it is polled, not made again. A poll that gives up (errors, or no end within ``GIVE_UP_S``) keeps the id,
and the retry polls that video again, its end settling the try that gave up (``job_kept``). Once a create is
answered (or its video found), the id goes to the dispatcher (``CallJob.made``), which journals it and frees the
call's concurrency slot: a restarted dispatcher gives it back (``resume``), and the call made again polls that
video rather than make another. Before each create, its intent (no id yet, the snapshot) is journaled the same
way: a restart that cuts the create before its answer gives the call made again its snapshot, and the look-up
above finds the video that create made (``_intent``)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import warnings
from collections.abc import Callable
from typing import Any

from actors.providers._http import PollBackoff, Unreadable, create_call
from actors.providers._video_content import content_address
from engine.core._logkeys import get_logger
from engine.core.cost import price_alone
from engine.core.latency import sync_latency_median
from engine.core.provider_api import CallJob, CallOutcome, sent_key
from engine.core.video_sizes import resolution_of, size_of

__all__ = ["GIVE_UP_S", "VideoCalls", "poll_to_end"]

log = get_logger("smartbatch.providers")

GIVE_UP_S = 10.0  # polls stop after this many times the model's expected latency (engine s), at least 600 s
POLL_MIN_S, POLL_MAX_S = 2.0, 20.0  # engine seconds between polls of one video, growing by half
POLL_ERRORS = 3  # polls in a row that fail before the call gives up (the video is kept for the retry)
SCAN = 500  # videos looked through, newest first, for a create whose answer was lost
HELD_KEEP = 4 * SCAN  # ids of videos made or taken kept: an older one is past any find's SCAN
# A failure no new try can help (ASSUMPTION: OpenAI's reference lists no codes; a refused prompt is moderation's)
_FINAL_CODES = ("moderation", "policy", "invalid")


def _quiet(fn: Callable) -> Callable:
    """``fn`` without the SDK's DeprecationWarning (its video methods say the Sora API shuts down on 2026-09-24:
    docs/providers.md, "Video"). The warning is raised when the method is called, before anything is awaited.
    ``wraps``: the signature stays the method's, which ``sdk_kwargs`` reads to put unknown fields in extra_body."""
    @functools.wraps(fn)
    def call(*a: Any, **kw: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return fn(*a, **kw)
    return call


class _Try:
    """One request's video: the listing before its first create, the job's id once known, and how many of its
    creates got no answer (each may have made a video)."""

    __slots__ = ("covers", "lost", "replayed", "snapshot", "video_id")

    def __init__(self, snapshot: tuple[int | None, frozenset[str]] | None):
        self.snapshot, self.video_id, self.lost = snapshot, None, 0
        # The create was answered with an earlier run's job under its Idempotency-Key (a server that honours it):
        # that run counted it; counted again here, a re-run reported money the bill never held (a helper's tour).
        self.replayed = False
        # Whether its video's answer accounts for the request's earlier tries that got no answer (each may have
        # made a video): False once its video is known if lost creates of it are not all that video (``call``).
        self.covers = True


def _intent(provider: str, job: CallJob, key: str, t: _Try, body: dict[str, Any]) -> dict[str, Any]:
    """The record journaled before a create is sent (``job`` None: its video unknown yet): a dispatcher restarted
    before its answer looks for the video it made among those listed newer than ``snapshot`` (``_find``), and
    polls it rather than make another. The prompt only by its hash: the body record holds the prompt."""
    model, prompt, seconds, size = _made_as(body)
    newest, ids = t.snapshot or (None, frozenset())
    return {"provider": provider, "api": "videos", "job": None, "key": key, "lost": t.lost + 1, "covers": True,
            "snapshot": (newest, tuple(sorted(ids))), "model": model, "seconds": seconds, "size": size,
            "prompt_sha256": hashlib.sha256(str(prompt).encode()).hexdigest(), "call": job.key}


def _refused(provider: str, key: str, t: _Try) -> dict[str, Any]:
    """The record that replaces a refused create's intent: no video to look for after a restart (the intent's
    look-up took another request's video of the same body); ``lost``: its earlier creates that got no answer."""
    return {"provider": provider, "api": "videos", "job": None, "key": key, "refused": True, "lost": t.lost}


def _made_as(body: dict[str, Any]) -> tuple:
    """What a create of ``body`` makes, as the listing shows it (OpenAI's defaults where the body names none)."""
    return body.get("model"), body.get("prompt"), str(body.get("seconds", "4")), body.get("size", "720x1280")


class VideoCalls:
    """The video calls of one ``OpenAIProvider`` and the jobs it holds, by the request's Idempotency-Key."""

    def __init__(self, provider: Any):
        self.p = provider
        self._tries: dict[str, _Try] = {}
        # Ids some request of this provider made or took, never taken again, newest last: the HELD_KEEP newest
        # only, as a find looks at the SCAN newest videos listed and this provider's newer ones are among them
        # (every id of a long serve's videos was kept).
        self._held: dict[str, None] = {}
        # Creates under way (key -> what they make, and set once they answered or failed): their videos may be
        # listed before their answers name them held (``_find``).
        self._creating: dict[str, tuple[tuple, asyncio.Event]] = {}
        # The progress (0-100) the last poll read of each video under way, by its request's uid: what the
        # endpoint's retrieve shows (``progress_of``), kept from the polls made anyway, never asked for itself.
        self._progress: dict[str, int] = {}
        videos = provider.client.videos  # made once: sdk_kwargs caches what each create names
        self._create, self._raw_create = _quiet(videos.create), _quiet(videos.with_raw_response.create)

    def __repr__(self) -> str:
        return f"VideoCalls(open={len(self._tries)}, held={len(self._held)})"

    def progress_of(self, uids: list[str]) -> dict[str, int]:
        """The last polled progress of the videos of requests ``uids`` still being polled (the others: none)."""
        return {u: self._progress[u] for u in uids if u in self._progress}

    def _hold(self, vid: str) -> None:
        self._held[vid] = None
        while len(self._held) > HELD_KEEP:
            del self._held[next(iter(self._held))]

    def body(self, job: CallJob) -> dict[str, Any]:
        r = job.req
        body: dict[str, Any] = dict(r.body or {})
        body["model"] = r.model
        body.setdefault("prompt", r.prompt)
        # What the cost model prices it by: sent, or made (and billed) at OpenAI's defaults (4 s, 720x1280).
        if "duration_s" in r.params:
            body.setdefault("seconds", f"{float(r.params['duration_s']):g}")
        if (size := size_of(str(r.params.get("resolution", "")))) is not None:
            body.setdefault("size", size)
        return body

    async def call(self, job: CallJob) -> CallOutcome:
        p, sdk = self.p, self.p._sdk
        body = job.body if job.body is not None else self.body(job)
        key = sent_key(job, body)
        t = self._tries.get(key)
        recovered = t is not None and t.covers
        if t is None:
            t = self._tries[key] = _Try(await self._snapshot())
        elif t.video_id is None:  # an earlier create got no answer: did it make a video?
            t.video_id, alone = await self._find(t, body)
            # Found alone, it is the video of one lost create; of two or more, the others' may be listed later
            # (each still counted as possibly billed: ``recovered`` told the dispatcher they billed nothing).
            recovered = alone and t.lost == 1
        if t.video_id is None:
            if job.made is not None and t.snapshot is not None:  # before: a restart cutting it finds its video
                await job.made(_intent(p.name, job, key, t, body))
            answered = asyncio.Event()
            self._creating[key] = (_made_as(body), answered)
            try:
                resp, replayed = await create_call(self._create, self._raw_create, body, key, total_s=p._call_bound())
                self._hold(resp.id)
            except sdk.APIError as exc:
                out = p._error(exc, sdk.APIStatusError, sdk.APITimeoutError, key)
                if not out.maybe_billed:  # refused: no video was made, none to look for after a restart
                    self._tries.pop(key, None)
                    if job.made is not None:
                        await job.made(_refused(p.name, key, t))
                t.lost += out.maybe_billed
                return out
            except TypeError as exc:
                self._tries.pop(key, None)
                if job.made is not None:
                    await job.made(_refused(p.name, key, t))
                return CallOutcome(False, p.clock.now(), 0.0, error=f"{p.name}: bad request body: {exc}",
                                   retryable=False)
            except Unreadable as exc:
                t.lost += 1
                return p._unreadable(exc)
            finally:
                self._creating.pop(key, None)
                answered.set()
            t.video_id, recovered, t.replayed = resp.id, recovered and replayed, replayed
        # What a retry that polls this video again (its poll gave up) answers, as the journal's record says. Left
        # True, that retry answered ``recovered`` and the dispatcher dropped the bounds of lost creates of it whose
        # videos were never found (a review).
        t.covers = recovered or t.lost == 0
        if job.made is not None:  # journaled, and the call's concurrency slot freed, before minutes of polls
            await job.made({"provider": p.name, "api": "videos", "job": t.video_id, "key": key, "lost": t.lost,
                            "covers": t.covers, "model": job.req.model,
                            "cost_usd": price_alone(job.req, p.catalog, "sync").total})
        return await self._poll(job, key, t, recovered)

    def resume(self, records: Any) -> None:
        """The videos a call of the last process made (``CallJob.made``'s records), by its key: the call made
        again after the restart polls its video."""
        for rec in records:
            if rec.get("ended") and rec.get("api") == "videos":  # another call's, ended: never taken by a look-up
                self._hold(rec["job"])
            if rec.get("api") != "videos" or rec.get("ended") or rec.get("refused") or rec["key"] in self._tries:
                continue
            snap = rec.get("snapshot")  # (an intent's: its create cut before its answer, its video looked for)
            t = self._tries[rec["key"]] = _Try(None if snap is None else (snap[0], frozenset(snap[1])))
            t.video_id, t.lost, t.covers = rec["job"], rec.get("lost", 0), rec.get("covers", True)
            if t.video_id is not None:
                self._hold(t.video_id)

    async def poll_made(self, job: CallJob, rec: dict) -> CallOutcome:
        """The video of a journaled record (an engine cut off made it), polled to its end: never made again."""
        self.resume([rec])
        t = self._tries[rec["key"]]
        return await self._poll(job, rec["key"], t, t.covers)

    async def _poll(self, job: CallJob, key: str, t: _Try, recovered: bool) -> CallOutcome:
        p = self.p

        def gone(said: str) -> CallOutcome:  # deleted or expired: not this engine's to find again
            self._tries.pop(key, None)
            return CallOutcome(False, p.clock.now(), 0.0, real=True, maybe_billed=True,
                               error=f"{p.name}: video {t.video_id} is gone ({said})")

        def finished(v: Any) -> CallOutcome | None:
            if v.status == "completed":
                self._tries.pop(key, None)
                return self._made(job, v, recovered)._replace(replayed=t.replayed)
            if v.status == "failed":
                self._tries.pop(key, None)  # billed nothing: a retry makes a new one
                err = v.error
                code, said = (getattr(err, "code", None) or "failed"), (getattr(err, "message", None) or "")
                return CallOutcome(False, p.clock.now(), 0.0, real=True, provider_request_id=v.id,
                                   retryable=not any(w in code for w in _FINAL_CODES),
                                   error=f"{p.name}: video {v.id} failed: {code}: {p._redact(said)[:300]}")
            if isinstance(v.progress, (int, float)):  # never past 99 before it ends; a new try's video starts lower
                self._progress[uid] = max(self._progress.get(uid, 0), min(int(v.progress), 99))
            return None

        uid = job.req.uid
        try:
            return await poll_to_end(p, job, lambda: _quiet(p.client.videos.retrieve)(t.video_id), finished, gone,
                                     lambda why: self._gave_up(t, why),
                                     lambda v: f"still {v.status if v is not None else 'unread'}")
        finally:
            self._progress.pop(uid, None)  # ended (or given up: the retry's polls read it again)

    def _gave_up(self, t: _Try, why: str) -> CallOutcome:
        """The video may still complete and be billed: the retry polls it again (``_tries`` keeps its id), and its
        end settles this try's bound (``job_kept``): one video, not one more bound per try that gave up."""
        p = self.p
        return CallOutcome(False, p.clock.now(), 0.0, real=True, maybe_billed=True, job_kept=True,
                           error=f"{p.name}: video {t.video_id}: {why}; polled again on the next try")

    def _made(self, job: CallJob, v: Any, recovered: bool) -> CallOutcome:
        """A completed video, priced at the seconds and size it was made at (as the answer says), where the
        catalog prices that size; at the request's own otherwise."""
        p = self.p
        raw = v.model_dump(mode="json", exclude_none=True)
        params = dict(job.req.params)
        res = resolution_of(raw.get("size"))
        if res is not None and res in (p.spec.models[job.req.model].per_second or {}):
            params["resolution"] = res
        elif raw.get("size") is not None:
            log.warning("%s: video %s was made at size %r, which the catalog does not price; counted at %r",
                        p.name, v.id, raw.get("size"), params.get("resolution"))
        try:
            params["duration_s"] = float(raw["seconds"])
        except (KeyError, TypeError, ValueError):
            pass
        req = job.req.model_copy(update={"params": params})
        cost = price_alone(req, p.catalog, "sync").total
        url = content_address(str(p.client.base_url), v.id)
        return CallOutcome(True, p.clock.now(), cost, output=url, provider_request_id=v.id, raw=raw, real=True,
                           recovered=recovered)

    async def _snapshot(self) -> tuple[int | None, frozenset[str]] | None:
        """The newest videos before a first create: (their newest ``created_at``, their ids). None when the
        listing fails: a lost create of this request then cannot be found, and the retry makes a new one."""
        try:
            page = await _quiet(self.p.client.videos.list)(limit=20, order="desc")
        except self.p._sdk.APIError as exc:
            log.warning("%s: videos could not be listed before a create (%s); a create of it cut short would be "
                        "made again", self.p.name, self.p._redact(f"{type(exc).__name__}: {exc}")[:200])
            return None
        data = list(page.data)
        return (max((v.created_at for v in data), default=None), frozenset(v.id for v in data))

    async def _find(self, t: _Try, body: dict[str, Any]) -> tuple[str | None, bool]:
        """The video a lost create of ``body`` made, if the listing shows one (newest first, down to the
        snapshot's newest), and whether it was the only one; (None, False) if none, or none can be known."""
        if t.snapshot is None:
            return None, False
        newest, seen = t.snapshot
        want = _made_as(body)
        found: list[Any] = []
        try:
            n = 0
            async for v in _quiet(self.p.client.videos.list)(limit=100, order="desc"):
                n += 1
                if (newest is not None and v.created_at < newest) or n > SCAN:
                    break
                if v.id in seen or v.id in self._held or v.status == "failed":
                    continue
                if (v.model, v.prompt, str(v.seconds), v.size) == want:
                    found.append(v)
        except self.p._sdk.APIError as exc:
            log.warning("%s: videos could not be listed to find a create cut short (%s); made again", self.p.name,
                        self.p._redact(f"{type(exc).__name__}: {exc}")[:200])
            return None, False
        # A create of the same under way (another request's, the same prompt) may have made one of these, its
        # answer not back: taken here, its request and this one were answered with one video, each counting its
        # price, and this one's lost try not counted (a review). Once each has answered, its video is held.
        for done in [done for what, done in self._creating.values() if what == want]:
            await done.wait()  # bounded by the create's timeout; one made after the listing is not in it
        found = [v for v in found if v.id not in self._held]  # held meanwhile: another find took it, too
        if not found:
            return None, False
        if len(found) > 1:  # two tries' creates each made one: the others stay billed, counted as possibly so
            log.warning("%s: %d videos match a create cut short; the oldest is taken", self.p.name, len(found))
        vid = found[-1].id
        self._hold(vid)
        return vid, len(found) == 1


async def poll_to_end(p: Any, job: CallJob, read: Callable[[], Any], finished: Callable[[Any], CallOutcome | None],
                      gone: Callable[[str], CallOutcome], gave_up: Callable[[str], CallOutcome],
                      pending: Callable[[Any], str]) -> CallOutcome:
    """A video job polled to its end on the engine clock, for both video APIs (OpenAI's, Veo's): ``read()`` reads
    it (an SDK error when the read fails), ``finished(state)`` is its outcome once it has one (None while it runs);
    a 404 is ``gone(what the provider said)``; ``POLL_ERRORS`` failed reads in a row, or the poll limit (at least
    600 engine s, ``GIVE_UP_S`` times the model's expected latency), are ``gave_up(why)``, the job kept for the
    retry, ``pending(state)`` saying how it stood (state None: the last read failed)."""
    sdk = p._sdk
    give_up = p.clock.now() + max(600.0, GIVE_UP_S * sync_latency_median(p.spec, p.spec.models[job.req.model],
                                                                           job.req))
    backoff, errors = PollBackoff(POLL_MIN_S, POLL_MAX_S), 0
    while True:
        state = None
        try:
            state = await read()
            errors = 0
        except sdk.APIError as exc:
            said = p._redact(str(exc))[:200]
            if isinstance(exc, sdk.NotFoundError):
                return gone(said)
            errors += 1
            if errors >= POLL_ERRORS:
                return gave_up(f"{errors} polls failed, the last: {type(exc).__name__}: {said}")
        else:
            out = finished(state)
            if out is not None:
                return out
        if p.clock.now() >= give_up:
            return gave_up(f"{pending(state)} at the poll limit")
        await asyncio.sleep(p.clock.real_delay(backoff.next()))
