"""Google's Veo over HTTP: the emulator's Gemini API routes (predictLongRunning, the operation, the download) and
the provider's create-then-poll against them, with the key the provider's text calls use.

Before, a video request of provider google was sent as OpenAI's Videos API at the compatibility layer's address
(``/v1/videos``, which Google does not serve), and the emulator served no Veo route."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

import httpx2
import pytest

from actors.providers._veo import create_lost, native_root
from engine.core.cost import price_alone, reserve_bound
from engine.core.request import Request
from engine.emulator import Emulator
from tests.unit.helpers import sdk_request
from tests.unit.test_http_providers import CAT, KEY, SPEED, Rig
from tests.unit.test_video_http import run_one

MODEL = "veo-3.1-fast-generate-001"


@pytest.fixture
def emu_plain():
    """Google as documented: no Idempotency-Key honoured."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as e:
        yield e


def veo(rid: str = "v", model: str = MODEL, **kw) -> Request:
    d = {"id": rid, "arrival_s": 0.0, "provider": "google", "model": model, "prompt": f"a red fox in snow ({rid})",
         "params": {"resolution": "1080p", "duration_s": 8}}
    d.update(kw)
    return Request.model_validate(d)


@pytest.mark.parametrize("model, params", [(MODEL, {"resolution": "1080p", "duration_s": 8}),
                                           ("veo-3.1-generate-001", {"resolution": "720p", "duration_s": 4})])
def test_a_veo_video_is_made_polled_and_billed_once_at_the_engines_cost(emu_plain, model, params):
    """Create, then poll the operation until done: the result is the video's URI (not its bytes), its cost the cost
    model's at the seconds and resolution sent, equal to the emulator's one bill line."""
    r = veo(model=model, params=params)

    async def go():
        rig = Rig(emu_plain, "google")
        try:
            res = await run_one(rig, r)
            (item,) = emu_plain.bill().items
            assert res.status == "ok", res.error
            assert res.cost_usd == pytest.approx(price_alone(r, CAT, "sync").total, abs=1e-12) == item.cost_usd
            assert item.route == "veo" and item.usage == {"seconds": params["duration_s"],
                                                           "resolution": params["resolution"]}
            assert res.output.startswith(emu_plain.base_url("google").rsplit("/v1", 1)[0] + "/v1beta/files/")
            await rig.settled_to(item.cost_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_veo_video_google_fails_is_not_billed_and_is_made_again(emu_plain):
    emu_plain.faults.configure({"fail_videos": {"google": 1}})

    async def go():
        rig = Rig(emu_plain, "google")
        try:
            res = await run_one(rig, veo())
            outs = [o for _, _, o in rig.calls]
            assert [o.ok for o in outs] == [False, True] and "failed: code 13" in outs[0].error
            assert outs[0].cost == 0.0 and outs[0].retryable and not outs[0].maybe_billed
            (item,) = emu_plain.bill().items  # the failed video billed nothing
            assert res.status == "ok" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            await rig.settled_to(item.cost_usd)
        finally:
            await rig.close()
    asyncio.run(go())


# A length or resolution Veo does not make is refused when the request is made (test_veo_fields.py); what the
# engine does not check, Google does.
@pytest.mark.parametrize("body, field, fix", [
    ({"parameters": {"aspectRatio": "4:3"}}, "aspectRatio", "16:9"),
    ({"parameters": {"personGeneration": "everyone"}}, "personGeneration", "allow_all"),
    ({"parameters": {"sizee": "720p"}}, "sizee", "Veo takes aspectRatio"),
])
def test_a_bad_veo_field_is_refused_unbilled_naming_the_field(emu_plain, body, field, fix):
    async def go():
        rig = Rig(emu_plain, "google")
        try:
            res = await run_one(rig, veo(body=body))
            (_, _, out), = rig.calls  # not retried: the request itself is wrong
            assert res.status == "failed" and not out.retryable and "HTTP 400" in res.error
            assert field in res.error and fix in res.error
            assert emu_plain.bill().items == ()
        finally:
            await rig.close()
    asyncio.run(go())


def lose_first_create(rig: Rig, cause: BaseException, status: int | None = None, body: str = "") -> None:
    """The rig's first Veo create fails before it reaches Google, as the SDK says it (``cause``: the transport's
    error it wraps; ``status``: an answer of that status and ``body`` instead, from whatever answered)."""
    vc, sdk = rig.d.provider._videos, rig.d.provider._sdk
    inner, tries = vc.client.post, []

    async def post(*a, **kw):
        tries.append(a)
        if len(tries) > 1:
            return await inner(*a, **kw)
        if status is not None:
            raise sdk.APIStatusError(f"Error code: {status}", response=httpx2.Response(
                status, text=body, request=sdk_request()), body=body)
        raise (sdk.APITimeoutError if isinstance(cause, httpx2.TimeoutException) else sdk.APIConnectionError)(
            request=sdk_request()) from cause

    vc.client.post = post


@pytest.mark.parametrize("fault", [{"cut_connection": True}, {"cut_body": True}, {"trickle_s": 0.3}])
def test_a_create_whose_answer_is_lost_fails_naming_the_setting_and_is_not_made_again(emu_plain, fault):
    """The create reached Google (its video made, to be billed) and its answer was lost: the connection cut, or the
    answer cut short. Google offers no key and no listing to find it by, so it is not made again: the request fails,
    its error saying the video may be billed and naming the setting that makes it again, and its budget keeps the
    call's upper bound (possibly billed). One video billed. Before, the retry made (and Google billed) a second.
    Or its answer comes a byte at a time inside the client's timeout: cut at twice that (``HttpBase._call_bound``),
    as OpenAI's video create is, it is a lost answer; before (a review of moneyhunt), the create was held for the
    answer's length times the trickle (hours at the default timeout), its request open."""
    emu_plain.faults.configure({"script": [{"provider": "google", "route": "veo", "specs": [fault]}]})
    r = veo()

    async def go():
        rig = Rig(emu_plain, "google", **({"timeout_s": 0.5} if "trickle_s" in fault else {}))
        try:
            res = await run_one(rig, r)
            (_, _, out), = rig.calls
            assert res.status == "failed" and out.maybe_billed and not out.retryable
            assert "remake_lost_veo_creates" in res.error and "not made again" in res.error
            assert "SMARTBATCH_PROVIDERS__ENDPOINTS__GOOGLE__REMAKE_LOST_VEO_CREATES=true" in res.error
            await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
            emu_plain._core.clock.offset += 10_000  # the video the lost create made completes, and is billed
            (item,) = emu_plain.bill().items
            assert [c.route for c in emu_plain.calls].count("veo") == 1 and rig.d.possibly_billed == 1
            bound = reserve_bound(r, rig.catalog, "sync", None)
            assert item.cost_usd <= bound == pytest.approx(sum(rig.budget.book.spend.values()), abs=1e-12)
            assert res.possibly_billed_usd == pytest.approx(bound, abs=1e-12)  # its batch file line says so
        finally:
            await rig.close()
    asyncio.run(go())


def test_with_the_setting_a_lost_create_is_counted_possibly_billed_and_made_again(emu_plain):
    """``remake_lost_veo_creates``: as before it, the lost try is counted as possibly billed and the retry makes a
    second video, which is the result (docs/providers.md, "Veo", the residual risk)."""
    emu_plain.faults.configure({"script": [{"provider": "google", "route": "veo", "specs": [
        {"cut_connection": True}]}]})

    async def go():
        rig = Rig(emu_plain, "google", endpoint={"remake_lost_veo_creates": True})
        try:
            res = await run_one(rig, veo())
            outs = [o for _, _, o in rig.calls]
            assert [o.ok for o in outs] == [False, True] and outs[0].maybe_billed and not outs[1].recovered
            assert res.status == "ok" and [c.route for c in emu_plain.calls].count("veo") == 2
            await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
            emu_plain._core.clock.offset += 10_000  # the first video completes too, and is billed
            first, second = emu_plain.bill().items
            assert res.cost_usd == pytest.approx(second.cost_usd, abs=1e-12) and rig.d.possibly_billed == 1
        finally:
            await rig.close()
    asyncio.run(go())


_GOOGLES_502 = json.dumps({"error": {"code": 502, "message": "Bad Gateway", "status": "UNAVAILABLE"}})


@pytest.mark.parametrize("cause, status, body", [
    (httpx2.ConnectError("[Errno 111] Connection refused"), None, ""),
    (httpx2.ConnectTimeout("timed out"), None, ""),
    (None, 502, _GOOGLES_502),  # Google's own error body: it made no operation
])
def test_a_create_that_never_reached_google_or_google_refused_is_made_again_billed_once(emu_plain, cause, status,
                                                                                        body):
    """Nothing was written (refused, a connect timeout), or Google answered with its own error: no operation was
    made, so the retry makes the one video, billed once, and nothing is counted as possibly billed. Before, a 502 in
    Google's words counted the try as possibly billed, its bound kept on the budget beside the video's price."""
    async def go():
        rig = Rig(emu_plain, "google")
        lose_first_create(rig, cause, status, body)
        try:
            res = await run_one(rig, veo())
            outs = [o for _, _, o in rig.calls]
            assert [o.ok for o in outs] == [False, True] and not outs[0].maybe_billed
            (item,) = emu_plain.bill().items
            assert res.status == "ok" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            assert rig.d.possibly_billed == 0
            await rig.settled_to(item.cost_usd)
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("cause, status, body, lost", [
    (httpx2.ConnectError("refused"), None, "", False),
    (httpx2.ConnectTimeout("connect"), None, "", False),
    (httpx2.PoolTimeout("pool"), None, "", False),
    (httpx2.ReadTimeout("read"), None, "", True),
    (httpx2.RemoteProtocolError("Server disconnected without sending a response."), None, "", True),
    (httpx2.ReadError("reset"), None, "", True),
    (None, 502, "<html><body>502 Bad Gateway</body></html>", True),  # a proxy's page
    (None, 504, json.dumps({"message": "upstream timed out"}), True),  # a proxy's JSON, not Google's
    (None, 500, "", True),
    (None, 502, _GOOGLES_502, False),
    # google.rpc's DEADLINE_EXCEEDED: "may be returned even if the operation has completed successfully"
    (None, 504, json.dumps({"error": {"code": 504, "message": "Deadline expired before operation could complete.",
                                      "status": "DEADLINE_EXCEEDED"}}), True),
    (None, 503, json.dumps({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}), False),
    (None, 429, json.dumps({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}), False),
    (None, 400, "bad", False),
])
def test_a_create_is_lost_when_sent_and_its_answer_is_not_googles(cause, status, body, lost):
    """How the SDK says a failed create (its error, the transport's as ``__cause__``, or the answer's status and
    body), read as: may have made an operation (sent, answer lost) or certainly made none."""
    import openai

    if status is not None:
        exc = openai.APIStatusError("x", response=httpx2.Response(status, text=body, request=sdk_request()),
                                    body=body)
    else:
        kind = openai.APITimeoutError if isinstance(cause, httpx2.TimeoutException) else openai.APIConnectionError
        try:
            raise kind(request=sdk_request()) from cause
        except openai.APIConnectionError as e:
            exc = e
    assert create_lost(exc, openai) is lost


def test_a_rate_limited_veo_create_waits_as_google_says_in_its_body_then_is_made(emu_plain):
    """Google's 429 carries its wait as a RetryInfo detail in the error object, no Retry-After header: the engine
    reads it, retries after it, and the video is made and billed once."""
    emu_plain.faults.configure({"script": [{"provider": "google", "route": "veo", "specs": [
        {"status": 429, "retry_after_s": 7}]}]})

    async def go():
        rig = Rig(emu_plain, "google")
        try:
            res = await run_one(rig, veo())
            (_, _, first), (_, second_at, _) = rig.calls
            assert first.rate_limited and first.retry_after_s == 7.0
            assert second_at >= first.at + 7.0 and res.status == "ok"
            (item,) = emu_plain.bill().items
            await rig.settled_to(item.cost_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_key_never_shows_in_errors_or_logs(emu_plain, caplog):
    """A refused create and a poll that fails both name what went wrong, never the key (which went in
    x-goog-api-key, with no Authorization header)."""
    emu_plain.faults.configure({"script": [{"provider": "google", "route": "veo", "specs": [
        {"status": 403, "message": f"API key {KEY} is not valid for this project"}]}]})

    async def go():
        rig = Rig(emu_plain, "google")
        try:
            with caplog.at_level(logging.DEBUG):
                res = await run_one(rig, veo())
            (_, _, out), = rig.calls
            assert res.status == "failed" and "HTTP 403" in res.error and "not valid" in res.error
            assert KEY not in res.error and KEY not in out.error and KEY not in caplog.text
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_emulator_answers_veo_as_the_gemini_api_does(emu_plain):
    """No key: a 401 in Google's shape; an operation is not done, then done with the video's URI once the emulator's
    clock passes its latency; the download is an MP4; the bill holds the video once."""
    root = native_root(emu_plain.base_url("google"))

    def call(method: str, path: str, body: dict | None = None, key: str | None = "k") -> tuple[int, bytes]:
        headers = {"content-type": "application/json", **({"x-goog-api-key": key} if key else {})}
        rq = urllib.request.Request(root + path, json.dumps(body).encode() if body is not None else None,
                                    headers, method=method)
        try:
            with urllib.request.urlopen(rq) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    create = f"v1beta/models/{MODEL}:predictLongRunning"
    status, body = call("POST", create, {"instances": [{"prompt": "a"}]}, key=None)
    assert status == 401 and json.loads(body)["error"]["status"] == "UNAUTHENTICATED"
    status, body = call("POST", create, {"instances": [{"prompt": "a"}], "parameters": {"durationSeconds": 6}})
    name = json.loads(body)["name"]
    assert status == 200 and name.startswith(f"models/{MODEL}/operations/")
    assert "done" not in json.loads(call("GET", f"v1beta/{name}")[1])
    emu_plain._core.clock.offset += 10_000  # past the job's latency
    op = json.loads(call("GET", f"v1beta/{name}")[1])
    uri = op["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]["uri"]
    assert op["done"] is True and call("GET", uri.removeprefix(root))[1][4:8] == b"ftyp"
    (item,) = emu_plain.bill().items
    assert item.usage == {"seconds": 6, "resolution": "720p"}
    openai_route = urllib.request.Request(emu_plain.base_url("google") + "/videos", b'{"prompt": "a"}',
                                          {"content-type": "application/json", "authorization": "Bearer k"})
    with pytest.raises(urllib.error.HTTPError, match="404"):  # the layer serves no Videos API, as Google's does not
        urllib.request.urlopen(openai_route)
    assert item.cost_usd == pytest.approx(6 * CAT.model("google", MODEL).per_second["720p"], abs=1e-12)


@pytest.mark.parametrize("base, root", [("https://generativelanguage.googleapis.com/v1beta/openai/",
                                         "https://generativelanguage.googleapis.com/"),
                                        ("http://127.0.0.1:8080/google/v1", "http://127.0.0.1:8080/google/")])
def test_the_native_root_is_the_compatibility_layers_base_without_its_path(base, root):
    assert native_root(base) == root
