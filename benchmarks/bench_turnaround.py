"""Learning the batch turnaround online, where the catalog is wrong: smart with learning on and off (and smart
told the truth, where the world is a plain multiple of the catalog) on the real traces, in simulated worlds
whose batch turnaround is the catalog's, 3x faster, 3x slower, and one that changes with the hour of day.

    .venv/bin/python benchmarks/bench_turnaround.py [--data ../shared/data/real] [--hours 4] [--seed 0]
        [--traces azure_conv,azure_code,mooncake_conversation] [--worlds right,fast3,slow3,by_hour]

A trace of ``--hours`` hours plays the real hour once per hour, each time drawn with another seed (other models,
priorities and prompts), so the estimate has hours to learn in and the hour-of-day world several hours to show.
It starts at the real trace's time of day (the Azure traces' 18:15 UTC; Mooncake's is not known: midnight), so
the hour-of-day world meets it at the hours it was recorded in.
Capture is of the achievable saving in that world (naive minus its lower bound). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA  # noqa: E402

from engine.core.catalog import Catalog, default_catalog  # noqa: E402
from engine.core.settings import Settings, SimSettings  # noqa: E402
from engine.core.trace import TraceRequests, with_day_origin  # noqa: E402
from engine.core.tracegen import from_azure, from_mooncake  # noqa: E402
from engine.sim.lower_bound import lower_bound  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

# Hour of day -> multiplier: a quiet night, a busy working day (3x), an evening in between.
DAY = tuple([0.5] * 2 + [3.0] * 2 + [1.0] * 2) * 4
WORLDS = {"right": (1.0, ()), "fast3": (1 / 3, ()), "slow3": (3.0, ()), "by_hour": (1.0, DAY)}
SMART = {"smart-static": {"turnaround": {"enabled": False}}, "smart-learn": {}}


def scaled_catalog(catalog: Catalog, scale: float) -> Catalog:
    """The catalog with batch turnarounds (median, p95) at ``scale``: a policy told the truth of a scaled world
    (the floor stays: the world scales its draws, then clips them to the catalog's floor and window)."""
    d = catalog.model_dump()
    for p in d["providers"].values():
        ba = p.get("batch_api")
        if ba:
            for k in ("turnaround_median_s", "turnaround_p95_s"):
                ba[k] = min(max(ba[k] * scale, ba["turnaround_min_s"]), ba["completion_window_s"])
    return Catalog.model_validate(d)


def tiled(build, hours: int, seed: int) -> TraceRequests:
    out, origin = [], 0.0
    for h in range(hours):
        reqs = build(seed + h)
        origin = with_day_origin(Settings(), reqs).sim.day_origin_s  # the same every hour
        for r in reqs:
            out.append(r.model_copy(update={"id": f"{r.id}@{h}", "arrival_s": r.arrival_s + 3600.0 * h}))
    return TraceRequests(sorted(out, key=lambda r: r.arrival_s), day_origin_s=origin)


def row(name: str, s: dict, naive: float, bound: float, hedged: int) -> str:
    cap = (naive - s["cost_usd"]) / (naive - bound) if naive - bound > 1e-12 else float("nan")
    lat = s["latency_s_by_priority"]

    def q(p: str, k: str) -> str:
        return "n/a" if p not in lat else f"{lat[p][k]:,.0f}"

    return (f"| {name} | {s['cost_usd']:.2f} | {100 * cap:.1f} % | {100 * s['deadline_met_frac']:.2f} % | "
            f"{q('urgent', 'p50')} / {q('urgent', 'p99')} | {q('normal', 'p50')} / {q('normal', 'p99')} | "
            f"{s['requests_by_mode'].get('batch_api', 0):,} | {hedged} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--hours", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", default="azure_conv,azure_code,mooncake_conversation")
    ap.add_argument("--worlds", default=",".join(WORLDS))
    args = ap.parse_args()
    if not (args.data / "SOURCES.md").exists():
        sys.exit(f"real data not found at {args.data}; pass --data DIR")
    sources = {
        "azure_conv": lambda s: from_azure(args.data / "azure_llm_2023_conv.csv", seed=s),
        "azure_code": lambda s: from_azure(args.data / "azure_llm_2023_code.csv", seed=s),
        "mooncake_conversation": lambda s: from_mooncake(args.data / "mooncake_conversation_trace.jsonl", seed=s),
    }
    catalog = default_catalog()
    for trace in args.traces.split(","):
        reqs = tiled(sources[trace], args.hours, args.seed)
        for world in args.worlds.split(","):
            t0 = time.perf_counter()
            scale, by_hour = WORLDS[world]
            settings = Settings(sim=SimSettings(seed=args.seed, turnaround_scale=scale,
                                                turnaround_scale_by_hour=by_hour))
            naive = simulate(reqs, load_policy("naive", catalog), catalog=catalog, settings=settings,
                             seed=args.seed).total_cost
            bound = lower_bound(reqs, catalog=catalog, settings=settings, seed=args.seed).total_usd
            print(f"### {trace} x {args.hours} h ({len(reqs):,} requests), world {world} (turnaround x {scale:.2f}"
                  f"{', by hour ' + str(list(by_hour[:6])) + ' ...' if by_hour else ''}); naive ${naive:.2f}, "
                  f"lower bound ${bound:.2f}\n")
            print("| policy | cost USD | capture | deadlines met | urgent latency p50 / p99 s | "
                  "normal p50 / p99 s | batch-API requests | hedged batches |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for name, params in SMART.items():
                res = simulate(reqs, load_policy("smart", catalog, params), catalog=catalog, settings=settings,
                               seed=args.seed)
                print(row(name, res.summary(), naive, bound, sum(b.outcome == "hedged" for b in res.batches)))
            if not by_hour and scale != 1.0:
                # Told the truth: the same world (the draws scale as the world does), a policy that knows it.
                true = scaled_catalog(catalog, scale)
                res = simulate(reqs, load_policy("smart", true, {"turnaround": {"enabled": False}}), catalog=true,
                               settings=Settings(sim=SimSettings(seed=args.seed)), seed=args.seed)
                print(row("smart told the truth", res.summary(), naive, bound,
                          sum(b.outcome == "hedged" for b in res.batches)))
            print(f"\n(wall {time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
