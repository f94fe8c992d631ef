"""``smartbatch budget`` and ``status`` as a user reads them (two user walkthroughs): money as one figure, to the
micro-dollar with its trailing zeros trimmed down to the cents (``engine.app._words.dollars``), and a limit that
is no limit (inf, 1e308) refused where it is given, not where a stored one is read. No Ray: the driver's budget
methods run on a budget actor of memory (``test_budget_live._driver``)."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from engine.app import driver as driver_mod
from engine.app._words import dollars
from engine.app.cli import app
from engine.core._budget_check import budget_of
from engine.core.budgets import BudgetSpec
from engine.core.errors import ConfigError
from tests.unit.test_budget_live import CAT, DAY, _driver
from tests.unit.test_spend_views import _Attached


@pytest.fixture
def served(monkeypatch):
    """One engine's budget methods for every command of a test, as ``Engine.connect`` gives them."""
    eng = _driver()
    monkeypatch.setattr(eng, "stop", lambda: None)
    monkeypatch.setattr(driver_mod.Engine, "connect", classmethod(lambda cls, name, **k: eng))
    try:
        yield eng
    finally:  # a loop left open fails a later test (an unraisable ResourceWarning)
        eng._ray.loop.close()


@pytest.mark.parametrize(("usd", "said"), [(80, "$80.00"), (0.3, "$0.30"), (0.0123, "$0.0123"),
                                           (0.000244, "$0.000244"), (1234.5678, "$1,234.5678"), (0.0, "$0.00"),
                                           (-1e-9, "$0.00"), (-0.5, "-$0.50"), (math.inf, "$inf")])
def test_money_is_said_to_the_micro_dollar_with_its_trailing_zeros_trimmed_to_the_cents(usd, said):
    assert dollars(usd) == said


def test_budget_set_and_list_say_a_limit_of_80_as_80_dollars_and_keep_a_small_spend_whole(served):
    # A walkthrough: `budget set --max 80` printed "limit $80.000000".
    r = CliRunner().invoke(app, ["budget", "set", "--name", "prod", "--tenant", "acme", "--duration", "1d",
                                 "--max", "80", "--soft", "60.5"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "changed (limit was $1.00, soft -): budget tenant=acme/1d: limit $80.00, soft $60.50" in said, said
    assert "spent $0.00, reserved $0.00, remaining $80.00" in said
    assert ".000000" not in said


def test_status_says_each_figure_as_money_a_small_spend_beside_a_large_limit_with_its_digits(monkeypatch):
    class Spent(_Attached):
        def report(self) -> dict:
            rep = super().report()
            rep["spend_usd"] = rep["by_tenant"]["acme"]["cost_usd"] = 0.000244
            rep["budget"]["budgets"][0].update(max_budget=80.0, soft_budget=60.0, spent_usd=0.000244,
                                               reserved_usd=0.004, remaining_usd=79.995756)
            return rep

    monkeypatch.setattr(driver_mod.Engine, "connect", classmethod(lambda cls, name, **k: Spent()))
    r = CliRunner().invoke(app, ["status", "--name", "prod"], terminal_width=200)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "spend $0.000244 (USD" in out and "list price $0.02, saving $0.0077" in out
    assert "$80.00" in out and "$60.00 (passed)" in out and "$0.004" in out and "$79.995756" in out
    assert "80.000000" not in out and "$0.000244" in out.split("spend by tenant")[1]


@pytest.mark.parametrize(("args", "flag"), [(["--max", "inf"], "--max inf"), (["--max", "1e308"], "--max 1e+308"),
                                            (["--max", "-inf"], "--max -inf"),
                                            (["--max", "5", "--soft", "inf"], "--soft inf")])
def test_budget_set_refuses_a_limit_that_is_not_finite_or_past_any_account_naming_the_flag(served, args, flag):
    # A walkthrough: `--max inf` was taken ("limit $inf") and `--max 1e308` printed a 300-digit figure.
    r = CliRunner().invoke(app, ["budget", "set", "--name", "prod", "--tenant", "acme", "--duration", "1d", *args])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and said.startswith(f"error: {flag}: give a finite number of USD per window, at most "
                                                "1,000,000,000; for no limit, remove the budget"), r.output
    assert served.budgets()[0]["max_budget"] == 1.0 and served.budgets()[0]["soft_budget"] is None  # as it was


def test_a_driver_is_refused_a_limit_that_is_not_finite_but_a_stored_one_still_loads_and_changes():
    eng = _driver()
    try:
        for field, value in (("max_budget", math.inf), ("max_budget", 2e9), ("soft_budget", math.nan)):
            with pytest.raises(ConfigError, match=rf"^budget\.{field} = {value!r}: give a finite number of USD"):
                eng.set_budget(tenant="acme", budget_duration="1d", **{field: value})
        with pytest.raises(ConfigError, match=r"^budget\.max_budget = inf: "):
            eng.set_budget(BudgetSpec(tenant="beta", max_budget=math.inf))
        # A number as text (a JSON form's, an environment's) is read as that number, and judged so: a review
        # found "inf" and "1e12" taken, a limit of $inf as before the check.
        for field, value in (("max_budget", "inf"), ("max_budget", "1e12"), ("soft_budget", "Infinity")):
            with pytest.raises(ConfigError, match=rf"^budget\.{field} = {value!r}: give a finite number of USD"):
                eng.set_budget(tenant="acme", budget_duration="1d", **{field: value})
        assert eng.budgets()[0]["max_budget"] == 1.0 and len(eng.budgets()) == 1
        assert eng.set_budget(tenant="acme", budget_duration="1d", max_budget=1e9)["max_budget"] == 1e9  # the bound
    finally:
        eng.stop()
    # Checked at input only: a budget kept (in Redis, a journal) with an infinite limit before loads as it was,
    # and a change of its soft limit alone is taken, its limit kept.
    stored = BudgetSpec.model_validate({**DAY.model_dump(), "max_budget": math.inf})
    assert budget_of({"tenant": "acme", "budget_duration": "1d", "soft_budget": 5.0}, (stored,), CAT) == \
        stored.model_copy(update={"soft_budget": 5.0})
