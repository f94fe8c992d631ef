"""What the emulator has billed. Every cost comes from ``engine.core.cost``; this module only keeps the items."""

from __future__ import annotations

from collections import defaultdict, deque
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
    """Totals and items; ``total_usd`` is the sum of every billed item's ``cost_usd`` in order, kept or not.
    ``items``: the latest ``keep_records`` of the ``items_billed`` items (``items_dropped`` older ones not kept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total_usd: float
    by_provider: dict[str, float]
    by_model: dict[str, float]  # "provider/model"
    items: tuple[BilledItem, ...]
    items_billed: int
    items_dropped: int = 0

    def __repr__(self) -> str:
        return f"Bill(total_usd={self.total_usd:.6f}, items={self.items_billed}, dropped={self.items_dropped})"


class Ledger:
    """The billed items of one emulator: running totals of all, the latest ``keep`` items themselves (a long
    ``smartbatch emulate`` kept every item and grew without bound). Not thread-safe: the emulator calls it under
    its lock."""

    def __init__(self, keep: int) -> None:
        self._items: deque[BilledItem] = deque(maxlen=keep)
        # Summed as each item comes, in billing order: the very floats a sum over every item in order gave.
        self._total = 0.0
        self._by_provider: dict[str, float] = defaultdict(float)
        self._by_model: dict[str, float] = defaultdict(float)
        self._count = 0

    def add(self, item: BilledItem) -> bool:
        """Bill ``item``; True when that pushed the oldest kept item out."""
        dropping = len(self._items) == self._items.maxlen
        self._total += item.cost_usd
        self._by_provider[item.provider] += item.cost_usd
        self._by_model[f"{item.provider}/{item.model}"] += item.cost_usd
        self._count += 1
        self._items.append(item)
        return dropping

    def bill(self) -> Bill:
        return Bill(total_usd=self._total, by_provider=dict(self._by_provider), by_model=dict(self._by_model),
                    items=tuple(self._items), items_billed=self._count,
                    items_dropped=self._count - len(self._items))

    def __len__(self) -> int:
        """Items billed, kept or not."""
        return self._count
