import json

from typer.testing import CliRunner

from engine.cli import app

runner = CliRunner()
CONTRACT = {"policy", "cost_usd", "naive_cost_usd", "saving_vs_naive", "capture_of_achievable",
            "deadline_met_frac", "completed", "failed", "rejected", "exact_hits", "near_hits", "sim_requests_per_s"}


def test_synth_then_bench_writes_the_contract(tmp_path):
    trace = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["trace", "synth", "--n", "400", "--seed", "2", "--out", str(trace)])
    assert r.exit_code == 0, r.output
    variants = tmp_path / "v.yaml"
    variants.write_text("variants:\n  - name: smart-eager\n    policy: smart\n    params: {batch_gather_s: 0}\n")
    out = tmp_path / "out"
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive,smart,smart-eager", "--variants",
                            str(variants), "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["trace"] == "t" and doc["requests"] == 400 and doc["lower_bound_usd"] > 0
    assert [x["policy"] for x in doc["results"]] == ["naive", "smart", "smart-eager"]
    for row in doc["results"]:
        assert CONTRACT <= set(row)
        naive, cost, lb = row["naive_cost_usd"], row["cost_usd"], doc["lower_bound_usd"]
        assert abs(row["capture_of_achievable"] - (naive - cost) / (naive - lb)) < 1e-6
    assert doc["results"][0]["saving_vs_naive"] == 0
    assert (out / "results.md").read_text().count("\n| ") >= 4
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_bad_trace_and_skips_with_the_flag(tmp_path):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5}\n'
                     '{"id": "b", "arrival_s": 0, "model": "gpt-5", "input_tokens": -5}\n')
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "bad.jsonl:2: field 'input_tokens'" in r.output and "--skip-invalid" in r.output
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(tmp_path / "o"),
                            "--skip-invalid"])
    assert r.exit_code == 0, r.output
    assert "skipped 1 invalid line" in r.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["requests"] == 1


def test_unknown_policy_and_bad_variants_are_clear_errors(tmp_path):
    trace = tmp_path / "t.jsonl"
    runner.invoke(app, ["trace", "synth", "--n", "20", "--out", str(trace)])
    r = runner.invoke(app, ["bench", str(trace), "--policies", "smrt", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown policy 'smrt'" in r.output
    bad = tmp_path / "v.yaml"
    bad.write_text("variants:\n  - name: x\n    policy: smart\n    params: {near_threshold: 7}\n")
    r = runner.invoke(app, ["bench", str(trace), "--policies", "x", "--variants", str(bad), "--out",
                            str(tmp_path / "o")])
    assert r.exit_code == 2 and "near_threshold" in r.output


def test_trace_builders_from_the_command_line(real_data, tmp_path):
    out = tmp_path / "m.jsonl"
    r = runner.invoke(app, ["trace", "from-mooncake", str(real_data / "mooncake_synthetic_trace.jsonl"),
                            "--out", str(out), "--limit", "50"])
    assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 50
    out = tmp_path / "a.jsonl"
    r = runner.invoke(app, ["trace", "from-azure", str(real_data / "azure_llm_2023_code.csv"), "--out", str(out),
                            "--limit", "30", "--model", "google/gemini-2.5-flash"])
    assert r.exit_code == 0, r.output
    assert all(json.loads(x)["model"] == "gemini-2.5-flash" for x in out.read_text().splitlines())


def test_bench_with_budgets_reports_overrun_and_rejections(tmp_path):
    trace = tmp_path / "t.jsonl"
    assert runner.invoke(app, ["trace", "synth", "--n", "600", "--seed", "4", "--out", str(trace)]).exit_code == 0
    free = tmp_path / "free"
    assert runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(free)]).exit_code == 0
    naive = json.loads((free / "results.json").read_text())["results"][0]["cost_usd"]
    out = tmp_path / "out"
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive,smart", "--out", str(out), "--budget",
                            f"{naive / 3:.6f}", "--tenant-budget", f"tenant-a={naive / 10:.6f}"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    assert [b["tenant"] for b in doc["budgets"]] == [None, "tenant-a"]
    for row in doc["results"]:
        assert row["naive_cost_usd"] == naive  # judged against the bill without budgets
        assert row["budget_overrun_usd"] == 0 and row["cost_usd"] <= naive / 3 + 1e-6
        assert row["rejected"]["budget_exhausted"] > 0
        tenant_a = [w for w in row["budget"]["windows"] if w["budget"] == "tenant=tenant-a"]
        assert tenant_a and tenant_a[0]["spent_usd"] <= naive / 10 + 1e-6
    assert "rejected" in (out / "results.md").read_text()


def test_bad_budget_flags_name_the_flag_and_the_fix(tmp_path):
    trace = tmp_path / "t.jsonl"
    runner.invoke(app, ["trace", "synth", "--n", "20", "--out", str(trace)])
    r = runner.invoke(app, ["bench", str(trace), "--tenant-budget", "acme", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--tenant-budget 'acme': write NAME=USD" in r.output
    r = runner.invoke(app, ["bench", str(trace), "--budget", "5", "--budget-duration", "weekly", "--out",
                            str(tmp_path / "o")])
    assert r.exit_code == 2 and "budget_duration 'weekly'" in r.output
    r = runner.invoke(app, ["bench", str(trace), "--budget-duration", "1h", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--budget-duration needs --budget" in r.output
