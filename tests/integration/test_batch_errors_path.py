"""`smartbatch batch --errors PATH` against the emulator, then `--resume` without it: the error file the first run
wrote (a line failed possibly billed in it) is found where that run recorded it, so the line is not paid twice."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from engine.app.cli import app
from engine.core.batchfile import BILLED_KEY
from engine.core.provider_api import call_key
from engine.emulator import Emulator
from tests.integration._catalogs import OPENAI_ONLY, catalog_file

SPEEDUP = 1000.0  # a 1 h window in 3.6 s


def _line(cid: str) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-5-mini", "max_completion_tokens": 40,
                     "messages": [{"role": "user", "content": f"Write a haiku about river {cid}."}]}}


def test_a_resume_without_the_first_runs_errors_flag_does_not_pay_again_for_a_possibly_billed_line(
        ray_session, tmp_path, monkeypatch):
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "logs" / "failed.jsonl"
    src.write_text("".join(json.dumps(_line(c)) + "\n" for c in ("a", "g", "b")))
    monkeypatch.setenv("OPENAI_API_KEY", "emulator-test-key")
    with Emulator(OPENAI_ONLY, speedup=SPEEDUP, seed=0, cancel_s=1.0) as emu:
        emu.faults.garble_members = {call_key("default", "g", "gpt-5-mini", 0)}
        args = ["batch", str(src), "--window", "1h", "--out", str(out), "--policy", "batch-all",
                "--catalog", str(catalog_file(tmp_path, OPENAI_ONLY)), "--providers", "http",
                "--base-url", f"openai={emu.base_url('openai')}", "--speedup", str(SPEEDUP)]
        r = CliRunner().invoke(app, [*args, "--errors", str(err)])
        assert r.exit_code == 0, r.output
        first = emu.bill()
        rows = [json.loads(x) for x in err.read_text().splitlines()]
        assert [x["custom_id"] for x in rows] == ["g"] and rows[0][BILLED_KEY] > 0, rows
        emu.faults.garble_members = set()
        r = CliRunner().invoke(app, [*args, "--resume"])  # --errors not given again
        assert r.exit_code == 0, r.output
        again = emu.bill()
        # Before, the resume read OUT's default error file (none), and sent g again: billed twice.
        assert (len(again.items), again.total_usd) == (len(first.items), pytest.approx(first.total_usd)), \
            Counter(i.custom_id for i in again.items)
        assert "1 line(s) kept back in the error file" in " ".join(r.output.split()), r.output
        assert [json.loads(x)["custom_id"] for x in err.read_text().splitlines()] == ["g"]  # where it was
        assert not out.with_name(out.stem + ".errors.jsonl").exists()
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == ["a", "b"]
