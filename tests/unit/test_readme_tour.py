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

