"""`smartbatch serve --state-dir` killed with SIGKILL while an endpoint batch rides a provider batch, then served
again on the same directory: what that provider batch finished (billed) answers its lines, which are not sent
again (a helper's hunt: all 60 lines of such a batch were billed twice)."""

import io
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.emulator import Emulator
from tests.integration._catalogs import OPENAI_ONLY, openai_only_file

openai = pytest.importorskip("openai")

BIN = Path(sys.executable).parent / "smartbatch"
SPEEDUP = 100.0
N = 40
FINAL = ("completed", "failed", "cancelled", "expired")


class _Serve:
    """``smartbatch serve`` in its own process group, its output read in a thread (so a wait on it is bounded)."""

    def __init__(self, name: str, state: Path, emu: Emulator, tmp: Path):
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--name", name, "--http-port", "0", "--state-dir", str(state),
             "--catalog", str(openai_only_file(tmp)), "--providers", "http",
             "--base-url", f"openai={emu.base_url('openai')}", "--speedup", str(SPEEDUP)],
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": "emu-key"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(
            target=lambda: [self.lines.put(x) for x in self.proc.stdout] + [self.lines.put(None)], daemon=True)
        self.reader.start()

    def endpoint(self) -> str:
        url = None
        while True:
            line = self.lines.get(timeout=180)
            assert line is not None, "serve exited early:\n" + "".join(self.seen)
            self.seen.append(line)
            url = line.split(" at ", 1)[1].strip() if line.startswith("OpenAI-compatible endpoint at") else url
            if line.startswith("stop:"):
                return url

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.reader.join(30)  # at the pipe's end: every process holding it is gone
        self.proc.stdout.close()
        self.seen.extend(x for x in iter(self.lines.get_nowait, None))


@pytest.mark.timeout(600)
def test_a_serve_killed_while_its_provider_batch_runs_pays_no_line_twice_after_its_restart(tmp_path):
    name, state = f"crash-{secrets.token_hex(3)}", tmp_path / "state"
    lines = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": 200,
                       "messages": [{"role": "user", "content": f"Summarise chapter {k} of the long report."}]}}
             for k in range(N)]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    assert OPENAI_ONLY.providers.keys() == {"openai"}
    with Emulator(OPENAI_ONLY, speedup=SPEEDUP, seed=83, cancel_s=100.0) as emu:
        provider = openai.OpenAI(base_url=emu.base_url("openai"), api_key="emu-key", max_retries=0)
        first = _Serve(name, state, emu, tmp_path)
        try:
            with openai.OpenAI(base_url=first.endpoint(), api_key="x", max_retries=0, timeout=60) as client:
                up = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
                batch = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")
            until = time.monotonic() + 180
            while not (made := provider.batches.list().data) or made[0].request_counts.completed < N // 4:
                assert time.monotonic() < until, f"no provider batch under way: {emu.counters()}"
                time.sleep(0.1)  # polling the provider, as its client does
        finally:
            first.kill()
        again = _Serve(name, state, emu, tmp_path)
        try:
            with openai.OpenAI(base_url=again.endpoint(), api_key="x", max_retries=0, timeout=60) as client:
                until = time.monotonic() + 240
                while (done := client.batches.retrieve(batch.id)).status not in FINAL:
                    assert time.monotonic() < until, done
                    time.sleep(0.2)  # polling the HTTP API, as a client of OpenAI's batches does
                out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
                report = client.get(f"/batches/{batch.id}/smartbatch_report", cast_to=object)
        finally:
            again.kill()
        bill = emu.bill()
    assert done.status == "completed" and done.request_counts.completed == N, done
    assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
    assert len(bill.items) == N, f"{len(bill.items)} billed calls for {N} lines: {len(bill.items) - N} paid twice"
    said = " ".join("".join(again.seen).split())
    assert "answered from them, not sent again" in said, said
    assert report["totals"]["cost_usd"] == pytest.approx(bill.total_usd, abs=1e-9)
