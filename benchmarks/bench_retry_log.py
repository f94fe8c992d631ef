"""What keeping a generation's SDK tries on disk costs (``engine.app._endpoint_retry_log``): the event loop's time
per call (a try and its answer) with the table alone (no state directory), with the log (a line per event, its
``fsync`` in a worker thread, one for all the lines written meanwhile), and with an ``fsync`` on the loop at every
line (the alternative not taken); then the log's size and the time a restart takes to replay a full window.
Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_retry_log.py [--calls 20000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.app._endpoint_retries import ANSWERED_KEEP_S, RETRY_COUNT, SdkRetries  # noqa: E402
from engine.app._endpoint_retry_log import KeptTries, RetryLog, replay  # noqa: E402

HEADERS = {RETRY_COUNT: "0"}


async def _calls(tries: KeptTries, n: int, inline_fsync: bool = False) -> float:
    """Microseconds of the loop per call: the key, a try and its answer (the loop yields once per call, as a
    handler awaiting the engine does, so the log's fsyncs come back meanwhile)."""
    t0 = time.perf_counter()
    for i in range(n):
        key = SdkRetries.key("acme", "/v1/chat/completions", {"body": {"model": "gpt-5-mini", "messages": [
            {"role": "user", "content": f"Name river number {i}."}]}, "n": 1})
        rid = tries.request_id("acme", key, HEADERS, lambda i=i: f"req_{i:024x}")
        if inline_fsync and tries.log is not None:  # the line's fsync before the loop goes on
            tries.log._sync(tries.log._take_dirty())
        tries.answered(key, rid)
        if inline_fsync and tries.log is not None:
            tries.log._sync(tries.log._take_dirty())
        await asyncio.sleep(0)
    return (time.perf_counter() - t0) / n * 1e6


def _figure(root: Path | None, n: int, inline_fsync: bool = False) -> tuple[float, int]:
    syncs = [0]
    real = os.fsync

    def counted(fd: int) -> None:
        syncs[0] += 1
        real(fd)

    os.fsync = counted
    try:
        async def run() -> float:
            tries = KeptTries(SdkRetries())
            tries.resume(root)
            try:
                return await _calls(tries, n, inline_fsync)
            finally:
                await tries.close()
        return asyncio.run(run()), syncs[0]
    finally:
        os.fsync = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000, help="calls per figure")
    ap.add_argument("--inline-calls", type=int, default=200, help="calls of the fsync-on-the-loop figure")
    ap.add_argument("--dir", type=Path, default=None, help="where the state directory goes (default: a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        alone, _ = _figure(None, a.calls)
        print(f"table alone (no --state-dir):        {alone:7.1f} us of the loop per call")
        logged, syncs = _figure(root, a.calls)
        print(f"with the log (fsync off the loop):   {logged:7.1f} us per call (+{logged - alone:.1f}); "
              f"{syncs:,} fsyncs for {2 * a.calls:,} lines")
        size = sum((root / n).stat().st_size for n in ("retries-0.jsonl", "retries-1.jsonl"))
        print(f"log: {size / (2 * a.calls):.0f} bytes per line, 2 lines per call")
        inline, syncs = _figure(root, a.inline_calls, inline_fsync=True)
        print(f"with an fsync on the loop per line:  {inline:7.1f} us per call ({syncs:,} fsyncs; not taken)")
        for rate in (100, 1000):  # calls per second over a whole window: the most a restart reads
            lines = [{"e": e, "t": "acme", "h": f"{i:064x}", "id": f"req_{i:024x}", "at": i / rate}
                     for i in range(int(rate * ANSWERED_KEEP_S)) for e in ("try", "answered")]
            path = root / f"replay-{rate}"
            path.mkdir()
            with open(path / "retries-0.jsonl", "w") as f:
                f.writelines(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
            t0 = time.perf_counter()
            log = RetryLog(path, clock=lambda: ANSWERED_KEEP_S)
            got = replay(log.open(), ANSWERED_KEEP_S)
            asyncio.run(log.close())
            print(f"restart after {rate:,} calls/s for {ANSWERED_KEEP_S:.0f} s: {len(lines):,} lines replayed in "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms, {len(got):,} tries kept")


if __name__ == "__main__":
    main()
