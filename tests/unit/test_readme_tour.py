"""What a new user's walk through the README ran into (a helper's tour, stop 64)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine import default_catalog
from engine.app.cli import app
from engine.core.errors import TraceError
from engine.core.tracegen import _parse_model

runner = CliRunner()
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:50.99,396,109\n"


def test_a_builders_model_named_alone_takes_its_provider_as_a_trace_line_does(tmp_path):
    """`trace from-azure ... --model gpt-5.4-mini` was refused ("write it as provider/model, e.g. openai/gpt-5",
    a model that shuts down within days), where a trace line naming the same model alone is taken."""
    csv, out = tmp_path / "a.csv", tmp_path / "a.jsonl"
    csv.write_text(AZURE)
    r = runner.invoke(app, ["trace", "from-azure", str(csv), "--out", str(out), "--model", "gpt-5.4-mini"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and {(x["provider"], x["model"]) for x in rows} == {("openai", "gpt-5.4-mini")}


def test_a_builders_model_alone_that_no_provider_or_two_offer_says_what_to_write():
    cat = default_catalog()
    with pytest.raises(TraceError, match="did you mean 'gpt-5.4-mini'"):
        _parse_model("gpt-5.4-mimi", cat)
    twice = cat.model_copy(update={"providers": {**cat.providers, "azure": cat.providers["openai"]}})
    with pytest.raises(TraceError, match=r"several providers.*'openai/gpt-5.4-mini', 'azure/gpt-5.4-mini'"):
        _parse_model("gpt-5.4-mini", twice)
    assert _parse_model("azure/gpt-5.4-mini", twice) == ("azure", "gpt-5.4-mini")


def test_a_live_run_that_got_an_earlier_runs_answers_says_so_not_missed_deadlines(monkeypatch):
    """The second run of the README's `run --providers http` against the same emulator: $24.73 against a bound of
    $28.12, every deadline met, explained as "below the bound by missing deadlines"."""
    import io

    from rich.console import Console

    import engine.app.cli_report as cli_report

    row = {"policy": "smart (live)", "cost_usd": 24.73, "saving_vs_naive": 0.539, "capture_of_achievable": 1.133,
           "deadline_met_frac": 1.0, "deadline_met_by_priority": {"urgent": 1.0}, "failed": 0, "exact_hits": 0,
           "in_flight_hits": 0, "near_hits": 0, "recommendations": {}, "rejected": {}, "sim_requests_per_s": None}
    http = {"calls": "http", "batches_cancelled": 6, "members_saved_by_cancel": 345}
    doc = {"trace": "conv", "requests": 19366, "lower_bound_usd": 28.12, "results": [row], "samples": [],
           "engine_report": {"providers": {"openai": {**http, "replayed": 1234, "replayed_usd": 2.5},
                                           "anthropic": {**http, "replayed": 0, "replayed_usd": 0.0}}}}
    con = Console(width=200, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_report, "console", con)
    cli_report.print_table(doc)
    cli_report.print_providers(doc)
    text = " ".join(con.export_text().split())
    assert "below the bound by 1,234 answers an earlier run paid for" in text and "missing deadlines" not in text
    assert "openai: real calls over HTTP" in text and "Idempotency-Key: 1,234 ($2.500000 then, $0 here)" in text
    assert text.count("Idempotency-Key") == 1  # anthropic had none


def test_a_live_run_beside_real_calls_names_the_providers_it_simulated(monkeypatch):
    """docs/providers.md: `smartbatch run` says, per provider, whether its calls were http or simulated. A run with
    OpenAI's endpoint alone on the emulator (a helper's tour) printed "openai: real calls over HTTP" and nothing of
    Anthropic's 11 requests, answered from the simulator: the run read as real throughout."""
    import io

    from rich.console import Console

    import engine.app.cli_report as cli_report

    rep = {"providers": {"openai": {"calls": "http"}, "anthropic": {"calls": "simulated"},
                         "google": {"calls": "simulated"}},
           "by_provider": {"openai": {"requests": 19, "cost_usd": 0.027}, "anthropic": {"requests": 11, "cost_usd": 0.057}}}
    con = Console(width=200, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_report, "console", con)
    cli_report.print_providers({"engine_report": rep})
    text = " ".join(con.export_text().split())
    assert "openai: real calls over HTTP" in text, text
    assert "anthropic: simulated, no HTTP endpoint in this run: its 11 request(s) were answered with placeholder" in text
    assert "google" not in text  # it served none
    con = Console(width=200, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_report, "console", con)
    cli_report.print_providers({"engine_report": {**rep, "providers": {k: {"calls": "simulated"} for k in rep["providers"]}}})
    assert "simulated" not in con.export_text()  # a simulated run is simulated throughout: nothing to tell apart
