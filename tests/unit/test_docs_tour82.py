"""A demanding user's tour of docs/service.md, docs/budgets.md and docs/traces.md (a helper's, stop 82): what
ran other than the page says, each pinned here. No Ray."""

from __future__ import annotations

import pytest

from engine.app.cli_budget import budget_line
from engine.core.errors import TraceError
from engine.core.trace import load_trace


def _row(duration: str | None, window: str) -> dict:
    return {"budget": "tenant='alice@example.com'" + (f"/{duration}" if duration else ""), "window": window,
            "budget_duration": duration, "max_budget": 5.0, "soft_budget": None, "spent_usd": 0.0,
            "reserved_usd": 0.0, "remaining_usd": 5.0, "soft_exceeded": False}


def test_a_budget_that_never_resets_is_said_so_not_dated_from_engine_second_zero():
    # `budget set --tenant alice@example.com --max 5` on a real-speed serve said "in its window from t=0s": a
    # second of no clock the reader has (the calendar's windows read "2026-12-07 00:00 UTC"), where `status`
    # says "whole run" of the same window.
    line = budget_line(_row(None, "0"))
    assert "t=0s" not in line and "never resets" in line, line
    assert budget_line(_row("1d", "1796601600")).endswith("in its window from 2026-12-07 00:00 UTC")


AZURE_CSV = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
             + "2023-11-16 18:15:46.6805900,374,44\n" * 30)
MOONCAKE = '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}\n' * 30


@pytest.mark.parametrize("name,text,builder", [("code.csv", AZURE_CSV, "trace from-azure"),
                                               ("raw.jsonl", MOONCAKE, "trace from-mooncake")])
def test_a_recorded_source_given_as_a_trace_is_said_once_not_followed_by_each_lines_problem(tmp_path, name,
                                                                                            text, builder):
    # `bench azure_llm_2023_code.csv` named the builder, then listed 19 lines of "not valid JSON" and "... and 8801
    # more"; a Mooncake file's 19 lines said "'timestamp' is not a request field; remove it", a fix that is wrong
    # for a file that wants converting. The file's kind is its one problem.
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert len(info.value.problems) == 1, str(info.value)
    (_, no, field, msg) = info.value.problems[0]
    assert (no, field) == (0, "file") and builder in msg and "no requests" in msg, msg
    assert "not valid JSON" not in str(info.value) and "not a request field" not in str(info.value)
