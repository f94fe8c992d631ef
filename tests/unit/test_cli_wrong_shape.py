"""A new user's tour of the README's commands (stop 70, a helper's docs check): a file of the wrong shape, or a
flag value of the wrong form, is one error that says what the input is and which command or form takes it,
not one complaint per line nor a library's traceback. No Ray."""
import json

import pytest
from typer.testing import CliRunner

from engine.app.cli import app

runner = CliRunner()


def _trace(tmp_path):
    p = tmp_path / "conv.jsonl"
    p.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": i, "model": "gpt-5-mini", "prompt": f"hi {i}"})
                         + "\n" for i in range(30)))
    return p


def _mooncake(tmp_path):
    p = tmp_path / "mooncake.jsonl"
    p.write_text("".join(json.dumps({"timestamp": i, "input_length": 700, "output_length": 50, "hash_ids": [i]})
                         + "\n" for i in range(5)))
    return p


def _azure(tmp_path):
    p = tmp_path / "azure.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 + "".join(f"2023-11-16 18:15:{i:02d}.0000000,100,20\n" for i in range(5)))
    return p


@pytest.mark.parametrize("make, says", [
    (_trace, "smartbatch run"),            # the project's own trace: replayed, not sent as a batch file
    (_mooncake, "trace from-mooncake"),
    (_azure, "trace from-azure"),
])
@pytest.mark.parametrize("command", [["batch", "{f}", "--out", "{out}"],
                                     ["trace", "from-openai-batch", "{f}", "--out", "{out}"]])
def test_a_file_that_is_no_batch_file_is_named_for_what_it_is_with_the_command_that_takes_it(tmp_path, make, says,
                                                                                             command):
    """`smartbatch batch traces/conv.jsonl` (the README's trace, given where a batch file goes) printed "field
    'custom_id': is required" for each of its lines, then "Fix the lines named (each needs a unique custom_id), or
    pass --skip-invalid", which skips every line and fails again."""
    f = make(tmp_path)
    r = runner.invoke(app, [a.format(f=f, out=tmp_path / "o.jsonl") for a in command])
    assert r.exit_code == 2, r.output
    head = r.output.strip().splitlines()[0:2]
    assert any(says in h for h in head) and "OpenAI Batch input file" in r.output, r.output
    assert "--skip-invalid" not in r.output, r.output
    assert not (tmp_path / "o.jsonl").exists()


def test_a_batch_file_with_some_bad_lines_still_names_each_and_offers_skip_invalid(tmp_path):
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}}
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "model": "gpt-5-mini", "prompt": "x"}) + "\n")
    r = runner.invoke(app, ["batch", str(p), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and ":2: field 'custom_id'" in r.output and "--skip-invalid" in r.output, r.output


def test_a_csv_given_to_from_mooncake_is_not_told_to_fix_its_rows(tmp_path):
    """The file is the problem, not its rows: the row builders' "fix or remove the rows named" came after it."""
    r = runner.invoke(app, ["trace", "from-mooncake", str(_azure(tmp_path)), "--out", str(tmp_path / "t.jsonl")])
    assert r.exit_code == 2 and "trace from-azure" in r.output and "rows named" not in r.output, r.output


def test_a_base_url_without_its_scheme_is_one_error_naming_the_flag(tmp_path, monkeypatch):
    """`--base-url openai=127.0.0.1:8765/openai/v1` printed pydantic's dump ("1 validation error for
    ProvidersSettings ... For further information visit https://errors.pydantic.dev/...")."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    r = runner.invoke(app, ["run", str(_trace(tmp_path)), "--dry-run", "--providers", "http",
                            "--base-url", "openai=127.0.0.1:8765/openai/v1"])
    assert r.exit_code == 2, r.output
    assert "--base-url 'openai=127.0.0.1:8765/openai/v1'" in r.output and "http://" in r.output, r.output
    assert "validation error" not in r.output and "errors.pydantic.dev" not in r.output, r.output
