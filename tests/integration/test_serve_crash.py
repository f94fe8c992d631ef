"""`smartbatch serve` as real processes. Killed with SIGKILL while an endpoint batch rides a provider batch, then
served again on the same --state-dir: what that provider batch finished (billed) answers its lines, which are not
sent again (a helper's hunt: all 60 lines of such a batch were billed twice). While it serves, a second serve of
its name, or on its endpoint's port, is refused at once naming it. And a SIGTERM to its whole process group (what
`timeout`, systemd's control-group stop or `kill -- -PGID` send) stops the restarted one in seconds, leaving none
of its Ray's processes behind: that SIGTERM reached Ray's own processes too (they block only SIGINT), and serve's
stop then waited a minute on the dead GCS.

One test, so that these share the two serve starts (a Ray, an engine and the endpoint cost seconds each: the
refusals and the SIGTERM had a serve of their own, 26 s of the parallel pass); the checks without Ray are in
tests/unit/test_serve_cli.py.
"""

import io
import json
import os
import queue
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.emulator import Emulator
from tests.integration._catalogs import OPENAI_ONLY, openai_only_file
from tests.integration._sessions import kill_session, session_pids

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
             # batch-all: every line rides a provider batch, as smart's do here, and with no reuse, no cache
             # actor (a Ray worker process fewer per serve; a restarted serve's cache would start empty anyway).
             "--catalog", str(openai_only_file(tmp)), "--policy", "batch-all", "--providers", "http",
             "--base-url", f"openai={emu.base_url('openai')}", "--speedup", str(SPEEDUP)],
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": "emu-key"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.address: str | None = None
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
            self.address = line.split(":", 1)[1].strip() if line.startswith("ray address:") else self.address
            if line.startswith("stop:"):
                return url

    def kill(self) -> None:
        """What a machine's crash does: its whole session killed (Ray's workers, each in a process group of its
        own, outlived a ``killpg`` for seconds), and none of it alive when this returns."""
        kill_session(self.proc.pid)
        self.proc.wait(30)
        self.reader.join(30)  # at the pipe's end: every process holding it is gone
        self.proc.stdout.close()
        self._drain()

    def _drain(self) -> None:
        """What is left of its output, up to the reader's end mark (taken once: a second call finds none)."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                return
            self.seen.append(line)

    def sigterm(self) -> tuple[int, float, list[int]]:
        """SIGTERM to its whole process group: the exit code, the seconds it took, and its session's processes
        (the serve, the Ray processes it started and their workers, which the group leaves out) still alive 30 s
        later."""
        group = session_pids(self.proc.pid)
        assert len(group) > 2, group  # serve, and at least the GCS and the raylet
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=30)  # it took over 60 s: the stop's Ray calls waited for the dead GCS
        took = time.monotonic() - t0
        self.reader.join(30)  # at the pipe's end, once every process holding it is gone
        self._drain()
        return code, took, _wait_gone(group, 30)


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait (on each process's pidfd: an event, not a polled delay) until they have exited; those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


def _refused_while_served(first: _Serve, name: str, endpoint: str) -> None:
    """A second serve of the name, and a serve of another name on the endpoint's port, are refused at once,
    each naming what holds it and the fix."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    again = subprocess.run([str(BIN), "serve", "--name", name], env=env, capture_output=True, text=True, timeout=60)
    err = " ".join(again.stderr.split())
    assert again.returncode == 2, err
    address = first.address
    for fact in (f"engine {name!r} is already served", f"pid {first.proc.pid}", f"Ray address {address}",
                 f"endpoint {endpoint}", f"smartbatch stop --name {name} --address {address}", "another --name"):
        assert fact in err, (fact, err)
    port = endpoint.rsplit(":", 1)[1].split("/")[0]
    other = subprocess.run([str(BIN), "serve", "--name", name + "-b", "--http-port", port], env=env,
                           capture_output=True, text=True, timeout=60)
    err = " ".join(other.stderr.split())
    assert other.returncode == 2 and f"engine {name!r} serves its endpoint there" in err, err


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds to wait on the Ray processes")
@pytest.mark.timeout(600)
def test_a_serve_killed_while_its_provider_batch_runs_pays_no_line_twice_after_its_restart(tmp_path):
    name, state = f"crash-{secrets.token_hex(3)}", tmp_path / "state"
    lines = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "max_tokens": 200,
                       "messages": [{"role": "user", "content": f"Summarise chapter {k} of the long report."}]}}
             for k in range(N)]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    assert OPENAI_ONLY.providers.keys() == {"openai"}
    with Emulator(OPENAI_ONLY, speedup=SPEEDUP, seed=83, cancel_s=100.0) as emu, \
            openai.OpenAI(base_url=emu.base_url("openai"), api_key="emu-key", max_retries=0) as provider:
        first = _Serve(name, state, emu, tmp_path)
        try:
            url = first.endpoint()
            _refused_while_served(first, name, url)
            with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
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
            code, took, alive = again.sigterm()
        finally:
            again.kill()
        bill = emu.bill()
    assert done.status == "completed" and done.request_counts.completed == N, done
    assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)
    assert len(bill.items) == N, f"{len(bill.items)} billed calls for {N} lines: {len(bill.items) - N} paid twice"
    said = " ".join("".join(again.seen).split())
    assert "answered from them, not sent again" in said, said
    assert report["totals"]["cost_usd"] == pytest.approx(bill.total_usd, abs=1e-9)
    # The SIGTERM to the restarted serve's process group: a clean exit in seconds, Ray's processes gone with it.
    assert code == 0, "".join(again.seen[-30:])
    assert took < 20, took
    assert any("Ray's processes stopped with this one" in x for x in again.seen), "".join(again.seen[-10:])
    assert alive == []  # the GCS outlives a SIGTERM: serve stopped it
