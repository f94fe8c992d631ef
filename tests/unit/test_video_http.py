"""OpenAI's Videos API over HTTP: the emulator's jobs and bill, and the provider's create-then-poll, against it.

A video request went to the chat route and failed with "model 'sora-2' generates video, not text" before."""

from __future__ import annotations

import asyncio
import types
import warnings

import httpx2
import openai
import pytest

from actors._types import Job
from engine.core.cost import price_alone
from engine.core.provider_api import CallJob, CallOutcome
from engine.core.request import Request
from engine.emulator import Emulator
from tests.unit.test_http_providers import CAT, SPEED, Rig

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")


@pytest.fixture
def emu_plain():
    """OpenAI as documented: no Idempotency-Key honoured."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as e:
        yield e


def video(rid: str = "v", model: str = "sora-2", **kw) -> Request:
    d = {"id": rid, "arrival_s": 0.0, "model": model, "prompt": f"a red fox in snow ({rid})",
         "params": {"resolution": "720p", "duration_s": 8}}
    d.update(kw)
    return Request.model_validate(d)


async def run_one(rig: Rig, r: Request):
    """``r`` sent alone as a sync call, its budget claim reserved (settled at what the engine counts)."""
    job = Job(0, r, f"fp-{r.id}", claim="c0")
    await rig.reserve([job])
    await rig.run("sync", [job])
    return await rig.until(lambda: rig.results.get(r.id), f"the video {r.id}")


@pytest.mark.parametrize("model, resolution, size", [("sora-2", "720p", None), ("sora-2-pro", "720p", "1792x1024")])
def test_a_video_is_made_polled_and_billed_at_what_it_was_made_at(emu_plain, model, resolution, size):
    """Create, then poll until completed: the result names the video and its content address, and its cost, from
    the cost model at the seconds and size the answer reports, is the emulator's bill (a body's size of 1024p is
    billed at 1024p, though the request's params said 720p)."""
    # The body's size is what is made, and what the request's params (its budget's reservation) follow.
    r = video(model=model, params={"duration_s": 12} if size else {"resolution": resolution, "duration_s": 12},
              **({"body": {"size": size}} if size else {}))

    async def go():
        rig = Rig(emu_plain, "openai")
        try:
            res = await run_one(rig, r)
            (item,) = emu_plain.bill().items
            made = {"resolution": "1024p" if size else resolution, "duration_s": 12.0}
            want = price_alone(r.model_copy(update={"params": made}), CAT, "sync").total
            assert res.status == "ok", res.error
            assert res.cost_usd == pytest.approx(want, abs=1e-12) == item.cost_usd
            assert item.usage == {"seconds": 12, "size": size or "720x1280"}
            assert res.provider_request_id == res.raw["id"] and res.output.endswith(f"/videos/{res.raw['id']}/content")
            await rig.settled_to(item.cost_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_video_the_provider_fails_is_not_billed_and_is_made_again(emu_plain):
    emu_plain.faults.configure({"fail_videos": 1})

    async def go():
        rig = Rig(emu_plain, "openai")
        try:
            res = await run_one(rig, video())
            outs = [o for _, _, o in rig.calls]
            assert [o.ok for o in outs] == [False, True] and "video_generation_failed" in outs[0].error
            assert outs[0].cost == 0.0 and outs[0].retryable and not outs[0].maybe_billed
            (item,) = emu_plain.bill().items  # the failed job billed nothing
            assert res.status == "ok" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            await rig.settled_to(item.cost_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_create_whose_answer_is_lost_is_found_again_not_made_twice(emu_plain):
    """The create ran (its video made, to be billed) and its answer was cut short: the retry finds that video
    in the listing and polls it. Before, a second video was made and both were billed."""
    emu_plain.faults.configure({"script": [{"provider": "openai", "route": "videos", "specs": [{"cut_body": True}]}]})

    async def go():
        rig = Rig(emu_plain, "openai")
        try:
            res = await run_one(rig, video())
            outs = [o for _, _, o in rig.calls]
            assert [o.ok for o in outs] == [False, True] and outs[0].maybe_billed and outs[1].recovered
            (item,) = emu_plain.bill().items
            assert res.status == "ok" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            assert [c.route for c in emu_plain.calls].count("videos") == 1  # one create
            await rig.settled_to(item.cost_usd)  # nothing charged apart as possibly billed
            assert rig.d.possibly_billed == 0
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("body, field, fix", [
    ({"sizee": "1280x720"}, "sizee", "Unknown parameter"),  # the Videos API's own words (the emulator's since stop 71)
])
def test_a_bad_field_is_refused_unbilled_naming_the_field_and_what_it_takes(emu_plain, body, field, fix):
    async def go():
        rig = Rig(emu_plain, "openai")
        try:
            res = await run_one(rig, video(body=body))
            (_, _, out), = rig.calls  # not retried: the request itself is wrong
            assert res.status == "failed" and not out.retryable and "HTTP 400" in res.error
            assert f"'{field}'" in res.error and fix in res.error
            assert emu_plain.bill().items == ()
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_emulator_serves_the_videos_api_to_the_sdk(emu_plain):
    """Status moves queued -> completed on the emulator's clock; content is a 404 until then; the list is newest
    first; the bill holds the completed video once, at the catalog's per-second price."""
    c = openai.OpenAI(base_url=emu_plain.base_url("openai"), api_key="k", max_retries=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        a = c.videos.create(model="sora-2", prompt="a", seconds="4", size="1280x720")
        assert a.status == "queued" and a.object == "video" and a.seconds == "4" and a.size == "1280x720"
        with pytest.raises(openai.NotFoundError, match="not ready"):
            c.videos.download_content(a.id)
        b = c.videos.create(model="sora-2", prompt="b")
        assert [v.id for v in c.videos.list()] == [b.id, a.id]
        emu_plain._core.clock.offset += 10_000  # past both jobs' latency
        done = c.videos.retrieve(a.id)
        assert done.status == "completed" and done.progress == 100 and done.completed_at and done.expires_at
        assert c.videos.download_content(a.id).content[4:8] == b"ftyp"
        with pytest.raises(openai.BadRequestError, match="'seconds' must be one of"):
            c.videos.create(model="sora-2", prompt="c", seconds="6")
    bill = emu_plain.bill()
    assert [i.usage["seconds"] for i in bill.items] == [4, 4]  # b: OpenAI's default, 4 s at 720x1280
    assert bill.total_usd == pytest.approx(2 * 4 * CAT.model("openai", "sora-2").per_second["720p"], abs=1e-12)


class _Listing:
    """What ``client.videos.list`` answers: awaited, a page (``data``); iterated, its videos."""

    def __init__(self, videos: list):
        self.data = videos

    def __await__(self):
        async def page():
            await asyncio.sleep(0)
            return self
        return page().__await__()

    async def __aiter__(self):
        for v in self.data:
            await asyncio.sleep(0)  # a page read over HTTP: other calls go on meanwhile
            yield v


class _FakeVideos:
    """OpenAI's Videos API as ``VideoCalls`` uses it, each create doing what ``script`` says: ``lost`` times out
    having made nothing, ``cut`` having made its video, ``slow`` makes its video at once (listed) and answers once ``answer`` is set."""

    def __init__(self, script: list[str]):
        self.script, self.made = script, []
        self.slow_made, self.answer = asyncio.Event(), asyncio.Event()
        self.with_raw_response = types.SimpleNamespace(create=self._raw_create)

    async def create(self, *, model: str, prompt: str, seconds: str = "4", size: str = "720x1280"):
        raise AssertionError("sent through with_raw_response")

    async def _raw_create(self, *, extra_headers, model, prompt, seconds="4", size="720x1280"):
        how = self.script.pop(0)
        lost = openai.APITimeoutError(request=httpx2.Request("POST", "http://127.0.0.1/v1/videos"))
        if how == "lost":
            raise lost
        v = types.SimpleNamespace(id=f"video_{len(self.made)}", created_at=1000 + len(self.made), model=model,
                                  prompt=prompt, seconds=seconds, size=size, status="queued")
        self.made.append(v)
        if how == "cut":
            raise lost
        if how == "slow":
            self.slow_made.set()
            await self.answer.wait()
        return types.SimpleNamespace(parse=lambda: v, headers={})

    def list(self, limit: int, order: str) -> _Listing:
        return _Listing(list(reversed(self.made)))

    async def retrieve(self, vid: str):
        v = next(v for v in self.made if v.id == vid)
        return types.SimpleNamespace(**{**vars(v), "status": "completed"},
                                     model_dump=lambda **kw: {"id": v.id, "seconds": v.seconds, "size": v.size})


def _video_calls(videos: _FakeVideos):
    from actors.providers._openai_video import VideoCalls
    from engine.core.clock import ManualClock

    clock = ManualClock(0.0)

    def error(exc, status_error, timeout_error, key=""):
        return CallOutcome(False, clock.now(), 0.0, error=f"openai: {type(exc).__name__}", maybe_billed=True)

    provider = types.SimpleNamespace(
        client=types.SimpleNamespace(videos=videos, base_url="http://127.0.0.1/v1"), _sdk=openai, clock=clock,
        spec=CAT.provider("openai"), catalog=CAT, name="openai", _error=error, _redact=str,
        _call_bound=lambda timeout=None: None)  # (the fake answers at once: no bound on a create)
    return VideoCalls(provider)


def test_a_lost_create_is_not_found_as_an_identical_request_s_video_whose_create_is_under_way():
    """Two tenants' identical requests: a's create timed out having made nothing, b's made its video and its answer
    is on its way. a's retry found b's video in the listing, the only match and held by nobody yet, took it as its
    own (recovered: its lost try not counted as possibly billed), and both requests were answered with one video,
    each counting its price."""
    videos = _FakeVideos(["lost", "slow", "made"])
    calls = _video_calls(videos)
    a, b = video("a", tenant="t1"), video("b", tenant="t2", prompt=video("a").prompt)

    async def go():
        first = await calls.call(CallJob("ka", a, 0.0, 0, 0))
        b_call = asyncio.create_task(calls.call(CallJob("kb", b, 0.0, 0, 1)))
        await videos.slow_made.wait()
        a_retry = asyncio.create_task(calls.call(CallJob("ka", a, 0.0, 1, 0)))
        for _ in range(20):  # a's retry lists the videos while b's answer is on its way
            await asyncio.sleep(0)
        videos.answer.set()
        return first, await b_call, await a_retry

    first, b_out, a_out = asyncio.run(go())
    assert first.maybe_billed and b_out.ok and a_out.ok
    assert a_out.provider_request_id != b_out.provider_request_id, "a took b's video"
    assert not a_out.recovered  # its lost try may have been billed: counted so
    assert len(videos.made) == 2



def test_a_video_found_after_two_lost_creates_leaves_the_other_counted_as_possibly_billed():
    """The first create got no answer and its video is not listed (not made, or listed late: OpenAI's listing is
    all there is to go by), the second's answer was lost too and its video is found: the request was answered
    ``recovered``, and the dispatcher counted neither lost create as possibly billed, the first's video billed
    unseen where it was listed late."""
    videos = _FakeVideos(["lost", "cut"])
    calls = _video_calls(videos)
    r = video("a")

    async def go():
        return [await calls.call(CallJob("ka", r, 0.0, n, 0)) for n in range(3)]

    outs = asyncio.run(go())
    assert [o.ok for o in outs] == [False, False, True] and all(o.maybe_billed for o in outs[:2])
    assert outs[2].provider_request_id == videos.made[0].id and len(videos.made) == 1  # found, not made again
    assert not outs[2].recovered


def test_the_ids_of_the_videos_a_provider_made_are_kept_within_a_bound(monkeypatch):
    """Every video's id was kept for the life of the provider (a long serve's memory grew with each); those past
    any find's look (the ``SCAN`` newest listed) are let go, the newest kept."""
    from actors.providers import _openai_video

    monkeypatch.setattr(_openai_video, "HELD_KEEP", 3, raising=False)
    videos = _FakeVideos(["made"] * 5)
    calls = _video_calls(videos)

    async def go():
        return [await calls.call(CallJob(f"k{n}", video(f"r{n}"), 0.0, 0, n)) for n in range(5)]

    assert all(o.ok for o in asyncio.run(go()))
    assert list(calls._held) == [v.id for v in videos.made[-3:]]


def test_a_video_bodys_seconds_and_size_are_what_its_budget_reserves():
    """The body's ``seconds`` and ``size`` are what the Videos API makes and bills, but the budget reserved at the
    request's params (their defaults: 8 s at 720p): a sora-2-pro body of 12 s at 1792x1024 was reserved $2.40 and
    billed $6, past a hard limit that let it through. A size or length the model does not take (sora-2 makes no
    1024p) is refused with the request, before a reservation, no longer by the provider after it."""
    from engine.core.cost import reserve_bound

    r = Request.model_validate({"id": "v", "arrival_s": 0.0, "model": "sora-2-pro", "prompt": "a fox",
                                "body": {"seconds": "12", "size": "1792x1024"}})
    made = r.model_copy(update={"params": {"resolution": "1024p", "duration_s": 12.0}})
    assert reserve_bound(r, CAT, "sync") == pytest.approx(price_alone(made, CAT, "sync").total, abs=1e-12)
    for params, body, field in [({"duration_s": 4}, {"seconds": "12"}, "params.duration_s"),
                                ({"resolution": "720p"}, {"size": "1792x1024"}, "params.resolution"),
                                ({}, {"size": "1080x1920"}, "body.size"), ({}, {"seconds": "ten"}, "body.seconds"),
                                ({}, {"seconds": "6"}, "body.seconds")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            Request.model_validate({"id": "v", "arrival_s": 0.0, "model": "sora-2-pro", "prompt": "a fox",
                                    "params": params, "body": body})
    with pytest.raises(ValueError, match=r"body\.size '1792x1024' is not offered by 'sora-2'.*720x1280, 1280x720"):
        video(body={"size": "1792x1024"}, params={"duration_s": 8})
    with pytest.raises(ValueError, match=r"body\.seconds '5' is not offered by 'sora-2'; use one of 4, 8, 12"):
        video(body={"seconds": "5"}, params={})
