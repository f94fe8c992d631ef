"""What the emulator has billed. Every cost comes from ``engine.core.cost``; this module only keeps the items."""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["Bill", "BilledItem", "Ledger"]


class BilledItem(BaseModel):
    """One billed call, or one succeeded member of a batch (``custom_id`` set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    model: str
    mode: Literal["sync", "batch_api", "flex"]
    route: str
    request_id: str
    custom_id: str | None = None
    idempotency_key: str | None = None  # a sync call's Idempotency-Key header, when it had one
    usage: dict[str, int | str]
    cost_usd: float


class Bill(BaseModel):
    """Totals and items; ``total_usd`` is the sum of the items' ``cost_usd`` in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total_usd: float
    by_provider: dict[str, float]
    by_model: dict[str, float]  # "provider/model"
    items: tuple[BilledItem, ...]

    def __repr__(self) -> str:
        return f"Bill(total_usd={self.total_usd:.6f}, items={len(self.items)})"


class Ledger:
    """The billed items of one emulator. Not thread-safe: the emulator calls it under its lock."""

    def __init__(self) -> None:
        self._items: list[BilledItem] = []

    def add(self, item: BilledItem) -> None:
        self._items.append(item)

    def bill(self) -> Bill:
        by_provider: dict[str, float] = defaultdict(float)
        by_model: dict[str, float] = defaultdict(float)
        total = 0.0
        for it in self._items:
            total += it.cost_usd
            by_provider[it.provider] += it.cost_usd
            by_model[f"{it.provider}/{it.model}"] += it.cost_usd
        return Bill(total_usd=total, by_provider=dict(by_provider), by_model=dict(by_model),
                    items=tuple(self._items))

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
