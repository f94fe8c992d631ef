"""The live engine against the simulator on the same trace and seed, time-compressed (issue 12's last target:
deadline attainment within 0.5 points of the simulator's, cost within 2 %). Simulated providers, so what differs
is the actors' timing. Both count hours of day from the trace's start (the Azure trace's 18:15 UTC; the
synthetic one's midnight), never the live engine's own (``run_live``). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_live_parity.py                        # the demo's trace: 2,000 synthetic
    .venv/bin/python benchmarks/bench_live_parity.py --azure 3000           # the first 3,000 Azure conversation requests
    .venv/bin/python benchmarks/bench_live_parity.py --speedup 10 --shards 2
    .venv/bin/python benchmarks/bench_live_parity.py --mooncake 1500 --http   # prompt caching, over HTTP

``--http`` sends the OpenAI and Anthropic calls over HTTP to the provider emulator (which runs a batch's
members at its end when it follows the engine's clock, as ``smartbatch demo`` does) and prints each one's cost
in the simulator and live, and the emulator's bill. The emulator fails no call, so the simulator draws no
failures for those two providers (``as_emulated``).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _real import DATA  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402

from engine.app.live import run_live  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.tracegen import from_azure, from_mooncake, synth  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--azure", type=int, default=0, help="this many Azure conversation requests instead")
    ap.add_argument("--speedup", type=float, default=100.0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--mooncake", type=int, default=0, help="this many Mooncake conversation requests instead "
                    "(deadlines capped at one hour, as the demo's)")
    ap.add_argument("--http", action="store_true", help="OpenAI and Anthropic over HTTP to the provider emulator")
    a = ap.parse_args()
    cat = default_catalog()
    settings = None
    if a.http:
        from engine.app.cli import _providers, _settings

        settings, cat = _settings(None)
        settings = _providers(settings, "http", None)
    if a.mooncake:
        reqs = [r.model_copy(update={"deadline_s": min(r.deadline_s, 3600.0)})
                for r in from_mooncake(DATA / "mooncake_conversation_trace.jsonl", limit=a.mooncake)]
        name = f"mooncake[:{a.mooncake}]"
    elif a.azure:
        reqs = from_azure(DATA / "azure_llm_2023_conv.csv", limit=a.azure)
        name = f"azure_conv[:{a.azure}]"
    else:  # what `smartbatch demo` runs
        reqs = [r.model_copy(update={"deadline_s": min(r.deadline_s, 3600.0)})
                for r in synth(2000, seed=0, duration_s=600.0)]
        name = "synth-2000-seed0"
    live: list = []
    more = {"num_shards": a.shards} if a.shards != 1 else {}
    engines: list = []
    emu, on_start = None, engines.append
    if a.http:
        from engine.app.live import follow_engine, point_at_emulator
        from engine.emulator import Emulator

        emu = Emulator(cat, speedup=a.speedup, seed=0).start()
        settings = point_at_emulator(settings, emu)
        follow = follow_engine(emu, settings, 0)

        def on_start(eng) -> None:
            engines.append(eng)
            follow(eng)
    try:
        run_live(reqs, trace_name=name, policy="smart", speedup=a.speedup, results=live, on_start=on_start,
                 catalog=cat, settings=settings, seed=0, **more)
        bill = emu.bill() if emu is not None else None
    finally:
        if emu is not None:
            emu.stop()
    if a.http:  # the emulator fails no call: neither does the simulator, for the providers it plays
        from engine.app.live import as_emulated

        cat = as_emulated(cat)
    sim = simulate(reqs, load_policy("smart", cat), catalog=cat, seed=0)
    by = {r.id: r for r in live}
    pri = np.array([r.priority for r in sim.requests])
    met_live = np.array([bool(by[r.id].deadline_met) for r in sim.requests])
    cost_live = sum(r.cost_usd for r in live)
    print(f"{name}, {len(reqs):,} requests at {a.speedup:g}x, {a.shards} shard(s), "
          f"{'OpenAI and Anthropic over HTTP to the emulator' if a.http else 'simulated providers'}")
    print("| | simulator | live | difference |")
    print("|---|---:|---:|---:|")
    for label, mask in [("deadlines met, all", np.ones(len(pri), bool)),
                        *((f"deadlines met, {p}", pri == p) for p in ("urgent", "normal", "background"))]:
        if mask.any():
            s, li = 100 * sim.met[mask].mean(), 100 * met_live[mask].mean()
            print(f"| {label} | {s:.2f} % | {li:.2f} % | {li - s:+.2f} points |")
    print(f"| cost | ${sim.total_cost:.4f} | ${cost_live:.4f} | {100 * (cost_live / sim.total_cost - 1):+.2f} % |")
    for prov in sorted({r.provider for r in sim.requests}):
        mask = np.array([r.provider == prov for r in sim.requests])
        s_c, l_c = float(sim.cost[mask].sum()), sum(by[r.id].cost_usd for r in sim.requests if r.provider == prov)
        if s_c > 0:
            print(f"| cost, {prov} | ${s_c:.4f} | ${l_c:.4f} | {100 * (l_c / s_c - 1):+.2f} % |")
    if bill is not None:
        print(f"\nthe emulator billed ${bill.total_usd:.4f} for the calls it answered")
    print(f"\nthe driver made {engines[0].ingest_calls:,} ingest calls for {len(reqs):,} requests")
    si = {r.id: k for k, r in enumerate(sim.requests)}
    for p in ("urgent", "normal", "background"):
        missed = [r for r in sim.requests if r.priority == p and not by[r.id].deadline_met]
        if not missed:
            continue
        late = np.array([by[r.id].done_s - r.deadline_at for r in missed])
        print(f"\n{p} misses live: {len(missed)}, late by {np.median(late):.1f} engine s at the median "
              f"({np.median(late) / a.speedup * 1000:.0f} ms real); modes "
              f"{dict(collections.Counter(by[r.id].mode for r in missed))}; why: "
              f"{collections.Counter(by[r.id].reason.split(';')[0] for r in missed).most_common(3)}")
        took = np.array([by[r.id].done_s - r.arrival_s for r in missed])
        took_sim = np.array([sim.done_at[si[r.id]] - r.arrival_s for r in missed])
        print(f"  arrival to result, engine s, median: live {np.median(took):.1f}, simulator {np.median(took_sim):.1f}")


if __name__ == "__main__":
    main()
