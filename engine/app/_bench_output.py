"""A bench's results document written out: results.json, the results.md table and the plot, and the dollar
figures' decimals the commands that print costs share. Split from ``bench`` (run and judged there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.app._words import counted

__all__ = ["_markdown", "_plot", "places_for", "source_line", "usd_places", "write_outputs"]


def source_line(doc: dict) -> str | None:
    """The sentence results.md gives the source, when it is not a whole trace at the packaged prices."""
    src = doc.get("source") or {}
    said = []
    if src.get("skipped_lines"):
        said.append(f"{src['skipped_lines']:,} invalid line(s) skipped (--skip-invalid; each named in results.json, "
                    "`source.invalid_lines`).")
    if src.get("catalog", "packaged") != "packaged" or src.get("catalog_overlay"):
        overlay = f", overlay {src['catalog_overlay']}" if src.get("catalog_overlay") else ""
        said.append(f"Catalog: {src.get('catalog', 'packaged')}{overlay}.")
    return " ".join(said) or None


def usd_places(doc: dict) -> int:
    """Decimals that keep a results document's dollar figures readable: 2 from $10, 4 under it, 6 under a
    cent (a small batch file priced at 2 decimals read "$0.00" for every policy)."""
    figures = [doc.get("lower_bound_usd") or 0.0] + [max(r.get("cost_usd") or 0.0, r.get("naive_cost_usd") or 0.0)
                                                      for r in doc.get("results", [])]
    return places_for(max(figures, default=0.0))


def places_for(top: float) -> int:
    """Decimals for dollar figures whose largest is ``top``: 2 from $10, 4 under it, 6 under a cent."""
    return 2 if top >= 10 else 4 if top >= 0.01 else 6


def _markdown(doc: dict) -> str:
    nd = usd_places(doc)
    lines = [
        f"### {doc['trace']} ({counted(doc['requests'], 'request')}, seed {doc['seed']})",
        "",
        f"Lower bound: ${doc['lower_bound_usd']:.{nd}f}"
        + (f" (online: ${doc['online_bound_usd']:.{nd}f}{_online_note(doc)})" if doc.get("online_bound_usd")
           is not None else "")
        + f"; naive: ${doc['results'][0]['naive_cost_usd']:.{nd}f}."
        + ("" if not doc.get("budgets") else " Budgets: " + "; ".join(
            f"{b.get('tenant') or 'all'} ${b['max_budget']:g}" + (f"/{b['budget_duration']}" if b.get(
                "budget_duration") else "") for b in doc["budgets"]) + "."),
        *([source_line(doc), ""] if source_line(doc) else [""]),
        "| policy | cost USD | saving vs naive | capture of achievable | capture of online | deadlines met | "
        "urgent met | latency p50 / p99 s (urgent; normal; background) | exact/in-flight/near hits | failed | "
        "rejected | sim req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        cap = r["capture_of_achievable"]
        onl = r.get("capture_of_online")
        urgent = r["deadline_met_by_priority"].get("urgent")
        lines.append(
            f"| {r['policy']} | {r['cost_usd']:.{nd}f} | {100 * r['saving_vs_naive']:.1f} % | "
            f"{'n/a' if cap is None else f'{100 * cap:.1f} %'} | {'n/a' if onl is None else f'{100 * onl:.1f} %'} | "
            f"{100 * r['deadline_met_frac']:.2f} % | "
            f"{'n/a' if urgent is None else f'{100 * urgent:.1f} %'} | {_latency(r)} | "
            f"{r['exact_hits']}/{r['in_flight_hits']}/{r['near_hits']} | {r['failed']} | "
            f"{sum(r['rejected'].values())} | "
            f"{'live' if r.get('sim_requests_per_s') is None else format(r['sim_requests_per_s'], ',.0f')} |")
    return "\n".join(lines) + "\n"


def _online_note(doc: dict) -> str:
    """Why an online bound can read below the offline one (its captures then below the offline captures)."""
    if doc["online_bound_usd"] >= doc["lower_bound_usd"]:
        return ""
    return (", below this seed's offline bound: it is an expectation over the batch turnarounds, and this "
            "seed drew slower ones than average (docs/lower-bound.md)")


def _latency(row: dict) -> str:
    """``p50 / p99`` seconds per priority, e.g. ``12 / 280; 900 / 3,400; n/a``."""
    parts = []
    for p in ("urgent", "normal", "background"):
        q = (row.get("latency_s_by_priority") or {}).get(p)
        parts.append("n/a" if q is None else f"{q['p50']:,.0f} / {q['p99']:,.0f}")
    return "; ".join(parts)


def _plot(doc: dict, path: Path) -> Any:
    """Cost against deadline attainment, and cost against median latency (completion minus arrival), one
    labelled point per policy in each panel. Returns the figure, so tests can inspect where the labels landed."""
    # An Agg canvas bound to a bare Figure: no pyplot state, no GUI backend, nothing to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    met_ax, lat_ax = fig.subplots(1, 2, sharey=True)
    panels = [(met_ax, [100 * r["deadline_met_frac"] for r in doc["results"]], "deadlines met (%)",
               "cost against deadline attainment")]
    p50 = [((r.get("latency_s") or {}).get("p50")) for r in doc["results"]]
    panels.append((lat_ax, p50, "median latency, completion minus arrival (s)", "cost against median latency"))
    naive = doc["results"][0]["naive_cost_usd"]
    nd = usd_places(doc)  # results.md's decimals: at 2, a cheap trace's legend read "naive $0.00"
    labels: dict[Any, list] = {}
    for ax, xs, xlabel, title in panels:
        labels[ax] = []
        for r, x in zip(doc["results"], xs):
            if x is None:
                continue
            ax.scatter(x, r["cost_usd"], s=40)
            labels[ax].append(ax.annotate(r["policy"], (x, r["cost_usd"]), textcoords="offset points",
                                          xytext=(5, 4), fontsize=8))
        ax.axhline(naive, color="grey", linestyle="--", linewidth=1, label=f"naive ${naive:.{nd}f}")
        ax.axhline(doc["lower_bound_usd"], color="green", linestyle=":", linewidth=1,
                   label=f"lower bound ${doc['lower_bound_usd']:.{nd}f}")
        ax.set_xlabel(xlabel)
        ax.set_title(f"{doc['trace']}: {title}", fontsize=9)
    if any(x is not None and x > 0 for x in p50):
        lat_ax.set_xscale("symlog", linthresh=1.0)  # seconds to hours in one panel
        # From 0: autoscaling gave the symlog axis a negative half, ticked -10 s and -1 s. A little room past the
        # slowest point, whose marker sat on the frame.
        lat_ax.set_xlim(0, max(x for x in p50 if x is not None) * 1.6)
    met_ax.set_ylabel("cost (USD)")
    # Headroom above the dearest point: labels stacked over it (naive, cache-only, fixed) ran into the titles.
    met_ax.set_ylim(0, 1.25 * max([naive, doc["lower_bound_usd"]] + [r["cost_usd"] for r in doc["results"]]))
    met_ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.canvas.draw()
    for ax_labels in labels.values():
        _separate(fig, ax_labels)
    fig.savefig(path)
    return fig


def _separate(fig, labels: list) -> None:
    """Greedy de-collision, done after the layout is final (nothing rescales the axes afterwards): take the
    labels bottom to top and lift each one just clear of every label already placed that it overlaps."""
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    placed = []
    for label in sorted(labels, key=lambda a: a.get_window_extent(renderer).y0):
        box = label.get_window_extent(renderer)
        lift = 0.0
        moved = True
        while moved:  # ends: each pass lifts above one more placed box, and there are finitely many
            moved = False
            for other in placed:
                if box.translated(0, lift).overlaps(other):
                    lift = other.y1 - box.y0 + 1.0
                    moved = True
        if lift:
            dx, dy = label.xyann
            label.xyann = (dx, dy + lift / px_per_pt)
        placed.append(box.translated(0, lift))


def write_outputs(doc: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "plot.png"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(_markdown(doc), encoding="utf-8")
    _plot(doc, paths["plot"])
    return paths
