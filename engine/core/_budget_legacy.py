"""The window key a budget had before stop 74, when its name quoted no value: a ledger kept across the upgrade
(Redis, a journal) holds its spend there, and a budget whose name is quoted now finds it only through this."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.core.budgets import BudgetSpec

__all__ = ["legacy_key"]


def legacy_key(spec: BudgetSpec, t: float) -> str | None:
    """``spec``'s window key at ``t`` as the version before stop 74 wrote it, or None where it is today's (a name
    of no value with a separator, a quote or a space at an end: every other name is as it was)."""
    from engine.core.budgets import window_bounds

    name = _legacy_name(spec.tenant, spec.provider, spec.model, spec.budget_duration)
    return None if name == spec.name else f"{name}@{window_bounds(spec.budget_duration, t)[0]:.0f}"


@functools.lru_cache(maxsize=1024)  # asked per budget of every reservation, as the name itself is
def _legacy_name(tenant: str | None, provider: str | None, model: str | None, duration: str | None) -> str:
    base = ",".join(f"{k}={v}" for k, v in (("tenant", tenant), ("provider", provider), ("model", model))
                    if v is not None) or "global"
    return f"{base}/{duration}" if duration else base
