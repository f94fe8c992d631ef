"""``smartbatch serve``'s stop drains: the engine's work is cancelled, and the stop waits for what its provider
batches finished (billed) to reach the endpoint, which keeps it for the next start. The endpoint runs in this
process (uvicorn), a driver of the engine as its Ray Serve replica is; a helper measured the same through
``smartbatch serve`` and Ctrl-C with real processes (docs/service.md)."""

import io
import json
import secrets
import time

import pytest

from engine.app.driver import Engine
from engine.app.endpoint import make_app
from engine.app.live import point_at_emulator
from engine.core.catalog import default_catalog
from engine.core.settings import Settings
from engine.emulator import Emulator
from tests.integration._catalogs import OPENAI_ONLY
from tests.unit.test_endpoint import serving

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

CAT = default_catalog()
SPEEDUP = 100.0


def test_a_serve_stop_keeps_what_its_cancelled_batches_finished_and_the_restart_pays_no_line_twice(ray_session,
                                                                                                   tmp_path):
    """``smartbatch serve``'s stop with an endpoint batch riding a provider batch: the stop cancels the engine's
    work and waits (``drain``) until that provider batch has ended, so the members it finished before the cancel
    took effect (billed) reach the endpoint, which keeps them on disk; the next engine and endpoint on the same
    state ask only the other lines. Stopped at once, those members were billed unread and asked again at the
    restart: 124 of 300 lines paid twice (stop 48). Checked on the emulator's bill: one billed call per line.

    Then a driver script that fails (or is interrupted) inside ``with Engine.start(...)`` while a provider batch
    runs, on the restarted engine (an engine start of its own cost this module a third of its Ray workers):
    leaving the block cancels the engine's work and waits (``settings.stop_drain_s``) for that batch to take the
    cancel, so the members it finished (billed) resolve with their answers and the report counts them. Stopped at
    once, they were billed and never read, and the report was short of the bill by all of them."""
    import threading

    from engine.app.cli_serve import drain

    name, state, n = f"drain-{secrets.token_hex(3)}", tmp_path / "state", 24
    params = {"batch_gather_s": 0.0, "min_batch_saving_usd": 0.0}
    lines = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": 40,
                       "messages": [{"role": "user", "content": f"Summarise chapter {k} of the report."}]}}
             for k in range(n)]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    # The script's own requests: other prompts than the lines' (the same would be answered from the cache).
    reqs = [{"id": f"s{k}", "model": "gpt-4o-mini", "prompt": f"Summarise section {k} of the appendix.",
             "output_tokens": 40, "deadline_s": 86_400} for k in range(n)]
    # Members finish one by one over the provider batch's turnaround (seed 83: 637 emulator seconds, 6.4 s at
    # 100x), and go on finishing through the cancel's 100; the next batch takes 120, and the script's 454 (its
    # cancel must reach the emulator within 4.3 s of its first member's end, not to find every member finished).
    with Emulator(CAT, speedup=SPEEDUP, seed=83, cancel_s=100.0) as emu, \
            openai.OpenAI(base_url=emu.base_url("openai"), api_key="test-key", max_retries=0) as provider:
        settings = point_at_emulator(Settings(), emu, providers=("openai",))
        eng = Engine.start(settings, catalog=OPENAI_ONLY, speedup=SPEEDUP, name=name, metrics_port=None,
                           policy_params=params)
        try:
            with serving(make_app(eng, catalog=eng.catalog, state_dir=state)) as url, \
                    openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
                up = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
                batch = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")
                until = time.monotonic() + 120
                while not (made := provider.batches.list().data) or made[0].request_counts.completed < 1:
                    assert time.monotonic() < until, f"no member finished at the provider: {emu.counters()}"
                    time.sleep(0.1)  # polling the provider, as its client does
                assert drain(eng, 60.0, threading.Event()) == 0
                stopped = client.batches.retrieve(batch.id)
        finally:  # the endpoint first (leaving ``serving``), then the engine, as serve's stop does
            eng.stop()
        (first,) = provider.batches.list().data
        assert first.status == "cancelled", first.status
        ran = first.request_counts.completed
        assert 0 < ran < n, f"{ran} of {n} members finished before the cancel: the stop was not under way"
        assert stopped.status == "in_progress" and stopped.request_counts.completed == ran, stopped
        with pytest.raises(RuntimeError, match="the script failed"), \
                Engine.start(settings, catalog=OPENAI_ONLY, speedup=SPEEDUP, name=name, metrics_port=None,
                             policy_params=params) as again, \
                serving(make_app(again, catalog=again.catalog, state_dir=state)) as url, \
                openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
            until = time.monotonic() + 180
            while (done := client.batches.retrieve(batch.id)).status not in (
                    "completed", "failed", "cancelled", "expired"):
                assert time.monotonic() < until, done
                time.sleep(0.2)  # polling the HTTP API, as a client of OpenAI's batches does
            out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
            billed = emu.bill().items
            # The script's part: its requests ride a provider batch of their own when it fails.
            spent, earlier = again.report()["spend_usd"], {b.id for b in provider.batches.list().data}
            futs = again.submit_many(reqs)
            until = time.monotonic() + 120
            while not (made := [b for b in provider.batches.list().data if b.id not in earlier]) \
                    or made[0].request_counts.completed < 1:
                assert time.monotonic() < until, f"no member finished at the provider: {emu.counters()}"
                time.sleep(0.1)  # polling the provider, as its client does
            raise RuntimeError("the script failed")
        report, bill = again.report(), emu.bill()
        (script,) = [b for b in provider.batches.list().data if b.id not in earlier]
    assert done.status == "completed" and done.request_counts.completed == n, done
    assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
    assert len(billed) == n, f"{len(billed)} billed calls for {n} lines: {len(billed) - n} paid twice"
    # The with block left on the script's exception: the stop waited for its batch, and counted what it finished.
    assert script.status == "cancelled", script.status  # the stop waited for it
    ran = script.request_counts.completed
    assert 0 < ran < n, f"{ran} of {n} members finished before the cancel: the stop was not under way"
    got = [f.result(timeout=5) for f in futs]
    answered = [r for r in got if r.status == "ok"]
    assert len(answered) == ran and all(r.mode == "batch_api" and r.output for r in answered), got
    # Nothing else was sent: the rest ended cancelled, billed nothing; nor was a line of the endpoint's paid again.
    assert len(bill.items) == n + ran, f"{len(bill.items) - n} billed calls for the script's {ran} answers"
    assert report["spend_usd"] - spent == pytest.approx(bill.total_usd - sum(i.cost_usd for i in billed), abs=1e-6)
