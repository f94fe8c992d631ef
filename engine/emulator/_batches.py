"""Batch state machines (OpenAI Batch, Anthropic Message Batch), computed lazily from the emulator clock.

Nothing runs in the background: every read of a batch first ``advance``s it to now, running the members whose
finish time has passed (at that finish time, for the cache) and closing it once it reaches a final state.
Member ``k`` of ``n`` finishes at ``start + turnaround * (k + 1) / n`` (or all at the end, when the emulator follows
an engine's clock and mirrors the simulator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.emulator._wire import ApiError, rfc3339

__all__ = ["MemberOutcome", "MessageBatch", "OpenAIBatch", "Schedule", "newest_first"]

_NEVER = float("-inf")


class Schedule(NamedTuple):
    start: float
    turnaround: float
    n: int
    together: bool = False  # every member finishes at the end (the simulator's model of a batch)

    def finish(self, k: int) -> float:
        if self.together:
            return self.start + self.turnaround
        return self.start + self.turnaround * (k + 1) / self.n

    @property
    def end(self) -> float:
        return self.start + self.turnaround


class MemberOutcome(NamedTuple):
    """One member's answer. ``body``: the response body on success, the error body otherwise."""

    ok: bool
    status_code: int
    body: dict[str, Any]
    request_id: str
    error_code: str | None = None
    message: str | None = None
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


Run = Callable[[str, dict, float], MemberOutcome]  # (custom_id, body, finish time) -> outcome


@dataclass(eq=False)
class OpenAIBatch:
    id: str
    provider: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict | None
    model: str | None
    members: list[tuple[str, dict]]
    errors: list[dict]
    created_at: float
    schedule: Schedule  # start = in_progress_at
    expire_at: float  # when it expires if unfinished (early under an injected expiry)
    expires_at: float  # the advertised end of the completion window
    finalizing_s: float
    cancel_s: float
    cancelling_at: float | None = None
    queued_tokens: int = 0  # its input tokens, held in its model's batch queue until it ends
    done: int = 0
    completed: int = 0
    failed: int = 0
    outputs: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=lambda: {"input": 0, "cached": 0, "output": 0})
    output_file_id: str | None = None
    error_file_id: str | None = None
    closed: bool = False

    def _cancelled_early(self) -> bool:
        return self.cancelling_at is not None and self.cancelling_at < self.schedule.start

    def _cutoff(self) -> float:
        """No member finishes after this time."""
        if self.errors or self._cancelled_early():
            return _NEVER
        if self.cancelling_at is not None:
            return min(self.cancelling_at + self.cancel_s, self.expire_at)
        return self.expire_at

    def status(self, now: float) -> str:
        s = self.schedule
        if self.errors:
            return "validating" if now < s.start else "failed"
        if self.cancelling_at is not None:
            return "cancelling" if now < self.cancelling_at + self.cancel_s else "cancelled"
        if now < s.start:
            return "validating"
        if self.expire_at < s.end:
            return "in_progress" if now < self.expire_at else "expired"
        if now < s.end:
            return "in_progress"
        return "finalizing" if now < s.end + self.finalizing_s else "completed"

    def cancellable(self, now: float) -> bool:
        return self.status(now) in ("validating", "in_progress")

    def advance(self, now: float, run: Run, close: Callable[[OpenAIBatch], None],
                new_id: Callable[[], str]) -> None:
        limit = min(now, self._cutoff())
        while self.done < len(self.members) and self.schedule.finish(self.done) <= limit:
            cid, body = self.members[self.done]
            o = run(cid, body, self.schedule.finish(self.done))
            line = {"id": new_id(), "custom_id": cid,
                    "response": {"status_code": o.status_code, "request_id": o.request_id, "body": o.body},
                    "error": None if o.ok else {"code": o.error_code, "message": o.message}}
            if o.ok:
                self.completed += 1
                self.outputs.append(line)
                self.tokens["input"] += o.input_tokens
                self.tokens["cached"] += o.cached_tokens
                self.tokens["output"] += o.output_tokens
            else:
                self.failed += 1
                self.failures.append(line)
            self.done += 1
        status = self.status(now)
        if status in ("completed", "expired", "cancelled") and not self.closed:
            code, why = (("batch_expired", "This request could not be executed before the completion window "
                          "expired.") if status == "expired" else
                         ("batch_cancelled", "This request was not executed because the batch was cancelled."))
            for cid, _ in self.members[self.done:]:
                self.failures.append({"id": new_id(), "custom_id": cid, "response": None,
                                      "error": {"code": code, "message": why}})
                self.failed += 1
            self.done = len(self.members)
            close(self)
            self.closed = True

    def view(self, now: float) -> dict[str, Any]:
        status, s = self.status(now), self.schedule
        started = not self.errors and not self._cancelled_early() and now >= s.start
        counted = not self.errors and status != "validating"
        cancelled_at = None if self.cancelling_at is None else self.cancelling_at + self.cancel_s
        final = status in ("completed", "expired", "cancelled")
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": int(s.start) if started else None,
            "expires_at": int(self.expires_at),
            "finalizing_at": int(s.end) if status in ("finalizing", "completed") else None,
            "completed_at": int(s.end + self.finalizing_s) if status == "completed" else None,
            "failed_at": int(s.start) if status == "failed" else None,
            "expired_at": int(self.expire_at) if status == "expired" else None,
            "cancelling_at": int(self.cancelling_at) if self.cancelling_at is not None else None,
            "cancelled_at": int(cancelled_at) if status == "cancelled" and cancelled_at is not None else None,
            "request_counts": {"total": len(self.members) if counted else 0, "completed": self.completed,
                               "failed": self.failed},
            "metadata": self.metadata,
            "usage": {"input_tokens": self.tokens["input"],
                      "input_tokens_details": {"cached_tokens": self.tokens["cached"]},
                      "output_tokens": self.tokens["output"], "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": self.tokens["input"] + self.tokens["output"]} if final else None,
        }


@dataclass(eq=False)
class MessageBatch:
    id: str
    provider: str
    members: list[tuple[str, dict]]
    created_at: float
    schedule: Schedule  # start = created_at: Message Batches have no validation phase
    expire_at: float
    expires_at: float
    cancel_s: float
    results_url: str
    cancel_at: float | None = None
    done: int = 0
    results: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("succeeded", "errored", "canceled", "expired"), 0))
    closed: bool = False

    def _end(self) -> float:
        end = self.schedule.end
        if self.cancel_at is not None:
            end = min(end, self.cancel_at + self.cancel_s)
        return min(end, self.expire_at)

    def status(self, now: float) -> str:
        if now >= self._end():
            return "ended"
        return "canceling" if self.cancel_at is not None else "in_progress"

    def advance(self, now: float, run: Run) -> None:
        limit = min(now, self._end())
        while self.done < len(self.members) and self.schedule.finish(self.done) <= limit:
            cid, params = self.members[self.done]
            o = run(cid, params, self.schedule.finish(self.done))
            result = ({"type": "succeeded", "message": o.body} if o.ok else {"type": "errored", "error": o.body})
            self.results.append({"custom_id": cid, "result": result})
            self.counts["succeeded" if o.ok else "errored"] += 1
            self.done += 1
        if self.status(now) == "ended" and not self.closed:
            cancelled = self.cancel_at is not None and self.cancel_at + self.cancel_s <= self.expire_at
            kind = "canceled" if cancelled else "expired"
            for cid, _ in self.members[self.done:]:
                self.results.append({"custom_id": cid, "result": {"type": kind}})
                self.counts[kind] += 1
            self.done = len(self.members)
            self.closed = True

    def view(self, now: float) -> dict[str, Any]:
        ended = self.status(now) == "ended"
        # As the API documents: requests count as processing until the whole batch has ended.
        counts = dict(self.counts) if ended else dict.fromkeys(self.counts, 0)
        counts["processing"] = 0 if ended else len(self.members)
        return {
            "id": self.id, "type": "message_batch", "processing_status": self.status(now),
            "request_counts": counts, "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at), "ended_at": rfc3339(self._end()) if ended else None,
            "cancel_initiated_at": rfc3339(self.cancel_at) if self.cancel_at is not None else None,
            "archived_at": None, "results_url": self.results_url if ended else None,
        }


def newest_first(ctx, kind: type, cursor: str, max_limit: int, advance: Callable) -> tuple[list[dict], bool]:
    """One page of ``ctx.provider``'s batches of ``kind``, newest first, as both APIs list them: ``limit`` (1 to
    ``max_limit``, default 20) after the batch named by the ``cursor`` parameter; the views and whether more
    follow. ``advance(core, faults, batch, now)`` runs each listed batch up to now first."""
    try:
        limit = int(ctx.params.get("limit", 20))
    except ValueError:
        raise ApiError(400, f"limit must be an integer from 1 to {max_limit}", param="limit") from None
    if not 1 <= limit <= max_limit:
        raise ApiError(400, f"limit must be from 1 to {max_limit}, got {limit}", param="limit")
    core, after = ctx.core, ctx.params.get(cursor)
    with core.lock:
        now = core.now()
        mine = [b for b in reversed(core.batches.values()) if isinstance(b, kind) and b.provider == ctx.provider]
        if after is not None:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1:] if after in ids else []
        page = mine[:limit]
        for b in page:
            advance(core, ctx.faults, b, now)
        return [b.view(now) for b in page], len(mine) > limit
