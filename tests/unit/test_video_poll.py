"""The one poll loop both video APIs share (``actors.providers._openai_video.poll_to_end``): a 404 ends the call
as gone, failed reads in a row and the poll limit give up (the job kept for the retry), and a job's outcome ends
it. Fakes only: a read scripted state by state, an engine clock that moves by the backoff's waits."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx2
import openai

from actors.providers._openai_video import GIVE_UP_S, POLL_ERRORS, poll_to_end
from engine.core.catalog import default_catalog
from engine.core.latency import sync_latency_median
from engine.core.provider_api import CallOutcome
from engine.core.request import Request

CAT = default_catalog()
REQ = Request.model_validate({"id": "v", "arrival_s": 0.0, "model": "sora-2", "prompt": "a heron"})
URL = httpx2.Request("GET", "http://127.0.0.1/v1/videos/video_1")


class Clock:
    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def real_delay(self, engine_s: float) -> float:
        self.t += engine_s  # the wait passes on the engine clock at once: no real time
        return 0.0


def poll(script: list) -> tuple[CallOutcome, list[str], Clock]:
    """``poll_to_end`` over ``script``: each item a state the read returns, or an exception it raises; past its
    end the job keeps running ("queued")."""
    clock, said = Clock(), []
    p = SimpleNamespace(_sdk=openai, _redact=lambda text: text.replace("sk-secret", "[redacted]"), clock=clock,
                        spec=CAT.provider("openai"))
    states = iter(script)

    async def read():
        item = next(states, "queued")
        if isinstance(item, Exception):
            raise item
        return item

    def end(kind):
        def out(text):
            said.append(f"{kind}: {text}")
            return CallOutcome(False, clock.now(), 0.0, error=text)
        return out

    done = asyncio.run(poll_to_end(p, SimpleNamespace(req=REQ), read,
                                   lambda s: CallOutcome(True, clock.now(), 1.0) if s == "completed" else None,
                                   end("gone"), end("gave up"), lambda s: f"still {s or 'unread'}"))
    return done, said, clock


def failed_read() -> Exception:
    return openai.APIConnectionError(request=URL)


def test_a_job_is_polled_until_its_outcome():
    done, said, clock = poll(["queued", "in_progress", "completed"])
    assert done.ok and said == [] and clock.t > 0


def test_a_404_ends_the_call_as_gone_with_the_providers_words_redacted():
    gone = openai.NotFoundError("video_1 not found (key sk-secret)", body=None,
                                response=httpx2.Response(404, request=URL))
    done, said, _ = poll(["queued", gone])
    assert not done.ok and said == ["gone: video_1 not found (key [redacted])"]


def test_failed_reads_in_a_row_give_up_but_one_between_answers_does_not():
    done, said, _ = poll([failed_read()] * (POLL_ERRORS - 1) + ["queued"] + [failed_read()] * (POLL_ERRORS - 1)
                         + ["completed"])
    assert done.ok and said == []
    done, said, _ = poll([failed_read()] * POLL_ERRORS)
    assert not done.ok and said == [f"gave up: {POLL_ERRORS} polls failed, the last: APIConnectionError: "
                                    "Connection error."]


def test_the_poll_limit_gives_up_saying_how_the_job_stood():
    done, said, clock = poll([])
    limit = max(600.0, GIVE_UP_S * sync_latency_median(CAT.provider("openai"), CAT.model("openai", "sora-2"), REQ))
    assert not done.ok and said == ["gave up: still queued at the poll limit"]
    assert limit <= clock.t < limit + 20.0  # the poll after the limit, at most one wait (POLL_MAX_S) late
