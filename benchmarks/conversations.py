"""Mooncake's conversations and where smart's money goes on them.

    .venv/bin/python benchmarks/conversations.py [--seed 0] [--policy-params '{"gather_p_loss": 0.01}']

1. Follow-ups: how many requests have a later one whose prompt holds their whole prefix (every block but a
   partial last one), how soon it comes, and how the chance of one within the prompt cache's 5 minutes grows
   with the conversation's depth (turns seen before; known online, from earlier arrivals only).
2. Smart's bill by price component (plain input, cache writes, cache reads, output) per provider and mode,
   counted at the simulator's pricing calls.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA  # noqa: E402

import engine.runtime.providers as pricing  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.settings import Settings, SimSettings  # noqa: E402
from engine.core.tracegen import from_mooncake  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

PARTS = ("input", "cached_input", "cache_write", "output", "total")


def follow_ups(rows: list[dict], ttl_s: float) -> None:
    holders = collections.defaultdict(list)  # a prefix (two blocks or more) -> the requests whose prompt starts with it
    for i, r in enumerate(rows):
        h = r["hash_ids"]
        for k in range(2, len(h) + 1):
            holders[tuple(h[:k])].append(i)
    depth, seen = np.zeros(len(rows), int), {}
    gap = np.full(len(rows), np.inf)
    for i, r in enumerate(rows):
        h = r["hash_ids"]
        depth[i] = max((seen[tuple(h[:k])] + 1 for k in range(2, len(h) + 1) if tuple(h[:k]) in seen), default=0)
        if len(h) >= 3:
            own = tuple(h[:-1])  # without its partial last block
            seen[own] = depth[i]
            later = [j for j in holders[own] if j > i]
            if later:
                gap[i] = (rows[later[0]]["timestamp"] - r["timestamp"]) / 1000.0
    has = np.isfinite(gap)
    print(f"follow-ups: {has.sum():,} of {len(rows):,} requests have a later one holding their prefix; it comes "
          f"p10/p50/p90 {np.percentile(gap[has], 10):.0f} / {np.percentile(gap[has], 50):.0f} / "
          f"{np.percentile(gap[has], 90):.0f} s later, {np.mean(gap[has] <= ttl_s):.0%} within {ttl_s:.0f} s")
    print("| depth (turns seen before) | requests | P(follow-up) | P(within the TTL) |\n|---:|---:|---:|---:|")
    for d in range(8):
        sel = depth == d if d < 7 else depth >= d
        print(f"| {d}{'+' if d == 7 else ''} | {sel.sum():,} | {has[sel].mean():.2f} | {(gap[sel] <= ttl_s).mean():.2f} |")


def bill_parts(reqs, cat, seed: int, params: dict) -> None:
    acc: dict = collections.defaultdict(collections.Counter)
    text, batch = pricing.price_text, pricing.price_batch

    def count(provider: str, mode: str, price) -> None:
        c = acc[(provider, mode)]
        c["n"] += 1
        for f in PARTS:
            c[f] += getattr(price, f)

    def price_text(prov, spec, split, out, mode, *a, **k):
        p = text(prov, spec, split, out, mode, *a, **k)
        count(prov.name, mode, p)
        return p

    def price_batch(members, catalog, mode, **k):
        prices = batch(members, catalog, mode, **k)
        for r, p in zip(members, prices):
            count(r.provider, mode, p)
        return prices

    pricing.price_text, pricing.price_batch = price_text, price_batch
    try:
        res = simulate(reqs, load_policy("smart", cat, params), catalog=cat, settings=Settings(sim=SimSettings(seed=seed)))
    finally:
        pricing.price_text, pricing.price_batch = text, batch
    print(f"\nsmart {params or ''} seed {seed}: ${res.total_cost:.2f} (OpenAI and Gemini cache automatically: their "
          "uncached input is billed as cache_write at the plain price)")
    print("| provider | mode | billed | plain input $ | cache reads $ | cache writes $ | output $ | total $ |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (prov, mode), c in sorted(acc.items()):
        print(f"| {prov} | {mode} | {c['n']:,} | " + " | ".join(f"{c[f]:.2f}" for f in PARTS) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy-params", type=json.loads, default={})
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    path = a.data / "mooncake_conversation_trace.jsonl"
    cat = default_catalog()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    follow_ups(rows, cat.providers["anthropic"].cache_of("claude-sonnet-4-5").ttl_s)  # type: ignore[union-attr]
    bill_parts(from_mooncake(path, catalog=cat), cat, a.seed, a.policy_params)


if __name__ == "__main__":
    main()
