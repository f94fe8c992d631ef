"""A served request's list price: what the report's saving is measured against (docs/cost-model.md)."""

from __future__ import annotations

from collections.abc import Mapping

from engine.core.catalog import Catalog
from engine.core.cost import price_alone
from engine.core.request import Request

__all__ = ["list_price"]


def list_price(req: Request, catalog: Catalog, usage: Mapping[str, int] | None = None) -> float:
    """``req`` sent alone, sync, at the catalog's prices, no cache read. ``usage``: the tokens its answer counted
    (its call's, or the call a reused copy follows), priced in place of the request's estimate. At the estimate
    (256 output tokens, or its cap under that), a call billed at exactly its list price for an answer of
    2,000 tokens read as a loss (a parity hunt), and one whose answer stopped short of its cap as a saving (a
    helper's tour: the batch report and ``X-Smartbatch-Saving-Usd`` priced the estimate)."""
    if usage and req.kind == "text":
        req = req.model_copy(update={"input_tokens": int(usage.get("input_tokens") or req.input_tokens),
                                     "output_tokens": int(usage.get("output_tokens", req.output_tokens))})
    return price_alone(req, catalog, "sync").total
