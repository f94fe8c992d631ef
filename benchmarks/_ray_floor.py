"""What Ray itself allows on this machine, measured in the same run as the engine's figures (bench_engine.py
prints them side by side): the limit, plain actors doing nothing but passing items on, and the peer, Ray
Serve's own request batching behind a handle. Prints nothing itself; asserts nothing."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import ray

__all__ = ["chain_items_per_s", "chain_latency_ms", "serve_batch_per_s"]


@ray.remote(num_cpus=0, max_concurrency=1000)
class _Hop:
    """An actor that only passes what it gets to the next one, as the engine's actors pass batches: the
    engine's actor options, no work."""

    def __init__(self, nxt=None):
        self.nxt = nxt
        self.arrived: list[float] = []
        self.items = 0
        self.done = asyncio.Event()
        self.want = 0

    async def expect(self, n: int) -> None:
        self.want, self.items = n, 0
        self.done.clear()

    async def go(self, batch: list, sent_at: float) -> None:
        if self.nxt is not None:
            self.nxt.go.remote(batch, sent_at)  # sent on, not awaited, as the engine's legs are
            return
        self.arrived.append(time.time() - sent_at)
        self.items += len(batch)
        if self.items >= self.want:
            self.done.set()

    async def wait(self) -> list[float]:
        await self.done.wait()
        return self.arrived


def _chain(legs: int) -> list:
    hops = [_Hop.remote()]
    for _ in range(legs - 1):
        hops.insert(0, _Hop.remote(hops[0]))
    ray.get([h.__ray_ready__.remote() for h in hops])
    return hops


def chain_items_per_s(n: int = 100_000, per_call: int = 1_000, legs: int = 5) -> float:
    """Items/s through ``legs`` actors in a row carrying lists of ``per_call`` small dicts (a request's worth of
    fields each): the most an engine of that many legs moves if its actors did no work at all."""
    hops = _chain(legs)
    batch = [{"id": f"r{k}", "tenant": "t", "model": "gpt-5-mini", "input_tokens": 812, "deadline_s": 3600.0}
             for k in range(per_call)]
    ray.get(hops[-1].expect.remote(n))
    t = time.perf_counter()
    for _ in range(n // per_call):
        hops[0].go.remote(batch, 0.0)
    ray.get(hops[-1].wait.remote())
    rate = n / (time.perf_counter() - t)
    for h in hops:
        ray.kill(h)
    return rate


def chain_latency_ms(n: int = 600, legs: int = 4) -> tuple[float, float]:
    """p50 and p99 milliseconds for one item through ``legs`` idle actors: the urgent path's legs (driver to
    ingest, cache, grouper, dispatcher) with no work on them."""
    hops = _chain(legs)
    ray.get(hops[-1].expect.remote(n))
    for k in range(n):
        ray.get(hops[0].go.remote([k], time.time()))  # one at a time, as the engine's figure is taken
        time.sleep(0.002)  # idle between them: a request alone, not a queue
    ms = np.array(ray.get(hops[-1].wait.remote())) * 1000
    for h in hops:
        ray.kill(h)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def serve_batch_per_s(n: int = 2_000, max_batch_size: int = 100) -> float:
    """Requests/s through a Ray Serve deployment that batches them with ``@serve.batch`` (doing no work), called
    through a deployment handle from the driver: the peer, Ray's own answer to batching requests."""
    import logging

    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    @serve.deployment(max_ongoing_requests=10_000)
    class Batched:
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.01)
        async def __call__(self, items: list) -> list:
            return items

    handle = serve.run(Batched.bind(), name="bench-peer", route_prefix=None)
    try:
        t = time.perf_counter()
        responses = [handle.remote(k) for k in range(n)]
        for r in responses:
            r.result()
        return n / (time.perf_counter() - t)
    finally:
        serve.delete("bench-peer")  # Serve itself goes with the caller's ray.shutdown()
