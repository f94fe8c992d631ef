"""``bench --seeds N``: the same policies over N simulation seeds, so that a comparison is not one draw's luck.

A seed fixes the simulated world's draws: which calls fail, and how long a batch submitted in each 60-s slot
takes. One seed's bill swings with them: on the Mooncake trace smart's ranged from $99 to $110 over 30 seeds in
stop 33, and one seed was one of the cheapest, so a change that saves $3.73 on average could pass for noise
there (docs/benchmarks.md, "Measured in stop 34"). Per policy this reports the mean and standard error of cost and capture, the fewest
deadlines met on any seed, and the mean paired difference from the reference policy (the first one listed):
both runs of a seed share its draws, so the difference is the figure to judge a change by.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from engine.app._words import counted
from engine.app.bench import PolicySpec, load_spec, places_for, run_bench, source_line
from engine.core.catalog import Catalog, default_catalog
from engine.core.request import Request
from engine.core.settings import Settings, load_settings
from engine.core.trace import with_day_origin

__all__ = ["run_seeds", "seed_cells", "seeds_markdown", "write_seed_outputs"]

_NAIVE = "naive"  # a policy listed under this name is the deadline baseline of ``seeds_below_naive``
# Seeds on which a policy met fewer deadlines than naive ("seeds below naive", beside a cost, read as cheaper).
_FEWER = "seeds, fewer met than naive"
_KEPT = ("policy", "cost_usd", "capture_of_achievable", "capture_of_online", "deadline_met_frac", "rejected")
_REFUSED = "refused"  # requests the budgets refused, a mean over the seeds: only when a run refused any
_job: dict = {}  # a worker's trace and settings, set once by ``_init`` rather than pickled with every seed


def _init(requests, specs, trace_name, catalog, settings) -> None:
    _job.update(requests=requests, specs=specs, trace_name=trace_name, catalog=catalog, settings=settings)


def _one(seed: int) -> dict:
    doc = run_bench(_job["requests"], _job["specs"], trace_name=_job["trace_name"], catalog=_job["catalog"],
                    settings=_job["settings"], seed=seed)
    return {"seed": seed, "lower_bound_usd": doc["lower_bound_usd"], "online_bound_usd": doc.get("online_bound_usd"),
            "naive_cost_usd": doc["results"][0]["naive_cost_usd"],
            "results": [{k: r.get(k) for k in _KEPT} for r in doc["results"]]}


def _mean_se(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (None for an empty list; the error is None under two values)."""
    n = len(xs)
    if n == 0:
        return None, None
    m = math.fsum(xs) / n
    if n < 2:
        return m, None
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _summary(runs: list[dict], names: list[str]) -> list[dict]:
    by = {name: [next(r for r in run["results"] if r["policy"] == name) for run in runs] for name in names}
    ref = by[names[0]]
    naive = by.get(_NAIVE)  # "never below naive" is judged seed by seed, on the same draws
    out = []
    for name in names:
        rows = by[name]
        cost, cost_se = _mean_se([r["cost_usd"] for r in rows])
        # A run that refused work (budgets) has no capture: averaged over the seeds that have one, and counted.
        caps = [r["capture_of_achievable"] for r in rows if r["capture_of_achievable"] is not None]
        cap, cap_se = _mean_se(caps)
        onl, _ = _mean_se([r["capture_of_online"] for r in rows if r["capture_of_online"] is not None])
        diff, diff_se = _mean_se([r["cost_usd"] - b["cost_usd"] for r, b in zip(rows, ref)])
        out.append({"policy": name, "mean_cost_usd": cost, "se_cost_usd": cost_se,
                    "mean_capture_of_achievable": cap, "se_capture_of_achievable": cap_se,
                    "seeds_with_capture": len(caps), "mean_capture_of_online": onl,
                    "min_deadline_met_frac": min(r["deadline_met_frac"] for r in rows),
                    "mean_deadline_met_frac": math.fsum(r["deadline_met_frac"] for r in rows) / len(rows),
                    "mean_diff_vs_reference_usd": diff, "se_diff_vs_reference_usd": diff_se,
                    "mean_refused": math.fsum(sum((r.get("rejected") or {}).values()) for r in rows) / len(rows),
                    "seeds_below_naive": None if naive is None else sum(
                        r["deadline_met_frac"] < b["deadline_met_frac"] for r, b in zip(rows, naive))})
    return out


def run_seeds(requests: Sequence[Request], specs: Sequence[PolicySpec], seeds: Sequence[int], *, trace_name: str,
              catalog: Catalog | None = None, settings: Settings | None = None, jobs: int = 1,
              on_progress: Callable[[int], None] | None = None) -> dict:
    """``run_bench`` once per seed (in ``jobs`` processes), and each policy summarised over the seeds against the
    first policy of ``specs``, the reference. ``on_progress`` receives each seed as its run ends."""
    if not seeds:
        raise ValueError("seeds is empty")
    names = [s.name for s in specs]
    for s in specs:  # a bad name or parameter fails here, before any run or process starts
        load_spec(s, catalog or default_catalog())
    # The trace's time of day, read before the list below drops it (a TraceRequests carries it), as run_bench does.
    settings = with_day_origin(settings or load_settings(), requests)
    args = (list(requests), list(specs), trace_name, catalog, settings)
    runs: list[dict] = []
    if jobs <= 1 or len(seeds) == 1:
        _init(*args)
        try:
            for seed in seeds:
                runs.append(_one(seed))
                if on_progress:
                    on_progress(seed)
        finally:
            _job.clear()
    else:
        # spawn, not fork: a fork of a process that runs threads (a Ray driver, a progress bar) can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=ctx, initializer=_init, initargs=args) as pool:
            for run in pool.map(_one, seeds):  # in the seeds' order, whichever ends first
                runs.append(run)
                if on_progress:
                    on_progress(run["seed"])

    def mean(key: str) -> float | None:
        xs = [r[key] for r in runs if r[key] is not None]
        return math.fsum(xs) / len(xs) if xs else None

    return {"trace": trace_name, "requests": len(requests), "seeds": list(seeds), "reference": names[0],
            "lower_bound_usd": mean("lower_bound_usd"), "online_bound_usd": mean("online_bound_usd"),
            "naive_cost_usd": mean("naive_cost_usd"), "summary": _summary(runs, names), "by_seed": runs}


def _pm(m: float | None, se: float | None, fmt: str) -> str:
    if m is None:
        return "n/a"
    return format(m, fmt) + ("" if se is None else " ± " + format(se, fmt.lstrip("+")))


def seed_cells(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The summary as table cells (header, rows), shared by results.md and the command line's table."""
    nd = places_for(max(doc["naive_cost_usd"] or 0.0, *(s["mean_cost_usd"] for s in doc["summary"])))
    head = ["policy", "cost $", f"vs {doc['reference']} $", "capture %", "of online %", "met, fewest"]
    below = any(s.get("seeds_below_naive") is not None for s in doc["summary"])
    rows = [[s["policy"], _pm(s["mean_cost_usd"], s["se_cost_usd"], f".{nd}f"),
             "reference" if k == 0 else _pm(s["mean_diff_vs_reference_usd"], s["se_diff_vs_reference_usd"],
                                            f"+.{nd}f"),
             _pm(None if s["mean_capture_of_achievable"] is None else 100 * s["mean_capture_of_achievable"],
                 None if s["se_capture_of_achievable"] is None else 100 * s["se_capture_of_achievable"], ".1f"),
             "n/a" if s["mean_capture_of_online"] is None else f"{100 * s['mean_capture_of_online']:.1f}",
             f"{100 * s['min_deadline_met_frac']:.2f} %"] for k, s in enumerate(doc["summary"])]
    if below:
        head.append(_FEWER)
        for row, s in zip(rows, doc["summary"]):
            row.append(str(s["seeds_below_naive"]))
    # Under budgets a run's cost is of the work it served: naive refused everything read "$0", and smart "+$0.0057
    # vs naive" for the work it did (a new user's tour); the single seed's table shows its "rejected" too.
    if any(s.get("mean_refused") for s in doc["summary"]):
        head.append(_REFUSED)
        for row, s in zip(rows, doc["summary"]):
            row.append(f"{s.get('mean_refused', 0.0):,.1f}")
    return head, rows


def seeds_markdown(doc: dict) -> str:
    nd = places_for(doc["naive_cost_usd"] or 0.0)
    seeds = doc["seeds"]
    span = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))
    online = doc["online_bound_usd"]
    head, rows = seed_cells(doc)
    lines = [f"### {doc['trace']} ({counted(doc['requests'], 'request')}, {counted(len(seeds), 'seed')}: {span})", "",
             f"Means over the seeds: lower bound ${doc['lower_bound_usd']:.{nd}f}"
             + ("" if online is None else f" (online: ${online:.{nd}f})") + f"; naive ${doc['naive_cost_usd']:.{nd}f}."
             " ± is the standard error of the mean; the difference from "
             f"{doc['reference']} is paired, seed by seed; \"met, fewest\" is the least share of deadlines met on "
             "any seed." + (f' "{_FEWER}" counts the seeds on which a policy met fewer deadlines than naive.'
                             if _FEWER in head else "")
             + (f' "{_REFUSED}": requests the budgets refused, a mean over the seeds; a cost covers the work served, '
                "so a difference between policies that refused different work is no saving." if _REFUSED in head
                else ""), *([source_line(doc)] if source_line(doc) else []), "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    # Seed by seed, so a mean's spread and a lost deadline can be traced to the draws that made them.
    names = [s["policy"] for s in doc["summary"]]
    lines += ["", "Seed by seed: cost $ / capture % / deadlines met %.", "",
              "| seed | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for run in doc["by_seed"]:
        got = {r["policy"]: r for r in run["results"]}
        cells = [f"{got[n]['cost_usd']:.{nd}f} / "
                 + ("n/a" if got[n]["capture_of_achievable"] is None else f"{100 * got[n]['capture_of_achievable']:.1f}")
                 + f" / {100 * got[n]['deadline_met_frac']:.2f}" for n in names]
        lines.append(f"| {run['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_seed_outputs(doc: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(seeds_markdown(doc), encoding="utf-8")
    return paths
