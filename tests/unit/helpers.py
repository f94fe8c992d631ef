"""Small traces of one provider kind, built in code; a stand-in peer that records what it was sent."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.hub import ResultHub
from engine.core.request import Request

KINDS = {
    # name: (model, extra fields)
    "text-batch-api-auto-cache": ("gpt-5-mini", {}),
    "text-batch-api-explicit-cache": ("claude-sonnet-4-5", {}),
    "hosted-image-per-image": ("imagen-4", {"prompt": "a koi pond"}),
    "hosted-video-per-second": ("sora-2-pro", {"prompt": "a boat", "params": {"resolution": "1024p"}}),
    "gpu-image": ("flux-1-dev", {"prompt": "a cabin"}),
    "gpu-video": ("wan-2.1-t2v", {"prompt": "a storm", "params": {"resolution": "480p", "duration_s": 4}}),
}


def kind_trace(kind: str, n: int = 120, seed: int = 0, span_s: float = 900.0) -> list[Request]:
    model, extra = KINDS[kind]
    rng = np.random.default_rng(seed)
    prios = rng.choice(["urgent", "normal", "background"], size=n, p=[0.2, 0.5, 0.3])
    out = []
    for i in range(n):
        d = {"id": f"{kind}-{i}", "arrival_s": float(np.round(rng.uniform(0, span_s), 3)), "model": model,
             "priority": str(prios[i]), **extra}
        if "prompt" in extra:
            d["prompt"] = f"{extra['prompt']} variant {int(rng.integers(0, n // 3 + 1))}"
        else:
            d.update(input_tokens=int(rng.integers(1200, 6000)), output_tokens=int(rng.integers(20, 600)),
                     prefix_blocks=[7, 8] if rng.random() < 0.5 else [], prompt=f"task {int(rng.integers(0, n))}")
        out.append(Request.model_validate(d))
    return sorted(out, key=lambda r: r.arrival_s)


class Recorder:
    """A stand-in peer (a grouper, say): every method records its arguments and answers True."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str) -> Callable:
        async def method(*args: Any) -> bool:
            self.calls.append((name, args))
            return True
        return method

    def readmitted(self) -> list:
        """The jobs it was sent with ``add`` (a grouper's re-admissions)."""
        return [j for name, args in self.calls if name == "add" for j in args[0]]


class CtrlCEngine:
    """A stand-in ``Engine`` (patch ``Engine.start`` to return one) whose first request has finished and whose
    second is waited on when Ctrl-C comes: its future's ``result()`` raises KeyboardInterrupt, as Ctrl-C does in
    the main thread."""

    metrics_url = None

    def __init__(self, catalog=None, spend_usd: float = 0.001) -> None:
        self.catalog, self.spend_usd = catalog, spend_usd

    def __enter__(self) -> CtrlCEngine:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.stop()  # as Engine's
        return False

    def stop(self) -> None:
        pass

    def _drain_before_stop(self, limit_s: float) -> int:
        self.drained_for = limit_s  # (run's Ctrl-C drains before its report and stop: tests read this)
        return 0

    def submit_many(self, reqs: list, on_invalid: str = "raise") -> list:
        from engine.core.result import Result

        done = concurrent.futures.Future()
        done.set_result(Result(id=reqs[0].id, status="ok", output="sim://x", cost_usd=self.spend_usd, mode="sync",
                               usage={"input_tokens": 4, "output_tokens": 50}, provider=reqs[0].provider,
                               model=reqs[0].model))
        return [done, _CtrlC()]

    def replay(self, reqs: list, *, into: list | None = None, **_: object) -> list:
        futs = self.submit_many(reqs)
        if into is not None:
            into.extend(futs)
        return futs

    def report(self) -> dict:
        return {"spend_usd": self.spend_usd}


class CtrlCInReplayEngine(CtrlCEngine):
    """Ctrl-C comes while ``replay`` still paces arrivals (in its sleep): the first request was sent and has
    finished, the second was not sent yet."""

    def replay(self, reqs: list, *, into: list | None = None, **_: object) -> list:
        if into is not None:
            into.append(self.submit_many(reqs)[0])
        raise KeyboardInterrupt


class StopInterruptedEngine(CtrlCEngine):
    """Every request has finished; Ctrl-C comes while the engine stops (which takes seconds)."""

    def submit_many(self, reqs: list, on_invalid: str = "raise") -> list:
        done = CtrlCEngine.submit_many(self, reqs)[0]
        return [done] * len(reqs) if len(reqs) == 1 else [done, *[_done_as(done, r) for r in reqs[1:]]]

    def stop(self) -> None:
        raise KeyboardInterrupt


class TerminatedEngine(CtrlCEngine):
    """SIGTERM comes while the second request is waited on (a `timeout`, a service manager's stop)."""

    def submit_many(self, reqs: list, on_invalid: str = "raise") -> list:
        return [CtrlCEngine.submit_many(self, reqs)[0], _Terminated()]


def _done_as(done: concurrent.futures.Future, req) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(done.result().model_copy(update={"id": req.id}))
    return f


class _Terminated(concurrent.futures.Future):
    def result(self, timeout: float | None = None) -> Any:
        import os
        import signal
        import time

        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5.0)  # the handler interrupts this; without one the run waits and then goes on
        raise AssertionError("SIGTERM did not interrupt the wait")


class DrainingEngine(CtrlCEngine):
    """Ctrl-C while the second request rides a provider batch, which finishes it before the cancel takes effect:
    the drain (``Engine._drain_before_stop``) answers it, at the batch price."""

    def _drain_before_stop(self, limit_s: float) -> int:
        CtrlCEngine._drain_before_stop(self, limit_s)
        first, second = self.futs
        second.set_result(first.result().model_copy(update={"id": "r1", "mode": "batch_api", "cost_usd": 0.0005}))
        self.spend_usd += 0.0005
        return 0

    def submit_many(self, reqs: list, on_invalid: str = "raise") -> list:
        self.futs = CtrlCEngine.submit_many(self, reqs)
        return self.futs


class _CtrlC(concurrent.futures.Future):
    def result(self, timeout: float | None = None) -> Any:
        if self.done():  # answered by a drain
            return super().result(timeout)
        raise KeyboardInterrupt


def sdk_request():
    """A request object for an SDK exception made in a test (``APITimeoutError(request=...)``): openai 3.60 reads
    its headers when the exception is made, and ``request=None`` raised AttributeError there."""
    import httpx2

    return httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")


class AnsweringEngine(CtrlCEngine):
    """A stand-in ``Engine`` that answers every request at once ($0.002, sync) and records the ids of each
    ``submit_many`` call in ``sent`` (one list per call)."""

    def __init__(self, catalog=None, sent: list | None = None) -> None:
        super().__init__(catalog)
        self.sent = sent if sent is not None else []

    def submit_many(self, reqs, on_invalid="raise"):
        from engine.core.result import Result

        self.sent.append([r.id for r in reqs])
        futs = []
        for r in reqs:
            f = concurrent.futures.Future()
            f.set_result(Result(id=r.id, status="ok", output="sim://y", cost_usd=0.002, mode="sync",
                                usage={"input_tokens": 4, "output_tokens": 5}, provider=r.provider, model=r.model))
            futs.append(f)
        return futs


def limited_catalog(provider: str, conc: int, base_s: float, per_token_s: float = 0.0):
    """The default catalog with no failures and ``provider`` limited to ``conc`` calls at once, of a fixed sync
    latency (``sigma`` 0): where batches that hedge together must share the calls."""
    import copy
    from pathlib import Path

    import yaml

    from engine.core.catalog import Catalog

    raw = copy.deepcopy(yaml.safe_load((Path(__file__).parents[2] / "engine/data/catalog.yaml").read_text()))
    for p in raw["providers"].values():
        p["failure_rate"] = 0.0
    raw["providers"][provider]["rate_limits"]["max_concurrency"] = conc
    raw["providers"][provider]["sync_latency"] = {"base_s": base_s, "per_output_token_s": per_token_s, "sigma": 0.0}
    return Catalog.model_validate(raw)


class JobSink:
    """A grouper stand-in: keeps the jobs it is sent (``add``), for the ingest race tests."""

    def __init__(self):
        self.jobs = []

    async def add(self, jobs):
        self.jobs.extend(jobs)


async def until(cond) -> None:
    """Let the event loop run (no time passes) until ``cond()`` holds: tasks started by a test reach a point."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("never came")


class SlowDispatcher:
    """A dispatcher stand-in: records what it is sent; its answer to ``holds`` (of those, what it was sent) waits
    for ``answer``, so a test acts while a grouper's question is out (``asked``)."""

    def __init__(self):
        self.sent: list[str] = []
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    async def holds(self, uids):
        self.asked.set()
        await self.answer.wait()
        return [u for u in uids if u in self.sent]

    async def run_many(self, batches, *learns):
        self.sent += [j.req.uid for b in batches for j in b.jobs]
        return True


class HeldHub(ResultHub):
    """The result hub, whose journal writes started while ``held`` each wait for a gate of their own (``gates``, in
    the order they started): a dead actor's write still on its way to the hub lands when a test lets it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held, self.gates, self.started = False, [], asyncio.Event()

    async def _gate(self) -> None:
        if self.held:
            gate = asyncio.Event()
            self.gates.append(gate)
            self.started.set()
            await gate.wait()

    async def journal_put(self, space: str, key: str, blob: bytes) -> None:
        await self._gate()
        await super().journal_put(space, key, blob)

    async def journal_put_many(self, space: str, blobs: dict[str, bytes]) -> None:
        await self._gate()
        await super().journal_put_many(space, blobs)

    async def journal_put_checked(self, space: str, blobs: dict[str, bytes], store: str | None,
                                  seq: int | None = None) -> str:
        await self._gate()
        return await super().journal_put_checked(space, blobs, store, seq)


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when nothing is ready: it jumps to its next timer. A wait between
    events, a whole call's bound and the gaps of a served stream are its seconds, so which timer fires first is
    the test's numbers, never the machine's speed: in real seconds, a loaded machine's stall of 1 s (a run at
    idle priority beside busy cores) crossed a wait between events 16 ms apart. No thread may be waited for in it
    (its clock would jump past the wait): an SDK client's platform is read before (``test_anthropic_stream._paced``)."""

    def __init__(self) -> None:
        super().__init__()
        self._now, select = 0.0, self._selector.select

        def jump(timeout: float | None = None) -> list:
            ready = select(0 if timeout is not None else None)
            if not ready and timeout:
                self._now += timeout
            return ready

        self._selector.select = jump  # type: ignore[method-assign]

    def time(self) -> float:
        return self._now


def in_virtual_time(go: Any) -> Any:
    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(go())
