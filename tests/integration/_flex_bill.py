"""A provider's bill read against the engine's results where flex calls may time out."""

from __future__ import annotations

__all__ = ["request_key", "timed_out_flex"]


def request_key(item) -> str:
    """The request a billed item names: a batch member's custom_id or a sync call's Idempotency-Key, both
    ``call_key(tenant, id, model, attempt)``, less the attempt."""
    return (item.custom_id or item.idempotency_key or item.request_id).rsplit("-", 1)[0]


def timed_out_flex(items, providers: dict) -> list:
    """The flex items of requests billed as a flex call and as its standard call, checked: the one double bill the
    engine takes knowingly. A flex call given up at its timeout (on a slow machine, a time-compressed run's
    seconds pass in milliseconds) may have run and been billed, and its standard call goes for the deadline; the
    dispatchers count it (``flex_timed_out``) and keep its bound (``possibly_billed_usd``). No more such pairs than
    they counted, their flex items within the bound kept; ``providers``: the report's rows of the billing ones."""
    by: dict[str, list] = {}
    for i in items:
        by.setdefault(request_key(i), []).append(i)
    pairs = [group for group in by.values() if sorted(i.mode for i in group) == ["flex", "sync"]]
    flex = [i for group in pairs for i in group if i.mode == "flex"]
    counted = sum(p.get("flex_timed_out", 0) for p in providers.values())
    kept = sum(p.get("possibly_billed_usd", 0.0) for p in providers.values())
    assert len(pairs) <= counted, f"{len(pairs)} requests billed at flex and standard, {counted} flex time-outs"
    assert sum(i.cost_usd for i in flex) <= kept + 1e-9, (flex, kept)
    return flex
