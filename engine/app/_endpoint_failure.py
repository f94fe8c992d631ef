"""The error a generation route answers for a result that is no answer (``engine.app.endpoint``): its status, its
code, and whether the SDKs may send the call again.

A retry of the SDKs is a new request (``_endpoint_retries``: a try the endpoint answered with an error is
forgotten), so a retryable answer (a 503 or a 429 without ``x-should-retry: false``) is right only where the call
was neither sent nor billed: an engine's cancel that ended it waiting, a stop that names it cut unsent
(``actors._stop_cut``), or a budget ledger that never answered.
Anything that may have reached a provider is final."""

from __future__ import annotations

from engine.app._driver_stop import NEVER_SENT, unsent_at_stop
from engine.app._endpoint_job import cut_by_cancel
from engine.app._endpoint_wire import HEADER_REQUEST_ID, ApiError, refused
from engine.core.batchfile import provider_status
from engine.core.result import ID_TAKEN, Result, why_not

__all__ = ["LEDGER_RETRY_S", "NO_RETRY", "STOPPED", "STOPPING_RETRY_S", "failure"]

# The status of a result that is not an answer -> (HTTP status, error type, code).
_FAILURES = {"failed": (502, "api_error", "request_failed"),
             "rejected": (429, "insufficient_quota", "request_rejected"),
             "expired": (504, "api_error", "deadline_expired")}
# A failed result is final: the engine already retried it as far as its deadline allows. The official SDKs
# retry a 429, a 5xx and a 409 on their own unless the answer says not to, and each retry is a new request.
NO_RETRY = {"x-should-retry": "false"}
STOPPING_RETRY_S = 30  # what a 503 of a stopping engine asks: the next engine (a restart) takes calls again
LEDGER_RETRY_S = 5  # ... and of a budget ledger that did not answer: a Redis restarting or failing over
# How a driver's ``gone`` ends when its engine was stopped by name (``_supervise``), not lost: an engine failure
# (a result hub that died, actors Ray could not restart) leaves calls under way at the providers, billed.
STOPPED = "was stopped"


def failure(res: Result, gone: str | None = None, caller_id: bool = False) -> ApiError:
    """The error answering ``res``, a result that is no answer; ``gone``: why the engine went away, if it did;
    ``caller_id``: the caller named the request (``X-Smartbatch-Request-Id``), so a retry is that request again."""
    # A call the drain's cancel ended while it waited for its next try, after a try that got no answer, may have
    # been billed (its error says so): the SDK's retry of a 503 paid it again (a review, revend).
    if cut_by_cancel(res) and not res.possibly_billed_usd:
        # The engine is stopping (``serve`` cancels its work while it drains): the call may go again, to the next
        # engine. A final 502 made the SDKs give up on calls a restart would answer (a review).
        return ApiError(503, f"request {res.id!r} ended unanswered: the engine is stopping; send it again once it "
                             "is back", type="server_error", code="engine_stopped",
                        headers={"Retry-After": str(STOPPING_RETRY_S)})
    if res.status == "failed" and not res.possibly_billed_usd and (
            res.error == NEVER_SENT or (gone is not None and gone.endswith(STOPPED) and res.error == unsent_at_stop(gone))):
        # A stop cut it before it was sent, as the driver (its own buffer) or the stop's groupers know for sure
        # (``actors._stop_cut``): the next engine may take it. It was the final 502 below (a task of stop 81).
        return ApiError(503, f"request {res.id!r} ended unsent: {res.error}; send it again once the engine is back",
                        type="server_error", code="engine_stopped", headers={"Retry-After": str(STOPPING_RETRY_S)})
    if gone is not None and gone.endswith(STOPPED) and res.status == "failed" and res.error == gone:
        # The engine was stopped without the drain's word on this call, nor the stop's that it was never sent: it
        # may have been cut under way at a provider, billed (``--drain-s 0``, a drain cut short). Final: the SDK's
        # retry is a new request, which would pay a billed one again (stop 79 answered a 503 here for a while; a
        # review found that retry).
        return ApiError(502, f"request {res.id!r} failed: {gone}; it may have been cut under way at the provider "
                             "and billed: send it again (under a new id) only if paying twice is acceptable",
                        type="api_error", code="engine_stopped", headers=NO_RETRY)
    if res.status == "rejected" and res.error == "budget_unavailable":
        # Nothing was reserved nor billed, and the next try may find the ledger's Redis back: a 429
        # insufficient_quota with x-should-retry false read as "out of money, stop" (a user's tour: a 3 s Redis
        # restart failed every call of the window, a tenant with no budget among them, and no SDK retried).
        if caller_id:
            # The engine keeps a request's result under its id (the driver's retention, an hour by default): the
            # SDK's retries, with the same header, were each answered this 503 again at once, and so was every
            # "send it again" of the caller's, for as long (a review, revend).
            return ApiError(503, f"request {res.id!r} {res.status}: {why_not(res)}; billed nothing: send it again "
                                 f"under a new {HEADER_REQUEST_ID} (this id keeps this answer)",
                            type="server_error", code="budget_unavailable", param=HEADER_REQUEST_ID,
                            headers=NO_RETRY)
        return ApiError(503, f"request {res.id!r} {res.status}: {why_not(res)}; billed nothing: send it again",
                        type="server_error", code="budget_unavailable",
                        headers={"Retry-After": str(LEDGER_RETRY_S)})
    if res.reason == ID_TAKEN:
        # Another driver of a shared engine took the id with other content: the caller's id is at fault, as when
        # this endpoint's own earlier request holds it (a 400 naming the header there; here a 502 server error
        # told the client nothing of what to change: a helper's hunt).
        return refused("id", f"request {res.id!r}: {why_not(res)}", lambda field: None, code=ID_TAKEN)
    status, kind, code = _FAILURES.get(res.status, _FAILURES["failed"])
    message = why_not(res)
    status = provider_status(res) or status  # the provider's own answer, passed through
    return ApiError(status, f"request {res.id!r} {res.status}: {message}", type=kind, code=code, headers=NO_RETRY)
