"""A Veo request's own fields, checked and priced when the request is made (docs/providers.md, "Veo"): its body's
``parameters`` (or their fields at the top) pass to Google and are what the request is reserved for and billed at,
and a length the model does not make at a resolution is refused then, naming the field and the fix. A helper's
tour found every Veo body field refused as a field of Gemini's OpenAI layer, and a 4-s video at 1080p accepted,
then failed at Google's 400."""

from __future__ import annotations

import asyncio

import pytest

from engine.core.cost import price_alone
from engine.core.request import Request, validation_context
from engine.emulator import Emulator
from tests.unit.test_gemini import gemini_settings
from tests.unit.test_http_providers import CAT, SPEED, Rig
from tests.unit.test_video_http import run_one

FAST = "veo-3.1-fast-generate-001"
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")


def veo(params=None, body=None, model: str = FAST) -> Request:
    d = {"id": "v", "arrival_s": 0.0, "model": model, "prompt": "a paper boat on a river", "params": params or {}}
    if body is not None:
        d["body"] = body
    return Request.model_validate(d, context=validation_context(CAT, gemini_settings(), live=True))


@pytest.mark.parametrize("body, seconds, resolution", [
    ({"parameters": {"durationSeconds": 4, "negativePrompt": "rain", "aspectRatio": "9:16"}}, 4, "720p"),
    ({"negativePrompt": "rain", "durationSeconds": 6}, 6, "720p"),
    ({"parameters": {"resolution": "4k"}}, 8, "4k"),
])
def test_a_veo_body_passes_and_is_what_the_request_is_priced_at(body, seconds, resolution):
    r = veo(body=body)
    assert (r.params["duration_s"], r.params["resolution"]) == (seconds, resolution)
    assert price_alone(r, CAT, "sync").total == pytest.approx(seconds * CAT.model("google", FAST).per_second[resolution])


@pytest.mark.parametrize("params, body, field, fix", [
    ({"duration_s": 4, "resolution": "1080p"}, None, "params.duration_s", "give 8, or resolution 720p"),
    ({"duration_s": 6, "resolution": "4k"}, None, "params.duration_s", "give 8, or resolution 720p"),
    ({}, {"parameters": {"durationSeconds": 4, "resolution": "1080p"}}, "body.parameters.durationSeconds", "give 8"),
    ({}, {"parameters": {"durationSeconds": 5}}, "body.parameters.durationSeconds", "use one of 4, 6, 8"),
    ({}, {"parameters": {"resolution": "2k"}}, "body.parameters.resolution", "use one of ['1080p', '4k', '720p']"),
    ({"duration_s": 4}, {"parameters": {"durationSeconds": 6}}, "params.duration_s", "give one"),
])
def test_a_length_or_resolution_veo_does_not_make_is_refused_when_made_naming_the_field(params, body, field, fix):
    with pytest.raises(ValueError) as info:
        veo(params=params, body=body)
    assert f"Value error, {field} " in str(info.value) and fix in str(info.value)


def test_a_veo_bodys_length_is_what_google_bills_and_the_engine_counts():
    """Sent as given, the body's 4 s are made and billed; the engine counts the same, not the default 8 s."""
    r = veo(body={"parameters": {"durationSeconds": 4}})

    async def go(emu):
        rig = Rig(emu, "google")
        try:
            res = await run_one(rig, r)
            (item,) = emu.bill().items
            assert res.status == "ok", res.error
            assert item.usage["seconds"] == 4 and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
        finally:
            await rig.close()
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        asyncio.run(go(emu))


def test_a_dry_run_shows_veos_own_route_under_the_gemini_apis_root():
    """It said ``/v1/videos`` at the layer's base URL, a route the docs say answers 404 there (a helper's tour)."""
    from engine.app.live import dry_run
    from engine.core.settings import ProvidersSettings, Settings

    settings = Settings(providers=ProvidersSettings(mode="http", endpoints={
        "google": {"base_url": "http://127.0.0.1:9/google/v1"}}))
    r = Request.model_validate({"id": "v", "arrival_s": 0.0, "model": FAST, "prompt": "a boat"},
                               context=validation_context(CAT, settings))
    sample = dry_run([r], catalog=CAT, settings=settings)["samples"]["google"]
    assert (sample["route"], sample["base_url"]) == (f"/v1beta/models/{FAST}:predictLongRunning",
                                                     "http://127.0.0.1:9/google/")
    assert sample["body"]["parameters"] == {"durationSeconds": 8, "resolution": "720p"}


def test_a_runs_sample_of_a_video_keeps_its_whole_address():
    """results.json cut every sample at 72 characters: a video's URL could not be fetched from it."""
    from engine.app.live import samples
    from engine.core.result import Result

    r = veo()
    url = "http://127.0.0.1:9/google/v1beta/files/op000000000000000000000003:download?alt=media"
    got = Result(id="v", status="ok", output=url, provider="google", model=FAST, mode="sync", cost_usd=0.8, real=True)
    text = Result(id="t", status="ok", output="x" * 100, provider="openai", model="gpt-5.4-mini", mode="sync",
                  real=True)
    asked = Request.model_validate({"id": "t", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "hi"})
    shown = {s["id"]: s["output"] for s in samples([got, text], [r, asked])}
    assert shown == {"v": url, "t": "x" * 72}


def test_a_stop_with_a_video_under_way_says_it_waits_for_it(caplog):
    """Ctrl-C while a video was polled was told the stop waits for provider batches to take the cancel, and
    there were none: the wait was for the video, which has no cancel and is billed when it completes."""
    import logging
    from types import SimpleNamespace

    from engine.app._driver_shared import SharedEngine

    eng = SimpleNamespace(_owner=True, _running=True, _gone=None, _puller=None, name="e",
                          wait_cancelled=lambda _s: True, wind_down=lambda _s, _cut=None: 0)
    with caplog.at_level(logging.WARNING, logger="smartbatch"):
        assert SharedEngine._drain_before_stop(eng, 600.0) == 0
    (said,) = [r.getMessage() for r in caplog.records]
    assert "calls under way to end (a video being made has no cancel and is billed when it completes)" in said


def test_base_url_google_points_the_gemini_preset_at_a_server():
    """``--base-url google=URL`` was refused ("no endpoint named 'google'"), though the emulator's banner names
    that endpoint: a user had to write the endpoints' JSON. It adds Gemini's preset at that URL beside the default
    pair; a name that is no preset is still refused."""
    from engine.app.cli_common import _providers
    from engine.core.errors import ConfigError
    from engine.core.settings import Settings

    s = _providers(Settings(), "http", ["google=http://127.0.0.1:9/google/v1"])
    google = s.providers.endpoints["google"]
    assert (google.api, google.base_url, google.api_key_env) == ("openai", "http://127.0.0.1:9/google/v1",
                                                                 "GEMINI_API_KEY")
    assert {"openai", "anthropic"} <= set(s.providers.endpoints)
    with pytest.raises(ConfigError, match="no endpoint named 'mistral'"):
        _providers(Settings(), "http", ["mistral=http://127.0.0.1:9/v1"])


@pytest.mark.parametrize("model, duration", [("sora-2", 4), (FAST, 4)])
def test_a_rerun_of_a_video_against_a_server_that_honours_the_key_gets_the_same_video_at_no_cost(model, duration):
    """A second run of the same trace against the same emulator: the Sora create was a 409 ("a different request
    body": the SDK draws a new multipart boundary per send) and its request failed; the Veo one was the first
    run's operation, replayed and billed nothing, and counted again at full price (a helper's tour)."""
    r = Request.model_validate({"id": "again", "arrival_s": 0.0, "model": model, "prompt": "A heron",
                                "params": {"duration_s": duration}})

    async def go(emu):
        first, second = Rig(emu, r.provider), Rig(emu, r.provider)  # two runs of the same request
        try:
            a = await run_one(first, r)
            b = await run_one(second, r)
            assert a.status == b.status == "ok", (a.error, b.error)
            assert b.output == a.output and a.cost_usd > 0 and b.cost_usd == 0.0
            assert a.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12) and len(emu.bill().items) == 1
            assert (await second.d.stats())["replayed"] == 1
        finally:
            await first.close()
            await second.close()
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        asyncio.run(go(emu))


def test_run_writes_every_result_so_each_videos_address_is_in_a_file(tmp_path, monkeypatch):
    """``run`` kept four samples in results.json: a video trace's other addresses, paid for, were in no file (a
    helper's tour). Every result goes to results.jsonl, without the provider's raw body. The live run is a
    stand-in that answers as ``run_live`` does (it needs Ray)."""
    import json

    from typer.testing import CliRunner

    import engine.app.bench as bench
    import engine.app.cli as cli
    from engine.core.result import Result

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"v{i}", "arrival_s": i, "model": FAST, "prompt": f"A boat {i}",
                                         "params": {"duration_s": 4}}) + "\n" for i in range(6)))

    def live(reqs, name, *args, results=None, **kwargs):
        results.extend(Result(id=r.id, status="ok", output=f"https://g/v1beta/files/{r.id}:download?alt=media",
                              provider="google", model=FAST, mode="sync", cost_usd=0.4, real=True,
                              raw={"name": r.id}) for r in reqs)
        row = {"policy": "smart (live)", "cost_usd": 2.4, "saving_vs_naive": 0.0, "capture_of_achievable": 1.0,
               "deadline_met_frac": 1.0, "deadline_met_by_priority": {}, "failed": 0, "rejected": {},
               "exact_hits": 0, "in_flight_hits": 0, "near_hits": 0, "recommendations": {}}
        return {"trace": name, "requests": len(reqs), "lower_bound_usd": 2.4, "results": [row],
                "engine_report": {"requests": len(reqs)}, "samples": []}

    monkeypatch.setattr(cli, "_live", live)
    monkeypatch.setattr(bench, "write_outputs", lambda doc, out: {"json": "j", "markdown": "m", "plot": "p"})
    r = CliRunner().invoke(cli.app, ["run", str(trace), "--providers", "sim", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert [x["output"] for x in lines] == [f"https://g/v1beta/files/v{i}:download?alt=media" for i in range(6)]
    assert all("raw" not in x for x in lines) and "results.jsonl" in r.output
