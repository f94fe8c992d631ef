"""A driver script with ``journal.dir`` killed with SIGKILL while its provider batches run, then run again: what those
batches finished (billed) and the answers the killed script had received are given to the same requests submitted
again, never sent and paid again; a request submitted again with other content is sent as new."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actors._file_journal import engine_dirs
from engine.app._driver_resume import DRIVER_ANSWERS, KEPT_REASON
from engine.emulator import Emulator
from tests.integration._job_driver import URGENT
from tests.integration.test_batch_crash import (
    SPEEDUP,
    _env,
    _journaled_batches,
    _kill_when,
    _to_the_batches_end,
    _until,
)
from tests.unit.test_http_providers import fixed_turnaround_catalog

N = 24
SCRIPT = Path(__file__).with_name("_job_driver.py")
ROOT = Path(__file__).resolve().parents[2]


def _answers_kept(root: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in root.glob(f"{DRIVER_ANSWERS}.*.jsonl"))


def test_a_driver_killed_mid_job_and_run_again_pays_for_nothing_twice(tmp_path):
    root = tmp_path / "journal"
    # Sync answers at a loaded machine's pace (tens of ms at 1000x): a flex call of an urgent request, were one made,
    # would outlast its timeout and be billed beside its standard call (``_job_driver.URGENT_DEADLINE_S``).
    with Emulator(fixed_turnaround_catalog(3000.0), speedup=SPEEDUP, seed=0, cancel_s=600.0,
                  latency_scale=20.0) as emu:
        env = {**_env(), "SMARTBATCH_PROVIDERS__MODE": "http", "SMARTBATCH_JOURNAL__DIR": str(root),
               "OPENAI_BASE_URL": emu.base_url("openai"), "PYTHONPATH": str(ROOT)}
        args = [sys.executable, str(SCRIPT), str(N)]
        # The urgent answers reached the script, and both batches (one per model) run at the provider.
        _kill_when(args + [""], env, lambda: _journaled_batches(root) >= 2 and _answers_kept(root) >= URGENT,
                   "two provider batches and the urgent answers")
        # The batches run on at the provider, to their end: every member billed, its answer read by nobody.
        _to_the_batches_end(emu, 3000.0)
        _until(lambda: len(emu.bill().items) == N, "the killed run's batches to finish at the provider")
        before = emu.bill().items
        again = subprocess.run(args + ["Another question entirely."], env=env, capture_output=True, text=True,
                               timeout=300)
        bill = emu.bill()
    assert again.returncode == 0, again.stdout + again.stderr
    lines = [json.loads(x) for x in again.stdout.splitlines() if x.startswith("{")]
    results, figures = {d["id"]: d for d in lines if "id" in d}, lines[-1]["taken_back"]
    assert sorted(results) == sorted(f"r{k}" for k in range(N)) and all(r["status"] == "ok" for r in results.values())
    # The urgent calls went standard (``URGENT_DEADLINE_S``): a flex call given up at its timeout is billed too.
    assert all(results[f"r{k}"]["mode"] == "sync" for k in range(N - URGENT, N)), results
    # r0 asked something else under its old id: sent as new, and billed once more; nothing else was.
    assert len(bill.items) == N + 1
    assert results["r0"]["reason"] != KEPT_REASON
    kept = [r for i, r in results.items() if i != "r0"]
    assert all(r["reason"] == KEPT_REASON for r in kept)
    # The answers the killed script had received: its urgent calls.
    assert sum(r["mode"] == "sync" for r in kept) >= URGENT
    assert sum(r["mode"] == "batch_api" for r in kept) >= N - URGENT - 1  # read from its cancelled batches
    assert figures["answers"] == N - 1
    # Each kept answer at what the killed run paid for it: its bill, less r0's first content (one of its items).
    assert figures["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in kept), abs=1e-9)
    unasked = sum(i.cost_usd for i in before) - figures["cost_usd"]
    assert any(i.cost_usd == pytest.approx(unasked, abs=1e-9) for i in before), unasked
    # The job ended: nothing is left to take back.
    assert not list(root.glob(f"{DRIVER_ANSWERS}.*")) and not engine_dirs(root)
