"""The ``smartbatch`` command line: bench, run, demo and policies here; trace builders in ``cli_trace``, batch
files and the emulator in ``cli_batch``; how results are printed in ``cli_report``; what they share in
``cli_common``; what run and demo say at their end in ``_cli_run_end``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from engine.app import cli_batch, cli_budget, cli_serve, cli_status, cli_trace  # noqa: F401  (importing them registers their commands on the app)
from engine.app._cli_run_end import _flag_compression, _flag_run_lag, _keep_interrupted, _late
from engine.app.cli_common import (
    RESERVE_OUTPUT_HELP,
    _check_outputs,
    _fail,
    _providers,
    _settings,
    _warn_skipped,
    _write_results,
    app,
    console,
    err_console,
    progress,
)
from engine.app.cli_report import bill_words, print_plan, print_providers, print_seed_table, print_table
from engine.core.errors import SmartbatchError
from engine.core.settings import Settings


def _budgets(settings: Settings, budget: float | None, tenant_budget: list[str] | None,
             duration: str | None, requests, reserve_output: str | None = None) -> Settings:
    """``--budget``/``--tenant-budget NAME=USD``/``--budget-duration`` on top of the settings' budgets. A
    budget without a window covers the whole trace and is paced over its span."""
    from engine.core.errors import ConfigError
    from engine.core.settings import with_budget

    if reserve_output is not None:
        if reserve_output not in ("model_max", "request"):
            raise ConfigError(f"--reserve-output {reserve_output!r}: use model_max or request")
        budgets = settings.budgets.model_copy(update={"reserve_output": reserve_output})
        settings = settings.model_copy(update={"budgets": budgets})
    tenants: dict[str, float] = {}
    for item in tenant_budget or []:
        name, sep, usd = item.rpartition("=")  # a tenant may hold "=", a number never
        try:
            value = float(usd)
        except ValueError:
            value = -1.0
        if not sep or not name or value < 0:
            raise ConfigError(f"--tenant-budget {item!r}: write NAME=USD with USD >= 0, e.g. --tenant-budget acme=25")
        if name in tenants:
            raise ConfigError(f"--tenant-budget names tenant {name!r} twice")
        tenants[name] = value
    if tenants:
        present = {r.tenant for r in requests}
        missing = sorted(set(tenants) - present)
        if missing:  # a budget for nobody holds nothing back: a typo would run the whole trace unbudgeted
            shown = ", ".join(sorted(present)[:8]) + (" ..." if len(present) > 8 else "")
            raise ConfigError(f"--tenant-budget: no request of this trace has tenant {missing[0]!r}; "
                              f"its tenants are {shown}")
    if budget is None and not tenants:
        if duration is not None:
            raise ConfigError("--budget-duration needs --budget or --tenant-budget")
        return settings
    try:
        horizon = max((r.arrival_s for r in requests), default=0.0)
        return with_budget(settings, budget, tenants, duration, horizon_s=horizon)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        why = "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors()) if errors else exc
        raise ConfigError(f"--budget-duration {duration!r}: {why}") from None


def _load(trace: Path, cat, settings: Settings, skip_invalid: bool):
    """The trace, saying (in yellow) what was skipped and whether its arrivals were rebased."""
    from engine.core.trace import load_trace

    tr = load_trace(trace, catalog=cat, settings=settings, skip_invalid=skip_invalid)
    if tr.skipped:
        _warn_skipped(tr.skipped, "invalid line(s)", tr.problems)
    if tr.rebased_s:
        err_console.print(Text(f"arrivals rebased by {tr.rebased_s / 86400:,.0f} day(s) ({tr.rebased_s:,.0f} s), "
                               "so the trace starts on its first day", style="yellow"))
    return tr


def _bench(requests, name: str, policies: str, variants: Path | None, out: Path, seeds: list[int], jobs: int, cat,
           settings: Settings, source: dict | None = None) -> dict:
    """One seed: ``run_bench`` and its results, table and plot; several: ``run_seeds`` and its summary."""
    from engine.app.bench import load_variants, resolve_policies, run_bench, write_outputs
    from engine.app.bench_seeds import run_seeds, write_seed_outputs

    specs = resolve_policies(policies, load_variants(variants), cat)
    _check_outputs(dirs={"--out": out})
    with progress(err_console) as bar:
        if len(seeds) == 1:
            task = bar.add_task(f"bench {name}", total=len(specs) + 1)
            doc = run_bench(requests, specs, trace_name=name, catalog=cat, settings=settings, seed=seeds[0],
                            on_progress=lambda label: bar.update(task, advance=1, description=f"done: {label}"))
        else:
            task = bar.add_task(f"bench {name}, {len(seeds)} seeds", total=len(seeds))
            doc = run_seeds(requests, specs, seeds, trace_name=name, catalog=cat, settings=settings, jobs=jobs,
                            on_progress=lambda seed: bar.update(task, advance=1, description=f"done: seed {seed}"))
    if source is not None:
        doc["source"] = source
    (write_outputs if len(seeds) == 1 else write_seed_outputs)(doc, out)
    return doc


@app.command()
def bench(trace: Path = typer.Argument(..., help="a JSONL trace"),
          policies: str = typer.Option("naive,cache-only,fixed,batch-all,smart", help="comma-separated names "
                                       "(registered, module:Class, or variants from --variants)"),
          out: Path = typer.Option(Path("out/bench"), "--out", help="output directory"),
          variants: Path | None = typer.Option(None, help="YAML with variants: [{name, policy, params}]"),
          seed: int = typer.Option(0, min=0, help="simulation seed (the first one, with --seeds)"),
          seeds: int = typer.Option(1, min=1, help="run every policy on this many seeds (SEED, SEED+1, ...) and "
                                    "report means, standard errors and paired differences from the first policy"),
          jobs: int = typer.Option(1, min=1, help="processes for --seeds (one per core at most helps)"),
          skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip and count invalid lines"),
          budget: float | None = typer.Option(None, min=0, help="hard budget over all spend, USD"),
          tenant_budget: list[str] | None = typer.Option(None, "--tenant-budget",
                                                         help="hard budget of one tenant, NAME=USD (repeatable)"),
          budget_duration: str | None = typer.Option(None, help="budget window (30s, 1h, 1d, 30d, 1mo); default: "
                                                      "the whole trace"),
          reserve_output: str | None = typer.Option(None, help=RESERVE_OUTPUT_HELP),
          catalog: Path | None = typer.Option(None, help="catalog YAML (default: packaged)"),
          catalog_overlay: Path | None = typer.Option(None, "--catalog-overlay", help="a YAML merged over the "
                                                      "catalog: adds or overrides providers, models, prices")) -> None:
    """Run policies on a trace in the simulator; write results.json, results.md and plot.png (with --seeds:
    results.json and results.md, the policies summarised over the seeds)."""
    from engine.app.bench import source_of

    try:
        settings, cat = _settings(catalog, catalog_overlay)
        tr = _load(trace, cat, settings, skip_invalid)
        settings = _budgets(settings, budget, tenant_budget, budget_duration, tr.requests, reserve_output)
        source = source_of(trace, skipped=tr.skipped, problems=tr.problems, catalog=catalog or settings.catalog_path,
                           overlay=catalog_overlay or settings.catalog_overlay)
        doc = _bench(tr.requests, tr.name, policies, variants, out, list(range(seed, seed + seeds)), jobs, cat,
                     settings, source)
    except SmartbatchError as exc:
        _fail(exc)
    if seeds > 1:
        print_seed_table(doc)
        console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
        return
    print_table(doc)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'plot.png'}")


def _started(then=None):
    """Say where the engine serves its metrics as soon as it is up, then run ``then``."""
    def started(eng) -> None:
        if eng.metrics_url:
            err_console.print(f"metrics at {eng.metrics_url}")
        if then is not None:
            then(eng)
    return started


def _live(requests, name: str, policy: str, speedup: float, address: str | None, seed: int, settings,
          cat, results: list | None = None, on_start=None, spec=None, shards: int = 1) -> dict:
    from engine.app.live import run_live

    params, label = (spec.params, spec.name) if spec is not None else (None, None)
    policy = spec.policy if spec is not None else policy
    with progress(err_console) as bar:
        task = bar.add_task(f"live {label or policy} x{speedup:g}", total=len(requests))
        return run_live(requests, trace_name=name, policy=policy, params=params, label=label, speedup=speedup,
                        address=address, seed=seed, catalog=cat, settings=settings, results=results,
                        on_start=_started(on_start), on_done=lambda k: bar.update(task, advance=k),
                        num_shards=shards)


@app.command()
def run(trace: Path = typer.Argument(..., help="a JSONL trace"),
        policy: str = typer.Option("smart", help="registered name, module:Class, or a variant from --variants"),
        variants: Path | None = typer.Option(None, help="YAML with variants: [{name, policy, params}], as for "
                                             "bench"),
        speedup: float = typer.Option(100.0, min=0.001, max=1e6, help="engine seconds per real second"),
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
        budget_duration: str | None = typer.Option(None, help="budget window (30s, 1h, 1d, 30d, 1mo); default: "
                                                    "the whole trace"),
        reserve_output: str | None = typer.Option(None, help=RESERVE_OUTPUT_HELP),
        seed: int = typer.Option(0, min=0, help="seed of the simulated draws"),
        shards: int = typer.Option(1, "--shards", min=1, help="actors each of ingest, cache, result hub and "
                                   "groupers"),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip and count bad trace lines"),
        catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one"),
        catalog_overlay: Path | None = typer.Option(None, "--catalog-overlay", help="a YAML merged over the "
                                                    "catalog: adds or overrides providers, models, prices")) -> None:
    """Replay a trace through the live engine on Ray (time-compressed); same report and results.json as bench."""
    from engine.app.bench import load_variants, resolve_policies, source_of, write_outputs
    from engine.app.live import Interrupted
    from engine.app.provider_setup import check_simulated
    from engine.core.errors import ConfigError

    try:
        settings, cat = _settings(catalog, catalog_overlay)
        specs = resolve_policies(policy, load_variants(variants), cat, flag="--policy")  # a bad variant named too
        if len(specs) != 1:
            raise ConfigError(f"--policy {policy!r}: run takes one policy (bench compares several)")
        (spec,) = specs
        settings = _providers(settings, providers, base_url)
        tr = _load(trace, cat, settings, skip_invalid)
        check_simulated(tr.requests, settings)  # a dry run says it too: the run it stands for sends nothing
        settings = _budgets(settings, budget, tenant_budget, budget_duration, tr.requests, reserve_output)
        if dry_run:
            from engine.app.live import dry_run as plan

            print_plan(plan(tr.requests, policy=spec.policy, params=spec.params, catalog=cat, settings=settings,
                             seed=seed, speedup=speedup))
            return
        _check_outputs(dirs={"--out": out})
        got: list = []
        try:
            doc = _live(tr.requests, tr.name, policy, speedup, address, seed, settings, cat, spec=spec,
                        shards=shards, results=got)
        except Interrupted as stop:
            _keep_interrupted(stop, out)
        each = _write_results(got, out / "results.jsonl")
        doc["source"] = source_of(trace, skipped=tr.skipped, problems=tr.problems, overlay=catalog_overlay
                                  or settings.catalog_overlay, catalog=catalog or settings.catalog_path)
        paths = write_outputs(doc, out)
    except SmartbatchError as exc:
        _fail(exc)
    print_table(doc)
    print_providers(doc)
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}, {each}")
    if speedup > 1 and _late(doc["results"][0], doc["requests"]):
        _flag_run_lag(doc, tr.requests, spec, settings, cat, seed, speedup)


@app.command()
def demo(out: Path = typer.Option(Path("out/demo"), "--out", help="where results.json, results.md and plot.png go"),
         n: int = typer.Option(2000, "--n", min=1, help="requests in the synthetic workload"),
         seed: int = typer.Option(0, "--seed", min=0, help="seed of the workload and the draws"),
         speedup: float = typer.Option(25.0, min=1.0, max=1e6, help="engine seconds per real second"),
         providers: str = typer.Option("http", "--providers", help="http: OpenAI and Anthropic calls go over HTTP "
                                       "to the loopback emulator; sim: every provider simulated")) -> None:
    """A synthetic workload through the live engine on an embedded local Ray (smart policy), next to every
    policy in the simulator: report, results.json and plot. Needs no data files and no API key: OpenAI and
    Anthropic calls go over HTTP, through the official SDKs, to the project's provider emulator on 127.0.0.1
    (the other providers stay simulated). Deadlines are capped at one hour so the run ends in about three
    minutes. At 25x a 30-second deadline is 1.2 s of real time; at 100x a busy 2-core machine did not keep up
    (urgent requests late that the simulator met), and the run says so when that happens."""
    from engine.app.bench import write_outputs
    from engine.app.live import Interrupted
    from engine.core.tracegen import synth

    try:
        settings, cat = _settings(None)
        settings = _providers(settings, providers, None)
        if providers == "http":  # the emulator fails no call: the simulated runs beside it draw no failures there
            from engine.app.live import as_emulated
            cat = as_emulated(cat)
        reqs = [r.model_copy(update={"deadline_s": min(r.deadline_s, 3600.0)})
                for r in synth(n, seed=seed, duration_s=600.0, catalog=cat, settings=settings)]
        name = f"synth-{n}-seed{seed}"
        doc = _bench(reqs, name, "naive,cache-only,fixed,batch-all,smart", None, out, [seed], 1, cat, settings)
        emu = None
        on_start = None
        if providers == "http":
            from engine.app.live import follow_engine, point_at_emulator
            from engine.emulator import Emulator

            emu = Emulator(cat, speedup=speedup, seed=seed).start()
            settings = point_at_emulator(settings, emu)
            on_start = follow_engine(emu, settings, seed)
            console.print(f"provider emulator on {emu.base_url('openai')} and {emu.anthropic_base_url('anthropic')}")
        try:
            live = _live(reqs, name, "smart", speedup, None, seed, settings, cat, on_start=on_start)
            bill = emu.bill() if emu is not None else None
        except Interrupted as stop:  # as in ``run``: what finished is kept, and the command exits 130
            _keep_interrupted(stop, out)
        finally:
            if emu is not None:
                emu.stop()
        doc["results"].append(live["results"][0])
        doc["engine_report"] = live["engine_report"]
        doc["samples"] = live.get("samples", [])
        paths = write_outputs(doc, out)
    except SmartbatchError as exc:
        _fail(exc)
    print_table(doc)
    rep = doc["engine_report"]
    console.print(f"live engine: {rep['requests']:,} requests, spend ${rep['spend_usd']:.2f}, saving "
                  f"${rep['saving_usd']:.2f} against list prices (each request alone and sync, reading no prompt "
                  f"cache, where the table's naive reads what the provider caches by itself), hits {rep['hits']}")
    print_providers(doc)
    if bill is not None:
        http = {k for k, p in rep.get("providers", {}).items() if p.get("calls") == "http"}
        console.print(bill_words(rep, http, bill.total_usd))
    _flag_compression(doc, speedup)
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")


@app.command("policies")
def list_policies() -> None:
    """List the registered policies and their parameters."""
    from engine.core.catalog import default_catalog
    from policies import available_policies, load_policy

    for name in available_policies():
        p = load_policy(name, default_catalog())
        params = ", ".join(f"{k}={v!r}" for k, v in p.params.model_dump().items()) or "(none)"
        summary = " ".join((type(p).__doc__ or "").strip().split("\n\n")[0].split()) or "(no description)"
        console.print(Text.assemble((name, "bold"), f": {summary}\n    {params}"))


if __name__ == "__main__":
    app()
