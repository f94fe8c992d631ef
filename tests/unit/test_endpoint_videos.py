"""OpenAI's Videos API at the endpoint, with the official ``openai`` SDK's ``client.videos``: the endpoint under
uvicorn, an engine stand-in whose every request is the call a dispatcher makes through the OpenAI provider alone,
and the emulator's Videos API behind it (no Ray). Before, ``/v1/videos`` was a 404 saying "This endpoint has no
video route": every test here failed at its first call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time

import openai
import pytest
from pydantic import ValidationError

from actors._video_content import content_by, progress_by
from engine.app.endpoint import HEADER_COST, HEADER_MODE, HEADER_REQUEST_ID, make_app
from engine.core.cost import price_alone
from engine.core.errors import RequestError
from engine.core.request import Request, validation_context
from engine.core.result import Result
from engine.core.trace import _problems_of
from engine.emulator import Emulator
from engine.emulator._videos import mp4
from engine.runtime.outcomes import ok_result
from tests.unit.test_endpoint import serving
from tests.unit.test_http_providers import CAT, KEY, SPEED, direct, http_settings, job_of

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")
WAIT_S = 10.0  # real seconds any wait here is bounded by


class VideoEngine:
    """The engine's asyncio face for videos: each request one call through the OpenAI provider alone at the
    emulator (``direct``), run on a loop of its own as a dispatcher's would be; a video's bytes fetched as the
    dispatcher fetches them (``content_by``, with the provider's key). A (tenant, id) submitted again gets the same
    future, as the engine's does. While ``hold()`` is on, calls wait before they start."""

    def __init__(self, emu: Emulator):
        self.settings, self.gone = http_settings(emu), None
        self._ctx = validation_context(CAT, self.settings, live=True)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.provider = self._on_loop(self._make(emu))
        self._go = self._on_loop(self._event())
        self.futs: dict[tuple[str, str], concurrent.futures.Future] = {}
        self.submitted: list[str] = []  # every submission's id, in order
        self.progress_asks: list[list[str]] = []  # the uids of each ask of ``video_progress``

    async def _make(self, emu):
        return direct(emu, "openai")

    async def _event(self) -> asyncio.Event:
        ev = asyncio.Event()
        ev.set()
        return ev

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def hold(self) -> None:
        self.loop.call_soon_threadsafe(self._go.clear)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._go.set)

    def submit_many(self, ds: list[dict]) -> list[concurrent.futures.Future]:
        reqs = []
        for d in ds:  # all refused, or all queued
            try:
                reqs.append(Request.model_validate({**d, "arrival_s": 0.0}, context=self._ctx))
            except ValidationError as exc:
                field, msg = _problems_of(exc)[0]
                raise RequestError(d.get("id"), field, msg) from None
        futs = []
        for req in reqs:
            self.submitted.append(req.id)
            key = (req.tenant, req.id)
            if key not in self.futs:
                self.futs[key] = asyncio.run_coroutine_threadsafe(self._call(req), self.loop)
            futs.append(self.futs[key])
        return futs

    async def _call(self, req: Request) -> Result:
        await self._go.wait()
        job = job_of(req)
        out = await self.provider.call(job._replace(body=self.provider.sync_body(job)))
        if not out.ok:
            return Result(id=req.id, tenant=req.tenant, status="failed", error=out.error, provider=req.provider)
        return ok_result(req, at=0.0, cost=out.cost, mode="sync", batch_id=None, recommendation=None, reason="",
                         out=out)

    async def as_completed(self, futures):
        for f in futures:  # shielded, as the engine's: a wait cancelled (a shutdown) never cancels the request
            yield await asyncio.shield(asyncio.wrap_future(f))

    async def video_content(self, provider: str, url: str, variant: str = "video"):
        got = asyncio.run_coroutine_threadsafe(content_by(self.provider, provider, self.settings, url, variant),
                                               self.loop)
        return await asyncio.wrap_future(got)

    async def video_progress(self, provider: str, uids):
        """As the dispatcher answers it (``progress_by``: the figures its provider's polls read last)."""
        self.progress_asks.append(list(uids))
        got = asyncio.run_coroutine_threadsafe(_progress(self.provider, list(uids)), self.loop)
        return await asyncio.wrap_future(got)

    def close(self) -> None:
        self.release()
        self._on_loop(self.provider.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)


async def _progress(provider, uids):
    return progress_by(provider, uids)


@pytest.fixture
def rig():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with serving(make_app(eng, catalog=CAT)) as url, \
                    openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
                yield eng, client, emu
        finally:
            eng.close()


def creates(emu: Emulator) -> int:
    return [c.route for c in emu.calls].count("videos")


def until_ended(client: openai.OpenAI, vid: str):
    """Poll the retrieve route until the video has ended (a bounded loop: the emulator makes it in milliseconds)."""
    limit = time.monotonic() + WAIT_S
    while (v := client.videos.retrieve(vid)).status in ("queued", "in_progress"):
        assert time.monotonic() < limit, f"video {vid} still {v.status} after {WAIT_S} s"
    return v


def test_a_video_is_created_polled_downloaded_and_billed_once_at_the_catalogs_price(rig):
    eng, client, emu = rig
    eng.hold()  # the engine has no result yet: the create answers at once, and retrieve says it is being made
    made = client.videos.create(model="sora-2", prompt="A heron lands on a post", seconds="8", size="1280x720",
                                extra_headers={HEADER_REQUEST_ID: "heron-1"})
    assert (made.object, made.status, made.model, made.seconds, made.size) == ("video", "queued", "sora-2", "8",
                                                                               "1280x720")
    assert client.videos.retrieve(made.id).status == "in_progress" and creates(emu) == 0
    # Where the SDK reads a call's id (``_request_id``), as the other routes' answers say it (a review: None here).
    assert made._request_id == client.videos.retrieve(made.id)._request_id == "heron-1"
    eng.release()
    done = until_ended(client, made.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    raw = client.videos.with_raw_response.retrieve(made.id)
    # The cost model's price for 8 s at 720p, which the emulator billed once.
    want = price_alone(Request.model_validate({"id": "x", "arrival_s": 0.0, "model": "sora-2", "prompt": "p",
                                               "params": {"duration_s": 8, "resolution": "720p"}}), CAT, "sync").total
    (item,) = emu.bill().items
    assert float(raw.headers[HEADER_COST]) == pytest.approx(want, abs=1e-9) == item.cost_usd
    assert raw.headers[HEADER_MODE] == "sync" and raw.headers[HEADER_REQUEST_ID] == "heron-1"
    got = client.videos.download_content(made.id)
    assert got.content == mp4(8) and got.response.headers["content-type"] == "video/mp4"
    with pytest.raises(openai.BadRequestError) as caught:  # the provider's own refusal, passed on
        client.videos.download_content(made.id, variant="thumbnail")
    assert caught.value.body["param"] == "variant"
    # The same create again (the SDK's retry, or the app's): the same video, never a second.
    again = client.videos.create(model="sora-2", prompt="A heron lands on a post", seconds="8", size="1280x720",
                                 extra_headers={HEADER_REQUEST_ID: "heron-1"})
    assert (again.id, again.status) == (made.id, "completed") and creates(emu) == 1 and eng.submitted == ["heron-1"]
    assert again._request_id == client.videos.retrieve(made.id)._request_id == "heron-1"
    assert [v.id for v in client.videos.list()] == [made.id]
    assert client.videos.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(made.id)
    assert len(emu.bill().items) == 1


@pytest.mark.parametrize("kw, param, said", [
    ({"seconds": "5"}, "seconds", "'sora-2'"),
    ({"size": "1792x1024"}, "size", "720x1280, 1280x720"),
    ({"model": "gpt-5-mini"}, "model", "makes text, not video"),
    ({"model": "sora-3"}, "model", "did you mean"),
    ({"model": "veo-3.1-generate-001"}, "model", "not made through OpenAI's Videos API"),
    # Since stop 82 (a helper's tour) the Sora models it names come with their shutdown: named bare, as the fix.
    ({"model": "veo-3.1-generate-001"}, "model", "shut down at OpenAI: sora-2 on 2026-09-24, sora-2-pro on "
                                                 "2026-09-24; a server that still offers the Videos API"),
])
def test_a_bad_field_is_a_400_naming_it_and_nothing_is_admitted(rig, kw, param, said):
    eng, client, emu = rig
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.create(**{"model": "sora-2", "prompt": "A heron", **kw})
    assert caught.value.body["param"] == param and said in caught.value.body["message"]
    assert eng.submitted == [] and creates(emu) == 0


def test_an_unknown_video_is_a_404_in_openais_shape(rig):
    _, client, _ = rig
    for call in (client.videos.retrieve, client.videos.download_content, client.videos.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            call("video_nonesuch")
        assert caught.value.body["code"] == "video_not_found" and caught.value.body["param"] == "video_id"


def test_a_failed_video_says_why_and_has_no_content(rig):
    eng, client, emu = rig
    emu.faults.configure({"fail_videos": 1})
    made = client.videos.create(model="sora-2", prompt="A heron", seconds="4")
    done = until_ended(client, made.id)
    assert done.status == "failed" and "video_generation_failed" in done.error.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.download_content(made.id)
    assert caught.value.body["code"] == "video_not_ready" and not emu.bill().items


def test_a_download_never_shows_the_providers_key(rig):
    """The dispatcher fetches only an address under its provider's base_url (a result of another endpoint is
    refused, the key not sent), and a provider error it passes on is masked."""
    eng, _, _ = rig
    code, body, _ = asyncio.run(eng.video_content("openai", "http://elsewhere.test/v1/videos/video_1/content"))
    assert code == 409 and body["error"]["code"] == "video_address_elsewhere"
    base = str(eng.provider.client.base_url).rstrip("/")
    code, body, _ = asyncio.run(eng.video_content("openai", f"{base}/videos/video_nonesuch/content"))
    assert code == 404 and KEY not in str(body) and "not found" in body["error"]["message"]


@contextlib.contextmanager
def restarted(eng: VideoEngine, state_dir):
    """An endpoint started on ``state_dir`` (as a replica that restarts on it) and a client of it."""
    with serving(make_app(eng, catalog=CAT, state_dir=state_dir)) as url, \
            openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
        yield client


def test_videos_survive_a_restart_with_the_state_directory_and_an_open_one_is_not_made_twice(tmp_path):
    """An ended video is answered as it was; one still being made is asked of the engine again under the same
    request id, which the engine answers without making it again (one create at the provider)."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with restarted(eng, tmp_path) as client:
                ended = until_ended(client, client.videos.create(model="sora-2", prompt="A heron").id)
                eng.hold()
                open_ = client.videos.create(model="sora-2-pro", prompt="A crane", seconds="12")
            eng.release()
            with restarted(eng, tmp_path) as client:
                assert client.videos.retrieve(ended.id).status == "completed"
                assert until_ended(client, open_.id).status == "completed"
                assert client.videos.download_content(open_.id).content == mp4(12)
                assert [v.id for v in client.videos.list()] == [open_.id, ended.id]
        finally:
            eng.close()
        assert creates(emu) == 2 and eng.submitted.count(eng.submitted[-1]) == 2  # asked again, made once


def test_an_open_video_the_engine_refuses_after_a_restart_fails_saying_why_and_is_not_asked_again(tmp_path):
    """Before (a review of stop 67), a video still being made at a restart that the new engine refused (full,
    stopped, the request no longer valid) stayed ``in_progress`` for the endpoint's life, and was refused again at
    every start. Now it fails, saying why, as an open batch does then."""
    from engine.core.errors import Overloaded

    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with restarted(eng, tmp_path) as client:
                eng.hold()
                open_ = client.videos.create(model="sora-2", prompt="A crane")
            submit_many, asked = eng.submit_many, len(eng.submitted)

            def full(ds):
                raise Overloaded("100 requests are unfinished (max_pending=100)")

            eng.submit_many = full
            with restarted(eng, tmp_path) as client:
                v = client.videos.retrieve(open_.id)
                assert v.status == "failed" and "engine refused this video" in v.error.message
                assert "max_pending=100" in v.error.message
            eng.submit_many = submit_many
            with restarted(eng, tmp_path) as client:
                assert client.videos.retrieve(open_.id).status == "failed"  # ended: kept so, never asked again
            assert len(eng.submitted) == asked
        finally:
            eng.close()


def test_downloads_past_the_dispatchers_bound_are_refused_at_once():
    """Slow downloads pile up at a dispatcher no further than ``CONTENT_CONCURRENCY``: one more is a 429 at once,
    never sent, and once they end a download goes through again (each held an actor method slot and a connection)."""
    from actors._video_content import CONTENT_CONCURRENCY, VideoContent
    from engine.core.settings import Settings

    class SlowProvider:
        def __init__(self):
            self.release, self.asked = asyncio.Event(), 0

        async def video_content(self, url, variant):
            self.asked += 1
            await self.release.wait()
            return 200, b"mp4", "video/mp4"

    class D(VideoContent):
        def __init__(self):
            self.provider, self.name, self.settings = SlowProvider(), "openai", Settings()

    async def go():
        d = D()
        slow = [asyncio.ensure_future(d.video_content("u", "video")) for _ in range(CONTENT_CONCURRENCY)]
        while d.provider.asked < CONTENT_CONCURRENCY:
            await asyncio.sleep(0)  # each started download reaches the provider (no timer: the loop's next turn)
        status, body, _ = await asyncio.wait_for(d.video_content("u", "video"), WAIT_S)  # (a bound)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        assert d.provider.asked == CONTENT_CONCURRENCY  # never sent
        d.provider.release.set()
        assert [s for s, _, _ in await asyncio.gather(*slow)] == [200] * CONTENT_CONCURRENCY
        assert (await d.video_content("u", "video"))[0] == 200

    asyncio.run(go())


@pytest.mark.parametrize("key", [KEY, "NEVERSHOWN-plain-key-1234567890abcdef"], ids=["sk-shaped", "plain"])
def test_a_download_refused_quoting_the_providers_key_never_shows_it(key):
    """The provider answers the download with an error that quotes the key back (as OpenAI's 401 does): the
    answer passed on has it masked, a key shaped like one or not (the one the provider holds, by value)."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        async def go():
            p = direct(emu, "openai", key=key)
            try:
                emu.faults.script("openai", "videos.content",
                                  [{"status": 401, "message": f"Incorrect API key provided: {key}",
                                    "code": f"invalid_api_key:{key}"}])
                base = str(p.client.base_url).rstrip("/")
                return await content_by(p, "openai", p.settings, f"{base}/videos/video_1/content", "video")
            finally:
                await p.close()
        code, body, _ = asyncio.run(go())
    assert code == 401 and key not in str(body) and "[redacted]" in body["error"]["message"]
    assert body["error"]["code"].startswith("invalid_api_key:")  # the code too, its key masked (stop 68)


def test_a_listing_that_deletes_as_it_goes_reaches_every_video(rig):
    """The SDK's auto-paging asks each page ``after`` the last id of the one before; a loop that deletes each video
    it is given (clearing out the videos made) has deleted that one by then. Before, the next page was a 400 "after
    ... is not an id of this list", so the loop stopped after its first page. Now it goes on from where the deleted
    video was listed, in either order."""
    eng, client, _ = rig
    made = [client.videos.create(model="sora-2", prompt=f"A heron, take {k}").id for k in range(5)]
    for vid in made:
        until_ended(client, vid)
    for order in ("desc", "asc"):
        seen = []
        for v in client.videos.list(limit=2, order=order):
            seen.append(v.id)
            client.videos.delete(v.id)
        assert seen == (made[::-1] if order == "desc" else made)
        made = [client.videos.create(model="sora-2", prompt=f"A crane, take {k}").id for k in range(5)]
        for vid in made:
            until_ended(client, vid)
    with pytest.raises(openai.BadRequestError) as caught:  # an id never listed is still refused, naming 'after'
        client.videos.list(after="video_nonesuch")
    assert caught.value.body["param"] == "after"


def _without_sora_2_pro(eng):
    """The catalog with OpenAI's sora-2-pro left out (a catalog file changed between two starts)."""
    p = CAT.providers["openai"]
    models = {k: v for k, v in p.models.items() if k != "sora-2-pro"}
    return CAT.model_copy(update={"providers": {**CAT.providers, "openai": p.model_copy(update={"models": models})}})


def _without_openais_endpoint(eng):
    """The settings with no endpoint for OpenAI (a restart whose environment lacks it): its requests refused."""
    p = eng.settings.providers
    eng.settings = eng.settings.model_copy(update={"providers": p.model_copy(update={
        "endpoints": {k: v for k, v in p.endpoints.items() if k != "openai"}, "simulate_others": False})})
    return CAT


@pytest.mark.parametrize("change", [_without_sora_2_pro, _without_openais_endpoint])
def test_videos_whose_requests_a_restart_no_longer_takes_are_kept_not_set_aside(tmp_path, change):
    """Before (a review of stop 68), a restart whose catalog or provider settings no longer took a video's request
    read its record as unreadable: renamed ``*.bad`` and left out, so a video made and billed was a 404 from then
    on, even once the settings were put back. Now an ended one is answered as it was, an open one fails saying
    why (it may have been billed), and both are there again at the next start."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        eng.emu, settings = emu, eng.settings
        try:
            with restarted(eng, tmp_path) as client:
                ended = until_ended(client, client.videos.create(model="sora-2-pro", prompt="A heron").id)
                eng.hold()
                open_ = client.videos.create(model="sora-2-pro", prompt="A crane")
            asked = len(eng.submitted)
            with serving(make_app(eng, catalog=change(eng), state_dir=tmp_path)) as url, \
                    openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
                got = client.videos.with_raw_response.retrieve(ended.id)
                assert got.parse().status == "completed" and got.headers[HEADER_REQUEST_ID]
                v = client.videos.retrieve(open_.id)
                assert v.status == "failed" and "refused this video" in v.error.message, v
                assert {x.id for x in client.videos.list()} == {ended.id, open_.id}
            assert len(eng.submitted) == asked  # never asked of an engine that refuses it
            eng.settings = settings
            with restarted(eng, tmp_path) as client:
                assert client.videos.download_content(ended.id).content == mp4(4)
                assert client.videos.retrieve(open_.id).status == "failed"
        finally:
            eng.close()
        assert not list(tmp_path.glob("videos/*.bad"))


@pytest.mark.parametrize("junk", ["[1, 2]", "null", '"video"', '{"id": "video_elsewhere"}'])
def test_a_video_record_that_is_not_one_is_set_aside_and_the_endpoint_starts(tmp_path, junk):
    """A ``videos/*.json`` that parses but is no video's record (a list, a string, a record of another name: a disk
    fault, a hand edit). Before (a review of stop 68), the sort of the records by time raised on it, and the
    endpoint did not start: every video, and every route, gone with it. Now it is set aside as unreadable records
    are, and the videos beside it are answered."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with restarted(eng, tmp_path) as client:
                ended = until_ended(client, client.videos.create(model="sora-2", prompt="A heron").id)
            (tmp_path / "videos" / "video_junk.json").write_text(junk)
            with restarted(eng, tmp_path) as client:
                assert [v.id for v in client.videos.list()] == [ended.id]
        finally:
            eng.close()
        assert [p.name for p in tmp_path.glob("videos/*.bad")] == ["video_junk.json.bad"]


@pytest.mark.parametrize("field, value", [("seconds", ""), ("size", ""), ("seconds", 0), ("model", "")])
def test_an_empty_or_zero_field_is_a_400_naming_it_not_openais_default(rig, field, value):
    """A field given as "" (an empty form field) or 0 (JSON) is a value the model does not take, not one left
    out. Before (a review of stop 68), it took OpenAI's default: a 4 s, 720x1280 sora-2 video made and billed that
    the client had not asked for. The emulator refuses them too, as OpenAI's enums do (it took the default of an
    empty size or model)."""
    eng, client, emu = rig
    with openai.OpenAI(base_url=emu.base_url("openai"), api_key=KEY, max_retries=0, timeout=WAIT_S) as direct_:
        for c in (client, direct_):
            with pytest.raises(openai.BadRequestError) as caught:
                if isinstance(value, str):  # the SDK's multipart form
                    c.videos.create(**{"prompt": "A heron", field: value})
                else:
                    c.post("/videos", body={"prompt": "A heron", field: value}, cast_to=openai.types.Video)
            assert caught.value.body["param"] == field
            if c is client:
                assert eng.submitted == [] and creates(emu) == 0
    assert not emu.bill().items


def test_a_null_field_is_one_left_out_at_the_endpoint_and_the_emulator(rig):
    """JSON null takes OpenAI's default, as a field left out does, at both (the emulator answered a null seconds
    with a 400 quoting 'None', while its null model or size took the default: a review of stop 68)."""
    eng, client, emu = rig
    body = {"prompt": "A heron", "model": None, "seconds": None, "size": None}
    with openai.OpenAI(base_url=emu.base_url("openai"), api_key=KEY, max_retries=0, timeout=WAIT_S) as direct_:
        for c in (client, direct_):
            v = c.post("/videos", body=body, cast_to=openai.types.Video)
            assert (v.model, v.seconds, v.size) == ("sora-2", "4", "720x1280")


class SlowToAdmit(VideoEngine):
    """Takes a create only once the SDK's retry of it has come (``retried``): the first try outlives the client's
    timeout, as a create waiting for room in a full engine may."""

    def __init__(self, emu: Emulator):
        super().__init__(emu)
        self.retried = threading.Event()

    def submit_many(self, ds):
        assert self.retried.wait(WAIT_S)
        return super().submit_many(ds)


def test_an_sdk_video_create_that_outlived_its_timeout_is_one_video_and_a_first_try_is_a_video_of_its_own():
    """The SDK retries a create that timed out, with the same fields and no key of its own. Before, each try was a
    video of its own, made and billed twice (the retry's id was fresh); now the retry (``x-stainless-retry-count``
    above 0) takes the video of the try it repeats, as a batch create's does. A first try is always a new video."""
    from engine.app._endpoint_retries import RETRY_COUNT
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = SlowToAdmit(emu)
        app = make_app(eng, catalog=CAT)

        async def seen(scope, receive, send):  # the app, told when the SDK's retry comes
            if (RETRY_COUNT.encode(), b"1") in scope.get("headers", ()):
                eng.retried.set()
            await app(scope, receive, send)
        ask = {"model": "sora-2", "prompt": "A heron lands on a post", "seconds": "4", "size": "720x1280"}
        try:
            with serving(seen) as url, openai.OpenAI(base_url=url, api_key="unused", max_retries=1,
                                                     timeout=0.5) as client:
                made = client.videos.create(**ask)
                # (the 0.5 s timeout is the create's premise alone: a loaded machine's poll may outlast it)
                polls = client.with_options(timeout=WAIT_S)
                assert until_ended(polls, made.id).status == "completed"
                assert [v.id for v in polls.videos.list()] == [made.id]  # one video, though created twice
                assert creates(emu) == 1 and len(emu.bill().items) == 1 and eng.submitted == [made.id]
                again = polls.videos.create(**ask)  # a first try: a video of its own
                assert again.id != made.id and until_ended(polls, again.id).status == "completed"
                assert creates(emu) == 2 and len(emu.bill().items) == 2
        finally:
            eng.close()


def test_an_sdk_retry_of_a_video_create_after_a_restart_takes_the_video_its_try_made(tmp_path):
    """With a state directory, a video made by an SDK's try keeps what its retry repeats: a retry that comes after
    a restart (within 120 s of the create) is answered with that video, never a second one. Before, the table was
    the replica's memory alone, and the retry made and billed a second video."""
    from engine.app._endpoint_retries import RETRY_COUNT
    ask = {"model": "sora-2", "prompt": "A heron", "seconds": "4", "size": "720x1280"}
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with restarted(eng, tmp_path) as client:
                made = client.videos.create(**ask, extra_headers={RETRY_COUNT: "0"})
                until_ended(client, made.id)
            with restarted(eng, tmp_path) as client:
                assert client.videos.create(**ask, extra_headers={RETRY_COUNT: "1"}).id == made.id
                fresh = client.videos.create(**ask, extra_headers={RETRY_COUNT: "0"})  # a first try: its own
                other = client.with_options(default_headers={"X-Smartbatch-Tenant": "globex"})
                theirs = other.videos.create(**ask, extra_headers={RETRY_COUNT: "1"})  # another tenant's: its own
                assert len({made.id, fresh.id, theirs.id}) == 3
                until_ended(client, fresh.id), until_ended(other, theirs.id)
                assert creates(emu) == 3
        finally:
            eng.close()


def test_a_video_record_of_the_version_before_is_taken_by_its_retry_and_written_again_keyed(tmp_path, monkeypatch):
    """A record written before a review (revlog) kept its create's plain hash (``retry_key``); the table now holds
    the creates' keys keyed by the state directory's secret (``retry_h``), so such a record is keyed at the start:
    its retry across the upgrade still takes the video, and the record is written again without the plain hash."""
    import json

    from engine.app._endpoint_retries import RETRY_COUNT, SdkRetries
    plain: list[str] = []
    real = SdkRetries.key
    monkeypatch.setattr(SdkRetries, "key", staticmethod(lambda *a: plain.append(real(*a)) or plain[-1]))
    ask = {"model": "sora-2", "prompt": "A heron", "seconds": "4", "size": "720x1280"}
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = VideoEngine(emu)
        try:
            with restarted(eng, tmp_path) as client:
                made = client.videos.create(**ask, extra_headers={RETRY_COUNT: "0"})
                until_ended(client, made.id)
            record = tmp_path / "videos" / f"{made.id}.json"
            rec = json.loads(record.read_bytes())
            assert rec["retry_h"] != plain[0] and plain[0].encode() not in record.read_bytes()
            rec.pop("retry_h")
            rec["retry_key"] = plain[0]  # as the version before wrote it
            record.write_text(json.dumps(rec))
            with restarted(eng, tmp_path) as client:
                assert client.videos.create(**ask, extra_headers={RETRY_COUNT: "1"}).id == made.id
                assert creates(emu) == 1
            assert plain[0].encode() not in record.read_bytes()
        finally:
            eng.close()
