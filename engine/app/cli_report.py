"""How the command line prints a results document: the results table (fitted to the console's width), a dry
run's plan, and the live providers' lines and sample outputs."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from engine.app._words import counted
from engine.app.cli_common import console
from engine.core.settings import masked_url

__all__ = ["print_plan", "print_providers", "print_seed_table", "print_table"]


def print_table(doc: dict) -> None:
    """Print the results table on the CLI console. When the full table is wider than the console, headers
    shorten (a caption spells them out) and the columns that matter least move, in order, to a second table
    keyed by policy, so nothing wraps or is cut at 80 columns."""
    out = console  # read at call time, so tests can patch engine.app.cli_report.console
    budgeted = bool(doc.get("budgets"))
    from engine.app.bench import usd_places

    rows = doc["results"]
    nd = usd_places(doc)

    def pct(x: float | None, nd: int = 1) -> str:
        return "n/a" if x is None else f"{100 * x + 0.0:.{nd}f}%"

    # (full header, short header, cells); policy, cost, saving and met never fold.
    cols = {
        "policy": ("policy", "policy", [r["policy"] for r in rows]),
        "cost": ("cost $", "cost $", [f"{r['cost_usd']:.{nd}f}" for r in rows]),
        "saving": ("saving", "save", [pct(r["saving_vs_naive"]) for r in rows]),
        "capture": ("capture", "capt", [pct(r["capture_of_achievable"]) for r in rows]),
        "met": ("met", "met", [pct(r["deadline_met_frac"], 2) for r in rows]),
        "urgent": ("urgent", "urg", [pct(r["deadline_met_by_priority"].get("urgent")) for r in rows]),
        # Never folded: a failed request costs nothing, so a cost without it reads as a saving.
        "failed": ("failed", "fail", [str(r.get("failed", 0)) for r in rows]),
        "hits": ("hits e/f/n", "hits", [f"{r['exact_hits']}/{r['in_flight_hits']}/{r['near_hits']}" for r in rows]),
        "recs": ("b/c/i" if budgeted else "batch/consider/indiv", "b/c/i",
                 ["/".join(str(r["recommendations"].get(k, 0)) for k in
                           ("process_as_batch", "consider_batch", "process_individually")) for r in rows]),
    }
    if budgeted:
        cols["rejected"] = ("rejected", "rej", [str(sum(r["rejected"].values())) for r in rows])
        # At the cost's decimals, and never shown as nothing: an overrun under a dime printed "0.00" (a hunt).
        cols["overrun"] = ("overrun $", "over $", [_overrun(r.get("budget_overrun_usd", 0.0), nd) for r in rows])
    cols["speed"] = ("sim req/s", "req/s", ["live" if r.get("sim_requests_per_s") is None
                                            else f"{r['sim_requests_per_s']:,.0f}" for r in rows])
    fold_order = ["speed", "recs", "hits", "overrun", "rejected", "capture", "urgent"]
    title = f"{doc['trace']}: {counted(doc['requests'], 'request')}; lower bound ${doc['lower_bound_usd']:.{nd}f}"

    # A run that did not serve every request is judged on what it served (``saving_vs_naive``): say so.
    served = " on the requests served" if budgeted or any(r.get("failed") for r in rows) else ""
    legend = {False: {"saving": f"saving: vs naive{served}", "hits": "hits e/f/n: exact/in-flight/near",
                      "recs": "batch/consider/indiv: dispatches per recommendation"},
              True: {"saving": f"save: vs naive{served}", "capture": "capt: of achievable", "urgent": "urg: urgent met",
                     "hits": "hits: exact/in-flight/near", "recs": "b/c/i: dispatches batch/consider/indiv",
                     "speed": "req/s: simulated" + (", live: the engine's run" if any(
                         r.get("sim_requests_per_s") is None for r in rows) else "")}}
    if any((r.get("capture_of_achievable") or 0.0) > 1.0 for r in rows):  # the bound holds for deadlines met
        # Or answers an earlier run paid for: a live run's second pass at the emulator, every deadline met, read
        # "below the bound by missing deadlines" at $24.73 against a bound of $28.12 (a tour).
        missed, n = any((r.get("deadline_met_frac") or 0.0) < 1.0 for r in rows), _replayed(doc)
        why = [w for w, yes in (("missing deadlines", missed), (f"{n:,} answers an earlier run paid for", n)) if yes]
        for short, name in ((False, "capture"), (True, "capt")):
            said = legend[short].get("capture")
            note = f"{name} over 100%: below the bound by {' and '.join(why) or 'missing deadlines'}"
            legend[short]["capture"] = f"{said}, {note}" if said else note

    def build(keys: list[str], short: bool, title: str | None = None) -> Table:
        caption = "; ".join(legend[short][k] for k in keys if k in legend[short]) or None
        t = Table(title=title, caption=caption)
        for k in keys:
            t.add_column(cols[k][1 if short else 0], justify="left" if k == "policy" else "right", no_wrap=True)
        for i in range(len(rows)):
            t.add_row(*(cols[k][2][i] for k in keys))
        return t

    def width(t: Table) -> int:
        return out.measure(t, options=out.options.update_width(10_000)).maximum

    main, folded = list(cols), []
    table = build(main, short=False, title=title)
    if width(table) > out.width:
        table = build(main, short=True, title=title)
        for k in fold_order:
            if width(table) <= out.width:
                break
            if k in main:
                main.remove(k)
                folded.append(k)
                table = build(main, short=True, title=title)
    out.print(table)
    if folded:
        out.print(build(["policy", *reversed(folded)], short=True))


def _overrun(usd: float, nd: int) -> str:
    shown = f"{usd:.{nd}f}"
    return f"<{10.0 ** -nd:.{nd}f}" if usd > 0 and float(shown) == 0 else shown


def print_seed_table(doc: dict) -> None:
    """Print a ``bench --seeds`` summary: per policy, means over the seeds with their standard errors."""
    from engine.app.bench import places_for
    from engine.app.bench_seeds import seed_cells

    head, rows = seed_cells(doc)
    seeds = doc["seeds"]
    nd = places_for(max(doc["naive_cost_usd"] or 0.0, *(s["mean_cost_usd"] for s in doc["summary"])))
    t = Table(title=f"{doc['trace']}: {counted(doc['requests'], 'request')}, seeds {seeds[0]}-{seeds[-1]}; mean lower bound "
                    f"${doc['lower_bound_usd']:.{nd}f}", caption="± standard error of the mean; the difference from "
              f"{doc['reference']} is paired, seed by seed" + ("; refused: by the budgets (a cost is of the work "
                                                               "served)" if "refused" in head else ""))
    for col in head:
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)


def print_plan(plan: dict) -> None:
    t = Table(title=f"dry run: {counted(plan['requests'], 'request')}, nothing sent; estimated ${plan['cost_usd']:.4f} "
                    f"(${plan['list_price_usd']:.4f} at list price)")
    for col in ("provider", "calls", "requests", "sync", "flex", "batch API", "GPU batch", "reused", "refused",
                "est. $"):
        t.add_column(col, justify="left" if col in ("provider", "calls") else "right", no_wrap=True)
    for name, row in plan["providers"].items():
        m = row["modes"]
        t.add_row(name, row["calls"], str(row["requests"]), str(m.get("sync", 0)), str(m.get("flex", 0)),
                  str(m.get("batch_api", 0)), str(m.get("gpu_batch", 0)), str(m.get("reuse", 0)),
                  str(row.get("refused", 0)), f"{row['cost_usd']:.4f}")
    console.print(t)
    if (refused := plan.get("refused") or {}).get("count"):
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(refused["by_reason"].items()))
        ex = refused["example"]
        console.print(Text(f"{counted(refused['count'], 'request')} the budgets would refuse ({reasons}); e.g. "
                           f"{ex['id']}: {ex['why']}", style="yellow"))
    for name, sample in plan["samples"].items():
        console.print(Text.assemble((name, "bold"), f" {sample['route']} at {masked_url(sample['base_url'])}:"))
        console.print_json(data=sample["body"])
    for name, problem in plan.get("keys", {}).items():  # last, where a plan's reader looks before the real run
        console.print(Text(f"{name}'s API key: the real run would stop at its start: {problem}", style="yellow"))
    if plan.get("speedup"):
        console.print(Text(f"the real run would stop at its start: {plan['speedup']}", style="yellow"))


def _replayed(doc: dict) -> int:
    """Answers a live run's providers gave again under their Idempotency-Key: an earlier run's calls, counted 0."""
    return sum(p.get("replayed", 0) for p in ((doc.get("engine_report") or {}).get("providers") or {}).values())


def print_providers(doc: dict) -> None:
    rep = doc.get("engine_report") or {}
    for name, p in (rep.get("providers") or {}).items():
        if p.get("calls") == "http":
            console.print(f"{name}: real calls over HTTP; batches cancelled at their hedge: "
                          f"{p.get('batches_cancelled', 0)}, finished members kept from them: "
                          f"{p.get('members_saved_by_cancel', 0)}" + (f"; calls with no answer, maybe billed: {n} "
                          f"(${p['possibly_billed_usd']:.6f} kept on budgets)" if (n := p.get("possibly_billed")) else "")
                          # Billed a second time and in no result (charged to the budgets): said nowhere, the bill
                          # was above the results by it with no word why (a helper's hunt).
                          + (f"; batch members a late batch finished after they went again, paid twice: {n} "
                             f"(${p['paid_twice_usd']:.6f}, charged to budgets)" if (n := p.get("paid_twice")) else "")
                          + (f"; answers an earlier run paid for, replayed under their Idempotency-Key: {n:,} "
                             f"(${p['replayed_usd']:.6f} then, $0 here)" if (n := p.get("replayed")) else ""))
    provs = rep.get("providers") or {}
    if any(p.get("calls") == "http" for p in provs.values()):
        # Beside real calls, a provider without an endpoint was answered from the simulator (simulate_others: the
        # emulator's runs), and only the real ones were named: a mixed run read as real throughout (a helper's tour).
        for name, p in provs.items():
            served = ((rep.get("by_provider") or {}).get(name) or {}).get("requests", 0)
            if p.get("calls") == "simulated" and served:
                console.print(f"{name}: simulated, no HTTP endpoint in this run: its {served:,} request(s) were "
                              "answered with placeholder text at a simulated cost (Result.real false)")
    if n := (hidden := rep.get("billed_behind_refusal") or {}).get("requests"):
        # A Text: the console reads no markup (ids and tenants may hold brackets), so "[red]" printed as such.
        console.print(Text(f"{n} request(s) billed ${hidden['cost_usd']:.6f} after their driver got a refusal: a "
                           "defect of the engine (its log says which); the providers' bills are above this spend",
                           style="red"))
    for r in doc.get("samples", []):
        how = "over HTTP" if r.get("real") else "simulated"
        console.print(Text(f"  {r['id']} ({r['provider']}/{r['model']}, {r['mode']}, {how}, ${r['cost_usd']:.6f}): "
                           f"{r['output']}"))


def bill_words(rep: dict, http: set[str], billed_usd: float) -> str:
    """The demo's line: what the emulator billed for the calls made over HTTP beside what the engine counted of it,
    its results' cost and, in no result, the members a late batch paid twice and the bounds of calls with no
    answer (they may be billed)."""
    provs = [p for k, p in (rep.get("providers") or {}).items() if k in http]
    results = sum(p["cost_usd"] for k, p in rep["by_provider"].items() if k in http)
    words = (f"real calls ({', '.join(sorted(http))}): the emulator billed ${billed_usd:.4f}; the engine's results for "
             f"them add up to ${results:.4f}")
    if twice := sum(p.get("paid_twice", 0) for p in provs):
        words += (f", and ${sum(p['paid_twice_usd'] for p in provs if p.get('paid_twice')):.4f} more for {twice} "
                  "batch member(s) a late batch finished after they went again (paid twice)")
    if maybe := sum(p.get("possibly_billed", 0) for p in provs):
        words += (f", with ${sum(p['possibly_billed_usd'] for p in provs if p.get('possibly_billed')):.4f} more kept "
                  f"on budgets for {maybe} call(s) with no answer that may have been billed")
    return words
