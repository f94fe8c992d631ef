"""The window key a budget had before stop 74, when its name quoted no value: a ledger kept across the upgrade
(Redis, a journal) holds its spend there, and a budget whose name is quoted now finds it only through this."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.core.budgets import BudgetSpec

__all__ = ["legacy_key", "legacy_name", "today_key"]


def legacy_key(spec: BudgetSpec, t: float) -> str | None:
    """``spec``'s window key at ``t`` as the version before stop 74 wrote it, or None where it is today's (a name
    of no value with a separator, a quote or a space at an end: every other name is as it was)."""
    from engine.core.budgets import window_bounds

    name = _legacy_name(spec.tenant, spec.provider, spec.model, spec.budget_duration)
    return None if name == spec.name else f"{name}@{window_bounds(spec.budget_duration, t)[0]:.0f}"


def legacy_name(spec: BudgetSpec) -> str:
    """``spec``'s name as the version before stop 74 wrote it."""
    return _legacy_name(spec.tenant, spec.provider, spec.model, spec.budget_duration)


@functools.lru_cache(maxsize=1024)  # asked per budget of every reservation, as the name itself is
def _legacy_name(tenant: str | None, provider: str | None, model: str | None, duration: str | None) -> str:
    base = ",".join(f"{k}={v}" for k, v in (("tenant", tenant), ("provider", provider), ("model", model))
                    if v is not None) or "global"
    return f"{base}/{duration}" if duration else base


def today_key(key: str, specs: list[BudgetSpec]) -> str:
    """A window ``key`` as the budget of ``specs`` whose name before stop 74 it bears is named now (a claim's copy
    kept by that version); as it is when no budget's name changed to it or a budget bears that name today."""
    name, at, start = key.rpartition("@")
    names = {s.name for s in specs}
    if not at or name in names:
        return key
    now = next((s.name for s in specs
                if _legacy_name(s.tenant, s.provider, s.model, s.budget_duration) == name), None)
    return key if now is None else f"{now}@{start}"
