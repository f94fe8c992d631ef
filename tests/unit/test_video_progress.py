"""How far an open video is, at the endpoint's Videos API (``engine.app._endpoint_video_job``): the figure the
provider's own polls read last (OpenAI's video object carries ``progress``), kept by the dispatcher and asked of the
engine in one call per provider for all the replica's open videos. Before, a video answered ``progress: 0`` until
it was done, however far the provider said it was. No Ray."""

from __future__ import annotations

import asyncio
import time
import types

import openai
import pytest

from engine.app import _endpoint_video_job
from engine.app._endpoint_video_job import VideoJob, VideoProgress
from engine.app.endpoint import make_app
from engine.core.clock import ManualClock, ScaledClock
from engine.core.request import Request
from engine.core.result import Result
from engine.emulator import Emulator
from tests.unit.test_endpoint import serving
from tests.unit.test_endpoint_videos import WAIT_S, VideoEngine, until_ended
from tests.unit.test_http_providers import CAT, KEY, SPEED, direct

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")
POLL_SPEED = 50.0  # the provider's engine clock: polls 2-20 engine s apart are 40-400 ms real, its give-up >= 12 s


class _PolledEngine(VideoEngine):
    async def _make(self, emu):
        return direct(emu, "openai", clock=ScaledClock(time.time(), POLL_SPEED))


def _shown(client: openai.OpenAI, vid: str, want: int) -> list[int]:
    """The figures retrieve answers, asked until it shows at least ``want`` (bounded: the provider polls within
    0.4 s real)."""
    seen, limit = [], time.monotonic() + WAIT_S
    while not seen or seen[-1] < want:
        assert time.monotonic() < limit, f"video {vid} still shows {seen[-1:]} after {WAIT_S} s, not {want}"
        v = client.videos.retrieve(vid)
        assert v.status == "in_progress", v
        seen.append(v.progress)
    return seen


def test_an_open_videos_progress_is_what_the_providers_polls_read(monkeypatch):
    """The emulator's clock is held at points of the video's making; the endpoint's retrieve comes to show what the
    provider's polls read there (the emulator's own answer), never going back nor reaching 100 before it ends."""
    monkeypatch.setattr(_endpoint_video_job, "PROGRESS_EVERY_S", 0.0)  # each retrieve may ask (the rate: below)
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        making = ManualClock(emu.now())
        emu.follow(making)
        eng = _PolledEngine(emu)
        try:
            with serving(make_app(eng, catalog=CAT)) as url, \
                    openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client, \
                    openai.OpenAI(base_url=emu.base_url("openai"), api_key=KEY, max_retries=0) as at_provider:
                made = client.videos.create(model="sora-2", prompt="A heron lands on a post", seconds="4")
                assert made.progress == 0
                limit = time.monotonic() + WAIT_S
                while not (listed := at_provider.videos.list().data):  # the engine's call makes it (bounded)
                    assert time.monotonic() < limit, "the engine made no video"
                (v,) = listed
                seen: list[int] = []
                for want in (30, 70):  # the emulator's clock moved on until the provider says so much
                    while (v := at_provider.videos.retrieve(v.id)).progress < want:
                        making.advance(1.0)
                    assert v.status == "in_progress"
                    seen += _shown(client, made.id, v.progress)
                    assert seen[-1] == v.progress  # the provider's own figure, as its poll read it
                assert 70 <= seen[-1] < 100 and seen == sorted(seen), seen
                making.advance(10_000.0)
                done = until_ended(client, made.id)
                assert (done.status, done.progress) == ("completed", 100)
        finally:
            eng.close()
        assert eng.progress_asks and all(len(uids) == 1 for uids in eng.progress_asks)  # its one open video


# -- the endpoint's asks, with an engine stand-in -----------------------------------------------------------------

class _Told:
    """An engine that says each video's progress as ``figures`` holds it, counting its asks; ``fail``: it raises."""

    def __init__(self):
        self.figures: dict[str, int] = {}
        self.asks: list[tuple[str, list[str]]] = []
        self.fail = False
        self.go: asyncio.Event | None = None  # set: asks wait for it

    async def video_progress(self, provider, uids):
        self.asks.append((provider, list(uids)))
        if self.go is not None:
            await self.go.wait()
        if self.fail:
            raise TimeoutError("busy")
        return {u: self.figures[u] for u in uids if u in self.figures}


def _job(n: int, model: str = "sora-2") -> VideoJob:
    req = Request.model_validate({"id": f"v{n}", "tenant": "acme", "arrival_s": 0.0, "model": model,
                                  "prompt": "p", "body": {"seconds": "4", "size": "720x1280"}})
    job = VideoJob(f"video_{n}", req, 0)
    job.admitted = asyncio.get_running_loop().create_future()
    job.admitted.set_result(True)
    return job


def test_the_endpoint_asks_once_per_provider_for_all_its_open_videos_and_keeps_the_most_it_was_told():
    async def go():
        engine, clock = _Told(), ManualClock(0.0)
        progress = VideoProgress(engine, clock.now)
        jobs = [_job(n) for n in range(3)]
        done = _job(3)
        done.result = Result(id="v3", tenant="acme", status="ok", output="u", provider="openai")
        every = [*jobs, done]
        engine.figures = {jobs[0].req.uid: 40, jobs[1].req.uid: 100}
        await progress.refresh([jobs[0]], every)
        # One ask, for every open video of the provider (not the ended one), none of the provider itself.
        assert engine.asks == [("openai", [j.req.uid for j in jobs])]
        assert [j.view()["progress"] for j in every] == [40, 99, 0, 100]  # 100 only once it has ended
        engine.figures[jobs[0].req.uid] = 70
        await progress.refresh([jobs[0]], every)
        assert len(engine.asks) == 1 and jobs[0].view()["progress"] == 40  # asked within PROGRESS_EVERY_S: not again
        clock.advance(_endpoint_video_job.PROGRESS_EVERY_S)
        engine.figures[jobs[0].req.uid] = 20  # a new try's video, at the provider: the figure never goes back
        engine.figures[jobs[2].req.uid] = 10
        await progress.refresh([jobs[2]], every)
        assert len(engine.asks) == 2 and [j.view()["progress"] for j in jobs] == [40, 99, 10]
        # Retrieves at once share one ask; a client that leaves cancels only its own wait.
        clock.advance(_endpoint_video_job.PROGRESS_EVERY_S)
        engine.go, engine.figures[jobs[2].req.uid] = asyncio.Event(), 30
        waits = [asyncio.ensure_future(progress.refresh([j], every)) for j in jobs]
        while len(engine.asks) < 3:
            await asyncio.sleep(0)
        waits[0].cancel()
        engine.go.set()
        await asyncio.gather(*waits[1:])
        assert len(engine.asks) == 3 and jobs[2].view()["progress"] == 30
        # An engine that does not answer leaves the figures as they were, and the retrieve goes on.
        clock.advance(_endpoint_video_job.PROGRESS_EVERY_S)
        engine.go, engine.fail = None, True
        await progress.refresh(jobs, every)
        assert len(engine.asks) == 4 and [j.view()["progress"] for j in jobs] == [40, 99, 30]
        assert jobs[0].view(queued=True)["progress"] == 0  # the create's own answer: queued

    asyncio.run(go())


def test_a_provider_that_reads_no_figure_says_none():
    """Veo's operation says only whether it is done, and a simulated provider polls nothing: no figure (the
    endpoint answers 0), never an estimate."""
    from actors._video_content import progress_by
    from actors.providers._veo import VeoCalls

    assert progress_by(types.SimpleNamespace(), ["u"]) == {}
    assert VeoCalls.progress_of(None, ["u"]) == {}
