"""`smartbatch run --variants`: a variant of bench's variants file runs live too, with its parameters."""

import json

from typer.testing import CliRunner

from engine.app.cli import app
from engine.core.trace import load_trace
from tests.integration._catalogs import catalog_file, for_trace

runner = CliRunner()


def test_run_takes_a_variant_and_its_parameters_reach_the_live_policy(ray_session, tmp_path):
    trace = tmp_path / "t.jsonl"
    assert runner.invoke(app, ["trace", "synth", "--n", "30", "--seed", "5", "--out", str(trace)]).exit_code == 0
    variants = tmp_path / "v.yaml"
    # Worth batching only above $1,000 a request: nothing is, so no request rides a provider's batch API.
    variants.write_text("variants:\n  - name: smart-impatient\n    policy: smart\n"
                        "    params: {min_batch_saving_usd: 1000}\n")
    out = tmp_path / "out"
    # The trace's providers alone (two of the four): each dispatcher is a process to start.
    cat = catalog_file(tmp_path, for_trace(load_trace(trace).requests))
    r = runner.invoke(app, ["run", str(trace), "--policy", "smart-impatient", "--variants", str(variants),
                            "--catalog", str(cat), "--speedup", "5000", "--out", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    (row,) = doc["results"]
    assert row["policy"] == "smart-impatient (live)" and row["params"] == {"min_batch_saving_usd": 1000}
    modes = doc["engine_report"]["by_mode"]
    assert "batch_api" not in modes and modes.get("sync", 0) > 0, modes
    r = runner.invoke(app, ["run", str(trace), "--policy", "smart,naive", "--out", str(out)])
    assert r.exit_code == 2 and "one policy" in r.output
