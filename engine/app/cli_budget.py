"""``smartbatch budget``: list, set and remove a running engine's budgets from the command line, as a driver does
with ``Engine.budgets``/``set_budget``/``remove_budget`` (a change keeps what the current window spent and holds;
a restart of ``smartbatch serve`` to raise a limit forgot the in-process ledger's spend)."""

from __future__ import annotations

import json
from typing import Any

import typer

from engine.app._words import dollars
from engine.app.cli_common import app, console

__all__ = ["budget_app", "budget_line"]

budget_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="A running engine's budgets: list them, add or change one, remove one (kept through "
                              "the engine's run, with what each window spent).")
app.add_typer(budget_app, name="budget")

_NAME = typer.Option("smartbatch", "--name", help="the engine, as `smartbatch serve --name` named it")
_ADDRESS = typer.Option("auto", help="the Ray cluster it runs on (what `smartbatch serve` printed; default: the "
                        "serve of that name on this machine)")


def _usd(x: float | None) -> str:
    return "-" if x is None else dollars(x)


def budget_line(r: dict[str, Any]) -> str:
    """One budget's current window in a line (USD)."""
    from engine.core.budgets import window_label

    return (f"budget {r['budget']}: limit {_usd(r['max_budget'])}, soft {_usd(r['soft_budget'])}"
            + (" (passed)" if r.get("soft_exceeded") else "")
            + f"; spent {_usd(r['spent_usd'])}, reserved {_usd(r['reserved_usd'])}, remaining "
            f"{_usd(r['remaining_usd'])} "
            # One window for good: "from t=0s" named a second of no clock a real-speed reader has.
            + ("in its one window (no budget_duration: it never resets)" if not r.get("budget_duration")
               else f"in its window from {window_label(float(r['window']))}"))


# Each flag of `budget set` and the budget field it sets: an error names what the user typed (a new user's tour
# got "budget.budget_duration = '1dd'" for --duration 1dd, and "budget.max_budget" for --max -1).
_FLAGS = {"tenant": "--tenant", "provider": "--provider", "model": "--model", "budget_duration": "--duration",
          "max_budget": "--max", "soft_budget": "--soft"}


def _check_flags(fields: dict[str, Any]) -> None:
    """The flags' values, checked as a budget's fields are (``BudgetSpec``), before the engine is reached."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    from engine.app.cli_common import _check_tenant
    from engine.core._budget_check import limit_problem
    from engine.core.budgets import BudgetSpec, parse_duration
    from engine.core.errors import ConfigError

    if fields["tenant"] is not None:  # a tenant no request can have: a budget that would hold nothing
        _check_tenant(fields["tenant"])
    duration = fields["budget_duration"]
    try:
        parse_duration(duration)
    except ValueError as exc:
        why = str(exc).removeprefix(f"budget_duration {duration!r}: ")
        raise ConfigError(f"--duration {duration!r}: {why}") from None
    for field in ("max_budget", "soft_budget"):
        if fields.get(field) is not None:
            if (why := limit_problem(fields[field])) is not None:  # inf was taken: "limit $inf"
                raise ConfigError(f"{_FLAGS[field]} {fields[field]:g}: {why}")
            info = BudgetSpec.model_fields[field]
            try:
                TypeAdapter(Annotated[info.annotation, info]).validate_python(fields[field])
            except ValidationError:
                raise ConfigError(f"{_FLAGS[field]} {fields[field]:g}: give a number of USD >= 0") from None
    if fields.get("max_budget") is not None and fields.get("soft_budget") is not None:
        try:
            BudgetSpec(max_budget=fields["max_budget"], soft_budget=fields["soft_budget"])
        except ValidationError:
            raise ConfigError(f"--soft {fields['soft_budget']:g} is above --max {fields['max_budget']:g}: give a "
                              "soft limit at most the hard limit, or leave --soft out") from None


def _check_names(fields: dict[str, Any], catalog) -> None:
    """``--provider`` and ``--model`` against the engine's catalog, as the change is checked, naming the flag. A
    ``--model provider/model`` that the catalog has as such a pair (``status`` and the fallbacks write a model so)
    is taken as the two flags: refused before, as a model no provider has."""
    from engine.core._budget_check import check_budgets
    from engine.core.budgets import BudgetSettings, BudgetSpec

    model = fields["model"]
    if model and "/" in model and not any(model in p.models for p in catalog.providers.values()):
        provider, _, name = model.partition("/")
        if name in getattr(catalog.providers.get(provider), "models", {}) and fields["provider"] in (None, provider):
            fields["provider"], fields["model"] = provider, name
    spec = BudgetSpec(**{k: fields[k] for k in ("tenant", "provider", "model", "budget_duration")}, max_budget=0)
    check_budgets(catalog, BudgetSettings(specs=(spec,)), flags=_FLAGS, fix="give a name the engine's catalog has")


def _engine(name: str, address: str):
    from engine.app.driver import Engine

    return Engine.connect(name, address=address, flag="--address")


@budget_app.command("list")
def list_budgets(name: str = _NAME, address: str = _ADDRESS,
                 as_json: bool = typer.Option(False, "--json", help="print the rows as JSON")) -> None:
    """Each budget in force and its current window (limit, soft, spent, reserved, remaining)."""
    eng = _engine(name, address)
    try:
        rows = eng.budgets()
    finally:
        eng.stop()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    for r in rows:
        console.print(budget_line(r))
    if not rows:
        console.print(f"engine {name!r} has no budget")


@budget_app.command("set")
def set_budget(name: str = _NAME, address: str = _ADDRESS,
               tenant: str = typer.Option(None, help="the tenant it covers (default: every tenant)"),
               provider: str = typer.Option(None, help="the provider it covers (default: every provider)"),
               model: str = typer.Option(None, help="the model it covers (default: every model)"),
               duration: str = typer.Option(None, "--duration", help="its window: 30s, 1h, 1d, 30d, 1mo (default: "
                                            "one window for the whole run)"),
               max_usd: float = typer.Option(None, "--max", help="hard limit in USD per window (kept when changing "
                                             "only the soft limit)"),
               soft_usd: float = typer.Option(None, "--soft", help="soft limit (an alert) in USD"),
               no_soft: bool = typer.Option(False, "--no-soft", help="remove its soft limit")) -> None:
    """Add a budget, or change the limit or soft limit of the one that covers the same tenant, provider, model
    and window: its current window keeps what it spent and holds; held work goes at once under a higher limit;
    a lower one refuses new work and lets what was sent finish."""
    fields: dict[str, Any] = {"tenant": tenant, "provider": provider, "model": model, "budget_duration": duration}
    if max_usd is not None:
        fields["max_budget"] = max_usd
    if soft_usd is not None and no_soft:
        from engine.core.errors import ConfigError

        raise ConfigError(f"--soft {soft_usd:g} and --no-soft: give one (--no-soft removes the soft limit)")
    if soft_usd is not None or no_soft:
        fields["soft_budget"] = None if no_soft else soft_usd
    _check_flags(fields)
    eng = _engine(name, address)
    try:
        _check_names(fields, eng.catalog)
        was = {r["budget"]: r for r in eng.budgets()}
        row = eng.set_budget(fields)
    finally:
        eng.stop()
    old = was.get(row["budget"])
    console.print(("added " if old is None else f"changed (limit was {_usd(old['max_budget'])}, soft "
                   f"{_usd(old['soft_budget'])}): ") + budget_line(row))


@budget_app.command("remove")
def remove_budget(budget: str = typer.Argument(..., help="its name as `smartbatch budget list` shows it, e.g. "
                                               "tenant=acme/1d"),
                  name: str = _NAME, address: str = _ADDRESS) -> None:
    """Remove a budget: the work it held back is tried at once."""
    eng = _engine(name, address)
    try:
        last = eng.remove_budget(budget)
    finally:
        eng.stop()
    console.print("removed " + (budget_line(last) if last is not None else f"budget {budget}"))
