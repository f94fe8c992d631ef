"""Outcomes, the runtime kernel's last step: what an attempt that ended becomes, and the ``Result`` a request
resolves to. Pure functions, used by the simulator and by the actors alike (one copy of each rule).
"""

from __future__ import annotations

from typing import Literal

from engine.core._list_price import list_price
from engine.core.catalog import ModelSpec
from engine.core.result import CANCELLED, Result, Status

__all__ = ["THROTTLED_TRIES", "Verdict", "billed_reason", "call_mode", "failed_result", "list_price", "ok_result",
           "refused_result", "reused_result", "throttled_verdict", "throttled_wait", "verdict"]

Verdict = Literal["complete", "retry", "fail"]


def verdict(ok: bool, tries: int, max_attempts: int, retryable: bool = True) -> Verdict:
    """An attempt ended, the ``tries``-th of its request: complete it, try again (a retryable failure with
    attempts left), or fail the request for good."""
    if ok:
        return "complete"
    return "retry" if retryable and tries < max_attempts else "fail"


# Rate-limited tries of one request, at most: its deadline bounds them, and this bounds a deadline of days.
THROTTLED_TRIES = 50


def throttled_wait(retry_after_s: float | None, throttled: int, base_s: float, max_s: float) -> float:
    """Seconds to wait after a rate limit's 429, the request's ``throttled + 1``-th in a row: what the provider
    asked, but never less than a backoff that doubles with each 429 in a row up to ``max_s`` (a provider that
    says 0 s, or nothing readable, is not called again at once, time after time)."""
    return max(retry_after_s or 0.0, min(base_s * 2 ** throttled, max_s))


def throttled_verdict(retry_at: float, call_s: float, deadline_at: float, throttled: int,
                      cap: int = THROTTLED_TRIES) -> tuple[Verdict, str | None]:
    """A rate limit's 429 (it billed nothing), the request's ``throttled + 1``-th: try again at ``retry_at`` if a
    call of ``call_s`` started then ends by ``deadline_at`` and it was refused fewer than ``cap`` times; it is
    not one of its ``max_attempts``. "fail" comes with why."""
    if throttled + 1 >= cap:
        return "fail", f"{cap} rate-limited tries, the most one request makes"
    if retry_at + call_s > deadline_at:
        return "fail", (f"its next try, at engine time {retry_at:.0f} s as the provider asks, could not end by "
                        f"its deadline at {deadline_at:.0f} s")
    return "retry", None


def call_mode(spec: ModelSpec) -> str:
    """The mode a lone call is billed in: a GPU-priced model runs it as a GPU batch of one."""
    return "gpu_batch" if spec.gpu_priced else "sync"


FLEX_NOW = "flex now"  # how a decision to call at the flex tier begins its reason (``policies``)


def billed_reason(reason: str, mode: str) -> str:
    """The decision's ``reason`` as a result billed in ``mode`` gives it. A flex decision the tier did not serve
    (refused, timed out, served at another tier, or a server that does not take it) was called and billed at the
    standard tier: its "flex now: batch prices, no wait" beside mode "sync" and the standard price was false (a
    review of stop 82's tour). Its reason for calling now stays; what the tier was to give does not."""
    if mode != "sync" or not reason.startswith(FLEX_NOW):  # (the standard tier's call is a sync one)
        return reason
    why = reason[len(FLEX_NOW):].lstrip(": ")
    why = "" if why.startswith("batch prices, no wait") else why + "; "
    return f"sync now: {why}the flex tier did not serve it, so it was called at the standard tier and billed at its prices"


def ok_result(req, *, at: float, cost: float, mode: str, batch_id: str | None, recommendation: str | None,
              reason: str, out=None, possibly_billed_usd: float = 0.0) -> Result:
    """A request the provider answered: ``out`` is the call's ``CallOutcome`` (None: simulated). Its reason as
    its mode makes it true (``billed_reason``). ``possibly_billed_usd``: the bound of its earlier calls that got no
    answer and may have been billed beside ``cost`` (a flex call given up at its timeout, then answered standard)."""
    usage = out.usage if out is not None else None
    return Result(id=req.id, tenant=req.tenant, status="ok",
                  output=out.output if out is not None else f"sim://{req.provider}/{req.model}/{req.id}",
                  tool_calls=out.tool_calls if out is not None else None, finish=out.finish if out is not None else None,
                  cost_usd=cost, usage=usage.as_dict() if usage is not None else None,
                  provider_request_id=out.provider_request_id if out is not None else None,
                  raw=out.raw if out is not None else None, real=out is not None and out.real, mode=mode,
                  provider=req.provider, model=req.model, batch_id=batch_id, arrival_s=req.arrival_s, done_s=at,
                  deadline_met=req.met_by(at), recommendation=recommendation,
                  reason=billed_reason(reason, mode), possibly_billed_usd=possibly_billed_usd)


def failed_result(req, *, at: float, batch_id: str | None, recommendation: str | None, tries: int,
                  max_attempts: int, error: str | None, real: bool = False,
                  possibly_billed_usd: float = 0.0) -> Result:
    """A request whose last attempt failed: the error names the provider and the attempts made. One the engine
    ended unsent (cancelled) says so first, as the grouper's do: a batch file's line reads it as cancelled.
    ``possibly_billed_usd``: the bound its budget keeps for a call that may have been billed (``Result``)."""
    msg = (error if error and error.startswith(CANCELLED) else
           f"{req.provider} failed after {tries} attempt(s): {error}" if error
           else f"{req.provider} failed {max_attempts} attempts")
    return Result(id=req.id, tenant=req.tenant, status="failed", provider=req.provider, model=req.model,
                  batch_id=batch_id, arrival_s=req.arrival_s, done_s=at, deadline_met=False,
                  recommendation=recommendation, real=real, error=msg, possibly_billed_usd=possibly_billed_usd)


def refused_result(req, *, at: float, status: Status, error: str, reason: str = "") -> Result:
    """A request the engine did not send: ``rejected`` (a budget) or ``failed`` before any call."""
    return Result(id=req.id, tenant=req.tenant, status=status, provider=req.provider, model=req.model,
                  arrival_s=req.arrival_s, done_s=at, deadline_met=False, error=error, reason=reason)


def reused_result(req, *, at: float, hit: str, source_id: str, output: str | None,
                  similarity: float | None = None, made_by: tuple[str, str] | None = None,
                  tool_calls: list | None = None, finish: str | None = None,
                  usage: dict[str, int] | None = None) -> Result:
    """A request answered from the result of ``source_id`` (exact, in flight or near), free. ``made_by``: the
    (provider, model) that made the output, where it is not the request's (a leader rerouted to its fallback).
    ``usage``: the source's, the tokens of the call that made the answer, as a cache in front of an API reports
    a hit (LiteLLM's does); that it cost nothing is said by ``status``, ``mode``, ``hit`` and ``cost_usd``. Left
    out, an endpoint's client read an answer of 0 tokens (a helper's tour)."""
    why = f"reused {hit} result of {source_id}" + (f" (cosine {similarity:.3f})" if similarity is not None else "")
    provider, model = made_by or (req.provider, req.model)
    if made_by is not None and made_by != (req.provider, req.model):
        why += f", made by the fallback model {provider}/{model}"
    return Result(id=req.id, tenant=req.tenant, status="reused", output=output, tool_calls=tool_calls, finish=finish,
                  usage=dict(usage) if usage else None, cost_usd=0.0, mode="reuse", hit=hit,
                  provider=provider, model=model, arrival_s=req.arrival_s, done_s=at,
                  deadline_met=req.met_by(at), reason=why)
