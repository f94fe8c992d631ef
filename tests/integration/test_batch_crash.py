"""`smartbatch batch` killed with SIGKILL while its provider batches run, then run again with --resume: the lines
those batches answered (billed) are read back from the provider, never sent and paid again."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors._file_journal import engine_dirs, read_spaces
from engine.app._batch_rescue import journal_dir
from engine.emulator import Emulator
from tests.integration._catalogs import openai_only_file
from tests.integration._sessions import kill_session
from tests.unit.test_http_providers import fixed_turnaround_catalog

BIN = Path(sys.executable).parent / "smartbatch"
SPEEDUP = 1000.0
N = 30
TURNAROUND_S = 6000.0


def _env():
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OPENAI_API_KEY": "emulator-key",
            "ANTHROPIC_API_KEY": "emulator-key"}


def _until(probe, what: str, proc: subprocess.Popen | None = None, timeout_s: float = 180.0):
    """Poll ``probe`` (files, the emulator's bill) until it is truthy; fail after ``timeout_s`` (a bound)."""
    deadline = time.monotonic() + timeout_s
    while not (got := probe()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


def _kill_when(args: list[str], env: dict, probe, what: str) -> None:
    """Run ``args`` in a session of its own and kill that whole session (Ray's workers too, each in a process group
    of its own) once ``probe()`` holds, waiting until none of it lives."""
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _until(probe, what, proc)
    finally:
        kill_session(proc.pid)
        proc.wait()
        proc.stdout.close()


def _to_the_batches_end(emu: Emulator, turnaround_s: float) -> None:
    """Move the emulator's clock past a batch's end once the run that made it is killed (the house's jump, as
    ``test_video_durable``'s): waited out in real time, the turnaround (3 to 6 s at 1,000x) was most of the gap
    between the two runs; the test's wait on the bill after it still reads every member billed (stop 83)."""
    emu._core.clock.offset += 2 * turnaround_s  # twice: its validating and finalizing too, well inside its 24 h


def _journaled_batches(root: Path) -> int:
    return sum(rec[4] is not None for d in engine_dirs(root) for s, recs in read_spaces(d).items()
               if s == "batches:openai" for rec in recs.values())


def test_a_resume_after_a_sigkill_reads_the_killed_runs_batch_instead_of_paying_again(tmp_path):
    lines = [{"custom_id": f"r{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": ("gpt-5", "gpt-5-mini")[k % 2], "max_completion_tokens": 1000,
                       "messages": [{"role": "user", "content": f"Summarise report number {k}. " * 150}]}}
             for k in range(N)]
    src, out, rep = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "report.json"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    root = journal_dir(out)
    # Every batch takes 6,000 emulated s (6 s real): the kill comes while it runs; the clock then jumps to its end.
    with Emulator(fixed_turnaround_catalog(TURNAROUND_S), speedup=SPEEDUP, seed=0, cancel_s=600.0) as emu:
        # OpenAI alone, the one provider the lines call: each run starts four dispatcher processes fewer. batch-all:
        # every line rides a provider batch, as smart's do here, and with no reuse, no cache actor (a process fewer
        # per run; the lines are all different, and a run's cache starts empty).
        args = [str(BIN), "batch", str(src), "--out", str(out), "--providers", "http", "--policy", "batch-all",
                "--catalog", str(openai_only_file(tmp_path)),
                "--base-url", f"openai={emu.base_url('openai')}", "--speedup", str(SPEEDUP)]
        # Two batches (one per model): their answers come back out of the input's order (a helper's review:
        # the resume then failed to write OUT, after it had taken the killed run's journal).
        _kill_when(args, _env(), lambda: _journaled_batches(root) >= 2, "its two provider batches to be journaled")
        # The batch runs on at the provider, to its end: every line billed, its answer read by nobody.
        _to_the_batches_end(emu, TURNAROUND_S)
        _until(lambda: len(emu.bill().items) == N, "the killed run's batch to finish at the provider")
        again = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr, again.stderr
        assert len(emu.bill().items) == N  # refused before anything was sent
        resumed = subprocess.run(args + ["--resume", "--report", str(rep)], env=_env(), capture_output=True,
                                 text=True, timeout=300)
        bill = emu.bill()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    ids = [i.custom_id for i in bill.items]
    assert len(ids) == N == len(set(ids))  # no line paid twice
    answered = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(a["custom_id"] for a in answered) == sorted(x["custom_id"] for x in lines)
    assert all(a["error"] is None and a["response"]["status_code"] == 200 for a in answered)
    doc = json.loads(rep.read_text())
    assert doc["totals"]["cost_usd"] == pytest.approx(bill.total_usd, abs=1e-9)  # each answer counted
    said = " ".join(resumed.stdout.split())
    assert f"{N} line(s) answered by a run cut off earlier" in said
    assert not root.exists()  # the journal goes with a run that finished
