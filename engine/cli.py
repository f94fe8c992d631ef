"""The ``smartbatch`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from engine.catalog import load_catalog
from engine.errors import SmartbatchError
from engine.settings import Settings, load_settings

_DEBUG = "smartbatch.debug"  # key in click's context meta, shared by every sub-command's context


class _Group(typer.core.TyperGroup):
    """Every error ends the command with one ``error:`` message, never a traceback, unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get(_DEBUG):
                raise
            if isinstance(exc, SmartbatchError):
                _print_error(str(exc))
                raise typer.Exit(2) from None
            first = (str(exc).strip().splitlines() or [""])[0]
            _print_error(f"{type(exc).__name__}: {first} (unexpected, so a bug in smartbatch: rerun with --debug "
                         "for the traceback and report it)")
            raise typer.Exit(1) from None


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  help="smartbatch: cut the bill of paid generation APIs by deciding how and when each request "
                       "is sent.")
trace_app = typer.Typer(no_args_is_help=True, help="Build traces (JSONL) from real data or a seeded generator.")
app.add_typer(trace_app, name="trace")
# Wide enough for the results table when output goes to a file or CI log (rich assumes 80 columns there).
console = Console(width=None if Console().is_terminal else 120)
err_console = Console(stderr=True, soft_wrap=True)


@app.callback()
def _main(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")) -> None:
    ctx.meta[_DEBUG] = debug


def _print_error(message: str) -> None:
    # Text, not markup: messages quote user input and lists such as ['512x512'] that rich would eat. A lone
    # surrogate (from a file name or a bad line) is escaped, so printing the error cannot fail in turn.
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    err_console.print(Text.assemble(("error: ", "bold red"), safe))


def _fail(exc: SmartbatchError) -> NoReturn:
    raise exc  # _Group prints it as one error (exit status 2), or its traceback with --debug


def _settings(catalog: Path | None, overlay: Path | None = None) -> tuple[Settings, object]:
    settings = load_settings()
    return settings, load_catalog(catalog or settings.catalog_path, overlay or settings.catalog_overlay)


def _providers(settings: Settings, mode: str | None, base_urls: list[str] | None) -> Settings:
    """``--providers sim|http`` and ``--base-url NAME=URL`` on top of ``settings.providers``."""
    from engine.errors import ConfigError
    from engine.settings import ProvidersSettings

    raw = settings.providers.model_dump()
    if mode is not None:
        if mode not in ("sim", "http"):
            raise ConfigError(f"--providers {mode!r}: use sim (every provider simulated) or http (real calls to the "
                              "providers with an endpoint)")
        raw["mode"] = mode
    for item in base_urls or []:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"--base-url {item!r}: write NAME=URL, e.g. --base-url openai=http://127.0.0.1:8000/v1")
        if name not in raw["endpoints"]:
            raise ConfigError(f"--base-url {item!r}: no endpoint named {name!r}; endpoints are "
                              f"{sorted(raw['endpoints'])} (add one with SMARTBATCH_PROVIDERS__ENDPOINTS)")
        raw["endpoints"][name]["base_url"] = url
    try:
        return settings.model_copy(update={"providers": ProvidersSettings.model_validate(raw)})
    except ValueError as exc:
        raise ConfigError(f"providers: {exc}") from None


@trace_app.command("from-azure")
def trace_from_azure(csv: Path = typer.Argument(..., help="an Azure LLM inference trace CSV"),
                     out: Path = typer.Option(..., "--out", help="where to write the JSONL trace"),
                     seed: int = typer.Option(0, help="seed of the assignment rules"),
                     model: str | None = typer.Option(None, help="force one model, as provider/model"),
                     limit: int | None = typer.Option(None, min=1, help="only the first N rows"),
                     catalog: Path | None = typer.Option(None, help="catalog YAML (default: packaged)")) -> None:
    """Azure CSV (TIMESTAMP, ContextTokens, GeneratedTokens) to a trace."""
    from engine.trace import write_trace
    from engine.tracegen import from_azure

    try:
        settings, cat = _settings(catalog)
        n = write_trace(from_azure(csv, seed=seed, model=model, catalog=cat, settings=settings, limit=limit), out)
    except SmartbatchError as exc:
        _fail(exc)
    console.print(f"wrote {n:,} requests to {out}")


@trace_app.command("from-mooncake")
def trace_from_mooncake(jsonl: Path = typer.Argument(..., help="a Mooncake trace JSONL"),
                        out: Path = typer.Option(..., "--out"),
                        seed: int = typer.Option(0),
                        model: str | None = typer.Option(None, help="force one model, as provider/model"),
                        limit: int | None = typer.Option(None, min=1),
                        catalog: Path | None = typer.Option(None)) -> None:
    """Mooncake JSONL (timestamp, input_length, output_length, hash_ids) to a trace."""
    from engine.trace import write_trace
    from engine.tracegen import from_mooncake

    try:
        settings, cat = _settings(catalog)
        n = write_trace(from_mooncake(jsonl, seed=seed, model=model, catalog=cat, settings=settings, limit=limit),
                        out)
    except SmartbatchError as exc:
        _fail(exc)
    console.print(f"wrote {n:,} requests to {out}")


@trace_app.command("synth")
def trace_synth(out: Path = typer.Option(..., "--out"),
                n: int = typer.Option(5000, "--n", min=1, help="number of requests"),
                seed: int = typer.Option(0, "--seed"),
                duration: float = typer.Option(3600.0, min=1.0, help="seconds the arrivals span"),
                catalog: Path | None = typer.Option(None)) -> None:
    """A seeded text/image/video workload with campaigns, re-submissions and a priority mix."""
    from engine.trace import write_trace
    from engine.tracegen import synth

    try:
        settings, cat = _settings(catalog)
        count = write_trace(synth(n, seed=seed, duration_s=duration, catalog=cat, settings=settings), out)
    except SmartbatchError as exc:
        _fail(exc)
    console.print(f"wrote {count:,} requests to {out}")


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
    from engine.batchfile import from_openai_batch, parse_window
    from engine.trace import write_trace

    try:
        settings, cat = _settings(catalog)
        tr = from_openai_batch(jsonl, window_s=parse_window(window), tenant=tenant, catalog=cat, settings=settings,
                               skip_invalid=skip_invalid)
        n = write_trace(tr.requests, out)
    except SmartbatchError as exc:
        _fail(exc)
    if tr.skipped:
        p = tr.problems[0]
        err_console.print(Text(f"skipped {tr.skipped} invalid line(s); first: {p[0]}:{p[1]}: field '{p[2]}': "
                               f"{p[3]}", style="yellow"))
    console.print(f"wrote {n:,} requests to {out}")


def _print_table(doc: dict) -> None:
    t = Table(title=f"{doc['trace']}: {doc['requests']:,} requests; lower bound ${doc['lower_bound_usd']:.2f}")
    budgeted = bool(doc.get("budgets"))
    cols = ["policy", "cost $", "saving", "capture", "met", "urgent", "hits e/f/n",
            "batch/consider/indiv" if not budgeted else "b/c/i"]
    cols += ["rejected", "overrun $"] if budgeted else []
    for col in cols + ["sim req/s"]:
        t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for r in doc["results"]:
        cap = r["capture_of_achievable"]
        rc = r["recommendations"]
        recs = "/".join(str(rc.get(k, 0)) for k in ("process_as_batch", "consider_batch", "process_individually"))
        urgent = r["deadline_met_by_priority"].get("urgent")
        cells = [r["policy"], f"{r['cost_usd']:.2f}", f"{100 * r['saving_vs_naive'] + 0.0:.1f}%",
                 "n/a" if cap is None else f"{100 * cap + 0.0:.1f}%", f"{100 * r['deadline_met_frac']:.2f}%",
                 "n/a" if urgent is None else f"{100 * urgent:.1f}%",
                 f"{r['exact_hits']}/{r['in_flight_hits']}/{r['near_hits']}", recs]
        if budgeted:
            cells += [str(sum(r["rejected"].values())), f"{r.get('budget_overrun_usd', 0.0):.2f}"]
        t.add_row(*cells, "live" if r.get("sim_requests_per_s") is None else f"{r['sim_requests_per_s']:,.0f}")
    console.print(t)


def _budgets(settings: Settings, budget: float | None, tenant_budget: list[str] | None,
             duration: str | None, requests, reserve_output: str | None = None) -> Settings:
    """``--budget``/``--tenant-budget NAME=USD``/``--budget-duration`` on top of the settings' budgets. A
    budget without a window covers the whole trace and is paced over its span."""
    from engine.errors import ConfigError
    from engine.settings import with_budget

    if reserve_output is not None:
        if reserve_output not in ("model_max", "request"):
            raise ConfigError(f"--reserve-output {reserve_output!r}: use model_max or request")
        budgets = settings.budgets.model_copy(update={"reserve_output": reserve_output})
        settings = settings.model_copy(update={"budgets": budgets})
    tenants: dict[str, float] = {}
    for item in tenant_budget or []:
        name, sep, usd = item.partition("=")
        try:
            value = float(usd)
        except ValueError:
            value = -1.0
        if not sep or not name or value < 0:
            raise ConfigError(f"--tenant-budget {item!r}: write NAME=USD with USD >= 0, e.g. --tenant-budget acme=25")
        if name in tenants:
            raise ConfigError(f"--tenant-budget names tenant {name!r} twice")
        tenants[name] = value
    if budget is None and not tenants:
        if duration is not None:
            raise ConfigError("--budget-duration needs --budget or --tenant-budget")
        return settings
    try:
        horizon = max((r.arrival_s for r in requests), default=0.0)
        return with_budget(settings, budget, tenants, duration, horizon_s=horizon)
    except ValueError as exc:
        raise ConfigError(f"--budget-duration {duration!r}: {exc}") from None


def _bench(requests, name: str, policies: str, variants: Path | None, out: Path, seed: int, cat,
           settings: Settings) -> dict:
    from engine.bench import load_variants, resolve_policies, run_bench, write_outputs

    specs = resolve_policies(policies, load_variants(variants))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(f"bench {name}", total=len(specs) + 1)
        doc = run_bench(requests, specs, trace_name=name, catalog=cat, settings=settings, seed=seed,
                        on_progress=lambda label: bar.update(task, advance=1, description=f"done: {label}"))
    write_outputs(doc, out)
    return doc


@app.command()
def bench(trace: Path = typer.Argument(..., help="a JSONL trace"),
          policies: str = typer.Option("naive,cache-only,fixed,batch-all,smart", help="comma-separated names "
                                       "(registered, module:Class, or variants from --variants)"),
          out: Path = typer.Option(Path("out/bench"), "--out", help="output directory"),
          variants: Path | None = typer.Option(None, help="YAML with variants: [{name, policy, params}]"),
          seed: int = typer.Option(0, help="simulation seed"),
          skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip and count invalid lines"),
          budget: float | None = typer.Option(None, min=0, help="hard budget over all spend, USD"),
          tenant_budget: list[str] | None = typer.Option(None, "--tenant-budget",
                                                         help="hard budget of one tenant, NAME=USD (repeatable)"),
          budget_duration: str | None = typer.Option(None, help="budget window (30s, 1h, 1d, 30d, 1mo); default: "
                                                      "the whole trace"),
          reserve_output: str | None = typer.Option(None, help="output a reservation assumes without a "
                                                    "max_output_tokens cap: model_max (default, safe) or request "
                                                    "(output_tokens, when it is sent as max_tokens)"),
          catalog: Path | None = typer.Option(None, help="catalog YAML (default: packaged)")) -> None:
    """Run policies on a trace in the simulator; write results.json, results.md and plot.png."""
    from engine.trace import load_trace

    try:
        settings, cat = _settings(catalog)
        tr = load_trace(trace, catalog=cat, settings=settings, skip_invalid=skip_invalid)
        settings = _budgets(settings, budget, tenant_budget, budget_duration, tr.requests, reserve_output)
        if tr.skipped:
            p = tr.problems[0]
            err_console.print(Text(f"skipped {tr.skipped} invalid line(s); first: {p[0]}:{p[1]}: field '{p[2]}': "
                                   f"{p[3]}", style="yellow"))
        if tr.rebased_s:
            err_console.print(Text(f"arrivals rebased by {tr.rebased_s / 86400:,.0f} day(s) ({tr.rebased_s:,.0f} s), "
                                   "so the trace starts on its first day", style="yellow"))
        doc = _bench(tr.requests, tr.name, policies, variants, out, seed, cat, settings)
    except SmartbatchError as exc:
        _fail(exc)
    _print_table(doc)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'plot.png'}")


def _live(requests, name: str, policy: str, speedup: float, address: str | None, seed: int, settings,
          cat, results: list | None = None, on_start=None) -> dict:
    from engine.live import run_live

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(f"live {policy} x{speedup:g}", total=len(requests))
        return run_live(requests, trace_name=name, policy=policy, speedup=speedup, address=address, seed=seed,
                        catalog=cat, settings=settings, results=results, on_start=on_start,
                        on_done=lambda k: bar.update(task, advance=k))


@app.command()
def run(trace: Path = typer.Argument(..., help="a JSONL trace"),
        policy: str = typer.Option("smart", help="registered name or module:Class"),
        speedup: float = typer.Option(100.0, min=0.001, help="engine seconds per real second"),
        out: Path = typer.Option(Path("out/run"), "--out", help="where results.json, results.md and plot.png go"),
        address: str | None = typer.Option(None, help="attach to a Ray cluster (e.g. auto); default: "
                                              "an embedded local Ray"),
        providers: str | None = typer.Option(None, "--providers", help="sim: every provider simulated; http: real "
                                             "calls to the providers with an endpoint (default: settings)"),
        base_url: list[str] | None = typer.Option(None, "--base-url", help="NAME=URL: where provider NAME is "
                                                  "reached over HTTP (repeatable)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print what would be sent and its estimated "
                                     "cost; send nothing"),
        budget: float | None = typer.Option(None, min=0, help="hard budget over all spend, USD"),
        tenant_budget: list[str] | None = typer.Option(None, "--tenant-budget",
                                                       help="hard budget of one tenant, NAME=USD (repeatable)"),
        budget_duration: str | None = typer.Option(None, help="budget window (30s, 1h, 1d, 30d, 1mo)"),
        seed: int = typer.Option(0, help="seed of the simulated draws"),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip and count bad trace lines"),
        catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one"),
        catalog_overlay: Path | None = typer.Option(None, "--catalog-overlay", help="a YAML merged over the "
                                                    "catalog: adds or overrides providers, models, prices")) -> None:
    """Replay a trace through the live engine on Ray (time-compressed); same report and results.json as bench."""
    from engine.bench import write_outputs
    from engine.trace import load_trace

    try:
        settings, cat = _settings(catalog, catalog_overlay)
        settings = _providers(settings, providers, base_url)
        tr = load_trace(trace, catalog=cat, settings=settings, skip_invalid=skip_invalid)
        settings = _budgets(settings, budget, tenant_budget, budget_duration, tr.requests)
        if dry_run:
            from engine.live import dry_run as plan

            _print_plan(plan(tr.requests, policy=policy, catalog=cat, settings=settings, seed=seed))
            return
        doc = _live(tr.requests, tr.name, policy, speedup, address, seed, settings, cat)
        paths = write_outputs(doc, out)
    except SmartbatchError as exc:
        _fail(exc)
    _print_table(doc)
    _print_providers(doc)
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")


def _print_plan(plan: dict) -> None:
    t = Table(title=f"dry run: {plan['requests']:,} requests, nothing sent; estimated ${plan['cost_usd']:.4f} "
                    f"(${plan['list_price_usd']:.4f} at list price)")
    for col in ("provider", "calls", "requests", "sync", "batch API", "GPU batch", "reused", "est. $"):
        t.add_column(col, justify="left" if col in ("provider", "calls") else "right", no_wrap=True)
    for name, row in plan["providers"].items():
        m = row["modes"]
        t.add_row(name, row["calls"], str(row["requests"]), str(m.get("sync", 0)), str(m.get("batch_api", 0)),
                  str(m.get("gpu_batch", 0)), str(m.get("reuse", 0)), f"{row['cost_usd']:.4f}")
    console.print(t)
    for name, sample in plan["samples"].items():
        console.print(f"[bold]{name}[/] {sample['route']} at {sample['base_url']}:")
        console.print_json(data=sample["body"])


def _print_providers(doc: dict) -> None:
    rep = doc.get("engine_report") or {}
    for name, p in (rep.get("providers") or {}).items():
        if p.get("calls") == "http":
            console.print(f"{name}: real calls over HTTP; batches cancelled at their hedge: "
                          f"{p.get('batches_cancelled', 0)}, finished members kept from them: "
                          f"{p.get('members_saved_by_cancel', 0)}")
    for r in doc.get("samples", []):
        how = "over HTTP" if r.get("real") else "simulated"
        console.print(Text(f"  {r['id']} ({r['provider']}/{r['model']}, {r['mode']}, {how}, ${r['cost_usd']:.6f}): "
                           f"{r['output']}"))


@app.command("batch")
def batch_file(input_file: Path = typer.Argument(..., metavar="INPUT.jsonl", help="an OpenAI Batch input file"),
               out: Path = typer.Option(..., "--out", help="the output file (OpenAI's batch output format)"),
               window: str = typer.Option("24h", help="the completion window: every line's deadline (e.g. 24h)"),
               errors: Path | None = typer.Option(None, "--errors", help="the error file (default: "
                                                  "OUT's stem + .errors.jsonl)"),
               report_path: Path | None = typer.Option(None, "--report", help="where to write the cost report "
                                                       "(JSON)"),
               policy: str = typer.Option("smart", help="registered name or module:Class"),
               tenant: str = typer.Option("default", help="the tenant of every line (budgets, cache)"),
               providers: str | None = typer.Option(None, "--providers", help="sim: every provider simulated; "
                                                    "http: real calls to the providers with an endpoint"),
               base_url: list[str] | None = typer.Option(None, "--base-url", help="NAME=URL: where provider NAME "
                                                         "is reached over HTTP (repeatable)"),
               speedup: float = typer.Option(1.0, min=0.001, help="engine seconds per real second (1: real "
                                             "time; higher only against simulated or emulated providers)"),
               address: str | None = typer.Option(None, help="attach to a Ray cluster (e.g. auto); default: "
                                                  "an embedded local Ray"),
               seed: int = typer.Option(0, help="seed of the simulated draws"),
               skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip lines that have no usable "
                                                 "custom_id (bad JSON, missing or repeated) instead of refusing "
                                                 "the file"),
               catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one")) -> None:
    """Send an OpenAI Batch input file through the live engine within its completion window; write OpenAI's
    output and error files and a report of each line's cost against its list price. Lines that are not valid
    requests are answered in the error file (invalid_request)."""
    import json
    import time

    from engine.batchfile import parse_window, read_batch_file, report, write_results
    from engine.driver import Engine
    from engine.errors import TraceError

    try:
        window_s = parse_window(window)
        settings, cat = _settings(catalog)
        settings = _providers(settings, providers, base_url)
        bf = read_batch_file(input_file, window_s=window_s, tenant=tenant, catalog=cat, settings=settings)
        if bf.file_problems and not skip_invalid:
            raise TraceError(bf.file_problems, hint="fix the lines named (each needs a unique custom_id), or pass "
                                                    "--skip-invalid to skip them")
        if not bf.lines:
            raise TraceError([(bf.source, 0, "file", "no line can be answered; give at least one line with a "
                                                     "custom_id")], hint="")
        results = []
        if bf.requests:
            with Engine.start(settings, policy=policy, catalog=cat, address=address, speedup=speedup,
                              seed=seed) as eng:
                futs = eng.submit_many(bf.requests)
                results = [f.result() for f in futs]
                cat = eng.catalog
        n_out, n_err = write_results(bf, results, out, errors, created=int(time.time()))
        doc = report(bf, results, cat, window_s=window_s, policy=policy)
        if report_path is not None:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    except SmartbatchError as exc:
        _fail(exc)
    if bf.file_problems:
        p = bf.file_problems[0]
        err_console.print(Text(f"skipped {len(bf.file_problems)} line(s) with no usable custom_id; first: "
                               f"{p[0]}:{p[1]}: field '{p[2]}': {p[3]}", style="yellow"))
    _print_batch_report(doc)
    err_path = errors if errors is not None else out.with_name(out.stem + ".errors.jsonl")
    console.print(f"wrote {n_out:,} output line(s) to {out}, {n_err:,} error line(s) to {err_path}"
                  + (f", the report to {report_path}" if report_path is not None else ""))


def _print_batch_report(doc: dict) -> None:
    tot = doc["totals"]
    t = Table(title=f"batch {Path(doc['input']).name}: {tot['lines']:,} lines, {tot['succeeded']:,} answered; "
                    f"${tot['cost_usd']:.4f} against ${tot['list_price_usd']:.4f} at list price")
    for col in ("mode", "lines", "cost $", "list $", "saving $"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    groups: dict[str, list[dict]] = {}
    for r in doc["lines"]:
        groups.setdefault(r["mode"] or r["status"], []).append(r)
    for mode, rows in sorted(groups.items()):
        cost, listed = sum(r["cost_usd"] for r in rows), sum(r["list_price_usd"] for r in rows)
        t.add_row(mode, str(len(rows)), f"{cost:.4f}", f"{listed:.4f}", f"{listed - cost:.4f}")
    t.add_row("total", str(tot["lines"]), f"{tot['cost_usd']:.4f}", f"{tot['list_price_usd']:.4f}",
              f"{tot['saving_usd']:.4f}", style="bold")
    console.print(t)


@app.command()
def emulate(port: int = typer.Option(8765, help="port on 127.0.0.1 (0: a free one)"),
            speedup: float = typer.Option(1.0, min=0.001, help="emulated seconds per real second (match the "
                                          "engine's --speedup)"),
            seed: int = typer.Option(0, help="seed of latencies, turnarounds and random faults"),
            catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one")) -> None:
    """Serve the loopback provider emulator (OpenAI and Anthropic wire formats) until interrupted. Point the
    engine at it with --base-url openai=http://127.0.0.1:PORT/openai/v1 --base-url
    anthropic=http://127.0.0.1:PORT/anthropic."""
    from engine.emulator import serve

    try:
        serve(port, catalog_path=catalog, speedup=speedup, seed=seed)
    except SmartbatchError as exc:
        _fail(exc)


@app.command()
def demo(out: Path = typer.Option(Path("out/demo"), "--out", help="where results.json, results.md and plot.png go"),
         n: int = typer.Option(2000, "--n", min=1, help="requests in the synthetic workload"),
         seed: int = typer.Option(0, "--seed", help="seed of the workload and the draws"),
         speedup: float = typer.Option(100.0, min=1.0, help="engine seconds per real second"),
         providers: str = typer.Option("http", "--providers", help="http: OpenAI and Anthropic calls go over HTTP "
                                       "to the loopback emulator; sim: every provider simulated")) -> None:
    """A synthetic workload through the live engine on an embedded local Ray (smart policy), next to every
    policy in the simulator: report, results.json and plot. Needs no data files and no API key: OpenAI and
    Anthropic calls go over HTTP, through the official SDKs, to the project's provider emulator on 127.0.0.1
    (the other providers stay simulated). Deadlines are capped at one hour so the run ends in about a minute."""
    from engine.bench import write_outputs
    from engine.tracegen import synth

    try:
        settings, cat = _settings(None)
        settings = _providers(settings, providers, None)
        reqs = [r.model_copy(update={"deadline_s": min(r.deadline_s, 3600.0)})
                for r in synth(n, seed=seed, duration_s=600.0, catalog=cat, settings=settings)]
        name = f"synth-{n}-seed{seed}"
        doc = _bench(reqs, name, "naive,cache-only,fixed,batch-all,smart", None, out, seed, cat, settings)
        emu = None
        on_start = None
        if providers == "http":
            from engine.emulator import Emulator
            from engine.live import follow_engine, point_at_emulator

            emu = Emulator(cat, speedup=speedup, seed=seed).start()
            settings = point_at_emulator(settings, emu)
            on_start = follow_engine(emu, settings, seed)
            console.print(f"provider emulator on {emu.base_url('openai')} and {emu.anthropic_base_url('anthropic')}")
        try:
            live = _live(reqs, name, "smart", speedup, None, seed, settings, cat, on_start=on_start)
            bill = emu.bill() if emu is not None else None
        finally:
            if emu is not None:
                emu.stop()
        doc["results"].append(live["results"][0])
        doc["engine_report"] = live["engine_report"]
        doc["samples"] = live.get("samples", [])
        paths = write_outputs(doc, out)
    except SmartbatchError as exc:
        _fail(exc)
    _print_table(doc)
    rep = doc["engine_report"]
    console.print(f"live engine: {rep['requests']:,} requests, spend ${rep['spend_usd']:.2f}, saving "
                  f"${rep['saving_usd']:.2f} against list prices, hits {rep['hits']}")
    _print_providers(doc)
    if bill is not None:
        http = {k for k, p in rep.get("providers", {}).items() if p.get("calls") == "http"}
        engine_real = sum(p["cost_usd"] for k, p in rep["by_provider"].items() if k in http)
        console.print(f"real calls ({', '.join(sorted(http))}): the emulator billed ${bill.total_usd:.4f}; the "
                      f"engine's results for them add up to ${engine_real:.4f}")
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")


@app.command("policies")
def list_policies() -> None:
    """List the registered policies and their parameters."""
    from engine.catalog import default_catalog
    from policies import available_policies, load_policy

    for name in available_policies():
        p = load_policy(name, default_catalog())
        params = ", ".join(f"{k}={v!r}" for k, v in p.params.model_dump().items()) or "(none)"
        summary = " ".join((type(p).__doc__ or "").strip().split("\n\n")[0].split()) or "(no description)"
        console.print(Text.assemble((name, "bold"), f": {summary}\n    {params}"))


if __name__ == "__main__":
    app()
