"""``smartbatch batch`` (OpenAI batch files through the engine) and ``smartbatch emulate`` (the provider emulator)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.table import Table

from engine.app._batch_ended import brief  # (masked: a cancel's error may quote a provider's key)
from engine.app._batch_kept import billed_charges, earlier_answers, kept_charges
from engine.app._batch_output import _output_lock, _signals_held, _write
from engine.app._batch_record import check_own_files, error_file, unrecorded
from engine.app._batch_rescue import charges, finish, prepare, watch_answers
from engine.app._driver_shared import MAX_PENDING  # raised to a larger file's line count
from engine.app._ray_stop import (
    Terminated,
    exit_now,
    own_ray_processes,
    stop_or_lose_ray,
    terminate_as_interrupt,
)
from engine.app.cli_common import (
    _check_outputs,
    _check_tenant,
    _fail,
    _providers,
    _settings,
    _warn_skipped,
    app,
    console,
    err_console,
    progress,
)
from engine.app.provider_setup import speedup_problem
from engine.core._budget_check import check_budget_limits
from engine.core.errors import ConfigError, SmartbatchError


@app.command("batch")
def batch_file(input_file: Path = typer.Argument(..., metavar="INPUT.jsonl", help="an OpenAI Batch input file"),
               out: Path = typer.Option(..., "--out", help="the output file (OpenAI's batch output format)"),
               window: str = typer.Option("24h", help="the completion window: every line's deadline (e.g. 24h)"),
               errors: Path | None = typer.Option(None, "--errors", help="the error file (default: the one "
                                                  "an earlier run on OUT recorded beside it, else OUT's stem + "
                                                  ".errors.jsonl)"),
               report_path: Path | None = typer.Option(None, "--report", help="where to write the cost report "
                                                       "(JSON)"),
               policy: str = typer.Option("smart", help="registered name or module:Class"),
               tenant: str = typer.Option("default", help="the tenant of every line (budgets, cache)"),
               providers: str | None = typer.Option(None, "--providers", help="http: real calls to the "
                                                    "providers with an endpoint; sim: none (default: providers.mode)"),
               base_url: list[str] | None = typer.Option(None, "--base-url", help="NAME=URL: where provider NAME "
                                                         "is reached over HTTP (repeatable)"),
               speedup: float = typer.Option(1.0, min=0.001, max=1e6, help="engine seconds per real second (1: real "
                                             "time; higher only against simulated or emulated providers)"),
               address: str | None = typer.Option(None, help="attach to a Ray cluster (e.g. auto); default: "
                                                  "an embedded local Ray"),
               seed: int = typer.Option(0, min=0, help="seed of the simulated draws"),
               skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip lines that have no usable "
                                                 "custom_id (bad JSON, missing or repeated) instead of refusing "
                                                 "the file"),
               resume: bool = typer.Option(False, "--resume", help="keep the lines OUT already answers (an "
                                           "earlier, interrupted run's) and send only the others; a line is "
                                           "known by its custom_id"),
               overwrite: bool = typer.Option(False, "--overwrite", help="send every line again, though OUT "
                                              "already answers some of them (paid again), and replace OUT and the "
                                              "record beside it (OUT.smartbatch.json), even one that cannot be read"),
               resend_billed: bool = typer.Option(False, "--resend-possibly-billed", help="with --resume, send "
                                                  "again the lines the error file says failed possibly billed "
                                                  "(they ran; their answer could not be read): maybe paid twice"),
               catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one"),
               catalog_overlay: Path | None = typer.Option(None, "--catalog-overlay", help="a YAML merged over the "
                                                           "catalog: adds or overrides providers, models, prices")) -> None:
    """Send an OpenAI Batch input file through the live engine within its completion window; write OpenAI's
    output and error files and a report of each line's cost against its list price. Lines that are not valid
    requests are answered in the error file (invalid_request)."""
    import json

    from engine.app.driver import Engine
    from engine.core.batchfile import not_a_batch_file, parse_window, read_batch_file, report
    from engine.core.errors import TraceError
    from engine.core.result import CANCELLED

    stack = contextlib.ExitStack()
    try:
        window_s = parse_window(window)
        _check_tenant(tenant)
        settings, cat = _settings(catalog, catalog_overlay)
        settings = _providers(settings, providers, base_url)
        settings = _strict(settings)
        if (problem := speedup_problem(cat, settings, speedup)) is not None:
            # Here, not at the engine's start: `prepare` first takes back an earlier run's journal, cancelling
            # its batches under way at the provider, for a run refused (a review of stop 75).
            raise ConfigError(problem)
        check_budget_limits(settings.budgets)  # as early, for the same reason (``_budget_check``)
        bf = read_batch_file(input_file, window_s=window_s, tenant=tenant, catalog=cat, settings=settings, live=True)
        shape = None if bf.lines else not_a_batch_file(input_file)
        if shape is not None:
            raise TraceError([shape], hint="")
        if bf.file_problems and not skip_invalid:
            # --skip-invalid helps only where some line can be answered: with none, it skipped them all and failed.
            skip = ", or pass --skip-invalid to skip them" if bf.lines else ""
            raise TraceError(bf.file_problems, hint=f"fix the lines named (each needs a unique custom_id){skip}",
                             what="batch file")
        if not bf.lines:
            raise TraceError([(bf.source, 0, "file", "no line can be answered; give at least one line with a "
                                                     "custom_id")], hint="")
        check_own_files(out, {"--errors": errors, "--report": report_path})
        _check_outputs({"--out": out, "--errors": errors, "--report": report_path}, inputs=(input_file,))
        stack.enter_context(_output_lock(out))
        # The record beside OUT read under OUT's lock: read before it, a run on OUT ending meanwhile had written
        # its error file elsewhere unseen, and its possibly billed lines were sent again (a review).
        errors, err_flag = error_file(out, errors, {ln.custom_id for ln in bf.lines}, resume=resume,
                                      overwrite=overwrite, resend_billed=resend_billed)
        _check_outputs({"--out": out, err_flag: errors, "--report": report_path}, inputs=(input_file,))
        if (note := unrecorded(out, errors)) is not None:
            err_console.print(note, style="yellow")
        every = bf.lines
        bf, kept, kept_lines, held = earlier_answers(bf, input_file, out, errors, resume=resume,
                                                     overwrite=overwrite, resend_billed=resend_billed, cat=cat,
                                                     say=lambda m: err_console.print(m, style="yellow", markup=False))
        held_lines = [ln for ln in every if ln.no in held]
        settings, rescued, sending = prepare(out, settings, cat, bf.requests, resume=resume, overwrite=overwrite,
                                             address=address, speedup=speedup)
        results = list(rescued.results.values())  # answered by the batches of a run cut off by a crash
        interrupted = ray_gone = False
        written = None
        if sending:
            try:
                # Room for every line: they all ride the window, freeing places only as batches end, so a file
                # past the default let in by parts would wait in vain for room (read whole already, as before).
                eng = Engine.start(settings, policy=policy, catalog=cat, address=address, speedup=speedup, seed=seed,
                                   max_pending=max(MAX_PENDING, len(sending)))
            except KeyboardInterrupt:  # it stops what it had started; nothing was sent
                err_console.print("interrupted before the engine was up: no line was sent, nothing was billed",
                                  style="yellow")
                raise typer.Exit(130) from None
            ray_procs = [p for p in own_ray_processes() if p.poll() is None]  # if one exits, Ray is going down
            if settings.budgets.specs and settings.budgets.redis_url is None:
                # Budgets in this process start at 0: the kept lines were paid for, and a resumed run was granted
                # the whole budget again (a helper's hunt: 1.85x a hard limit). With Redis they are counted there.
                eng.count_spent(kept_charges(kept_lines + [ln for ln in bf.lines if ln.kept or ln.billed], kept, cat, out)
                                + charges(rescued.results, out) + billed_charges(held_lines, held, cat, out))
            if settings.providers.mode != "http" and speedup <= 1:  # a quiet wait of hours read as a hang
                err_console.print(f"simulated providers at real time: a line may wait for its batch up to the "
                                  f"{window} window (--speedup compresses time; --providers http makes real calls)",
                                  style="dim")
            try:
                # A line the driver refuses (a previous_response_id this run answered for no one) is its own error.
                futs = watch_answers(settings, eng.submit_many(sending, on_invalid="reject"))
                try:
                    with terminate_as_interrupt():
                        _wait_showing_progress(futs, f"batch {input_file.name}")
                        results += [f.result() for f in futs]
                except KeyboardInterrupt as exc:
                    # Ctrl-C or SIGTERM: cancel what is under way, keep what finished (it was paid for) and answer
                    # the rest in the error file, instead of leaving no file at all while a provider batch may
                    # still run and bill.
                    interrupted = True
                    results += _cancel_and_keep(eng, futs, sending, wait=not isinstance(exc, Terminated))
                cat = eng.catalog
                # The files before the engine's stop, which takes seconds: a second Ctrl-C (or one during the
                # stop) left no file at all, every answer paid for and lost (a helper's fault hunt).
                with _signals_held() as got:
                    written = _write(bf, results, out, errors, {**kept, **held})
                interrupted = interrupted or bool(got)
            finally:
                try:
                    # A SIGTERM to the whole process group (timeout, systemd) stops Ray's processes too: the stop
                    # then waited a minute for the GCS, and Ray ended the process, with no report and exit 1.
                    ray_gone = stop_or_lose_ray(eng.stop, ray_procs) == "ray-gone"
                    interrupted = interrupted or ray_gone
                except KeyboardInterrupt:  # the files are written; the interrupt ends the run as one would
                    interrupted = True
        n_out, n_err = written or _write(bf, results, out, errors, {**kept, **held})
        finish(settings, out, clean=not interrupted)  # (its journal: what a killed run leaves to --resume)
        doc = report(bf, results, cat, window_s=window_s, policy=policy)
        if report_path is not None:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    except SmartbatchError as exc:
        _fail(exc)
    finally:
        stack.close()
    if bf.file_problems:
        _warn_skipped(len(bf.file_problems), "line(s) with no usable custom_id", bf.file_problems)
    _print_batch_report(doc)
    partly = [ln for ln in bf.lines if ln.kept]  # (its choices answered by an earlier run)
    console.print(f"wrote {n_out:,} output line(s) to {out}, {n_err:,} error line(s) to {errors}"
                  + (f", the report to {report_path}" if report_path is not None else "")
                  + (f"; {len(kept):,} line(s) kept from the earlier run, not sent again" if kept else "")
                  + (f"; {sum(len(ln.kept) for ln in partly):,} choice(s) of {len(partly):,} line(s) of n choices "
                     "kept from the earlier run's error file, not sent again" if partly else "")
                  + (f"; {len(rescued.results):,} line(s) answered by a run cut off earlier ({rescued.answered:,} "
                     "it had received, the rest read from its provider batches), not sent again"
                     if rescued.results else "")
                  + (f"; {len(held):,} line(s) kept back in the error file, not sent again: the earlier run's "
                     "calls of them ran and may be billed, their answers unread (--resend-possibly-billed sends "
                     "them)" if held else ""))
    if interrupted:
        n_open = sum(r.error == _INTERRUPTED for r in results)
        n_cancelled = sum((r.error or "").startswith(CANCELLED) for r in results)
        err_console.print(f"interrupted: {n_cancelled:,} request(s) cancelled before they ran (a line of n choices is n "
                          "requests; billed nothing; --resume sends them)" + (f"; {n_open:,} had not finished: what their cancelled provider "
                                                    "batches still finish is billed, and --resume sends them again"
                                                    if n_open else ""), style="yellow")
        if ray_gone:  # Ray's exit hooks would each wait for its GCS
            exit_now(130)
        raise typer.Exit(130)


PROGRESS_S = 0.5  # how often the bar is brought up to date while an answer is waited for


def _wait_showing_progress(futs: list, what: str) -> None:
    """Wait for every line's answer, showing on a terminal how many are in and what they cost so far: a file
    due in a day rides provider batches that take minutes to hours, during which nothing was shown."""
    import concurrent.futures

    with progress(err_console, "${task.fields[spent]:.4f}") as bar:
        task = bar.add_task(what, total=len(futs), spent=0.0)
        for f in futs:  # in order, each waited on as before (Ctrl-C comes in a wait); the bar counts them all
            while True:
                try:
                    f.result(timeout=PROGRESS_S)
                    break
                except concurrent.futures.TimeoutError:
                    done = [x.result() for x in futs if x.done()]
                    bar.update(task, completed=len(done), spent=sum(r.cost_usd for r in done), refresh=True)


def _strict(settings):
    """Over HTTP, a line whose provider has no endpoint is answered in the error file (``check_real``) unless
    ``simulate_others`` is set true, loopback endpoints or not: its answer would be simulated, and it was written
    to OUT as a 200 with made-up text, costed at what no provider billed (a helper's hunt). ``run`` says so of its
    simulated providers; an output file cannot."""
    if settings.providers.simulate_others is not None:
        return settings
    return settings.model_copy(update={"providers": settings.providers.model_copy(update={"simulate_others": False})})


_INTERRUPTED = ("interrupted (Ctrl-C or SIGTERM) before this line finished; a provider batch already submitted for it may "
                "still finish and be billed")


def _cancel_and_keep(eng, futs: list, reqs: list, wait: bool) -> list:
    """Ctrl-C: cancel the engine's work (``Engine.cancel``: nothing more is sent; provider batches under way are
    cancelled, and what they finished is kept) and wait for every line to end, unless Ctrl-C comes again. A
    SIGTERM cancels and waits for nothing: a service manager kills soon after. Before, the provider batches ran
    on to their end, every member billed and its answer lost, and ``--resume`` sent those lines again (a
    helper's tour)."""
    if wait:
        err_console.print("cancelling: nothing more is sent; provider batches under way are cancelled and what "
                          "they finished is kept (a cancel takes up to 10 minutes at OpenAI and Anthropic). Ctrl-C "
                          "again to leave now: what they finished, before the cancel or after, is then billed and "
                          "its answer lost",
                          style="yellow")
    try:
        with terminate_as_interrupt():
            eng.cancel()
            if wait:
                _wait_showing_progress(futs, "cancelling")
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # e.g. Ray is going down (a SIGTERM to the process group): what finished is kept
        err_console.print(f"could not cancel the engine's work: {brief(exc)}",
                          style="yellow")
    return [_finished_or_interrupted(f, r) for f, r in zip(futs, reqs, strict=True)]


def _finished_or_interrupted(fut, req):
    """The future's Result if it finished, else a failed Result saying the run was interrupted."""
    from engine.core.result import Result

    if fut.done() and not fut.cancelled() and fut.exception() is None:
        return fut.result()
    return Result(id=req.id, status="failed", tenant=req.tenant, provider=req.provider, model=req.model,
                  error=_INTERRUPTED)


def _print_batch_report(doc: dict) -> None:
    tot = doc["totals"]
    from engine.app.bench import places_for

    # As bench's figures: a file of a few cheap lines read "$0.0008 against $0.0008", saving "$0.0001".
    nd = places_for(max(tot["cost_usd"], tot["list_price_usd"]))
    t = Table(title=f"batch {Path(doc['input']).name}: {tot['lines']:,} lines, {tot['succeeded']:,} answered; "
                    f"${tot['cost_usd']:.{nd}f} against ${tot['list_price_usd']:.{nd}f} at list price")
    for col in ("mode", "lines", "cost $", "list $", "saving $"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    groups: dict[str, list[dict]] = {}
    for r in doc["lines"]:
        groups.setdefault(r["mode"] or r["status"], []).append(r)
    for mode, rows in sorted(groups.items()):
        cost, listed = sum(r["cost_usd"] for r in rows), sum(r["list_price_usd"] for r in rows)
        t.add_row(mode, str(len(rows)), f"{cost:.{nd}f}", f"{listed:.{nd}f}", f"{listed - cost:.{nd}f}")
    t.add_row("total", str(tot["lines"]), f"{tot['cost_usd']:.{nd}f}", f"{tot['list_price_usd']:.{nd}f}",
              f"{tot['saving_usd']:.{nd}f}", style="bold")
    console.print(t)


@app.command()
def emulate(port: int = typer.Option(8765, min=0, max=65535, help="port on 127.0.0.1 (0: a free one)"),
            speedup: float = typer.Option(1.0, min=0.001, max=1e6, help="emulated seconds per real second (match the "
                                          "engine's --speedup)"),
            seed: int = typer.Option(0, min=0, help="seed of latencies, turnarounds and random faults"),
            catalog: Path | None = typer.Option(None, help="a catalog YAML replacing the packaged one"),
            keep_records: int = typer.Option(10_000, min=0, help="how many of the latest call records, billed items "
                                             "and Idempotency-Key answers it keeps (an answer at least an emulator "
                                             "hour; the bill's totals and the counts cover every call)")) -> None:
    """Serve the loopback provider emulator (OpenAI and Anthropic wire formats, OpenAI's Videos API, Gemini's
    OpenAI layer and Veo) until interrupted. Point the engine at it with --base-url
    openai=http://127.0.0.1:PORT/openai/v1 --base-url anthropic=http://127.0.0.1:PORT/anthropic --base-url
    google=http://127.0.0.1:PORT/google/v1 (Gemini and Veo; docs/providers.md, "Gemini", "Video"). Your own
    SDK client: openai.OpenAI(base_url=".../openai/v1", api_key="any"); an Anthropic route, as Anthropic's API,
    reads the key from x-api-key alone, and the anthropic SDK (2.17) sends api_key as a Bearer token (401 "x-api-key
    header is required"), so give anthropic.Anthropic(base_url=".../anthropic", api_key="any",
    default_headers={"x-api-key": "any", "Authorization": anthropic.Omit()})."""
    from engine.emulator import serve

    def started(emu) -> None:  # where it listens: with --port 0, nothing else says
        console.print(f"provider emulator on {emu.base_url('openai')} and {emu.anthropic_base_url('anthropic')}, "
                      f"Gemini's layer and Veo on {emu.base_url('google')} (--base-url google=...) "
                      f"(speed-up x{speedup:g}); its bill: GET http://127.0.0.1:{emu.port}/_emulator/bill; "
                      "Ctrl-C stops it", soft_wrap=True)

    def stopped(emu) -> None:
        bill = emu.bill()
        by = ", ".join(f"{k} ${v:.6f}" for k, v in sorted(bill.by_provider.items())) or "nothing"
        older = f" ({bill.items_dropped:,} older item(s) not kept)" if bill.items_dropped else ""
        console.print(f"emulator stopped; it billed ${bill.total_usd:.6f} for {bill.items_billed:,} item(s){older}: "
                      f"{by}", soft_wrap=True)

    try:
        serve(port, catalog_path=catalog, speedup=speedup, seed=seed, on_start=started, on_stop=stopped,
              keep_records=keep_records)
    except SmartbatchError as exc:
        _fail(exc)


