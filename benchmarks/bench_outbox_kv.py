"""Calls to Ray's key-value store made by a Redis ledger's outbox journal while Redis is away.

A budget controller whose Redis refuses connections (a closed port) takes bursts of settlements and charges, as a
provider batch's end or many dispatchers at once hand them over; each is journaled in Ray's store
(``actors._kv_journal``) before its call is answered. Prints the store's calls (puts, deletes, reads) and the wall
time per burst, then what a restarted controller reads back. Run it on a branch and on main to compare:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_outbox_kv.py [--burst 200] [--rounds 5]

Starts a local Ray (a few seconds). Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import time
from collections import Counter


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections to it are refused at once


def _count_calls(counts: Counter) -> None:
    from ray.experimental import internal_kv

    for name in ("_internal_kv_put", "_internal_kv_del", "_internal_kv_get", "_internal_kv_list"):
        real = getattr(internal_kv, name)

        def counted(*a, _real=real, _name=name, **kw):
            counts[_name.removeprefix("_internal_kv_")] += 1
            return _real(*a, **kw)
        setattr(internal_kv, name, counted)


async def _run(burst: int, rounds: int, counts: Counter) -> None:
    from actors._kv_journal import KvJournal, drop_engine
    from actors.budget import BudgetController
    from engine.core.budgets import BudgetSettings, BudgetSpec, Charge
    from engine.core.clock import ManualClock

    b = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),),
                       redis_url=f"redis://127.0.0.1:{_closed_port()}/0", redis_timeout_s=0.5, redis_retry_s=60.0)
    engine = f"bench-{secrets.token_hex(4)}"
    kv = KvJournal(engine, f"{engine}@run")
    ctl = BudgetController(b, None, ManualClock(100.0), kv_journal=kv)
    try:
        await ctl.settle_many([("warm", 0.0)])  # Redis found away: from here on each call goes to the outbox
        print(f"{'round':>5} {'items':>6} {'kv puts':>8} {'kv dels':>8} {'ms':>8}  (burst of concurrent calls)")
        total_items = 1
        for r in range(rounds):
            counts.clear()
            t0 = time.perf_counter()
            calls = [ctl.settle_many([(f"r{r}-c{k}", 0.01)]) for k in range(burst // 2)]
            calls += [ctl.charge_many([Charge(f"r{r}-x{k}", "acme", "openai", "gpt-5-mini", 0.01)])
                      for k in range(burst - burst // 2)]
            await asyncio.gather(*calls)
            ms = (time.perf_counter() - t0) * 1000
            total_items += burst
            print(f"{r:>5} {burst:>6} {counts['put']:>8} {counts['del']:>8} {ms:>8.1f}")
        counts.clear()
        t0 = time.perf_counter()
        records = await kv.items("budget-outbox")
        ms = (time.perf_counter() - t0) * 1000
        print(f"read back: {len(records)} key(s) holding the {total_items} item(s); kv lists {counts['list']}, "
              f"gets {counts['get']}, {ms:.1f} ms")
        print(f"report: unsettled {(await ctl.report())['ledger']['unsettled']}, "
              f"unjournaled {ctl.unjournaled()}")
    finally:
        ctl._closed = True
        for task in (ctl._flusher, ctl._reported):
            if task is not None:
                task.cancel()
        drop_engine(engine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=200, help="concurrent calls per burst (half settlements)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=1, log_to_driver=False, configure_logging=False)
    counts: Counter = Counter()
    try:
        _count_calls(counts)
        asyncio.run(_run(args.burst, args.rounds, counts))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
