"""A budget of the start's settings whose limit is no limit (inf, 1e12, NaN), as ``Engine.set_budget`` and
``smartbatch budget set`` judge one (``engine.core._budget_check.limit_problem``). Before (a stop's notes), inf
and 1e12 from ``SMARTBATCH_BUDGETS__SPECS`` were taken at start, shown as "limit $inf", where both live changes
refused them. Refused now by the check every start runs (``check_budgets``: ``actors.remote.start_actors``,
the simulator), naming the setting and how to say no limit. No Ray."""

from __future__ import annotations

import json
import math

import pytest

from engine.core._budget_check import budget_of, check_budgets
from engine.core.budgets import BudgetSettings, BudgetSpec
from engine.core.catalog import default_catalog
from engine.core.errors import ConfigError
from engine.core.request import Request
from engine.core.settings import Settings, load_settings, with_budget
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
ENV = "SMARTBATCH_BUDGETS__SPECS"


def from_env(monkeypatch, **fields) -> Settings:
    spec = {"tenant": "acme", "budget_duration": "1d", **fields}
    monkeypatch.setenv(ENV, json.dumps([spec]))  # inf and NaN written as JSON's Infinity and NaN, as json.dumps does
    return load_settings()


@pytest.mark.parametrize(("fields", "said"), [({"max_budget": math.inf}, "max_budget = inf"),
                                              ({"max_budget": 1e12}, "max_budget = 1000000000000.0"),
                                              ({"max_budget": math.inf, "soft_budget": 100}, "max_budget = inf")])
def test_a_start_budget_that_is_no_limit_is_refused_naming_the_setting_and_how_to_say_no_limit(monkeypatch, fields,
                                                                                                said):
    settings = from_env(monkeypatch, **fields)
    with pytest.raises(ConfigError) as exc:
        check_budgets(CAT, settings.budgets)
    assert str(exc.value) == (f"setting budgets.specs.0.{said}: give a finite number of USD per window, at most "
                              f"1,000,000,000; for no limit, leave budget tenant=acme/1d out of {ENV} (the "
                              "settings' budgets.specs)" + ("; to keep its soft alert alone, give max_budget 1e9"
                                                            if "soft_budget" in fields else ""))


def test_a_flags_budget_past_the_bound_is_refused_naming_its_flag_not_the_settings():
    with pytest.raises(ConfigError, match=r"^budget_usd \(--budget\) = 1000000000000.0: give a finite number of USD "
                                          r"per window, at most 1,000,000,000; for no limit, leave it out$"):
        with_budget(Settings(), 1e12)
    with pytest.raises(ConfigError, match=r"^the budget of tenant 'acme' \(--tenant-budget\) = 2000000000.0: "):
        with_budget(Settings(), 10, {"acme": 2e9})
    assert with_budget(Settings(), 1e9).budgets.specs[0].max_budget == 1e9  # the bound itself is a limit


def test_a_simulation_is_refused_at_its_start_as_an_engine_is_and_the_bound_itself_is_taken():
    reqs = [Request(id="r1", tenant="acme", model="gpt-5-mini", input_tokens=10, output_tokens=5, arrival_s=0.0)]
    spec = BudgetSpec(tenant="acme", max_budget=math.inf, budget_duration="1d")  # BudgetSpec loads a stored one
    with pytest.raises(ConfigError, match=r"^setting budgets\.specs\.0\.max_budget = inf: "):
        simulate(reqs, load_policy("naive", CAT), settings=Settings(budgets=BudgetSettings(specs=(spec,))))
    bound = Settings(budgets=BudgetSettings(specs=(spec.model_copy(update={"max_budget": 1e9}),)))
    assert simulate(reqs, load_policy("naive", CAT), settings=bound).served.tolist() == [True]


def test_a_nan_limit_is_refused_at_every_way_in_so_no_budget_that_passes_everything_runs(monkeypatch):
    """A NaN limit would hold nothing: every comparison with it is false, so ``spent + cost > limit`` never is.
    None reaches a running budget: the settings (``BudgetSpec``'s ``ge=0`` is false for NaN too), ``with_budget``
    (``--budget``), a live change and the start's check each refuse it, naming the field."""
    for fields in ({"max_budget": math.nan}, {"max_budget": 5, "soft_budget": math.nan}, {"max_budget": "nan"}):
        field = "soft_budget" if "soft_budget" in fields else "max_budget"
        with pytest.raises(ConfigError, match=rf"^setting budgets\.specs\.0\.{field} \(from {ENV}\): .*got nan"):
            from_env(monkeypatch, **fields)
    monkeypatch.delenv(ENV)
    with pytest.raises(ConfigError, match=r"^budget_usd \(--budget\) must be a number of US dollars >= 0, got nan"):
        with_budget(Settings(), math.nan)
    with pytest.raises(ConfigError, match=r"^budget\.max_budget = nan: give a finite number"):
        budget_of({"tenant": "acme", "budget_duration": "1d", "max_budget": math.nan}, (), CAT)
    # Past them all (a spec built without its checks): the start's check refuses it still.
    nan = BudgetSpec.model_construct(tenant="acme", max_budget=math.nan, soft_budget=None, budget_duration="1d")
    assert not (0.5 > nan.max_budget)  # what a NaN limit does to the check of a claim: it never holds
    with pytest.raises(ConfigError, match=r"^setting budgets\.specs\.0\.max_budget = nan: give a finite number"):
        check_budgets(CAT, BudgetSettings.model_construct(specs=(nan,)))


def test_a_start_refuses_such_a_budget_before_a_killed_runs_take_back_and_before_any_ray(monkeypatch, tmp_path):
    """Refused only by the actors' start, the budget came after ``Engine.start`` took back what a killed run left on
    journal.dir (cancelling its provider batches under way, waiting up to minutes for them) and started a Ray;
    `batch` after `prepare` (the same take-back) and `serve` after a killed endpoint's rescue: each for a start
    refused (a review of stop 80). Now the first check of each, as the speed-up's is."""
    import tempfile

    from typer.testing import CliRunner

    import engine.app.cli_batch as cli_batch
    import engine.app.cli_serve as cli_serve
    import engine.app.driver as driver
    from engine.app.cli import app

    settings = from_env(monkeypatch, max_budget=math.inf)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # serve's name claims
    first = "a killed run's journal was taken back (its provider batches cancelled) before the refusal"
    monkeypatch.setattr(driver, "take_back", lambda *a, **k: pytest.fail(first))
    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: pytest.fail("a Ray was started for a refused start"))
    monkeypatch.setattr(cli_batch, "prepare", lambda *a, **k: pytest.fail(first))
    monkeypatch.setattr(cli_serve, "prepare_endpoint", lambda *a, **k: pytest.fail(first))
    monkeypatch.setattr(cli_serve, "init_ray", lambda *a, **k: pytest.fail("a Ray was started for a refused serve"))
    said = r"setting budgets\.specs\.0\.max_budget = inf: give a finite number of USD per window"
    with pytest.raises(ConfigError, match="^" + said):
        driver.Engine.start(settings)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    for args in (["batch", str(src), "--out", str(tmp_path / "o.jsonl")], ["serve"]):
        r = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        assert r.exit_code == 2 and "max_budget = inf: give a finite number" in r.output, (args, r.output)


def test_the_soft_alert_fix_is_told_only_where_max_budget_1e9_keeps_that_soft_limit(monkeypatch):
    """``max_budget inf`` with ``soft_budget 2e9``: told to give max_budget 1e9 to keep the alert, which was then
    refused in turn, its soft limit above it (a review of stop 80)."""
    for soft, told in ((100, True), (1e9, True), (2e9, False)):
        with pytest.raises(ConfigError) as exc:
            check_budgets(CAT, from_env(monkeypatch, max_budget=math.inf, soft_budget=soft).budgets)
        assert ("give max_budget 1e9" in str(exc.value)) is told, (soft, str(exc.value))
