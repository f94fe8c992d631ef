"""What longer batches could give on Mooncake, and what they cost smart (docs/benchmarks.md, "Measured in stop
31"). A static model: the normal and background requests of each model cut into fixed windows of W seconds of
arrival, each window one batch priced by ``price_batch`` (no hedge, every batch on time); with the priorities
kept apart; and with background turns held to the last window of their conversation (hindsight). Then smart as
it is and with ``gather_p_loss: 0.03``: the cost of its non-urgent batch members and of its non-urgent
requests sent sync. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/batch_windows.py [--data ../shared/data/real]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA  # noqa: E402

from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.cost import price_batch  # noqa: E402
from engine.core.tracegen import from_mooncake  # noqa: E402
from engine.sim.simulator import MODES, simulate  # noqa: E402
from policies import load_policy  # noqa: E402


def conversations(reqs) -> dict[str, int]:
    """A request's conversation: that of the latest earlier request of its model sharing its longest leading run
    of two or more prefix blocks, else a new one."""
    conv: dict[str, int] = {}
    last: dict[tuple, int] = {}
    for r in sorted(reqs, key=lambda r: r.arrival_s):
        b = r.prefix_blocks
        cid = next((last[(r.model, tuple(b[:k]))] for k in range(len(b), 1, -1) if (r.model, tuple(b[:k])) in last),
                   len(conv))
        conv[r.id] = cid
        for k in range(1, len(b) + 1):
            last[(r.model, tuple(b[:k]))] = cid
    return conv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    path = a.data / "mooncake_conversation_trace.jsonl"
    if not path.exists():
        sys.exit(f"error: {path} not found; point --data at ../shared/data/real")
    reqs = list(from_mooncake(path))
    cat = default_catalog()
    rest = [r for r in reqs if r.priority != "urgent"]

    def cost(key) -> float:
        groups = defaultdict(list)
        for r in rest:
            groups[key(r)].append(r)
        return sum(sum(x.total for x in price_batch(v, cat, "batch_api")) for v in groups.values())

    print("static model, normal + background, one batch per model and window:")
    for w in (300, 600, 900, 1800):
        print(f"  W = {w:5d} s: together ${cost(lambda r: (r.model, int(r.arrival_s // w))):7.2f}   priorities "
              f"apart ${cost(lambda r: (r.model, r.priority, int(r.arrival_s // w))):7.2f}")
    conv, w = conversations(reqs), 300
    last_win: dict[int, int] = {}
    for r in reqs:  # the last window in which the conversation has a turn (hindsight)
        last_win[conv[r.id]] = max(last_win.get(conv[r.id], 0), int(r.arrival_s // w))
    held = cost(lambda r: (r.model, last_win[conv[r.id]] if r.priority == "background" else int(r.arrival_s // w)))
    print(f"  W = {w} s, background turns held to their conversation's last window: ${held:.2f}")

    print("smart, non-urgent requests:")
    for params in ({}, {"gather_p_loss": 0.03}):
        res = simulate(reqs, load_policy("smart", cat, params), catalog=cat)
        mode = [MODES[m] for m in res.mode]
        batch = [i for i, r in enumerate(res.requests) if r.priority != "urgent" and mode[i] == "batch_api"]
        sync = [i for i, r in enumerate(res.requests) if r.priority != "urgent" and mode[i] == "sync"]
        urgent = sum(c for c, r in zip(res.cost, res.requests) if r.priority == "urgent")
        print(f"  {params or 'as it is'}: total ${res.total_cost:.2f}; batch members {len(batch)} "
              f"${res.cost[batch].sum():.2f}; sync {len(sync)} ${res.cost[sync].sum():.2f}; urgent ${urgent:.2f}")


if __name__ == "__main__":
    main()
