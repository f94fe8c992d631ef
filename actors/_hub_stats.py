"""The running report's figures a result hub keeps (``actors.hub.ResultHub``): counted as results arrive, and
added up across hub shards (``merge_reports``)."""

from __future__ import annotations

from actors.metrics import rejected_reason
from engine.core._logkeys import get_logger
from engine.core.result import Result

__all__ = ["billed_behind", "merge_reports", "new_stats", "stats_report", "sum_figures", "tally"]

log = get_logger("smartbatch.hub")


def new_stats() -> dict:
    return {"requests": 0, "cost_usd": 0.0, "list_price_usd": 0.0, "by_status": {}, "by_mode": {}, "hits": {},
            "deadline_met": 0, "deadline_known": 0, "by_provider": {}, "by_model": {}, "by_tenant": {},
            "rejected": {}, "billed_behind_refusal": {"requests": 0, "cost_usd": 0.0}}


def _count(into: dict, key: str, usd: float) -> None:
    row = into.get(key)
    if row is None:
        row = into[key] = {"requests": 0, "cost_usd": 0.0}
    row["requests"] += 1
    row["cost_usd"] += usd


def tally(s: dict, results: list[Result], list_prices: list[float] | None) -> None:
    """Count ``results`` (each once: the hub drops one sent again) in ``s``, made by ``new_stats``."""
    for k, r in enumerate(results):
        s["requests"] += 1
        s["cost_usd"] += r.cost_usd
        # Served only: a failed or refused request's list price is no saving (a failed run read 89.8 % saved).
        s["list_price_usd"] += list_prices[k] if list_prices and r.status in ("ok", "reused") else 0.0
        s["by_status"][r.status] = s["by_status"].get(r.status, 0) + 1
        if r.status == "rejected":
            why = rejected_reason(r)
            s["rejected"][why] = s["rejected"].get(why, 0) + 1
        if r.mode:
            s["by_mode"][r.mode] = s["by_mode"].get(r.mode, 0) + 1
        if r.hit:
            s["hits"][r.hit] = s["hits"].get(r.hit, 0) + 1
        if r.deadline_met is not None:
            s["deadline_known"] += 1
            s["deadline_met"] += bool(r.deadline_met)
        # Spend per tenant and per model whether budgets are set or not: only the budget ledger's rows had them,
        # and an engine without budgets showed spend per provider alone (a tour, stop 64). Models are keyed as
        # the providers' bills key them ("provider/model").
        _count(s["by_tenant"], r.tenant, r.cost_usd)
        if r.provider:
            _count(s["by_provider"], r.provider, r.cost_usd)
            if r.model:
                _count(s["by_model"], f"{r.provider}/{r.model}", r.cost_usd)


def billed_behind(s: dict, results: list[Result], recent) -> None:
    """Count (and log) the billed answers among ``results`` that come after a result of the same request that billed
    nothing (a rejection, a failure): its driver has that one, the hub keeps the first, and the provider's bill has
    this one. No path of the engine should make it (a grouper race did, stop 67: a re-admitted copy sent while the
    request was rejected); if one does, the report says so rather than a spend below the bill."""
    row = s["billed_behind_refusal"]
    for r in results:
        first = recent.get(r.uid)
        if first is not None and r.cost_usd > 0 and first.cost_usd == 0 and first.status not in ("ok", "reused"):
            row["requests"] += 1
            row["cost_usd"] += r.cost_usd
            log.error("request %r of tenant %r was billed $%.6f (%s) after its driver got %s (%s): the engine sent a "
                      "copy of it; its answer is not delivered (report: billed_behind_refusal)", r.id, r.tenant,
                      r.cost_usd, r.mode, first.status, first.error)


def _usd_rows(rows: dict) -> dict:
    return {k: {"requests": v["requests"], "cost_usd": round(v["cost_usd"], 6)} for k, v in rows.items()}


def stats_report(s: dict, cache: dict) -> dict:
    """One hub's report of ``s``; ``cache``: the cache's figures."""
    saving = s["list_price_usd"] - s["cost_usd"]
    return {
        "requests": s["requests"],
        "spend_usd": round(s["cost_usd"], 6),
        "list_price_usd": round(s["list_price_usd"], 6),
        "saving_usd": round(saving, 6),
        "saving_frac": round(saving / s["list_price_usd"], 6) if s["list_price_usd"] > 0 else 0.0,
        "by_status": dict(s["by_status"]),
        "rejected": dict(s["rejected"]),  # requests rejected for good, by reason
        # Billed after their driver got a result that billed nothing (a defect: the provider's bill is above
        # spend_usd by this much); zero on every run the tests see.
        "billed_behind_refusal": {"requests": s["billed_behind_refusal"]["requests"],
                                  "cost_usd": round(s["billed_behind_refusal"]["cost_usd"], 6)},
        "by_mode": dict(s["by_mode"]),
        "hits": dict(s["hits"]),
        "deadline_met_frac": (s["deadline_met"] / s["deadline_known"]) if s["deadline_known"] else None,
        "deadlines_known": s["deadline_known"],
        "by_provider": _usd_rows(s["by_provider"]),
        "by_model": _usd_rows(s["by_model"]),
        "by_tenant": _usd_rows(s["by_tenant"]),
        "cache": cache,
    }


def sum_figures(parts) -> dict:
    """Figures of several shards (numbers, and dicts of them, nested) added up; anything else from the first."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
                out.setdefault(k, v)
            elif k.endswith("_up"):  # a state, not a count: up only when every shard is
                out[k] = min(out.get(k, v), v)
            elif isinstance(v, dict):
                out[k] = sum_figures([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out


def merge_reports(reps: list[dict]) -> dict:
    """One engine report from the hub shards' reports (each counts the results of its ids)."""
    if len(reps) == 1:
        return reps[0]
    out = sum_figures([{k: v for k, v in r.items() if k not in ("saving_frac", "deadline_met_frac", "cache")}
                       for r in reps])
    out["cache"] = reps[0]["cache"]  # cache figures reach shard 0 only
    lp = out["list_price_usd"]
    out["saving_frac"] = round(out["saving_usd"] / lp, 6) if lp > 0 else 0.0
    known = [(r["deadline_met_frac"], r["deadlines_known"]) for r in reps if r["deadline_met_frac"] is not None]
    n = sum(w for _, w in known)
    out["deadline_met_frac"] = sum(f * w for f, w in known) / n if n else None
    return out
