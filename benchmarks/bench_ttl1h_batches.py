"""What Anthropic's one-hour cache would be worth for batch members of continuing conversations, on Mooncake:
smart as it is against the same decisions with such members' cache writes at the hour's terms, seed by seed.

    .venv/bin/python benchmarks/bench_ttl1h_batches.py --seeds 0 1 2 3 --min-turns 1 2 3

A member is "continuing" when at least ``--min-turns`` earlier requests held its conversation's own prefix (its
second block; every Mooncake request shares the first), which an online policy knows at its arrival. Such a
member writes at 2x the input price instead of 1.25x (batch-discounted either way), and what it writes stays warm
an hour, refreshed an hour by each read; the rest is as the simulator prices a batch (docs/cost-model.md,
"Warmth"). ``--whole`` also has it write its whole prefix, not only what a later member of its batch reads. A
read never turns a five-minute entry into an hour's: a first version of this probe let it, and showed a saving
that was that free warmth (docs/benchmarks.md, "Stop 68").

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, load_real  # noqa: E402

import engine.runtime.providers as sim_providers  # noqa: E402
from engine.app.bench import PolicySpec  # noqa: E402
from engine.app.bench_seeds import run_seeds  # noqa: E402
from engine.core import cost  # noqa: E402
from engine.core.catalog import ProviderSpec, default_catalog  # noqa: E402

HOUR_S = 3600.0


def hour_terms(p: ProviderSpec) -> ProviderSpec:
    """``p`` with its prompt cache (and each model's own terms) at the one-hour TTL's write price."""
    def up(pc):
        return pc.model_copy(update={"write_multiplier": 2.0, "ttl_s": HOUR_S})
    models = {m: s.model_copy(update={"prompt_cache": up(s.prompt_cache)}) if s.prompt_cache is not None else s
              for m, s in p.models.items()}
    return p.model_copy(update={"prompt_cache": up(p.prompt_cache), "models": models})


def continuing(reqs, min_turns: int) -> set[str]:
    """The ids of requests whose conversation's prefix at least ``min_turns`` earlier requests held."""
    out, seen = set(), collections.Counter()
    for r in sorted(reqs, key=lambda r: r.arrival_s):
        if len(r.prefix_blocks) > 1 and seen[r.prefix_blocks[1]] >= min_turns:
            out.add(r.id)
        seen.update(set(r.prefix_blocks[1:]))
    return out


def patch(long_ids: set[str], whole: bool) -> None:
    """Anthropic's batches priced with ``long_ids``' writes at the hour's terms (``SimProvider.end_batch``).

    The loop is ``cost.price_batch``'s, member by member, so with no member continuing it bills what the simulator
    bills: an explicit cache read by entries, a write ending at the last whole block (since stop 84) and leaving
    an entry where a later member parts from it sooner (since stop 86, ``entry_marks``). Until stop 85
    it read the leading run of warm blocks and kept every block warm, the simulator's rule before stop 84: with no
    member continuing it billed $0.18-0.34 a seed under the simulator on Mooncake seeds 0-3, and the hour's terms
    looked cheaper by as much (docs/benchmarks.md, "Stop 85")."""
    plain = sim_providers.SimProvider.end_batch

    def end_batch(self, out):
        if self.spec.name != "anthropic" or out.members or out.pending is None:
            return plain(self, out)
        # (model, block) -> the TTL and warm period of its last write by a batch member, per simulator: one dict for
        # the whole probe let a seed's read take the hour of a write in the seed before, of an entry a sync call
        # had written for five minutes in this one (1,606 of 13,207 hour refreshes over seeds 0-1 at K = 2)
        ttl_of = self.__dict__.setdefault("_ttl_of", {})
        (members, oks), done = out.pending, out.at
        model = members[0].model
        hour = hour_terms(self.spec)
        spec = self.spec.models[model]
        pc = self.spec.cache_of(model)
        automatic = pc.automatic
        warm = {b for r in members for b in r.prefix_blocks if self._is_warm(model, b, done)}
        least = cost.min_cacheable_tokens(self.spec, spec)
        depths = cost.shared_prefix_depths(members, self.bt, least)
        for k, (r, ok) in enumerate(zip(members, oks)):
            long, shared = r.id in long_ids, depths[k]
            mark = max(shared[0] if shared else 0, len(r.prefix_blocks)) if long and whole else \
                shared[0] if shared else 0
            mark = min(mark, r.input_tokens // self.bt)  # the live body marks at most its last whole block
            whole_blocks = r.prefix_blocks if automatic else r.prefix_blocks[:r.input_tokens // self.bt]
            n_warm = cost.warm_run(whole_blocks, warm.__contains__, automatic)
            prov = hour if long else self.spec
            split = cost.cache_split(prov, prov.models[model], r.input_tokens, len(r.prefix_blocks), n_warm, mark,
                                     self.bt)
            price = cost.price_text(prov, prov.models[model], split, r.output_tokens, "batch_api")
            cached = cost.cached_blocks(split.read, split.write, self.bt) if ok else 0
            ends = cost.left_warm(r, split.read, split.write, self.bt, automatic) if ok else ()
            if ok and split.write and not automatic:  # the shallower entries of its write (since stop 86)
                extra = cost.entry_marks(shared, n_warm, len(whole_blocks), self.bt, least, cost.mark_room(r.body))[1:]
                ends = tuple(sorted(set(ends) | {r.prefix_blocks[d - 1] for d in extra}, key=r.prefix_blocks.index))
            out.members.append(sim_providers.Attempt(ok, done, price.total, cached))
            for b in ends:
                if b not in warm:  # an entry this member wrote
                    ttl = HOUR_S if long else pc.ttl_s
                else:  # read: refreshed for the TTL its entry was written with (a sync call's: five minutes)
                    ttl, since = ttl_of.get((model, b), (pc.ttl_s, None))
                    ttl = ttl if since == self.warm_from[model].get(b) else pc.ttl_s
                self._keep_warm(model, [b], done, done + ttl)
                if b not in warm:
                    ttl_of[(model, b)] = ttl, self.warm_from[model][b]
            warm.update(ends)
        return out.members

    sim_providers.SimProvider.end_batch = end_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--min-turns", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--whole", action="store_true", help="a continuing member writes its whole prefix")
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    reqs = load_real("mooncake", a.data)
    default_catalog()  # read once, before any patch
    plain = sim_providers.SimProvider.end_batch
    spec = [PolicySpec(name="smart", policy="smart")]

    def costs() -> list[float]:
        doc = run_seeds(reqs, spec, a.seeds, trace_name="mooncake", jobs=1)
        return [run["results"][0]["cost_usd"] for run in doc["by_seed"]]

    t0 = time.perf_counter()
    base = costs()
    print(f"smart as it is: {' '.join(f'${c:.2f}' for c in base)}")
    for k in a.min_turns:
        sim_providers.SimProvider.end_batch = plain
        long_ids = continuing(reqs, k)
        patch(long_ids, a.whole)
        got = costs()
        diff = [g - b for g, b in zip(got, base)]
        print(f"continuing after {k} turn(s) ({len(long_ids):,} of {len(reqs):,} requests), whole={a.whole}: "
              f"{' '.join(f'${c:.2f}' for c in got)}; vs smart {sum(diff) / len(diff):+.2f} a seed "
              f"({' '.join(f'{d:+.2f}' for d in diff)})")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
