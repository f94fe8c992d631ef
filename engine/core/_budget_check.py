"""Budgets checked against the catalog: a budget whose provider or model the catalog does not have covers no
request, so its limit would hold nothing while the spend it was meant to cap runs on."""

from __future__ import annotations

from engine.core.budgets import BudgetSettings
from engine.core.catalog import Catalog
from engine.core.errors import CatalogError, ConfigError

__all__ = ["check_budgets"]


def check_budgets(catalog: Catalog, budgets: BudgetSettings) -> None:
    """Raise ``ConfigError`` naming the spec's field and the fix when a budget names a provider or a model that
    ``catalog`` lacks (a tenant is the caller's word: any name goes)."""
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
            raise ConfigError(f"setting budgets.specs.{k}.{field} = {value!r}: {exc}; as written, budget {s.name} "
                              "covers no request and its limit holds nothing: fix the name in "
                              "SMARTBATCH_BUDGETS__SPECS") from None
