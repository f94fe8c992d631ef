import json

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.app.cli import app

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
    r = runner.invoke(app, ["run", str(trace), "--dry-run", "--skip-invalid"])  # run says so too
    assert r.exit_code == 0 and "skipped 1 invalid line" in r.output and "bad.jsonl:2" in r.output, r.output


def test_skip_invalid_names_each_of_the_first_bad_lines_and_counts_the_rest_by_field(tmp_path):
    trace = tmp_path / "bad.jsonl"
    lines = ['{"id": "g0", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5}\n']
    lines += [f'{{"id": "t{k}", "arrival_s": 0, "model": "gpt-5", "input_tokens": -5}}\n' for k in range(6)]
    lines += [f'{{"id": "m{k}", "arrival_s": 0, "model": "gpt-0", "input_tokens": 5}}\n' for k in range(3)]
    trace.write_text("".join(lines))
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(tmp_path / "o"),
                            "--skip-invalid"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps long lines
    assert "skipped 9 invalid line(s)" in text
    for n in range(2, 7):  # the first five, each by its line
        assert f"bad.jsonl:{n}: field 'input_tokens'" in text
    assert "bad.jsonl:7:" not in text and "and 4 more; by field: 'input_tokens' 6, 'model' 3" in text


def test_unknown_policy_and_bad_variants_are_clear_errors(tmp_path):
    trace = tmp_path / "t.jsonl"
    runner.invoke(app, ["trace", "synth", "--n", "20", "--out", str(trace)])
    r = runner.invoke(app, ["bench", str(trace), "--policies", "smrt", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown policy 'smrt'; did you mean 'smart'?" in " ".join(r.output.split())
    bad = tmp_path / "v.yaml"
    bad.write_text("variants:\n  - name: x\n    policy: smart\n    params: {near_threshold: 7}\n")
    r = runner.invoke(app, ["bench", str(trace), "--policies", "x", "--variants", str(bad), "--out",
                            str(tmp_path / "o")])
    assert r.exit_code == 2 and "near_threshold" in r.output
    # Broken YAML: one line naming the place and what the parser expected, not its multi-line pointer.
    bad.write_text("variants:\n  - name: x\n    policy: smart\n     params: {near_threshold: 1\n")
    r = runner.invoke(app, ["bench", str(trace), "--policies", "x", "--variants", str(bad), "--out",
                            str(tmp_path / "o")])
    assert r.exit_code == 2 and f"{bad}:4:" in r.output and "not valid YAML" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


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
        # Refused work bills nothing; the saving is judged on the requests served, not the whole trace.
        served = row["naive_cost_of_served_usd"]
        assert row["cost_usd"] <= served < naive
        assert row["saving_vs_naive"] == pytest.approx((served - row["cost_usd"]) / served, abs=1e-6)
        # The bound a run is held to prices only what it served: the refused requests billed nothing (a hunt:
        # $0.76 against a run's $0.06, which read as a policy beating its bound).
        assert row["lower_bound_for_its_misses_usd"] <= row["cost_usd"] + 1e-6
    naive_row = doc["results"][0]
    assert naive_row["saving_vs_naive"] == pytest.approx(0.0, abs=1e-6)  # naive saves nothing on what it served
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
    # A tenant no request has (a typo) would leave the run unbudgeted: refused, naming the trace's tenants.
    tenants = sorted({json.loads(x)["tenant"] for x in trace.read_text().splitlines()})
    r = runner.invoke(app, ["bench", str(trace), "--tenant-budget", "acme=5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no request of this trace has tenant 'acme'" in r.output
    assert tenants[0] in r.output
    r = runner.invoke(app, ["bench", str(trace), "--tenant-budget", f"{tenants[0]}=5", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output


# --- every error is one `error:` line naming the file, line and field (or the setting), no traceback ------------

def _one_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.count("error:") == 1, r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def test_policies_lists_every_registered_policy():
    from policies import available_policies

    r = runner.invoke(app, ["policies"])
    assert r.exit_code == 0, r.output
    assert all(f"{name}:" in r.output for name in available_policies())


def test_a_bad_environment_setting_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTBATCH_SIM__SEED", "abc")
    r = runner.invoke(app, ["trace", "synth", "--n", "5", "--out", str(tmp_path / "t.jsonl")])
    _one_error(r, "SMARTBATCH_SIM__SEED", "sim.seed")
    assert len(r.output.strip().splitlines()) <= 3  # was a 150-line pydantic traceback


def test_a_malformed_redis_url_is_a_settings_error_not_an_actor_death(tmp_path, monkeypatch):
    trace = tmp_path / "t.jsonl"
    assert runner.invoke(app, ["trace", "synth", "--n", "5", "--out", str(trace)]).exit_code == 0
    for var in ("SMARTBATCH_CACHE__REDIS_URL", "SMARTBATCH_BUDGETS__REDIS_URL"):
        monkeypatch.setenv(var, "notaurl")
        r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(tmp_path / "o")])
        _one_error(r, var, "redis://")
        monkeypatch.delenv(var)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTBATCH_SIM__SEED", "abc")
    from engine.core.errors import ConfigError

    r = runner.invoke(app, ["--debug", "trace", "synth", "--n", "5", "--out", str(tmp_path / "t.jsonl")])
    # printed masked by the command itself, not re-raised to typer's hook (tests/unit/test_stderr_keys.py)
    assert r.exit_code == 1 and "Traceback (most recent call last)" in r.output
    assert f"{ConfigError.__module__}.{ConfigError.__name__}: setting sim.seed" in r.output, r.output


def test_an_unexpected_exception_is_one_line_unless_debug(tmp_path, monkeypatch):
    import engine.core.trace

    def boom(*a, **k):
        raise IndexError("list index out of range")

    monkeypatch.setattr(engine.core.trace, "load_trace", boom)
    r = runner.invoke(app, ["bench", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("error:") == 1
    assert "IndexError: list index out of range" in r.output and "--debug" in r.output
    r = runner.invoke(app, ["--debug", "bench", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "Traceback (most recent call last)" in r.output and "error:" not in r.output
    assert r.output.rstrip().endswith("IndexError: list index out of range"), r.output


def test_builder_errors_name_file_line_and_column(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,12,3\n2023-11-16 18:15:47.1,x,3\n")
    r = runner.invoke(app, ["trace", "from-azure", str(csv), "--out", str(tmp_path / "t.jsonl")])
    _one_error(r, f"{csv}:3: field 'ContextTokens'")
    mc = tmp_path / "m.jsonl"
    mc.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1, "output_length": 3}\n')
    r = runner.invoke(app, ["trace", "from-mooncake", str(mc), "--out", str(tmp_path / "t.jsonl")])
    _one_error(r, f"{mc}:2: field 'input_length'")
    assert not (tmp_path / "t.jsonl").exists()  # nothing written


def test_bench_on_non_utf8_surrogates_and_empty_traces(tmp_path):
    good = '{"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5}\n'
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(good.encode() + b'{"id": "b", "prompt": "\xff"}\n' + b'{"id": "c\\ud800", "arrival_s": 0}\n')
    out = str(tmp_path / "o")
    _one_error(runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", out]),
               f"{trace}:2: field 'line': not UTF-8", f"{trace}:3: field 'id'")
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", out, "--skip-invalid"])
    assert r.exit_code == 0 and "skipped 2 invalid line(s)" in r.output, r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_error(runner.invoke(app, ["bench", str(empty), "--out", out]), "trace empty.jsonl has no requests")


def test_bench_rebases_an_epoch_trace_and_says_so(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": 1.7e9 + 10 * i, "model": "gpt-5-mini",
                                         "prompt": f"task {i}"}) + "\n" for i in range(5)))
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "arrivals rebased by 19,675 day(s)" in r.output


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"smartbatch {version('smartbatch')}"


def test_help_and_usage_errors_are_not_reported_as_bugs():
    """--help ends at 0 and a bad flag value at 2 naming the flag, for every command: typer's own exits pass
    through the one-line error handler (newer typer raises its vendored click's classes, not click's)."""
    for cmd in (["bench"], ["run"], ["demo"], ["serve"], ["stop"], ["batch"], ["emulate"], ["trace"],
                ["trace", "synth"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "unexpected" not in r.output and "Usage" in r.output, (cmd, r.output)
    r = runner.invoke(app, ["trace", "synth", "--n", "abc"])
    assert r.exit_code == 2 and "--n" in r.output and "unexpected" not in r.output, r.output
    r = runner.invoke(app, ["bench", "t.jsonl", "--polices", "naive"])
    assert r.exit_code == 2 and "--policies" in r.output, r.output


def test_every_registered_policy_describes_itself():
    r = runner.invoke(app, ["policies"])
    assert r.exit_code == 0 and "smart:" in r.output and "(no description)" not in r.output, r.output


def test_stop_at_an_address_where_nothing_listens_fails_at_once_naming_it():
    """Ray would retry a dead GCS address for minutes, deaf to SIGTERM (the stop: line of a serve gone since)."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = runner.invoke(app, ["stop", "--name", "nu", "--address", f"127.0.0.1:{port}"])
    assert r.exit_code != 0 and f"--address 127.0.0.1:{port}: no Ray cluster answers there" in r.output
    # So do a driver's attach and start there (they waited minutes for Ray's retries), and no Ray is left started.
    import ray

    from engine import Engine
    from engine.core.errors import ConfigError

    for attach in (lambda: Engine.connect("nu", address=f"127.0.0.1:{port}"),
                   lambda: Engine.start(address=f"ray://127.0.0.1:{port}")):
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: no Ray cluster answers there"):
            attach()
    # A driver script gave address=, not a flag: Ray's own refusal is told in those words too (a helper's tour).
    with pytest.raises(ConfigError, match=r"^address http://x: no Ray cluster answers there"):
        Engine.start(address="http://x")
    assert not ray.is_initialized()


@pytest.mark.parametrize("cmd", [["status"], ["budget", "list"], ["budget", "remove", "tenant=acme/1d"],
                                 ["budget", "set", "--max", "1"], ["stop", "--name", "nu"]])
def test_a_bad_address_is_named_by_its_flag_in_every_command_that_reaches_an_engine(cmd, monkeypatch):
    """A new user's tour: `status --address nonsense` (and `budget`, `stop`) said "address nonsense: ...", the
    argument of a driver's Engine.connect, where a command line names its --address. Nothing starts: Ray refuses
    the address's form before it starts anything."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the suite's own Ray may run in this process
    r = runner.invoke(app, [*cmd, "--address", "nonsense"])
    assert r.exit_code == 2 and r.output.startswith("error: --address nonsense: no Ray cluster answers there"), r.output


def test_a_bad_budget_duration_is_one_line_with_the_fix(tmp_path):
    trace = tmp_path / "t.jsonl"
    assert runner.invoke(app, ["trace", "synth", "--n", "50", "--seed", "2", "--out", str(trace)]).exit_code == 0
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--budget", "18", "--budget-duration",
                            "2weeks", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "e.g. 30s, 15m, 1h" in r.output
    assert "pydantic" not in r.output and "input_value" not in r.output


def test_emulate_prints_where_it_listens_and_its_bill_when_stopped():
    """`emulate --port 0` picks a free port: unless it says which, nobody can point the engine at it. A
    SIGTERM (kill, timeout) stops it as Ctrl-C does, printing what it billed."""
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "engine.app.cli", "emulate", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "COLUMNS": "200"})
    try:
        import select

        ready, _, _ = select.select([proc.stdout], [], [], 30)  # before the fix it printed nothing: no hang here
        line = proc.stdout.readline() if ready else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)/openai/v1 and http://127\.0\.0\.1:\1/anthropic", line)
        assert m, line
        # Gemini's side too: the emulator serves it, and a tour of Gemini could not find its address (stop 63).
        assert f"http://127.0.0.1:{m.group(1)}/google/v1" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/_emulator/bill", timeout=10) as r:
            assert json.loads(r.read())["total_usd"] == 0
        proc.send_signal(signal.SIGTERM)  # its handler is in place before the line above is printed
        rest = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "emulator stopped; it billed $0.000000" in rest, rest


def test_bench_of_a_small_workload_shows_its_costs_not_zeros(tmp_path):
    """A batch file of a few cheap lines (the README's `trace from-openai-batch` then `bench`) cost fractions of
    a cent per policy; at 2 decimals every policy and the bound read 0.00."""
    trace = tmp_path / "small.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": 0, "model": "gpt-5-mini",
                                         "prompt": f"Summarise item {i}", "output_tokens": 100,
                                         "deadline_s": 86400}) + "\n" for i in range(5)))
    out = tmp_path / "o"
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(out)])
    assert r.exit_code == 0, r.output
    naive = json.loads((out / "results.json").read_text())["results"][0]["cost_usd"]
    assert 0 < naive < 0.01
    assert f"{naive:.6f}" in r.output and f"| naive | {naive:.6f} |" in (out / "results.md").read_text()


@pytest.mark.parametrize("engine", ["CtrlCEngine", "TerminatedEngine"])
def test_ctrl_c_during_run_keeps_the_finished_results_and_the_spend(tmp_path, monkeypatch, engine):
    """Ctrl-C during `smartbatch run` wrote nothing, so what had finished (and was paid for) left no record.
    SIGTERM (``kill PID``) is taken as Ctrl-C: Ray's driver handled it with a stack dump, and nothing was kept."""
    import signal

    import engine.app.driver as driver_mod
    from tests.unit import helpers

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": i, "model": "gpt-5-mini", "prompt": f"q{i}"})
                             + "\n" for i in range(2)))
    cls = getattr(helpers, engine)
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda c, *a, **k: cls()))
    out = tmp_path / "o"
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # without the command's own handler: no harm here
    try:
        r = runner.invoke(app, ["run", str(trace), "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.exit_code == 130, r.output
    (kept,) = [json.loads(x) for x in (out / "results.partial.jsonl").read_text().splitlines()]
    assert kept["id"] == "r0" and kept["cost_usd"] == 0.001
    text = " ".join(r.output.split())
    assert "1 of 2 request(s) had finished (spend so far $0.0010)" in text
    assert "provider batches under way were cancelled" in text  # the engine's stop cancels them (Ray still up)


@pytest.mark.parametrize("engine", ["DrainingEngine", "TerminatedEngine"])
def test_ctrl_c_during_run_keeps_what_the_cancelled_batches_finish_and_a_sigterm_waits_for_nothing(tmp_path,
                                                                                                  monkeypatch, engine):
    """Ctrl-C during `smartbatch run` drains before its report and stop (``settings.stop_drain_s``): a request
    its cancelled provider batch finished (billed) is kept with its cost. Stopped at once, it was billed and
    lost, and the spend said less than the bill. A SIGTERM (followed by a kill) does not wait."""
    import signal

    import engine.app.driver as driver_mod
    from tests.unit import helpers

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": i, "model": "gpt-5-mini", "prompt": f"q{i}"})
                             + "\n" for i in range(2)))
    eng = getattr(helpers, engine)()
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda c, *a, **k: eng))
    monkeypatch.setenv("SMARTBATCH_STOP_DRAIN_S", "42")
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        r = runner.invoke(app, ["run", str(trace), "--out", str(tmp_path / "o")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.exit_code == 130, r.output
    kept = [json.loads(x) for x in (tmp_path / "o" / "results.partial.jsonl").read_text().splitlines()]
    text = " ".join(r.output.split())
    if engine == "DrainingEngine":
        assert eng.drained_for == 42
        assert [(k["id"], k["mode"]) for k in kept] == [("r0", "sync"), ("r1", "batch_api")]
        assert "2 of 2 request(s) had finished (spend so far $0.0015)" in text
    else:
        assert not hasattr(eng, "drained_for") and [k["id"] for k in kept] == ["r0"]


def test_a_sigterm_that_stopped_ray_too_ends_run_at_once_with_what_had_finished(tmp_path, monkeypatch):
    """A SIGTERM to the whole process group (`timeout`, systemd) stops Ray's processes too: the report and the
    engine's stop then waited a minute for the GCS, and Ray ended the process with nothing kept."""
    import signal
    import threading

    import engine.app.driver as driver_mod
    import engine.app.live as live_mod
    from tests.unit.helpers import TerminatedEngine

    stopping, never = threading.Event(), threading.Event()

    class RayGoesDown(TerminatedEngine):
        def report(self) -> dict:  # a Ray call that waits for a GCS that is gone, then fails
            stopping.set()
            never.wait(10.0)
            raise AssertionError("the run waited for a Ray that is gone")

    class RayProcess:
        def poll(self):
            return 0 if stopping.is_set() else None

    def exit_now(code):
        raise SystemExit(code)

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": i, "model": "gpt-5-mini", "prompt": f"q{i}"})
                             + "\n" for i in range(2)))
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda c, *a, **k: RayGoesDown()))
    monkeypatch.setattr(live_mod, "own_ray_processes", lambda: [RayProcess()])
    monkeypatch.setattr("engine.app._ray_stop.exit_now", exit_now)
    monkeypatch.setattr("engine.app._ray_stop.GRACE_S", 0.2)
    out = tmp_path / "o"
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        r = runner.invoke(app, ["run", str(trace), "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
        never.set()
    assert r.exit_code == 130, r.output
    (kept,) = [json.loads(x) for x in (out / "results.partial.jsonl").read_text().splitlines()]
    assert kept["id"] == "r0"


def test_an_interrupted_run_whose_engine_cannot_report_still_keeps_what_had_finished(tmp_path, monkeypatch):
    """An actor gone when Ctrl-C came: the report's error ended the command (exit 1) with no results kept."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import CtrlCEngine

    class NoReport(CtrlCEngine):
        def report(self) -> dict:
            raise RuntimeError("the result hub died")

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": i, "model": "gpt-5-mini", "prompt": f"q{i}"})
                             + "\n" for i in range(2)))
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda c, *a, **k: NoReport()))
    r = runner.invoke(app, ["run", str(trace), "--out", str(tmp_path / "o")])
    assert r.exit_code == 130, r.output
    (kept,) = [json.loads(x) for x in (tmp_path / "o" / "results.partial.jsonl").read_text().splitlines()]
    assert kept["id"] == "r0" and "spend so far unknown" in " ".join(r.output.split())


def test_ctrl_c_while_run_still_paces_arrivals_keeps_what_was_sent(tmp_path, monkeypatch):
    """Ctrl-C while `run` replays the trace (its whole span, at speed-up 1) left no record: the requests sent
    and paid so far were lost, with no message. Now they go to results.partial.jsonl as after the replay."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import CtrlCInReplayEngine

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": i, "model": "gpt-5-mini", "prompt": f"q{i}"})
                             + "\n" for i in range(2)))
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: CtrlCInReplayEngine()))
    out = tmp_path / "o"
    r = runner.invoke(app, ["run", str(trace), "--out", str(out)])
    assert r.exit_code == 130, r.output
    (kept,) = [json.loads(x) for x in (out / "results.partial.jsonl").read_text().splitlines()]
    assert kept["id"] == "r0" and kept["cost_usd"] == 0.001
    assert "1 of 1 request(s) had finished (spend so far $0.0010)" in " ".join(r.output.split())


@pytest.mark.parametrize("cmd", ["bench", "run"])
def test_an_unwritable_out_is_refused_before_the_run(tmp_path, monkeypatch, cmd):
    """`run --out` where nothing can be written ran the whole trace (paid, with real providers), then failed as
    an 'unexpected' bug and lost every result; `bench` likewise after simulating every policy."""
    import engine.app.bench as bench_mod
    import engine.app.driver as driver_mod

    def ran(*_a, **_k):
        raise AssertionError("it ran")
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(ran))
    monkeypatch.setattr(bench_mod, "run_bench", ran)
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "q"}) + "\n")
    for out, says in ((trace / "o", "cannot write there"), (trace, "is a file; give a directory")):
        r = runner.invoke(app, [cmd, str(trace), "--out", str(out)])
        assert r.exit_code == 2, r.output
        text = " ".join(r.output.split())
        assert text.startswith(f"error: --out {out}: {says}") and "unexpected" not in text, text


def test_naive_against_itself_saves_nothing_on_a_tiny_trace(tmp_path):
    """A one-request trace: naive's cost is rounded to 6 places in the row, and saving and capture were computed
    from that rounded figure against the unrounded naive bill, so naive 'captured' 0.1 % of the achievable."""
    trace = tmp_path / "one.jsonl"
    trace.write_text(json.dumps({"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "hi"}) + "\n")
    out = tmp_path / "o"
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(out)])
    assert r.exit_code == 0, r.output
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["saving_vs_naive"] == 0 and row["capture_of_achievable"] == 0 and row["capture_of_online"] == 0


def test_ctrl_c_during_the_demo_s_live_run_keeps_what_finished(tmp_path, monkeypatch):
    """`smartbatch demo` let Ctrl-C out as a bare abort; it now ends as `run` does: the finished results in
    results.partial.jsonl, the spend so far on the terminal, exit 130."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import CtrlCEngine

    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: CtrlCEngine()))
    out = tmp_path / "o"
    r = runner.invoke(app, ["demo", "--n", "20", "--providers", "sim", "--out", str(out)])
    assert r.exit_code == 130, r.output
    (kept,) = [json.loads(x) for x in (out / "results.partial.jsonl").read_text().splitlines()]
    assert kept["cost_usd"] == 0.001
    assert "1 of 2 request(s) had finished (spend so far $0.0010)" in " ".join(r.output.split())


def test_the_demo_says_when_the_live_run_was_late_where_the_simulator_was_not(tmp_path, monkeypatch):
    """Under time compression a machine that cannot keep up shows as late requests; the demo names that
    rather than leaving a lower 'met' to read as the policy's. The live run here is a stand-in whose row is the
    simulator's smart row with 1 % fewer deadlines met (the demo's own runs need Ray)."""
    import engine.app.cli as cli

    real_bench, seen = cli._bench, {}

    def bench(*args, **kwargs):
        seen["doc"] = real_bench(*args, **kwargs)
        return seen["doc"]

    def live(reqs, name, policy, speedup, *args, **kwargs):
        row = dict(next(r for r in seen["doc"]["results"] if r["policy"] == "smart"))
        row.update(policy="smart (live)", deadline_met_frac=row["deadline_met_frac"] - late / len(reqs))
        rep = {"requests": len(reqs), "spend_usd": row["cost_usd"], "saving_usd": 0.0, "hits": {}}
        return {"results": [row], "engine_report": rep, "samples": []}

    monkeypatch.setattr(cli, "_bench", bench)
    monkeypatch.setattr(cli, "_live", live)
    for late, speedup, said in ((2, "100", "--speedup 100 a deadline of 30 s is 0.30 s of real time"),
                                (2, "1", "live: 2 more request(s) late than in the simulator's run of the same policy."),
                                (0, "100", None)):
        r = runner.invoke(app, ["demo", "--n", "40", "--providers", "sim", "--speedup", speedup,
                                "--out", str(tmp_path / speedup)])
        assert r.exit_code == 0, r.output
        out = " ".join(r.output.split())
        if said is None:
            assert "late than in the simulator" not in out
        else:
            assert said in out and (speedup != "1" or "lower --speedup" not in out)



def test_a_run_says_when_it_was_late_where_the_simulator_was_not_and_not_for_failures(tmp_path, monkeypatch):
    """``run`` under time compression: late requests that the same policy in the simulator met are named as the
    machine's lag (a new user saw 45 % of urgent requests late at 100x, silently). Failed requests are no lag:
    a run whose only misses are failures says nothing of it, and its table judges the saving on what it served."""
    import engine.app.bench as bench
    import engine.app.cli as cli
    from engine.core.tracegen import synth

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(r.model_dump_json() + "\n" for r in synth(40, seed=3)))

    def live(reqs, name, policy, speedup, *args, **kwargs):
        n = len(reqs)
        row = {"policy": "smart (live)", "cost_usd": 1.0, "saving_vs_naive": 0.5, "capture_of_achievable": 0.9,
               "deadline_met_frac": 1.0 - missed / n, "deadline_met_by_priority": {}, "failed": failed,
               "rejected": {}, "exact_hits": 0, "in_flight_hits": 0, "near_hits": 0, "recommendations": {}}
        return {"trace": name, "requests": n, "lower_bound_usd": 0.5, "results": [row],
                "engine_report": {"requests": n}, "samples": []}

    monkeypatch.setattr(cli, "_live", live)
    monkeypatch.setattr(bench, "write_outputs", lambda doc, out: {"json": "j", "markdown": "m", "plot": "p"})
    for missed, failed, said in ((3, 0, "live: 3 more request(s) late"), (3, 3, None)):
        r = runner.invoke(app, ["run", str(trace), "--providers", "sim", "--out", str(tmp_path / "o")])
        assert r.exit_code == 0, r.output
        out = " ".join(r.output.split())
        assert (said in out and "lower --speedup" in out) if said else "late than in the simulator" not in out, out
        # A saving of a run with failures is against naive on what it served, and the table says so.
        assert ("vs naive on the requests served" in out) == bool(failed), out
        assert "below the bound by missing deadlines" not in out  # capture 90 %: nothing to explain
        assert out.index("wrote j") < out.index("live: 3") if said else "wrote j" in out

    # The comparison never fails a run that is done and written: a simulator that raises is said in one line.
    import engine.app.live as live_mod

    def broken(*args, **kwargs):
        raise RuntimeError("a policy bug")

    monkeypatch.setattr(live_mod, "simulate", broken)  # the simulator the plan runs
    missed, failed = 3, 0
    r = runner.invoke(app, ["run", str(trace), "--providers", "sim", "--out", str(tmp_path / "o")])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "wrote j" in out and "not compared with the simulator's run: RuntimeError" in out, out

def test_a_run_whose_requests_failed_is_judged_on_what_it_served():
    """A run at an unreachable provider read "saving 89.8 %, capture 120.8 %": its failed requests billed
    nothing, and the whole trace's naive bill was its reference (a helper's tour)."""
    from engine.app.bench import result_row
    from engine.core.catalog import default_catalog
    from engine.core.tracegen import synth
    from engine.sim.simulator import simulate
    from policies import load_policy

    cat = default_catalog()
    reqs = synth(40, seed=3)
    naive = simulate(reqs, load_policy("naive", cat), seed=0)
    run = simulate(reqs, load_policy("naive", cat), seed=0)
    failed = np.arange(len(reqs)) % 2 == 0  # half of them failed, billing nothing
    run.status[failed], run.cost[failed] = 3, 0.0  # engine.sim.results: _FAILED
    row = result_row("naive", "Naive", {}, run, naive, bound=0.5 * naive.total_cost, relaxed_bound=0.0)
    assert row["failed"] == failed.sum() and row["capture_of_achievable"] is None
    assert row["naive_cost_of_served_usd"] == pytest.approx(float(naive.cost[~failed].sum()), abs=1e-6)
    assert row["saving_vs_naive"] == pytest.approx(0.0, abs=1e-6)  # naive's own bill for what it served


def test_a_negative_seed_is_a_usage_error_naming_the_flag(tmp_path):
    """``trace synth --seed -1`` crashed with "ValueError: expected non-negative integer" (a helper's tour)."""
    r = runner.invoke(app, ["trace", "synth", "--n", "5", "--seed", "-1", "--out", str(tmp_path / "s.jsonl")])
    assert r.exit_code == 2 and "--seed" in r.output and not (tmp_path / "s.jsonl").exists()


def test_trace_builders_refuse_to_overwrite_their_input_a_directory_and_a_span_bench_refuses(tmp_path):
    """A hunt: ``from-azure same.csv --out same.csv`` replaced the CSV with its trace; ``synth --out DIR`` was an
    'unexpected' error; a CSV spanning more than a year was written and then refused by bench."""
    csv = tmp_path / "a.csv"
    rows = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,374,44\n"
    csv.write_text(rows)
    r = runner.invoke(app, ["trace", "from-azure", str(csv), "--out", str(csv)])
    _one_error(r, "--out", "that is the input file")
    assert csv.read_text() == rows
    _one_error(runner.invoke(app, ["trace", "synth", "--n", "5", "--out", str(tmp_path)]), "is a directory")
    csv.write_text(rows + "2024-11-17 18:15:46.1,374,44\n")
    out = tmp_path / "t.jsonl"
    _one_error(runner.invoke(app, ["trace", "from-azure", str(csv), "--out", str(out)]),
               f"{csv}:3: field 'arrival_s'", "365 days")
    assert not out.exists()


def test_a_catalog_with_an_infinite_or_negative_price_and_a_variant_of_infinity_are_refused(tmp_path):
    """A hunt: a negative per-image or per-second price lowered the bill, ``.inf`` priced a trace at inf with a
    saving of nan %, and a variant's ``batch_wait_s: .inf`` crashed bench."""
    trace = tmp_path / "t.jsonl"
    runner.invoke(app, ["trace", "synth", "--n", "20", "--out", str(trace)])
    for overlay, field in [("openai:\n    models:\n      gpt-5-mini: {output_per_mtok: .inf}", "output_per_mtok"),
                           ("google:\n    models:\n      imagen-4: {per_image: {1024x1024: -0.04}}", "per_image"),
                           ("openai:\n    models:\n      sora-2: {per_second: {720p: -0.1}}", "per_second")]:
        cat = tmp_path / "over.yaml"
        cat.write_text(f"providers:\n  {overlay}\n")
        r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--catalog-overlay", str(cat),
                                "--out", str(tmp_path / "o")])
        _one_error(r, field)
    v = tmp_path / "v.yaml"
    v.write_text("variants:\n  - {name: x, policy: batch-all, params: {batch_wait_s: .inf}}\n")
    r = runner.invoke(app, ["bench", str(trace), "--policies", "x", "--variants", str(v), "--out", str(tmp_path / "o")])
    _one_error(r, "batch_wait_s", "finite")
    v.write_bytes(b"\xffvariants: []\n")
    r = runner.invoke(app, ["bench", str(trace), "--policies", "x", "--variants", str(v), "--out", str(tmp_path / "o")])
    _one_error(r, "not UTF-8")


def test_emulates_help_tells_how_an_anthropic_sdk_client_sends_its_key_there():
    """A new user's tour (stop 86): the anthropic SDK (2.17) sends ``api_key`` as a Bearer token, which the emulator,
    as Anthropic's API, refuses (401 "x-api-key header is required"); ``emulate --help`` named only the engine's
    ``--base-url``, so a user's own client failed with no word on why. The recipe it gives now is let in, the plain
    client refused. Fails on the code before (the help says nothing of x-api-key)."""
    import anthropic

    from engine.emulator import Emulator

    r = runner.invoke(app, ["emulate", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    words = " ".join(r.output.split())
    assert 'default_headers={"x-api-key": "any", "Authorization": anthropic.Omit()}' in words, words
    with Emulator(latency_scale=0.0, speedup=1e4) as emu:
        base = emu.anthropic_base_url("anthropic")
        told = anthropic.Anthropic(base_url=base, api_key="any", max_retries=0,
                                   default_headers={"x-api-key": "any", "Authorization": anthropic.Omit()})
        ask = {"model": "claude-haiku-5-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        assert told.messages.create(**ask).usage.output_tokens > 0
        with pytest.raises(anthropic.AuthenticationError, match="x-api-key header is required"):
            anthropic.Anthropic(base_url=base, api_key="any", max_retries=0).messages.create(**ask)
