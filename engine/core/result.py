"""What every submitted request resolves to."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["ANSWERED", "CANCELLED", "ENGINE_CANCELLED", "ID_TAKEN", "Result", "Status", "why_not"]

Status = Literal["ok", "reused", "failed", "rejected", "expired"]
ANSWERED = ("ok", "reused")  # the statuses of an answer (called, or served from the cache)
# The reason of a request refused because another driver submitted its (tenant, id) with other content: its
# driver frees the id, so the right content can be submitted under it.
ID_TAKEN = "id_taken"
# How the error of a request an engine's cancel ended begins (``Engine.cancel``; a batch file's error line then
# has the code ``batch_cancelled``, as OpenAI's error file has for the lines of a cancelled batch).
CANCELLED = "cancelled"
# The whole error of a request that an engine-wide cancel ended before it finished (``Engine.cancel``, which a
# ``serve`` stop sends first): not an answer, so the endpoint keeps its line open for the next start.
ENGINE_CANCELLED = (f"{CANCELLED}: the engine was cancelled (Engine.cancel) before this request finished: it is "
                    "not sent again; a provider batch it rode was cancelled and bills only the members it finished")


class Result(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    status: Status
    tenant: str = "default"
    # The output: a text answer (an answer with tool calls and no text: the calls as JSON), an image (base64 or
    # URL); a simulated provider returns a sim:// reference.
    output: str | None = None
    # The tool calls of the answer, as the provider gave them: OpenAI chat's ``tool_calls`` items, Responses'
    # ``function_call`` (and ``custom_tool_call``) items, Anthropic's ``tool_use`` blocks. None: no call.
    tool_calls: list[dict] | None = None
    # How the answer ended: "stop", "length" (cut at its output cap), "tool_calls" or "content_filter", in OpenAI
    # chat's words whichever provider made it; None: not said (simulated).
    finish: str | None = None
    usage: dict[str, int] | None = None  # the provider's token counts (input, output, cached, cache_write)
    provider_request_id: str | None = None  # the provider's id of the call, or of the batch that carried it
    raw: dict | None = None  # the provider's whole response body (HTTP providers only)
    real: bool = False  # the call went to a provider over HTTP (False: simulated)
    cost_usd: float = 0.0
    mode: str | None = None  # sync | batch_api | gpu_batch | reuse
    hit: str | None = None  # exact | in_flight | near, for reused results
    provider: str | None = None
    model: str | None = None
    batch_id: str | None = None
    arrival_s: float = 0.0
    done_s: float | None = None
    deadline_met: bool | None = None
    recommendation: str | None = None
    reason: str = ""
    error: str | None = None
    # A failed request a call of which may have been billed (it ran, or got no answer): the upper bound its budget
    # keeps (0: none). Its batch file line says so (``smartbatch_possibly_billed_usd``), and ``batch --resume``
    # keeps that line back rather than pay for it twice. An answered request's: its earlier calls that got no
    # answer (a flex call given up at its timeout), beside ``cost_usd`` (the batch file report's
    # ``possibly_billed_usd``).
    possibly_billed_usd: float = 0.0

    @property
    def billed_bound_usd(self) -> float:
        """The most its calls may have been billed: an answer's cost and its earlier calls' bound (both billed,
        ``max`` dropped the smaller); a failure's bound (a batch member a resume read back failed carries it as
        its cost too: counted once)."""
        if self.status in ("ok", "reused"):
            return self.cost_usd + self.possibly_billed_usd
        return max(self.cost_usd, self.possibly_billed_usd)

    @property
    def uid(self) -> str:
        """The identity of the request this result answers (``Request.uid``)."""
        return f"{len(self.tenant)}:{self.tenant}/{self.id}"


def why_not(res: Result) -> str:
    """What to tell a caller of a result that is not an answer: its error, and its reason beside it when that
    says more ("budget_exhausted: budget global has $0.000371 left"; the reason was dropped, a helper's hunt)."""
    parts = [p for p in (res.error, res.reason) if p]
    if len(parts) == 2 and parts[1] in parts[0]:
        parts = parts[:1]
    return ": ".join(parts) or res.status
