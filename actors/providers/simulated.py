"""The simulated provider behind the ``Provider`` protocol: the catalog's draws (``engine.runtime.providers.SimProvider``)
in engine time. An outcome is drawn when the call starts and returned when its end comes on the clock, so a
live run with simulated providers bills and times calls exactly as the simulator does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from engine.core.provider_api import BatchState, CallJob, CallOutcome, Usage
from engine.runtime.providers import BatchOutcome, SimProvider

__all__ = ["SimulatedProvider"]

_EPS = 1e-6  # engine seconds: a timer may wake a hair before the time it was set for


def _sim_output(job: CallJob) -> str:
    r = job.req
    return f"sim://{r.provider}/{r.model}/{r.id}"


class _Handle:
    __slots__ = ("cancelled", "jobs", "out")
    real = False  # nothing was billed: a killed run's take-back has nothing to read back from it

    def __init__(self, jobs: Sequence[CallJob], out: BatchOutcome):
        self.jobs, self.out, self.cancelled = list(jobs), out, False


class SimulatedProvider:
    real = False
    honours_keys = True  # nothing real is billed: a simulated retry never pays for an earlier attempt
    names_batches = True  # (nothing real is made: ``find_batch`` finds nothing)
    takes_flex = True  # the catalog's flex draws: slower, refused at its ``unavailable_rate``

    def __init__(self, sim: SimProvider, clock):
        self.name = sim.spec.name
        self.sim = sim
        self.clock = clock

    def __repr__(self) -> str:
        return f"SimulatedProvider({self.name})"

    async def _until(self, at: float) -> None:
        delay = self.clock.real_delay(at - self.clock.now())
        if delay > 0:
            await asyncio.sleep(delay)

    def sync_body(self, job: CallJob) -> None:
        return None  # nothing is sent: no body to keep for retries

    async def call(self, job: CallJob) -> CallOutcome:
        a, _ = self.sim.draw_sync(job.row, job.req, job.start, job.attempt, job.cache_write, job.flex)
        await self._until(a.at)
        r = job.req
        if a.refused:  # billed nothing: the dispatcher sends it at the standard tier
            return CallOutcome(False, a.at, 0.0, error=f"{r.provider} 429 flex tier: resource unavailable",
                               refused=True)
        if not a.ok:
            return CallOutcome(False, a.at, 0.0, a.retry_after_s,
                               error=f"{r.provider} {'429 rate limited' if a.retry_after_s is not None else '5xx'}")
        return CallOutcome(True, a.at, a.cost, output=_sim_output(job), usage=Usage(r.input_tokens, r.output_tokens),
                           warm_blocks=a.cached, flex=job.flex)

    def batch_body(self, jobs: Sequence[CallJob]) -> None:
        return None

    def create_slot(self, n: int) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    async def discard(self, handle: object) -> int:
        return 0  # nothing was uploaded

    def queue_refusal(self, handle: object) -> None:
        return None  # its queue is the dispatcher's own gate: never refused

    async def find_batch(self, jobs: Sequence[CallJob], ref: str, known: frozenset[str] = frozenset()) -> None:
        return None  # nothing real was created: the draws run again

    async def submit_batch(self, jobs: Sequence[CallJob], hedge_at: float | None, ref: str = "",
                           body: Any = None, wanted: Any = None) -> Any:  # (no step before the create: ``wanted``)
        return self.reattach("", jobs, hedge_at)

    def reattach(self, bid: str, jobs: Sequence[CallJob], hedge_at: float | None, model: str | None = None) -> _Handle:
        """Nothing runs anywhere but in the draws (seeded by row and slot): a batch of an earlier process is drawn
        again, the same."""
        # The draws know when the batch ends; a batch that would end after its hedge is drawn as cancelled
        # there, billing nothing (all members of a simulated batch finish together).
        out = self.sim.batch([j.row for j in jobs], [j.req for j in jobs], jobs[0].start, hedge_at,
                             [j.attempt for j in jobs])
        return _Handle(jobs, out)

    async def poll(self, handle: _Handle) -> BatchState:
        if handle.cancelled:
            return BatchState("ended", 0.0)
        if handle.out.hedged:
            return BatchState("running", float("inf"))
        left = handle.out.at - self.clock.now()
        return BatchState("ended", 0.0) if left <= _EPS else BatchState("running", left)

    async def cancel(self, handle: _Handle) -> BatchState | None:
        if handle.out.hedged or self.clock.now() < handle.out.at - _EPS:
            handle.cancelled = True
        return None

    async def fetch(self, handle: _Handle) -> Mapping[str, CallOutcome]:
        if handle.cancelled or handle.out.hedged:
            return {}
        out = {}
        for j, a in zip(handle.jobs, self.sim.end_batch(handle.out), strict=True):
            r = j.req
            out[j.key] = (CallOutcome(True, a.at, a.cost, output=_sim_output(j),
                                      usage=Usage(r.input_tokens, r.output_tokens), warm_blocks=a.cached) if a.ok
                          else CallOutcome(False, a.at, 0.0, error=f"{r.provider} batch member failed"))
        return out

    def results_at(self, handle: _Handle) -> str:
        return "a simulated batch (its results are the simulator's draws)"

    def resume_jobs(self, records) -> None:
        """Nothing simulated is journaled as a job (``CallJob.made`` is set over HTTP only)."""

    async def close(self) -> None:
        return None
