"""The memory budget ledger's throughput against the charge ids it keeps (``engine.core.ledger.KeptCharges``).

A memory ledger answers a reservation, settlement or charge once a journal snapshot holding it is in the hub's
journal (group commit), and copies it to Ray's key-value store at most every 0.25 s; each snapshot carried every
charge id kept, up to ``CHARGES_KEPT`` in the ledger and as many again in the controller. Drives the plain
``BudgetController`` (no Ray) with a ``ResultHub`` as its hub and a stand-in for Ray's store that pickles what it is
given, as the unit tests do, and prints reserve + settle pairs per second and the bytes per journal write to the
hub for each count of ids kept:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_budget_ids.py [--seconds 2] [--callers 1 16] [--repeat 3]

Each run lasts ``--seconds`` (the copy to Ray's store starts at most every 0.25 s: a run of less shows none).

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import BudgetController, ResultHub  # noqa: E402
from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim  # noqa: E402
from engine.core.clock import ManualClock  # noqa: E402
from engine.core.ledger import CHARGES_KEPT  # noqa: E402

SETTINGS = BudgetSettings(specs=(BudgetSpec(max_budget=1e9, budget_duration="1d"),))


class PicklingStore:
    """Ray's store as ``KvJournal`` uses it: the value pickled at each put (the copy's cost), kept as bytes."""

    durable = True

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}
        self.puts = 0

    async def put(self, space: str, key: str, value) -> None:
        self.puts += 1
        self.records[space, key] = pickle.dumps(value)

    async def items(self, space: str) -> dict:
        return {k: pickle.loads(v) for (s, k), v in self.records.items() if s == space}

    async def delete(self, space: str, keys: list[str]) -> None:
        for k in keys:
            self.records.pop((space, k), None)


class SizedHub(ResultHub):
    """The hub, adding up the bytes of the journal writes it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = self.written = 0

    async def journal_put(self, space: str, key: str, blob: bytes) -> None:
        self.writes, self.written = self.writes + 1, self.written + len(blob)
        await super().journal_put(space, key, blob)

    async def journal_put_checked(self, space: str, blobs: dict[str, bytes], *rest):  # since stop 82
        self.writes, self.written = self.writes + 1, self.written + sum(map(len, blobs.values()))
        return await super().journal_put_checked(space, blobs, *rest)


async def _run(ids: int, seconds: float, callers: int) -> tuple[float, int, int]:
    hub, store = SizedHub(), PicklingStore()
    ctl = BudgetController(SETTINGS, hub, ManualClock(100.0), kv_journal=store)
    await ctl.check_ledger()
    if ids:  # charges of 0 USD: the ids kept, the budget untouched
        await ctl.charge_many([Charge(f"late:b{k}:{j}", "acme", "openai", "gpt-5-mini", 0.0)
                               for k, j in enumerate(range(ids))])
    hub.writes = hub.written = 0
    done = [0] * callers
    t0 = time.perf_counter()
    end = t0 + seconds

    async def caller(c: int) -> None:
        while time.perf_counter() < end:
            rid = f"c{c}-{done[c]}"
            await ctl.reserve_many([Claim(rid, "acme", "openai", "gpt-5-mini", "urgent", 0.01)])
            await ctl.settle_many([(rid, 0.005)])
            done[c] += 1

    await asyncio.gather(*(caller(c) for c in range(callers)))
    took = time.perf_counter() - t0
    size = hub.written // max(hub.writes, 1)
    for task in (ctl._reported, ctl.__dict__.get("_kv_task"), ctl._journaling):
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return sum(done) / took, size, store.puts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="how long each run lasts")
    ap.add_argument("--callers", type=int, nargs="+", default=[1, 16], help="concurrent callers")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (the best and the worst are printed)")
    ap.add_argument("--ids", type=int, nargs="+", default=[0, 1_000, CHARGES_KEPT])
    args = ap.parse_args()
    print("| charge ids kept | callers | pairs/s best (worst) | bytes per hub write | copies to the store (last run) |")
    print("|---:|---:|---:|---:|---:|")
    for ids in args.ids:
        for callers in args.callers:
            runs = [asyncio.run(_run(ids, args.seconds, callers)) for _ in range(args.repeat)]
            rates = sorted(r[0] for r in runs)
            print(f"| {ids:,} | {callers} | {rates[-1]:,.0f} ({rates[0]:,.0f}) | {runs[-1][1]:,} | {runs[-1][2]} |",
                  flush=True)


if __name__ == "__main__":
    main()
