"""Where the live engine's time goes, per actor kind, and what that predicts on more nodes. Prints figures;
asserts nothing.

    .venv/bin/python benchmarks/scale_out.py [--n 10000] [--shards 2] [--cores-per-node 2]

1. CPU microseconds per request of every engine process (user + system time from /proc, before and after
   ``n`` requests go end to end through ``submit_many`` at a speed-up so high that simulated latencies vanish),
   and of the driver. CPU time, not wall time: it does not depend on what else the machine runs.
2. The ceiling each kind sets: one actor is one process on one core, so a kind with ``c`` us per request and
   ``k`` shards can move at most ``k * 1e6 / c`` requests/s.
3. What that predicts for 1, 4 and 16 nodes of ``--cores-per-node`` cores: unsharded (ingest, cache, hub and
   budget one actor each) and sharded as ``Engine.start(num_shards=...)`` runs it, one shard of each of
   ingest, cache, hub and groupers per core (ingest and hub split by request id, cache and groupers by
   compatibility class). What stays one actor: the budget controller, and one dispatcher per provider.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from engine import Engine  # noqa: E402
from engine.core.tracegen import synth  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prompts import padded  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
# Kinds that were one actor each before sharding; of them only the budget controller stays one.
UNSHARDED = ("ingest", "cache", "hub", "budget")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def kind_of(name: str) -> str:
    """"hub-1" -> "hub", "grouper-0" -> "grouper"; a dispatcher keeps its provider."""
    return name if name.startswith("dispatcher-") else name.split("-", 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=2, help="shards of ingest, cache, hub and groupers")
    ap.add_argument("--cores-per-node", type=int, default=2)
    ap.add_argument("--prompt-chars", type=int, default=0,
                    help="pad every prompt to about this many characters (real prompts run to thousands)")
    a = ap.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    reqs = [r.model_copy(update={"arrival_s": 0.0, "deadline_s": min(r.deadline_s, 3600.0),
                                 "prompt": padded(r.prompt, a.prompt_chars)})
            for r in synth(a.n, seed=2, duration_s=1.0)]
    with Engine.start(speedup=1e6, num_shards=a.shards, metrics_port=None) as eng:
        named = eng._h["named"]
        pids = dict(zip(named, ray.get([h.__ray_call__.remote(lambda self: os.getpid()) for h in named.values()])))
        before = {k: cpu_s(p) for k, p in pids.items()}
        drv0, t0 = time.process_time(), time.perf_counter()
        futs = [f for k in range(0, a.n, 1000) for f in eng.submit_many(reqs[k:k + 1000])]
        for f in futs:
            f.result(timeout=600)
        wall, drv = time.perf_counter() - t0, time.process_time() - drv0
        after = {k: cpu_s(p) for k, p in pids.items()}
        swept = eng.swept
        providers = collections.Counter(r.provider for r in reqs)
    if swept:
        # At this speed-up every deadline passes within seconds: a run over 5 s re-admits what is still open
        # (the driver's sweep), which adds work to ingest and the cache. Fewer requests keep the run shorter.
        print(f"warning: the driver's sweep re-admitted {swept:,} requests; rerun with a smaller --n")
    us = {k: (after[k] - before[k]) * 1e6 / a.n for k in named}
    print(f"{a.n:,} requests end to end in {wall:.2f} s = {a.n / wall:,.0f} requests/s "
          f"({a.shards} shards each of ingest, cache, hub and groupers; providers: {dict(providers)})\n")
    print("| process | CPU us / request | ceiling, one actor (req/s) |")
    print("|---|---:|---:|")
    print(f"| driver (validation, micro-batching, futures) | {drv * 1e6 / a.n:,.0f} | {a.n / drv:,.0f} |")
    for k in sorted(us, key=lambda k: -us[k]):
        share = providers[k.split("-", 1)[1]] / a.n if k.startswith("dispatcher-") else 1.0
        per = us[k] / share if share else 0.0  # a dispatcher sees only its provider's requests
        note = f" (us per request of its provider: {per:,.0f})" if share < 1.0 else ""
        print(f"| {k}{note} | {us[k]:,.0f} | {1e6 / us[k]:,.0f} |" if us[k] > 0 else f"| {k} | 0 | - |")
    total = sum(us.values()) + drv * 1e6 / a.n
    print(f"| all engine processes and the driver | {total:,.0f} | {1e6 / total:,.0f} per core |\n")

    by_kind: dict[str, float] = collections.defaultdict(float)
    for k, v in us.items():
        by_kind[kind_of(k)] += v
    print("| kind | CPU us / request, all its shards | shards here |")
    print("|---|---:|---:|")
    for k in sorted(by_kind, key=lambda k: -by_kind[k]):
        print(f"| {k} | {by_kind[k]:,.0f} | {sum(kind_of(n) == k for n in named)} |")
    print()
    # One actor is one process on one core. Unsharded, the busiest of ingest, cache, hub and budget caps the
    # whole engine; sharded one per core, only the budget and each provider's dispatcher stay one actor.
    single = min(1e6 / by_kind[k] for k in UNSHARDED if by_kind.get(k))
    bound_by = min((k for k in UNSHARDED if by_kind.get(k)), key=lambda k: 1e6 / by_kind[k])
    budget = 1e6 / by_kind["budget"] if by_kind.get("budget") else float("inf")
    disp = min(1e6 / us[k] for k in us if k.startswith("dispatcher-") and us[k] > 0)
    print("| nodes | cores | unsharded (ingest, cache, hub, budget one actor each) | sharded, one shard per core |")
    print("|---:|---:|---:|---:|")
    for nodes in (1, 4, 16):
        cores = nodes * a.cores_per_node
        spread = cores * 1e6 / total  # the work itself, spread over every core
        before = min((single, bound_by), (spread, "cores"), (disp, "a dispatcher"))
        after = min((spread, "cores"), (budget, "budget"), (disp, "a dispatcher"))
        print(f"| {nodes} | {cores} | {before[0]:,.0f} (bound: {before[1]}) | {after[0]:,.0f} (bound: {after[1]}) |")
    ray.shutdown()


if __name__ == "__main__":
    main()
