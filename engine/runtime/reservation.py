"""Reservation, the runtime kernel's step between a decision and a dispatch: what each member reserves, and
what a budget's verdict means for it. One copy of each rule, used by the simulator and by the grouper actor."""

from __future__ import annotations

from typing import Literal

from engine.core.budgets import Verdict
from engine.core.catalog import Catalog
from engine.core.cost import reserve_bound
from engine.core.request import Request

__all__ = ["Triage", "claim_amount", "dispatch_mode", "goes_back", "triage"]

Triage = Literal["go", "wait", "retry", "defer", "reject"]


def dispatch_mode(mode: str, hedge_at: float | None, now: float) -> str:
    """The mode a dispatch is carried out in: a batch hedged before it starts goes sync (at the sync price)."""
    return "sync" if mode == "batch_api" and hedge_at is not None and hedge_at <= now else mode


def goes_back(mode: str, hedge_at: float | None, now: float, req: Request) -> bool:
    """Whether a member of a batch whose hedge passed before the batch started (held back by a budget, or on its
    way to the provider) goes back to the policy, as at a hedge, instead of straight to sync.

    The hedge may be a checkpoint with a second batch behind it: sent sync, the member would pay the full
    price, and reserve it, where a second batch costs half and may fit a tight budget. An urgent member goes
    sync: its claim holds the sync price already, and its deadline leaves no room for another decision."""
    return dispatch_mode(mode, hedge_at, now) != mode and req.priority != "urgent"


def claim_amount(req: Request, catalog: Catalog, mode: str, model_max: bool) -> float:
    """What a member reserves: the upper bound of its bill. An urgent member of a batch reserves the sync price,
    so its hedge (the sync fallback) is covered whatever the budget does meanwhile."""
    m = "sync" if mode == "batch_api" and req.priority == "urgent" else mode
    return reserve_bound(req, catalog, m, None if model_max else req.output_tokens)


def triage(v: Verdict, deadline_at: float) -> Triage:
    """A verdict for one member: ``go`` (reserved), ``wait`` for reservations to settle, ``retry`` when the
    ledger did not answer, ``defer`` to a later window that opens by the deadline, else ``reject``."""
    if v.ok:
        return "go"
    if v.reason == "wait":
        return "wait"
    if v.reason == "budget_unavailable":
        return "retry"
    if v.reason == "deferred" and v.retry_at is not None and v.retry_at <= deadline_at:
        return "defer"
    return "reject"
