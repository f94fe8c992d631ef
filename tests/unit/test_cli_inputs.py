"""Bad flag values, odd paths and reruns at the command line (a helper's hunt, stop 57): each is one error naming
the flag and its fix (exit 2), never "unexpected, a bug in smartbatch"; no written file is cut short or left
empty; a rerun never pays again for what its output already answers without being told to."""
import json

import pytest
from typer.testing import CliRunner

from engine.app.cli import app

runner = CliRunner()


def test_write_trace_interrupted_midway_keeps_the_previous_trace(tmp_path):
    """Ctrl-C (or a full disk) while a trace builder writes --out left the file cut short: the previous trace gone,
    and a shorter one that loads without a word (confirmed with SIGINT on `trace synth --n 200000`: 6,481 of
    200,000 lines, `bench` ran on it)."""
    from engine.core.trace import load_trace, write_trace

    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["trace", "synth", "--n", "50", "--seed", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    before = out.read_bytes()
    reqs = load_trace(out).requests

    def interrupted():
        yield from reqs[:10]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_trace(interrupted(), out)
    assert out.read_bytes() == before, f"{out} now holds {len(out.read_bytes().splitlines())} of 50 lines"


def test_a_trace_written_to_a_stream_or_through_a_link_leaves_the_stream_and_the_link(tmp_path):
    """`trace synth --out /dev/null` run as root replaced /dev/null with a regular file (the trace, written beside
    the path, was renamed over it: a helper's run, stop 82, left every later write to /dev/null in a file); a FIFO
    went so too, its reader given nothing. A link's target was left as it was, the link replaced by the trace."""
    import os
    import stat
    import threading

    from engine.core.trace import load_trace, write_trace

    src = tmp_path / "src.jsonl"
    assert runner.invoke(app, ["trace", "synth", "--n", "20", "--seed", "1", "--out", str(src)]).exit_code == 0
    reqs = load_trace(src).requests
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert write_trace(reqs, fifo) == 20
    reader.join(30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert got and len(got[0].splitlines()) == 20, got
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert write_trace(reqs, link) == 20
    assert link.is_symlink(), "the link was replaced by a file"
    assert len(load_trace(target).requests) == 20


def _small_trace(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id":"a1","arrival_s":0,"model":"gpt-5-mini","prompt":"hello","deadline_s":600}\n'
                 '{"id":"a2","arrival_s":1,"model":"gpt-5-mini","prompt":"hello2","deadline_s":6000}\n')
    return p


@pytest.mark.parametrize("duration", ["0.5mo", "0.25mo"])
def test_a_fractional_month_budget_window_is_refused_naming_the_flag(tmp_path, duration):
    """`--budget-duration 0.5mo` passes parse_duration (n > 0), then window_bounds does `months % int(0.5)`:
    ZeroDivisionError, 'unexpected, a bug' in bench (exit 1), and in `run` (or a SMARTBATCH_BUDGETS__SPECS of
    it, in serve) the BudgetController fails every reservation and the run ends exit 1 with no results file.
    engine/core/budgets.py:46 and :65. ("1.5mo" is silently taken as 1 month, the same int().)"""
    r = runner.invoke(app, ["bench", str(_small_trace(tmp_path)), "--policies", "naive", "--budget", "1",
                            "--budget-duration", duration, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--budget-duration" in r.output, r.output


def test_a_huge_month_budget_window_is_refused_naming_the_flag(tmp_path):
    """`--budget-duration 100000mo` (past year 9999): ValueError 'year 0 is out of range', unexpected (exit 1)."""
    r = runner.invoke(app, ["bench", str(_small_trace(tmp_path)), "--policies", "naive", "--budget", "1",
                            "--budget-duration", "100000mo", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--budget-duration" in r.output, r.output


def test_an_out_path_with_brackets_is_printed_as_given_and_the_command_succeeds(tmp_path):
    """The 'wrote ...' lines are rich markup: `--out 'o/[/x]'` made bench write everything and then exit 1 with
    'MarkupError ... (unexpected, so a bug in smartbatch)'; `batch --out` does the same after a paid run
    (cli_batch.py:166), and `--out 'o/[exp1]'` is printed as 'o/'. engine/app/cli.py:143/146/231/355."""
    out = tmp_path / "[/x]"
    r = runner.invoke(app, ["bench", str(_small_trace(tmp_path)), "--policies", "naive", "--out", str(out)])
    assert (out / "results.json").exists()
    assert r.exit_code == 0, r.output
    out2 = tmp_path / "[exp1]"
    r = runner.invoke(app, ["bench", str(_small_trace(tmp_path)), "--policies", "naive", "--out", str(out2)])
    assert r.exit_code == 0 and "[exp1]" in r.output, r.output


def test_a_variant_named_after_the_policy_it_runs_elsewhere_cannot_shadow_a_registered_name(tmp_path):
    """A variant named 'naive' (policy batch-all) replaces the real naive under its name: the table's 'naive'
    row is batch-all's cost, with no word. engine/app/bench.py:73."""
    v = tmp_path / "v.yaml"
    v.write_text("variants:\n  - name: naive\n    policy: batch-all\n")
    r = runner.invoke(app, ["bench", str(_small_trace(tmp_path)), "--policies", "naive,smart", "--variants", str(v),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "naive" in r.output, r.output


@pytest.mark.parametrize("args", [
    ["run", "{trace}", "--speedup", "inf", "--dry-run"],          # live.py:213 -> provider_setup.py:64 ValidationError
    ["trace", "synth", "--n", "10", "--duration", "inf", "--out", "{out}"],   # tracegen.py:283 OverflowError
    ["run", "{trace}", "--address", "bad address", "--out", "{dir}"],        # _driver_shared.py:48 ValueError
    ["bench", "{trace}", "--policies", "engine.core.request:Request", "--out", "{dir}"],  # policies/base.py:137
])
def test_bad_flag_values_are_one_error_naming_the_flag_not_an_unexpected_bug(tmp_path, args):
    trace = _small_trace(tmp_path)
    args = [a.format(trace=trace, out=tmp_path / "s.jsonl", dir=tmp_path / "o") for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "unexpected" not in r.output, r.output


@pytest.mark.parametrize("args", [["emulate", "--port", "70000"], ["serve", "--name", "hunt-cli-port", "--http-port", "70000"]])
def test_a_port_out_of_range_names_the_flag(args):
    """OverflowError from bind(): 'unexpected, a bug in smartbatch', exit 1 (serve_http.py:37, emulator)."""
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "unexpected" not in r.output, r.output


def test_a_synth_duration_past_a_year_names_duration_not_rows(tmp_path):
    """`trace synth --duration 1e9` is refused as 'arrives ... s after the first row ... split the file, or fix
    the outlier ... Fix or remove the rows named': synth has no rows or file; the flag to change is --duration."""
    r = runner.invoke(app, ["trace", "synth", "--n", "10", "--duration", "1e9", "--out", str(tmp_path / "s.jsonl")])
    assert r.exit_code == 2 and "--duration" in r.output, r.output


def _bline(cid, content="Name three rivers.", model="gpt-5-mini"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": content}],
                                "max_completion_tokens": 50}})


def test_a_batch_refused_before_anything_is_sent_leaves_no_empty_output_file(tmp_path, monkeypatch):
    """`_output_lock` opens OUT with "a" (cli_batch.py:248) before Engine.start: a run refused there (a key not
    exported with --providers http, a bad --address) leaves a new, empty OUT behind, with no error file beside
    it: an empty answer file of a batch that never ran."""
    import engine.app.driver as driver_mod
    from engine.core.errors import ConfigError

    def refused(*_a, **_k):
        raise ConfigError("providers.endpoints.openai: the environment variable OPENAI_API_KEY ... is not set")
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(refused))
    p = tmp_path / "in.jsonl"
    p.write_text(_bline("a") + "\n")
    out = tmp_path / "o.jsonl"
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert not out.exists(), f"{out} left behind ({out.stat().st_size} bytes)"


def test_a_rerun_over_an_output_that_answers_its_lines_does_not_pay_for_them_again_silently(tmp_path, monkeypatch):
    """OUT already answers line a (an earlier run, paid); the same command again without --resume sends a again
    (paid twice) and overwrites the earlier paid answer, with no word. --resume exists, but nothing points to it
    when OUT holds this input's answers."""
    import engine.app.driver as driver_mod
    from engine.core.catalog import default_catalog
    from tests.unit.helpers import AnsweringEngine

    calls: list[list[str]] = []
    monkeypatch.setattr(driver_mod.Engine, "start",
                        classmethod(lambda cls, *a, **k: AnsweringEngine(default_catalog(), calls)))
    p = tmp_path / "in.jsonl"
    p.write_text(_bline("a") + "\n")
    out = tmp_path / "o.jsonl"
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    first = out.read_text()
    calls.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])
    assert r.exit_code == 2 and calls == [] and "--resume" in r.output and "--overwrite" in r.output, r.output
    assert out.read_text() == first  # the paid answer is still there
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and calls == [], r.output  # nothing left to send
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and calls == [["a"]], r.output  # asked for: sent again
    other = tmp_path / "other.jsonl"  # another input's lines, answered in OUT: not dropped unasked either
    other.write_text(_bline("b") + "\n")
    r = runner.invoke(app, ["batch", str(other), "--out", str(out)])
    assert r.exit_code == 2 and "another input" in r.output and calls == [["a"]], r.output


def test_a_base_url_credential_is_not_printed_by_dry_run(tmp_path, monkeypatch):
    """`run --dry-run --providers http --base-url openai=http://user:KEY@host/v1` printed the URL whole, credential
    included ('openai /v1/chat/completions at http://u:sk-test-SECRET123@h/v1:'; cli_report.py:127, the same
    sample is printed after a real run). Such a URL is refused now, naming the flag (the SDKs sent its credentials
    in place of the key: tests/unit/test_base_url_credentials.py), the credential printed nowhere."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-other")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-other")
    r = runner.invoke(app, ["run", str(_small_trace(tmp_path)), "--dry-run", "--providers", "http",
                            "--base-url", "openai=http://u:sk-test-SECRET123@127.0.0.1:9/v1"])
    assert r.exit_code == 2 and "--base-url openai" in r.output and "user:password@" in r.output, r.output
    assert "SECRET123" not in r.output, r.output


def test_a_trace_id_with_a_control_character_is_refused_as_a_custom_id_or_tenant_is(tmp_path):
    """A batch file's custom_id and a tenant refuse control characters; a trace's id takes NUL, newline and ESC,
    and `run` prints it raw to the terminal in its samples ('  a^@b (openai/gpt-5-mini, sync, ...)')."""
    from engine.core.trace import load_trace

    p = tmp_path / "t.jsonl"
    p.write_text('{"id":"a\\u0000b","arrival_s":0,"model":"gpt-5-mini","prompt":"hello"}\n'
                 '{"id":"ok","arrival_s":0,"model":"gpt-5-mini","prompt":"hello2"}\n')
    tr = load_trace(p, skip_invalid=True)
    assert [r.id for r in tr.requests] == ["ok"], [r.id for r in tr.requests]


def test_a_password_holding_an_at_sign_is_masked_whole_and_a_month_count_too_long_to_read_names_the_field():
    """A review: ``redis://u:p@ss@h`` printed ``ss@h`` of the password; a budget window of 400 digits of months was
    an OverflowError rather than the field's error."""
    from engine.core.budgets import parse_duration
    from engine.core.settings import masked_url

    assert masked_url("redis://u:p@ss@h:1/0") == "redis://u:***@h:1/0"
    assert masked_url("https://sk-abc@host/v1?q=a@b") == "https://***@host/v1?q=a@b"
    with pytest.raises(ValueError, match="budget_duration"):
        parse_duration("1" * 400 + "mo")


def test_a_dry_run_says_which_api_key_the_real_run_would_stop_on_and_never_prints_one(tmp_path, monkeypatch):
    """A new user's tour: `run --dry-run --providers http` without ANTHROPIC_API_KEY printed the plan with no word
    of the key; the real run then stopped at its start naming the variable. The plan says it now, in the start's
    words, and still succeeds (it sends nothing); a key an HTTP header cannot carry is said too, never shown."""
    from engine.app.provider_setup import http_setup
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError
    from engine.core.settings import ProvidersSettings, Settings

    p = tmp_path / "t.jsonl"
    p.write_text('{"id":"a1","arrival_s":0,"model":"gpt-5-mini","prompt":"hello","deadline_s":600}\n'
                 '{"id":"a2","arrival_s":1,"model":"claude-haiku-4-5","prompt":"hello2","deadline_s":6000}\n')
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET42 ")  # a trailing space, as pasted
    r = runner.invoke(app, ["run", str(p), "--dry-run", "--providers", "http"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "dry run: 2 requests, nothing sent" in said
    assert "SECRET42" not in r.output
    settings = Settings(providers=ProvidersSettings(mode="http"))
    with pytest.raises(ConfigError) as start:  # what the real start says, for each key in turn
        http_setup(default_catalog(), settings)
    assert "OPENAI_API_KEY" in str(start.value) and " ".join(str(start.value).split()) in said
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fine")
    with pytest.raises(ConfigError) as start:
        http_setup(default_catalog(), settings)
    assert "ANTHROPIC_API_KEY" in str(start.value) and " ".join(str(start.value).split()) in said
    r = runner.invoke(app, ["run", str(p), "--dry-run", "--providers", "http"])
    assert r.exit_code == 0 and "OPENAI_API_KEY" not in r.output and "ANTHROPIC_API_KEY" in r.output, r.output
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-fine")
    r = runner.invoke(app, ["run", str(p), "--dry-run", "--providers", "http"])
    assert r.exit_code == 0 and "API_KEY" not in r.output and "API key" not in r.output, r.output


def test_a_key_given_in_place_of_its_variable_is_never_printed_by_the_start_or_the_dry_run(tmp_path, monkeypatch):
    """A review: SMARTBATCH_PROVIDERS__ENDPOINTS__OPENAI__API_KEY_ENV=$OPENAI_API_KEY (the key where its variable's
    name goes) made the start say "the environment variable sk-... holding the API key is not set", and the dry
    run, which now prints the start's words, printed the key on the terminal."""
    from engine.app.provider_setup import http_setup, key_problems
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError
    from engine.core.settings import ProviderEndpoint, ProvidersSettings, Settings

    secret = "sk-proj-SECRET77abc"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-fine")
    endpoints = {"openai": ProviderEndpoint(api="openai", api_key_env=secret),
                 "anthropic": ProviderEndpoint(api="anthropic", api_key_env="ANTHROPIC_API_KEY")}
    settings = Settings(providers=ProvidersSettings(mode="http", endpoints=endpoints))
    said = key_problems(default_catalog(), settings)
    assert list(said) == ["openai"] and "api_key_env" in said["openai"] and "SECRET77" not in said["openai"]
    with pytest.raises(ConfigError) as start:
        http_setup(default_catalog(), settings)
    assert "providers.endpoints.openai.api_key_env" in str(start.value) and "SECRET77" not in str(start.value)
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__OPENAI__API_KEY_ENV", secret)
    r = runner.invoke(app, ["run", str(_small_trace(tmp_path)), "--dry-run", "--providers", "http"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "api_key_env" in r.output, r.output
    assert "SECRET77" not in r.output, r.output


def test_a_dry_run_names_the_address_an_sdk_variable_points_the_real_run_at(tmp_path, monkeypatch):
    """`OPENAI_BASE_URL=http://127.0.0.1:8765/openai/v1 smartbatch run --dry-run --providers http` (the emulator, as
    docs/providers.md points the SDKs at it) printed 'openai /v1/chat/completions at (the SDK's default)', where
    the real run's calls go to that address (a new user's tour, stop 79)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-other")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-other")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/openai/v1")
    monkeypatch.delenv("SMARTBATCH_PROVIDERS__ENDPOINTS", raising=False)
    r = runner.invoke(app, ["run", str(_small_trace(tmp_path)), "--dry-run", "--providers", "http"])
    assert r.exit_code == 0, r.output
    assert "openai /v1/chat/completions at http://127.0.0.1:9/openai/v1:" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize(("url", "fix"), [("ftp://127.0.0.1:9/v1", "openai=http://127.0.0.1:9/v1"),
                                          ("127.0.0.1:9/v1", "openai=http://127.0.0.1:9/v1"),
                                          ("HTTPS://api.example.com/v1", "openai=https://api.example.com/v1"),
                                          ("https//api.example.com/v1", "openai=https://api.example.com/v1"),
                                          ("api.example.com/v1", "openai=https://api.example.com/v1"),
                                          ("vllm:8000/v1", "openai=http://vllm:8000/v1")])
def test_a_base_url_of_another_scheme_is_told_a_fix_that_is_a_url(tmp_path, url, fix):
    """`--base-url openai=ftp://x` was told "write --base-url openai=http://ftp://x" (a new user's tour, stop 79);
    and a review of it: `HTTPS://api.example.com/v1` was told `http://api.example.com/v1`, the key in clear to a
    remote API, `https//h` `http://https//h`: a remote host's fix keeps or takes https."""
    r = runner.invoke(app, ["run", str(_small_trace(tmp_path)), "--dry-run", "--providers", "http",
                            "--base-url", f"openai={url}"])
    assert r.exit_code == 2 and f"write --base-url {fix}" in " ".join(r.output.split()), r.output


def test_a_base_url_of_a_misspelt_endpoint_is_told_the_one_it_may_mean_among_all_it_takes(tmp_path):
    """`--base-url opnai=...` was told "endpoints are ['anthropic', 'openai']": no word of the slip, and google,
    which the flag takes too (its preset), left out (a helper's tour of docs/providers.md)."""
    r = runner.invoke(app, ["run", str(_small_trace(tmp_path)), "--dry-run", "--providers", "http",
                            "--base-url", "opnai=http://127.0.0.1:9/openai/v1"])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "did you mean 'openai'?" in said and "anthropic, google, openai" in said, r.output
