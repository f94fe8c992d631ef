"""Bad input found on a new user's tour: each problem names the field, the value given and the fix, and a
file's count of bad lines counts lines, not problems."""

import json

import pytest

from engine.core.errors import TraceError
from engine.core.trace import parse_trace_lines

BASE = {"id": "r1", "arrival_s": 0, "model": "gpt-5.4-mini", "prompt": "Hi", "deadline_s": 600}


def problems_of(**kw) -> list[tuple[str, str]]:
    with pytest.raises(TraceError) as ei:
        parse_trace_lines([json.dumps({**BASE, **kw})])
    return [(f, m) for _, _, f, m in ei.value.problems]


@pytest.mark.parametrize("field, value, says", [
    ("arrival_s", -1, "must be >= 0, got -1"),
    ("input_tokens", -3, "must be >= 0, got -3"),
    ("max_output_tokens", 0, "must be >= 1, got 0"),
    ("input_tokens", 1.5, "must be a whole number, got 1.5"),
    ("tenant", "acme\n", "holds a control character ('acme\\n')"),
    ("tenant", "t" * 300, "300 characters long, over the limit of 256"),
])
def test_a_bound_or_pattern_is_said_with_the_value_given(field, value, says):
    # pydantic's own words ("Input should be greater than or equal to 0") named neither the value nor a fix.
    [(got, msg)] = problems_of(**{field: value})
    assert got == field and says in msg and "Input should" not in msg, msg


@pytest.mark.parametrize("value", ["yes", "no", 1, "false"])
def test_gather_takes_true_or_false_only(value):
    # pydantic's lax bool read "yes", "off", 1 and "1" as booleans where every other field of a line refuses a
    # string or a number in place of its JSON type (docs/traces.md, "Numbers are JSON numbers").
    [(field, msg)] = problems_of(gather=value)
    assert field == "gather" and "must be true or false" in msg, msg


def test_a_file_s_count_of_bad_lines_counts_lines_not_problems():
    lines = [json.dumps({k: v for k, v in BASE.items() if k != "arrival_s"} | {"id": "a", "deadline_s": -5}),
             json.dumps(BASE | {"id": "b", "promt": "x"}),
             json.dumps(BASE | {"id": "c"})]
    with pytest.raises(TraceError) as ei:
        parse_trace_lines(lines, source="t.jsonl")
    assert len(ei.value.problems) == 3  # line 1 has two
    assert str(ei.value).startswith("3 problems on 2 invalid trace line(s):"), str(ei.value)


def test_a_whole_file_s_problem_is_not_counted_as_a_line():
    with pytest.raises(TraceError) as ei:  # no valid line: the file's headline (line 0), then line 1's one problem
        parse_trace_lines([json.dumps(BASE | {"promt": "x"})], source="t.jsonl", skip_invalid=True)
    assert [n for _, n, _, _ in ei.value.problems] == [0, 1]
    assert str(ei.value).startswith("1 invalid trace line(s):"), str(ei.value)


@pytest.mark.parametrize("first, says", [
    ('{"id": "batch_req_1", "custom_id": "r1", "response": {"status_code": 200}, "error": null}',
     "batch output file"),
    ('{"id": "r1", "status": "ok", "cost_usd": 0.001, "mode": "sync"}', "results file"),
    ("variants:", "give it with --variants"),
    ('{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-5.4-mini"}}',
     "trace from-openai-batch"),
    ("{", "spans lines"),
])
def test_a_file_of_the_project_s_own_given_as_a_trace_is_named(first, says):
    # `bench variants.yaml` listed "not valid JSON" per line; a run's results.jsonl "'status' is not a request
    # field" per line: neither said which file it was, nor which to give instead.
    with pytest.raises(TraceError) as ei:
        parse_trace_lines([first, "  - name: x"], source="f.jsonl")
    (_, no, field, msg) = ei.value.problems[0]
    assert (no, field) == (0, "file") and says in msg, msg


@pytest.mark.parametrize("body, field, says", [
    ({"mesages": [{"role": "user", "content": "Hi"}]}, "body.mesages", "did you mean body.messages?"),
    ({"imput": "Hi"}, "body.imput", "did you mean body.input?"),
    ({"messages": [{"role": "user", "content": ""}]}, "body.messages", "the body has no text to send"),
    ({"temperature": 1}, "body.messages", "the body has no text to send"),
])
def test_a_body_with_no_text_names_a_misspelt_messages(body, field, says):
    # {"mesages": [...]} in a batch file's line was answered "the body has no text to send", naming
    # body.messages: the text was there, under a misspelt name the message did not show.
    [(got, msg)] = problems_of(prompt="", body=body)
    assert got == field and says in msg, msg


def test_a_batch_file_s_line_that_is_not_json_says_where_and_the_fix_once(tmp_path):
    from typer.testing import CliRunner

    from engine.app.cli import app

    p = tmp_path / "in.jsonl"
    good = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "Hi"}]}}
    p.write_text(json.dumps(good) + "\n" + json.dumps(good | {"custom_id": "r2"})[:-1] + "\n")
    r = CliRunner().invoke(app, ["batch", str(p), "--out", str(tmp_path / "out.jsonl")])
    # It said "not valid JSON (Expecting ',' delimiter); fix the line; fix the lines named ...": no column, two fixes.
    assert r.exit_code == 2 and "at column" in r.output and r.output.count("fix the line") == 1, r.output


def test_a_variant_with_a_misspelt_policy_key_names_the_typo(tmp_path):
    from engine.app.bench import load_variants
    from engine.core.errors import ConfigError

    p = tmp_path / "variants.yaml"
    p.write_text("variants:\n  - name: se\n    polcy: smart\n")
    # It said "variants[0].policy: Field required": the missing key, not the misspelt one beside it.
    with pytest.raises(ConfigError, match=r"variants\[0\]\.polcy: .*did you mean 'policy'\?"):
        load_variants(p)


def test_run_names_the_variant_whose_parameter_is_bad(tmp_path):
    from typer.testing import CliRunner

    from engine.app.cli import app

    trace, variants = tmp_path / "t.jsonl", tmp_path / "v.yaml"
    trace.write_text(json.dumps(BASE) + "\n")
    variants.write_text("variants:\n  - name: smart-x\n    policy: smart\n    params: {batch_gather: 0}\n")
    r = CliRunner().invoke(app, ["run", str(trace), "--policy", "smart-x", "--variants", str(variants), "--dry-run"])
    # bench said "variant 'smart-x' (policy smart): ..."; run said only "policy 'smart' has no parameter ...".
    assert r.exit_code != 0 and "variant 'smart-x' (policy smart)" in r.output, r.output


def test_a_live_budget_with_a_misspelt_field_names_it():
    from engine.core._budget_check import budget_of
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError

    # Engine.set_budget(tenant="acme", max_budgt=5) said "max_budget is missing": the typo went unnamed.
    with pytest.raises(ConfigError, match=r"budget\.max_budgt: not a budget field; did you mean max_budget\?"):
        budget_of({"tenant": "acme", "max_budgt": 5}, (), default_catalog())


def test_a_live_row_s_speed_is_not_called_simulated(monkeypatch):
    import io

    from rich.console import Console

    import engine.app.cli_report as cli_report
    from engine.app.bench import resolve_policies, run_bench
    from engine.core.tracegen import synth

    doc = run_bench(synth(30, seed=1), resolve_policies("naive", {}), trace_name="t")
    doc["results"][0] |= {"policy": "smart (live)", "sim_requests_per_s": None}
    doc["budgets"] = [{"tenant": None, "max_budget": 1.0, "budget_duration": None}]  # the short headers
    con = Console(width=100, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_report, "console", con)
    cli_report.print_table(doc)
    text = con.export_text()
    # `run` printed "live" in the req/s column above the legend "req/s: simulated".
    assert "live" in text and "req/s: simulated, live: the engine's run" in " ".join(text.split()), text


@pytest.mark.parametrize("value, says", [("", "is set but empty"), (None, "is not set")])
def test_an_empty_key_variable_is_not_called_unset(monkeypatch, value, says):
    from engine.app.provider_setup import key_problems
    from engine.core.catalog import default_catalog
    from engine.core.settings import ProvidersSettings, Settings

    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    if value is None:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OPENAI_API_KEY", value)
    # OPENAI_API_KEY= (exported, blank) was "is not set": the user looked for a missing export that was there.
    said = key_problems(default_catalog(), Settings(providers=ProvidersSettings(mode="http")))
    assert f"OPENAI_API_KEY holding the API key {says}" in said["openai"], said


def test_a_boolean_setting_says_what_it_takes(monkeypatch):
    from engine.core.errors import ConfigError
    from engine.core.settings import load_settings

    monkeypatch.setenv("SMARTBATCH_CACHE__SHARE_ACROSS_TENANTS", "maybe")
    # It said "Input should be a valid boolean, unable to interpret input".
    with pytest.raises(ConfigError, match=r"share_across_tenants = 'maybe' .*: must be true or false; fix or unset"):
        load_settings()


def test_a_base_url_in_a_simulated_run_is_refused_saying_how_to_call_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from engine.app.cli import app

    monkeypatch.delenv("SMARTBATCH_PROVIDERS__MODE", raising=False)
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps(BASE) + "\n")
    # Taken without a word: the dry run (and the run) simulated OpenAI while the user pointed it at a server.
    r = CliRunner().invoke(app, ["run", str(trace), "--dry-run", "--base-url", "openai=http://127.0.0.1:9/v1"])
    assert r.exit_code == 2 and "--base-url" in r.output and "--providers http" in r.output, r.output


@pytest.mark.parametrize(("var", "value", "says"), [
    ("SMARTBATCH_DEADLINES__URGENT", "-5", r"setting deadlines\.urgent \(from SMARTBATCH_DEADLINES__URGENT\): "
     r"must be > 0, got -5; fix or unset SMARTBATCH_DEADLINES__URGENT"),
    ("SMARTBATCH_SIM__SEED", "abc", r"sim\.seed = 'abc' .*: must be a whole number; fix or unset"),
    ("SMARTBATCH_DEADLINES__URGENT", "soon", r"deadlines\.urgent = 'soon' .*: must be a number; fix or unset"),
])
def test_a_number_setting_says_what_it_takes(monkeypatch, var, value, says):
    from engine.core.errors import ConfigError
    from engine.core.settings import load_settings

    monkeypatch.setenv(var, value)
    # It said pydantic's "Input should be greater than 0" (or "a valid integer, unable to parse string as an integer").
    with pytest.raises(ConfigError, match=says):
        load_settings()


def test_a_list_setting_given_one_object_says_to_write_a_json_list(monkeypatch):
    """A new user's tour (stop 81): the README's SMARTBATCH_BUDGETS__SPECS written for one budget as an object, not
    a list of one, said pydantic's "Input should be a valid tuple", a type no JSON has."""
    from engine.core.errors import ConfigError
    from engine.core.settings import load_settings

    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", '{"tenant": "acme", "max_budget": 50, "budget_duration": "1d"}')
    with pytest.raises(ConfigError, match=r"setting budgets\.specs \(from SMARTBATCH_BUDGETS__SPECS\): must be a JSON "
                                          r"list, not an object: write it in \[ \], e.g. '\[\{\"tenant\": \"acme\", "
                                          r"\"max_budget\": 50, \"budget_duration\": \"1d\"\}\]'; fix or unset"):
        load_settings()


@pytest.mark.parametrize(("var", "value", "says"), [
    ("SMARTBATCH_SIM__TURNAROUND_SCALE_BY_HOUR", '{"0": 1.5}', r"turnaround_scale_by_hour \(from SMARTBATCH_SIM__"
     r"TURNAROUND_SCALE_BY_HOUR\): must be a JSON list of numbers, not an object, e.g. '\[1.0, 0.8\]'; fix"),
    ("SMARTBATCH_BUDGETS__SPECS", "null", r"budgets\.specs \(from SMARTBATCH_BUDGETS__SPECS\): must be a JSON list, "
     r"e.g. '\[...\]', not null; fix"),
])
def test_a_list_setting_of_numbers_given_an_object_is_not_told_to_wrap_it(monkeypatch, var, value, says):
    """Review of stop 81's list message: it told every list setting given an object to write it in [ ], so
    SMARTBATCH_SIM__TURNAROUND_SCALE_BY_HOUR='{"0": 1.5}' was told "e.g. '[{"0": 1.5}]'", a list of an object that
    a list of numbers refuses again; and JSON's null was quoted as Python's None."""
    from engine.core.errors import ConfigError
    from engine.core.settings import load_settings

    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=says):
        load_settings()
