"""Budgets checked against the catalog: a budget whose provider or model the catalog does not have covers no
request, so its limit would hold nothing while the spend it was meant to cap runs on. The same check for a
budget set on a running engine (``Engine.set_budget``), and the rule of such a change (``changed_specs``)."""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping
from difflib import get_close_matches
from typing import Any

from pydantic import ValidationError

from engine.core._budget_legacy import legacy_name
from engine.core.budgets import BudgetSettings, BudgetSpec, parse_duration
from engine.core.catalog import Catalog
from engine.core.errors import CatalogError, ConfigError

__all__ = ["MAX_LIMIT_USD", "budget_of", "changed_specs", "check_budget_limits", "check_budgets", "limit_problem"]

LIVE_FIX = "fix the name in the budget you set"
# The largest limit taken where one is given (``Engine.set_budget``, ``smartbatch budget set``): a limit past any
# account's spend holds nothing, and one of inf or 1e308 was taken and shown as "limit $inf" or a 300-digit figure
# (a user's walkthrough). A budget that should hold nothing is removed. Checked at input, the start's settings
# too (``check_budgets``); not where a stored budget is read (the ledger's Redis, a journal, ``BudgetSpec``
# itself): one kept before this check loads as it was.
MAX_LIMIT_USD = 1e9
LIVE_NO_LIMIT = "remove the budget (Engine.remove_budget, `smartbatch budget remove NAME`)"


def limit_problem(value: Any, no_limit: str = LIVE_NO_LIMIT) -> str | None:
    """Why a limit of ``value`` USD given as input is refused (not finite, or above ``MAX_LIMIT_USD``), with the
    fix (``no_limit``: how to say no limit there); None for any other value (a negative one or a word is
    ``BudgetSpec``'s to refuse). A number as text is judged as the number ``BudgetSpec`` reads it as: "inf" and
    "1e12" were taken (a review)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if math.isfinite(value) and value <= MAX_LIMIT_USD:
        return None
    return f"give a finite number of USD per window, at most {MAX_LIMIT_USD:,.0f}; for no limit, {no_limit}"


def check_budgets(catalog: Catalog, budgets: BudgetSettings, *, where: str = "setting budgets.specs.{k}",
                  fix: str = "fix the name in SMARTBATCH_BUDGETS__SPECS", flags: Mapping[str, str] | None = None,
                  limits: bool = True) -> None:
    """Raise ``ConfigError`` naming the spec's field and the fix when a budget names a provider or a model that
    ``catalog`` lacks (a tenant is the caller's word: any name goes), or, with ``limits``, has a limit that is no
    limit (``limit_problem``). ``where``: how the message names the spec (``{k}``, its index); ``fix``: where to
    fix a name; ``flags``: the command-line flag of each field, named instead of the spec's field (``smartbatch
    budget set --model``); ``limits=False``: a live change's, whose limit kept from a stored budget is not judged."""
    if limits:
        check_budget_limits(budgets, where)
    for k, s in enumerate(budgets.specs):
        field = "model" if s.model is not None else "provider"
        try:
            if s.provider is not None and s.model is not None:
                catalog.model(s.provider, s.model)
            elif s.provider is not None:
                catalog.provider(s.provider)
            elif s.model is not None:
                catalog.find_model(s.model)
        except CatalogError as exc:
            if "several providers" in str(exc):  # a model name two providers share: the budget covers both
                continue
            value = s.model if field == "model" else s.provider
            said = f"{flags[field]} {value!r}" if flags else f"{where.format(k=k)}.{field} = {value!r}"
            raise ConfigError(f"{said}: {exc}; as written, budget {s.name} "
                              f"covers no request and its limit holds nothing: {fix}") from None


def budget_of(fields: BudgetSpec | Mapping[str, Any], current: Iterable[BudgetSpec], catalog: Catalog) -> BudgetSpec:
    """The budget a live change sets, checked as a budget at start is (its fields, then the catalog's names).
    A field left out of ``fields`` is taken from the budget of the same name in ``current`` (tenant, provider,
    model and budget_duration name a budget), so a change of its soft limit alone keeps its limit; a new
    budget needs ``max_budget``. Raises ``ConfigError`` naming the field and the fix."""
    given = fields.model_dump(exclude_unset=True) if isinstance(fields, BudgetSpec) else dict(fields)
    if unknown := [k for k in given if k not in BudgetSpec.model_fields]:
        # Named first: set_budget(tenant="acme", max_budgt=5) said only "max_budget is missing" (a new user's tour).
        near = get_close_matches(str(unknown[0]), list(BudgetSpec.model_fields), 1, 0.6)
        raise ConfigError(f"budget.{unknown[0]}: not a budget field" + (f"; did you mean {near[0]}?" if near else "")
                          + f" (a budget's fields: {', '.join(BudgetSpec.model_fields)}; docs/budgets.md)")
    for field in ("max_budget", "soft_budget"):  # as given: a running budget's stored value is not judged again
        if (why := limit_problem(given.get(field))) is not None:
            raise ConfigError(f"budget.{field} = {given[field]!r}: {why}")
    who = {k: given.get(k) for k in ("tenant", "provider", "model", "budget_duration")}
    try:
        parse_duration(who["budget_duration"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"budget.budget_duration = {who['budget_duration']!r}: {exc}") from None
    try:
        name = BudgetSpec(**who, max_budget=0).name
    except ValidationError as exc:
        raise _config_error(exc) from None
    old = next((s for s in current if s.name == name), None)
    merged = {**(old.model_dump() if old is not None else {}), **given}
    if "max_budget" not in merged:
        raise ConfigError(f"budget {name}: max_budget is missing, and no budget of that name runs to take it from: "
                          "give its hard limit in USD per window (max_budget, --max)")
    try:
        spec = BudgetSpec.model_validate(merged)
    except ValidationError as exc:
        kept = merged.get("soft_budget") if "soft_budget" not in given else None
        if kept is not None and _valid({**merged, "soft_budget": None}):  # --max alone, under the soft limit kept
            raise ConfigError(f"budget {name}: max_budget {merged['max_budget']} is below its soft limit {kept}, "
                              "kept from the running budget: give a soft limit at most the new limit too "
                              "(soft_budget, --soft) or remove it (soft_budget=None, --no-soft)") from None
        soft = merged.get("soft_budget")
        if ("max_budget" not in given and isinstance(soft, (int, float)) and soft > merged["max_budget"]
                and _valid({**merged, "soft_budget": None})):  # --soft alone, above the limit kept
            raise ConfigError(f"budget {name}: soft_budget {merged['soft_budget']} is above its limit "
                              f"{merged['max_budget']}, kept from the running budget: give a soft limit at most it "
                              "(soft_budget, --soft) or a higher limit too (max_budget, --max)") from None
        raise _config_error(exc, name) from None
    check_budgets(catalog, BudgetSettings(specs=(spec,)), where="budget", fix=LIVE_FIX, limits=False)
    return spec


def check_budget_limits(budgets: BudgetSettings, where: str = "setting budgets.specs.{k}") -> None:
    """``check_budgets``' check of the limits alone, which needs no catalog: a start runs it before anything with a
    cost, as its first step. Run where the catalog is read, it came after a killed run's journal was taken back
    (its provider batches under way cancelled, up to minutes of waiting) and a Ray started, for a start refused
    (a review of stop 80)."""
    for k, s in enumerate(budgets.specs):
        _check_limits(s, where.format(k=k))


def _check_limits(s: BudgetSpec, where: str) -> None:
    """A start's budget (its settings, ``check_budgets``) is input as a live change is: a limit of inf or 1e12 was
    taken at start (shown as "limit $inf") where ``set_budget`` and ``budget set`` refused it (a stop's notes).
    Refused rather than taken with a warning: the fix is one edit, said here, and nothing has started to lose."""
    # (only for a soft limit that 1e9 can keep: past it, max_budget 1e9 was refused in turn as below the soft one)
    soft = s.soft_budget
    keep_alert = ("; to keep its soft alert alone, give max_budget 1e9" if soft is not None and math.isfinite(soft)
                  and soft <= MAX_LIMIT_USD else "")
    no_limit = f"leave budget {s.name} out of SMARTBATCH_BUDGETS__SPECS (the settings' budgets.specs){keep_alert}"
    for field in ("max_budget", "soft_budget"):
        if (why := limit_problem(getattr(s, field), no_limit)) is not None:
            raise ConfigError(f"{where}.{field} = {getattr(s, field)!r}: {why}")


def _valid(fields: Mapping[str, Any]) -> bool:
    try:
        BudgetSpec.model_validate(fields)
    except ValidationError:
        return False
    return True


def _config_error(exc: ValidationError, name: str = "") -> ConfigError:
    # A field's error names it (budget.max_budget); a check across fields names both in its message.
    said = "; ".join((f"budget.{'.'.join(map(str, e['loc']))}: " if e["loc"] else f"budget {name}: ")
                     + e["msg"].removeprefix("Value error, ") for e in exc.errors())
    return ConfigError(f"{said} (a budget's fields: tenant, provider, model, max_budget, soft_budget, "
                       "budget_duration, horizon_s; docs/budgets.md)")


def changed_specs(specs: Iterable[BudgetSpec], put: Iterable[BudgetSpec] = (),
                  remove: Iterable[str] = ()) -> tuple[BudgetSpec, ...]:
    """``specs`` with each of ``put`` in place of the budget of its name (or added last) and the budgets named in
    ``remove`` left out. Raises ``ConfigError`` for a name to remove that no budget has, naming those that run."""
    out = {s.name: s for s in specs}
    missing = [n for n in remove if n not in out]
    if missing:
        raise ConfigError(f"no budget named {', '.join(map(repr, missing))} runs (running: "
                          f"{', '.join(out) or 'none'}); name one as `smartbatch budget list` shows it"
                          + "".join(_quotes_lost(n, out) for n in missing))
    for n in remove:
        del out[n]
    for s in put:
        out[s.name] = s
    return BudgetSettings(specs=tuple(out.values())).specs


def _quotes_lost(name: str, running: Mapping[str, BudgetSpec]) -> str:
    """What to say of ``name`` when it is a running budget's quoted name without its quotes: a shell takes them from
    ``tenant='alice@example.com'`` typed as ``budget list`` shows it, and the names before stop 74 had none."""
    def bare(n: str) -> str:
        return n.replace("'", "").replace('"', "").replace("\\", "")

    for n, s in running.items():
        if name in (bare(n), legacy_name(s)):
            shell = f'"{n}"' if not set(n) & set('"\\$`!') else shlex.quote(n)
            return (f"; {name!r} is {n!r} without its quotes (a shell takes them, and names before stop 74 had "
                    f"none): give it quoted for the shell, as in `smartbatch budget remove {shell}`")
    return ""
