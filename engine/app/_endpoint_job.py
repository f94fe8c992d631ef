"""One batch of the endpoint's Batches API (``engine.app._endpoint_batches``): its lines, the engine's futures
of the valid ones, the results in so far, and the record of it kept on disk (``engine.app._endpoint_state``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from engine.app._endpoint_retries import retry_key_of
from engine.core._logkeys import get_logger
from engine.core.batchfile import BatchFile
from engine.core.request import Request
from engine.core.result import ANSWERED, ENGINE_CANCELLED, Result

__all__ = ["CANCELLED_LINE", "OPEN", "BatchJob", "cut_by_cancel", "for_endpoint", "submission", "withdraw_open"]

# The error of a line its batch's cancel ended before it finished.
CANCELLED_LINE = ("The batch was cancelled before this line finished. It was already in a provider call or in a "
                  "provider batch with other work, so it may still be billed; its result is not in this batch's "
                  "output.")


def cut_by_cancel(res: Result) -> bool:
    """An engine-wide cancel (a ``serve`` stop's first step) ended this line unanswered: not a result of it, and
    asked of the engine again at the next start."""
    return res.status == "failed" and (res.error or "").startswith(ENGINE_CANCELLED)  # (+ "; ... possibly billed")

log = get_logger("smartbatch.endpoint")

OPEN = ("validating", "in_progress")


@dataclass(eq=False)
class BatchJob:
    """One batch: its lines, the engine's futures of the valid ones, and the results collected so far (by
    custom_id). Changed only on the event loop, so the collector and the routes never race."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    window_s: float
    metadata: dict[str, str] | None
    tenant: str
    created_at: int
    bf: BatchFile | None = None
    status: str = "validating"
    errors: list[dict] = field(default_factory=list)
    at: dict[str, int] = field(default_factory=dict)  # when it entered each status
    futures: dict[str, concurrent.futures.Future] = field(default_factory=dict)  # custom_id -> engine future
    custom_ids: dict[str, str] = field(default_factory=dict)  # engine request id -> custom_id
    results: dict[str, Result] = field(default_factory=dict)  # custom_id -> result (its id the custom_id)
    output_file_id: str | None = None
    error_file_id: str | None = None
    report: dict | None = None
    task: asyncio.Task | None = None
    # Once it ended: its request counts and usage, kept after its lines, futures and results are let go (a
    # long-running endpoint held every line and result of every batch it ever ran).
    final: tuple[dict[str, int], dict[str, Any]] | None = None
    created_ns: int = field(default_factory=time.time_ns)  # the order batches are listed in, across restarts
    # The engine's seconds per real one: the window counts engine seconds (each line's deadline), so a batch of a
    # time-compressed engine expires that much sooner than its created_at plus the window (was shown as if not).
    speedup: float = 1.0
    retry_key: str | None = None  # what an SDK's retry of its create repeats (``_endpoint_batch_once``)

    def take(self, res: Result) -> str | None:
        """Keep ``res`` under its line's custom_id, which it returns (None: not a line of this batch)."""
        cid = self.custom_ids.get(res.id)
        if cid is not None:
            self.results[cid] = res.model_copy(update={"id": cid})
        return cid

    def counts(self) -> dict[str, int]:
        """Lines, as OpenAI counts them: a line of n choices (``engine.core._choices``) is completed once every
        choice is answered, and failed once one is not (it cannot be answered then)."""
        if self.final is not None:
            return self.final[0]
        lines = self.bf.lines if self.bf is not None else []
        done = failed = 0
        for ln in lines:
            got = [self.results.get(q.id) for q in ln.choices]
            if ln.request is None or any(r is not None and r.status not in ANSWERED for r in got):
                failed += 1
            elif all(r is not None for r in got):
                done += 1
        return {"total": len(lines), "completed": done, "failed": failed}

    def release(self) -> None:
        """Keep what an ended batch shows (its counts, usage, files and report), let go of the rest."""
        self.final = (self.counts(), self._usage())
        self.bf, self.futures, self.custom_ids, self.results, self.task = None, {}, {}, {}, None

    def view(self) -> dict[str, Any]:
        final = self.status in ("completed", "cancelled", "expired")
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": self.at.get("in_progress"),
            "expires_at": self.created_at + int(self.window_s / self.speedup), "finalizing_at": self.at.get("finalizing"),
            "completed_at": self.at.get("completed"), "failed_at": self.at.get("failed"),
            "expired_at": self.at.get("expired"),
            "cancelling_at": self.at.get("cancelling"), "cancelled_at": self.at.get("cancelled"),
            "request_counts": self.counts(),
            "metadata": self.metadata, "usage": (self._usage() if self.final is None else self.final[1]) if final
            else None,
        }

    def record(self) -> dict[str, Any]:
        """What the endpoint's state on disk keeps of it (``EndpointState.save_batch``); ``from_record`` reads it."""
        return {"id": self.id, "endpoint": self.endpoint, "input_file_id": self.input_file_id,
                "completion_window": self.completion_window, "window_s": self.window_s, "metadata": self.metadata,
                "tenant": self.tenant, "created_at": self.created_at, "status": self.status, "errors": self.errors,
                "at": self.at, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "report": self.report, "final": list(self.final) if self.final is not None else None,
                "created_ns": self.created_ns, "retry_h": self.retry_key}

    @classmethod
    def from_record(cls, rec: dict[str, Any], keyed: Callable[[str], str] = str) -> BatchJob:
        """The job ``rec`` keeps; ``keyed``: the retry table's (``SdkRetries.keyed``; ``str``: as it is), for the
        plain hash a record of the version before kept as its ``retry_key`` (now ``retry_h``, keyed: a Message
        Batch's requests are gone from the disk once it has them, and their plain hash let a reader confirm a
        guess of them)."""
        job = cls(rec["id"], rec["endpoint"], rec["input_file_id"], rec["completion_window"], rec["window_s"],
                  rec["metadata"], rec["tenant"], rec["created_at"], status=rec["status"], errors=rec["errors"],
                  at=rec["at"], output_file_id=rec["output_file_id"], error_file_id=rec["error_file_id"],
                  report=rec["report"], created_ns=rec["created_ns"], retry_key=retry_key_of(rec, keyed))
        if rec["final"] is not None:
            job.final = (rec["final"][0], rec["final"][1])
        return job

    def _usage(self) -> dict[str, Any]:
        # The tokens billed: a reused line reports its source's usage (``reused_result``) and cost nothing.
        used = [r.usage or {} for r in self.results.values() if r.status == "ok"]
        n_in = sum(u.get("input_tokens", 0) for u in used)
        n_out = sum(u.get("output_tokens", 0) for u in used)
        cached = sum(u.get("cache_read", 0) for u in used)
        return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": n_in + n_out}

    def __repr__(self) -> str:
        return (f"BatchJob({self.id}, {self.status}, {len(self.results)}/{len(self.futures)} results, "
                f"tenant={self.tenant!r})")


def for_endpoint(bf: BatchFile, endpoint: str) -> BatchFile:
    """A line whose url is not the batch's endpoint is invalid (its response would have another shape)."""
    def why(url: str) -> tuple[str, str]:
        return "url", f"url {url!r} differs from the batch's endpoint {endpoint!r}; every line goes to it"

    lines = [ln if ln.request is None or ln.url == endpoint else
             replace(ln, request=None, more=(), problem=why(ln.url)) for ln in bf.lines]
    return BatchFile(bf.source, lines, bf.file_problems)


def submission(req: Request, request_id: str, deadline_s: float | None = None) -> dict:
    """The line as the engine takes it: validated already, with an id unique to the batch (a custom_id may
    repeat across batches) and no arrival, which the engine sets to its now."""
    d = {**req.model_dump(exclude={"arrival_s"}), "id": request_id}
    return d if deadline_s is None else {**d, "deadline_s": deadline_s}


async def withdraw_open(engine, job: BatchJob) -> None:
    """Withdraw a cancelled batch's open lines from the engine (``Engine.cancel_requests``): those not sent yet
    end cancelled at no cost, and a provider batch of its lines alone is cancelled. Before, every line ran on and
    was billed for an output nobody read."""
    open_ = [f for cid, f in job.futures.items() if cid not in job.results and not f.done()]
    if open_:
        try:
            await asyncio.to_thread(engine.cancel_requests, open_)
        except Exception as exc:  # the lines run on, as they did before; the cancel stands
            log.warning("endpoint: batch %s: its lines could not be withdrawn from the engine: %s", job.id, exc)
