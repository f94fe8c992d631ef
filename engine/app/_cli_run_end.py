"""What ``run`` and ``demo`` say at their end: late requests of a live run set against the simulator's run of the
same policy (the machine's lag, not the policy's), and an interrupted run's finished results kept. Split from
``engine.app.cli`` (the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from engine.app._batch_ended import brief  # an exception's words, masked for the terminal
from engine.app.cli_common import console, err_console

__all__ = ["_flag_compression", "_flag_run_lag", "_keep_interrupted", "_late"]


def _flag_run_lag(doc: dict, reqs, spec, settings, cat, seed: int, speedup: float) -> None:
    """A time-compressed run with late requests: the same policy in the simulator (seconds), planned as the engine
    plans (``with_hedge_lag``), says whether the machine or the policy made them late. The run is done and written:
    nothing here fails it."""
    from engine.app.live import planned

    try:
        sim = planned(reqs, policy=spec.policy, params=spec.params, catalog=cat, settings=settings, seed=seed,
                      speedup=speedup)[0].summary()
    except (Exception, KeyboardInterrupt) as exc:
        err_console.print(f"(its late requests were not compared with the simulator's run: {brief(exc)})",
                          style="yellow")
        return
    _say_lag(_late(doc["results"][0], doc["requests"]), _late(sim, doc["requests"]), speedup)


def _late(row: dict, n: int) -> int:
    """Requests served after their deadline (a failed or refused one is not a late one)."""
    missed = round((1.0 - row["deadline_met_frac"]) * n)
    return max(missed - row.get("failed", 0) - sum(row.get("rejected", {}).values()), 0)


def _say_lag(live_late: int, sim_late: int, speedup: float) -> None:
    if live_late <= sim_late:
        return
    said = f"live: {live_late - sim_late} more request(s) late than in the simulator's run of the same policy."
    if speedup > 1:
        said += (f" At --speedup {speedup:g} a deadline of 30 s is {30 / speedup:.2f} s of real time, and this machine "
                 "did not keep up; rerun with a lower --speedup to see the policy's own deadlines.")
    console.print(said, style="yellow")


def _keep_interrupted(stop, out: Path) -> NoReturn:
    """Ctrl-C during ``run``: the results that finished (paid for) go to ``results.partial.jsonl``, with the
    spend so far on the terminal; the rest were not answered, and the engine's stop cancelled its provider batches
    (what they finished is billed; a stop that did not finish may have cancelled none). Exits 130, as an interrupted
    command does."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.partial.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for r in stop.results:
            fh.write(r.model_dump_json() + "\n")
    spend = stop.report.get("spend_usd")
    spend = "unknown: the engine did not answer" if spend is None else f"${spend:.4f}"
    batches = ("the provider batches under way were cancelled: what they finished before the cancel is billed"
               if stop.stopped else "a provider batch already submitted for them may still finish and be billed")
    err_console.print(f"interrupted: {len(stop.results):,} of {stop.sent:,} request(s) had finished (spend so far "
                      f"{spend}); their results are in {path}. The others were not answered, and {batches}",
                      style="yellow")
    if stop.ray_gone:  # Ray's exit hooks would each wait for its GCS
        from engine.app._ray_stop import exit_now

        exit_now(130)
    raise typer.Exit(130)


def _flag_compression(doc: dict, speedup: float) -> None:
    """Say so when the live run met fewer deadlines than the simulator's run of the same policy and draws:
    under time compression the engine's real-time margins shrink by the speedup, and a busy machine that
    cannot keep up shows as late requests, not as a policy's choice."""
    by = {r["policy"]: r for r in doc["results"]}
    sim, live = by.get("smart"), by.get("smart (live)")
    if sim is not None and live is not None:
        _say_lag(_late(live, doc["requests"]), _late(sim, doc["requests"]), speedup)
