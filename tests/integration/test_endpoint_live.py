"""The OpenAI-compatible endpoint end to end: the official ``openai`` SDK talks to Ray Serve, whose replica is a
driver of a named live engine, whose OpenAI calls go over HTTP to the provider emulator on 127.0.0.1. Only
``base_url`` differs from what an application sends to OpenAI."""

import io
import json
import secrets
import time
import urllib.request

import pytest

from engine.app.driver import Engine
from engine.app.live import point_at_emulator
from engine.app.serve_http import start_endpoint, stop_endpoint
from engine.core.catalog import default_catalog
from engine.core.settings import Settings
from engine.emulator import Emulator
from tests.integration._catalogs import OPENAI_ONLY

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")

CAT = default_catalog()
SPEEDUP = 100.0


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    name, state = f"ep-{secrets.token_hex(3)}", tmp_path_factory.mktemp("endpoint-state")
    with Emulator(CAT, speedup=SPEEDUP, seed=0) as emu:
        settings = point_at_emulator(Settings(), emu)
        # No reuse: a request id asked again is answered by the engine's ingest (its idempotency), not the cache,
        # and no test asks the same content under another id; an engine without reuse starts no cache actor.
        with Engine.start(settings, catalog=OPENAI_ONLY, speedup=SPEEDUP, name=name, metrics_port=None,
                          policy_params={"reuse_exact": False, "reuse_in_flight": False, "reuse_near": False}) as eng:
            url = start_endpoint(name, port=0, state_dir=state)
            try:
                with openai.OpenAI(base_url=url, api_key="not-a-key", max_retries=0, timeout=60) as client:
                    yield eng, url, emu, client, (name, state)
            finally:
                stop_endpoint(name)


def test_a_chat_completion_through_the_endpoint_carries_smartbatchs_decision(endpoint):
    eng, url, emu, client, _ = endpoint
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Name three rivers."}], max_tokens=50,
        extra_headers={"X-Smartbatch-Deadline": "60", "X-Smartbatch-Priority": "urgent",
                       "X-Smartbatch-Tenant": "acme", "X-Smartbatch-Request-Id": "rivers-1"})
    done = raw.parse()
    assert done.object == "chat.completion" and done.choices[0].message.content  # the emulator's answer
    assert raw.headers["x-smartbatch-mode"] == "sync" and raw.headers["x-smartbatch-request-id"] == "rivers-1"
    cost = float(raw.headers["x-smartbatch-cost-usd"])
    assert cost > 0 and float(raw.headers["x-smartbatch-saving-usd"]) >= 0
    rep = eng.report()
    assert rep["requests"] >= 1 and rep["spend_usd"] >= cost - 1e-9
    # The same id again is the same request: answered without a second call to the provider.
    calls = emu.count("chat.completions", "openai")
    again = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Name three rivers."}], max_tokens=50,
        extra_headers={"X-Smartbatch-Deadline": "60", "X-Smartbatch-Priority": "urgent",
                       "X-Smartbatch-Tenant": "acme", "X-Smartbatch-Request-Id": "rivers-1"})
    assert again.parse().choices[0].message.content == done.choices[0].message.content
    assert eng.report()["requests"] == rep["requests"] and emu.count("chat.completions", "openai") == calls


def test_a_second_engines_endpoint_on_the_same_ray_is_refused_naming_the_first(endpoint):
    # Serve gives one HTTP endpoint a cluster: a second one had its port ignored and failed with Serve's traceback.
    from engine.core.errors import ConfigError

    name = endpoint[4][0]
    with pytest.raises(ConfigError, match=f"already serves smartbatch-{name}.*leave out --address"):
        start_endpoint(f"{name}-b", port=0)


def test_a_bad_header_is_a_400_that_names_it(endpoint):
    client = endpoint[3]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                             extra_headers={"X-Smartbatch-Deadline": "soon"})
    assert err.value.body["param"] == "X-Smartbatch-Deadline"


def test_a_standard_batch_file_round_trips_through_the_sdk(endpoint):
    url, client = endpoint[1], endpoint[3]
    lines = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {k}?"}],
                       "max_tokens": 40}} for k in range(3)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}})
    data = "\n".join(json.dumps(x) for x in lines).encode()
    up = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status in ("validating", "in_progress")
    until = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < until:
        time.sleep(0.2)  # polling the HTTP API, as a client of OpenAI's batches does
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 4 and batch.request_counts.completed == 3
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["q0", "q1", "q2"]
    assert all(x["response"]["status_code"] == 200 and x["response"]["body"]["choices"][0]["message"]["content"]
               for x in out)
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert [x["custom_id"] for x in errors] == ["bad"] and "no-such-model" in json.dumps(errors)
    with urllib.request.urlopen(f"{url}/batches/{batch.id}/smartbatch_report", timeout=30) as r:
        report = json.loads(r.read())
    totals = report["totals"]
    assert (totals["lines"], totals["succeeded"], totals["failed"]) == (4, 3, 1)
    assert totals["cost_usd"] > 0 and totals["saving_usd"] == pytest.approx(totals["list_price_usd"] - totals["cost_usd"])
    assert client.batches.retrieve(batch.id).id == batch.id and any(
        b.id == batch.id for b in client.batches.list().data)
    # Ray restarts the replica (killed here, as a crash would): the new one reads the state directory and still
    # has the batch and its files.
    import ray

    name, _ = endpoint[4]

    def replica():
        """The handle of the endpoint's replica actor, while Serve runs one."""
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["namespace"] == "serve" and "REPLICA" in a["name"] and f"smartbatch-{name}" in a["name"]:
                try:
                    return ray.get_actor(a["name"], namespace="serve")
                except ValueError:  # listed as it dies
                    return None
        return None

    first = replica()
    assert first is not None
    ray.kill(first, no_restart=True)
    until = time.monotonic() + 60
    while True:  # until another replica serves (the proxy answers 503 or drops the connection meanwhile)
        if (now := replica()) is not None and now._actor_id != first._actor_id:
            try:
                again = client.batches.retrieve(batch.id)
                break
            except (openai.APIConnectionError, openai.InternalServerError):
                pass
        assert time.monotonic() < until, "the endpoint did not come back"
        time.sleep(0.2)  # polling the HTTP API, as a client does
    assert (again.status, again.request_counts, again.output_file_id) == (
        "completed", batch.request_counts, batch.output_file_id)
    assert [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()] == out



@pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")
def test_a_video_round_trips_through_the_sdks_videos_api_its_bytes_fetched_by_the_dispatcher(endpoint):
    """``client.videos`` through Serve's replica: created, polled, and its MP4 fetched by the engine's dispatcher
    with the provider's key (``Engine.video_content``), billed once at the catalog's price. Before, a 404. Its
    ``progress`` while it is made is what the dispatcher's polls read (``Engine.video_progress``): it never goes
    back, and says 100 only once the video has completed."""
    import asyncio

    from engine.core.cost import price_alone
    from engine.core.request import Request
    from engine.emulator._videos import mp4

    eng, _, emu, client, _ = endpoint
    made = client.videos.create(model="sora-2", prompt="A kingfisher dives", seconds="4",
                                extra_headers={"X-Smartbatch-Request-Id": "kingfisher-1"})
    assert made.status == "queued"
    until, seen = time.monotonic() + 60, []
    while (v := client.videos.retrieve(made.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < until, f"video still {v.status}"
        seen.append(v.progress)
        time.sleep(0.2)  # polling the HTTP API, as a client does
    assert v.status == "completed", v.error
    assert seen == sorted(seen) and all(p < 100 for p in seen) and v.progress == 100, seen
    # Asked of the dispatcher through Ray: a video no longer polled has no figure.
    assert asyncio.run(eng.video_progress("openai", [Request.model_validate(
        {"id": "kingfisher-1", "arrival_s": 0.0, "model": "sora-2", "prompt": "p"}).uid])) == {}
    raw = client.videos.with_raw_response.retrieve(made.id)
    want = price_alone(Request.model_validate({"id": "x", "arrival_s": 0.0, "model": "sora-2", "prompt": "p",
                                               "params": {"duration_s": 4, "resolution": "720p"}}), CAT, "sync").total
    assert float(raw.headers["x-smartbatch-cost-usd"]) == pytest.approx(want, abs=1e-9)
    assert client.videos.download_content(made.id).content == mp4(4)
    assert emu.count("videos", "openai") == 1
