"""``smartbatch status``: a running engine's spend, per model and tenant, and its budgets, read from the command
line as a driver reads ``Engine.report()`` (a helper's tour found no command to watch a served engine's spend:
only a Python driver or a scrape of the metrics page)."""

from __future__ import annotations

import json
import math
from typing import Any

import typer
from rich.table import Table

from engine.app._words import counted, dollars
from engine.app.cli_common import _fail, app, console
from engine.core.budgets import window_bounds, window_label
from engine.core.errors import SmartbatchError

__all__ = ["print_status"]

def _usd(x: float | None) -> str:
    return "-" if x is None else dollars(x)


def _rows(title: str, rows: dict[str, dict], key: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column(key)
    t.add_column("requests", justify="right")
    t.add_column("spend", justify="right")
    for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["cost_usd"]):
        t.add_row(k, f"{v['requests']:,}", _usd(v["cost_usd"]))
    return t


def print_status(name: str, rep: dict[str, Any], now: float | None = None) -> None:
    """Print ``rep`` (``Engine.report()``) of the engine ``name``: every figure in US dollars. ``now``: the
    engine's clock, which the windows of a time-compressed engine run on."""
    counts = ", ".join(f"{k} {v:,}" for k, v in sorted(rep.get("by_status", {}).items()))
    console.print(f"engine {name!r}: {counted(rep['requests'], 'request')} answered ({counts or 'none yet'})")
    console.print(f"spend {dollars(rep['spend_usd'])} (USD, billed to the providers), list price "
                  f"{dollars(rep['list_price_usd'])}, saving {dollars(rep['saving_usd'])} "
                  f"({100 * rep['saving_frac']:.1f} %)")
    for title, key, rows in (("spend by model", "provider/model", rep.get("by_model")),
                             ("spend by tenant", "tenant", rep.get("by_tenant"))):
        if rows:
            console.print(_rows(title, rows, key))
    budget = rep.get("budget") or {}
    if budget.get("budgets"):
        t = Table(title="budgets, current window (USD; reserved: upper bounds of requests under way, the unused "
                  "part freed as each ends)", title_justify="left")
        for col in ("budget", "window", "resets", "limit", "soft", "spent", "reserved", "remaining"):
            t.add_column(col, justify="left" if col in ("budget", "window", "resets") else "right")
        for b in budget["budgets"]:
            start, end = window_bounds(b["budget_duration"], float(b["window"]))
            over = b["remaining_usd"] < 0 or b["spent_usd"] > b["max_budget"]
            soft = _usd(b["soft_budget"]) + (" (passed)" if b.get("soft_exceeded") else "")
            t.add_row(b["budget"], "whole run" if math.isinf(end) else window_label(start), window_label(end),
                      _usd(b["max_budget"]), soft, _usd(b["spent_usd"]), _usd(b["reserved_usd"]),
                      _usd(b["remaining_usd"]) + (" (over)" if over else ""))
        console.print(t)
        if now is not None and any(window_label(float(b["window"])).startswith("t=") for b in budget["budgets"]
                                   if b["budget_duration"]):
            console.print(f"(windows in engine seconds, as the engine runs time-compressed: it is now t={now:,.0f}s)")
        said = [f"{k} {v:,}" for k, v in budget.get("rejected", {}).items() if v]
        console.print("rejected by the budgets: " + (", ".join(said) or "none")
                      + "; the ledger's refusals (a held request's every try): "
                      + ", ".join(f"{k} {v:,}" for k, v in budget.get("refusals", {}).items()))
    if rep.get("rejected"):
        console.print("rejected, every reason: " + ", ".join(f"{k} {v:,}" for k, v in rep["rejected"].items()))


@app.command()
def status(name: str = typer.Option("smartbatch", "--name", help="the engine, as `smartbatch serve --name` named it"),
           address: str = typer.Option("auto", help="the Ray cluster it runs on (what `smartbatch serve` printed; "
                                       "default: the serve of that name on this machine)"),
           as_json: bool = typer.Option(False, "--json", help="print the whole report (Engine.report()) as JSON")
           ) -> None:
    """A running engine's spend so far (USD, per model and tenant), its budgets' windows (spent, reserved,
    remaining) and what they rejected, for every driver of it; read again to watch it move."""
    from engine.app.driver import Engine

    try:
        eng = Engine.connect(name, address=address, flag="--address")
    except SmartbatchError as exc:
        _fail(exc)
    try:
        rep, now = eng.report(), eng.now()
    finally:
        eng.stop()
    if as_json:
        console.print_json(json.dumps(rep, default=str))
    else:
        print_status(name, rep, now)
