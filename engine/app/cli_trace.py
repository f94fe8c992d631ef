"""``smartbatch trace ...``: build traces from real data, a seeded generator or an OpenAI batch file."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer
from rich.text import Text

from engine.app._words import counted
from engine.app.cli_common import (
    _check_outputs,
    _check_tenant,
    _fail,
    _settings,
    _warn_skipped,
    console,
    err_console,
    trace_app,
)
from engine.core.errors import SmartbatchError

_CURRENT = typer.Option(False, "--current-models", help="write a drawn model shut down by --today as its "
                        "catalog successor (docs/traces.md, \"Current models\")")
_TODAY = typer.Option(None, "--today", formats=["%Y-%m-%d"], help="the day models' shutdowns are judged at, "
                      "YYYY-MM-DD (default: today, UTC)")


def _day(today: datetime.datetime | None) -> datetime.date:
    return today.date() if today is not None else datetime.datetime.now(datetime.timezone.utc).date()


def _drawn(model: str | None, cat, media: bool = False) -> list[tuple[str, str]]:
    from engine.core.tracegen import drawn_models

    if model is None:
        return list(drawn_models(media))
    name = model.split("/", 1)[-1]  # the builder has checked it: its provider(s) offer it
    return [(p, name) for p, spec in cat.providers.items() if name in spec.models]


def _say_retired(reqs: list, cat, day: datetime.date, current: bool, drawn: list[tuple[str, str]]) -> None:
    """One line: the written models shut down by ``day`` (a run at their provider's API is refused), and the flag
    that writes their successors; with the flag, which of the ``drawn`` models were written as successors."""
    written = {(r.provider, r.model) for r in reqs}
    gone = sorted((m, d) for p, m in written if (d := cat.model(p, m).shutdown) is not None and d <= day)
    names = ", ".join(f"{m} ({d})" for m, d in gone)
    if current:
        moved = sorted({f"{m} -> {cat.current(p, m, day)}" for p, m in drawn
                        if cat.current(p, m, day) != m and (p, cat.current(p, m, day)) in written})
        # (synth leaves a media model with no successor out of its draws: said, so no kind seems lost unsaid)
        dropped = sorted({m for p, m in drawn if cat.current(p, m, day) == m and (p, m) not in written
                          and (d := cat.model(p, m).shutdown) is not None and d <= day})
        if moved or dropped:
            console.print(f"models shut down by {day} written as their successors: {', '.join(moved) or 'none'}"
                          + (f"; left out of the draws, having none: {', '.join(dropped)}" if dropped else ""))
        if gone:
            err_console.print(Text(f"the trace still names models shut down by {day} that have no successor in the "
                                   f"catalog: {names}; name one in a catalog overlay, or leave them out", style="yellow"))
    elif gone:
        err_console.print(Text(f"the trace names models shut down by {day}: {names}; their providers refuse them. "
                               "Add --current-models to write their successors", style="yellow"))
    _say_retiring(written, cat, day)


def _say_retiring(written: set[tuple[str, str]], cat, day: datetime.date) -> None:
    """The written models that shut down within the days a start warns of (``RETIRING_DAYS``), and the ``--today``
    that writes their successors: a trace for the real APIs built days before a shutdown held them unsaid."""
    from engine.app.provider_setup import RETIRING_DAYS

    soon = sorted((d, m, cat.model(p, m).successor) for p, m in written if (d := cat.model(p, m).shutdown) is not None
                  and day < d <= day + datetime.timedelta(days=RETIRING_DAYS))
    if soon:
        names = ", ".join(f"{m} ({d}, in {counted((d - day).days, 'day')}" + (f"; successor: {s})" if s else
                                                                              "; no successor)") for d, m, s in soon)
        # A --today past the shutdown of one with no successor writes it still (and says so): not offered as a fix.
        moved = [d for d, _, s in soon if s]
        fix = [f"--current-models --today {moved[-1]} writes their successors" if moved else "",
               "name a successor in a catalog overlay for one that has none" if len(moved) < len(soon) else ""]
        err_console.print(Text(f"the trace names models that shut down within {RETIRING_DAYS} days: {names}; from "
                               f"that day their providers refuse them. {'; '.join(f for f in fix if f)}", style="yellow"))


# A trace spans a year at most (engine.core.trace.MAX_SPAN_S), and synth's follow-ups run to 1.2x its duration.
_MAX_DURATION_S = 365 * 86400.0 / 1.2


@trace_app.command("from-azure")
def trace_from_azure(csv: Path = typer.Argument(..., help="an Azure LLM inference trace CSV"),
                     out: Path = typer.Option(..., "--out", help="where to write the JSONL trace"),
                     seed: int = typer.Option(0, min=0, help="seed of the assignment rules"),
                     model: str | None = typer.Option(None, help="force one model (provider/model where two providers offer it)"),
                     limit: int | None = typer.Option(None, min=1, help="only the first N rows"),
                     catalog: Path | None = typer.Option(None, help="catalog YAML (default: packaged)"),
                     current_models: bool = _CURRENT, today: datetime.datetime | None = _TODAY) -> None:
    """Azure CSV (TIMESTAMP, ContextTokens, GeneratedTokens) to a trace."""
    from engine.core.trace import write_trace
    from engine.core.tracegen import from_azure

    try:
        _check_outputs({"--out": out}, inputs=(csv,))
        settings, cat = _settings(catalog)
        day = _day(today)
        reqs = from_azure(csv, seed=seed, model=model, catalog=cat, settings=settings, limit=limit,
                          today=day if current_models else None)
        n = write_trace(reqs, out)
    except SmartbatchError as exc:
        _fail(exc)
    console.print(f"wrote {counted(n, 'request')} to {out}")
    _say_retired(reqs, cat, day, current_models, _drawn(model, cat))


@trace_app.command("from-mooncake")
def trace_from_mooncake(jsonl: Path = typer.Argument(..., help="a Mooncake trace JSONL"),
                        out: Path = typer.Option(..., "--out", help="where to write the JSONL trace"),
                        seed: int = typer.Option(0, min=0, help="seed of the assignment rules"),
                        model: str | None = typer.Option(None, help="force one model (provider/model where two providers offer it)"),
                        limit: int | None = typer.Option(None, min=1, help="only the first N rows"),
                        catalog: Path | None = typer.Option(None, help="catalog YAML (default: packaged)"),
                        current_models: bool = _CURRENT, today: datetime.datetime | None = _TODAY) -> None:
    """Mooncake JSONL (timestamp, input_length, output_length, hash_ids) to a trace."""
    from engine.core.trace import write_trace
    from engine.core.tracegen import from_mooncake

    try:
        _check_outputs({"--out": out}, inputs=(jsonl,))
        settings, cat = _settings(catalog)
        day = _day(today)
        reqs = from_mooncake(jsonl, seed=seed, model=model, catalog=cat, settings=settings, limit=limit,
                             today=day if current_models else None)
        n = write_trace(reqs, out)
    except SmartbatchError as exc:
        _fail(exc)
    console.print(f"wrote {counted(n, 'request')} to {out}")
    _say_retired(reqs, cat, day, current_models, _drawn(model, cat))


@trace_app.command("synth")
def trace_synth(out: Path = typer.Option(..., "--out", help="where to write the JSONL trace"),
                n: int = typer.Option(5000, "--n", min=1, help="number of requests"),
                seed: int = typer.Option(0, "--seed", min=0, help="seed of the workload"),
                duration: float = typer.Option(3600.0, min=1.0, max=_MAX_DURATION_S, help="seconds the campaigns' arrivals span; re-sent and reworded requests follow "
                                                     "theirs by minutes, up to 1.2x this"),
                catalog: Path | None = typer.Option(None, help="catalog YAML (default: packaged)"),
                current_models: bool = _CURRENT, today: datetime.datetime | None = _TODAY) -> None:
    """A seeded text/image/video workload with campaigns, re-submissions and a priority mix."""
    from engine.core.trace import write_trace
    from engine.core.tracegen import synth

    try:
        _check_outputs({"--out": out})
        settings, cat = _settings(catalog)
        day = _day(today)
        reqs = synth(n, seed=seed, duration_s=duration, catalog=cat, settings=settings,
                     today=day if current_models else None)
        count = write_trace(reqs, out)
    except SmartbatchError as exc:
        _fail(exc)
    console.print(f"wrote {counted(count, 'request')} to {out}")
    _say_retired(reqs, cat, day, current_models, _drawn(None, cat, media=True))


@trace_app.command("from-openai-batch")
def trace_from_openai_batch(jsonl: Path = typer.Argument(..., help="an OpenAI Batch input file (JSONL of "
                                                         "custom_id, method, url, body)"),
                            out: Path = typer.Option(..., "--out", help="where to write the JSONL trace"),
                            window: str = typer.Option("24h", help="the completion window: every line's deadline "
                                                       "(e.g. 24h, 90m)"),
                            tenant: str = typer.Option("default", help="the tenant of every line"),
                            skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip and count "
                                                              "invalid lines"),
                            catalog: Path | None = typer.Option(None, help="catalog YAML (default: packaged)")) -> None:
    """OpenAI Batch input file to a trace: every line arrives at 0 with the window as its deadline, its body
    kept, so bench can compare policies on the workload before anything is sent."""
    from engine.core.batchfile import from_openai_batch, parse_window
    from engine.core.trace import write_trace

    try:
        _check_tenant(tenant)
        _check_outputs({"--out": out}, inputs=(jsonl,))
        settings, cat = _settings(catalog)
        tr = from_openai_batch(jsonl, window_s=parse_window(window), tenant=tenant, catalog=cat, settings=settings,
                               skip_invalid=skip_invalid)
        n = write_trace(tr.requests, out)
    except SmartbatchError as exc:
        _fail(exc)
    if tr.skipped:
        _warn_skipped(tr.skipped, "invalid line(s)", tr.problems)
    console.print(f"wrote {counted(n, 'request')} to {out}")


