"""The one boundary between the engine and a provider: the ``Provider`` protocol and the values it trades.

The dispatcher knows only this protocol. Two kinds of implementation sit behind it (``actors/providers``): the
simulated provider, which draws outcomes from the catalog (``engine.runtime.providers.SimProvider``), and HTTP providers
built on the official SDKs (OpenAI-compatible servers, Anthropic). Time is engine time (``Clock.now()``): an
outcome's ``at`` is when the call ended, so the rate gate releases a concurrency slot when the answer arrives,
not when it was sent.

The engine is the only one that retries: an HTTP provider turns the SDK's own retries off (``max_retries=0``)
and reports a failure as an outcome (``ok=False``, with the provider's ``Retry-After`` when it gave one), so
the dispatcher's retry, backoff and circuit breaker decide what happens next.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from engine.core.request import Request

__all__ = ["BatchState", "CallJob", "CallOutcome", "Provider", "Secret", "Usage", "call_key", "idempotency_key",
           "refusal_state", "sent_key"]


class Usage(NamedTuple):
    """Tokens a provider reported for one call. ``input_tokens`` counts every input token, the ones read
    from or written to the provider's prompt cache included."""

    input_tokens: int
    output_tokens: int
    cache_read: int = 0
    cache_write: int = 0

    def as_dict(self) -> dict[str, int]:
        return self._asdict()


class CallJob(NamedTuple):
    """One request's attempt, as a provider sees it."""

    key: str  # call_key(...): a batch member's custom_id; a sync call's Idempotency-Key is idempotency_key(key, body)
    req: Request
    start: float  # engine time the rate gate let it through
    attempt: int
    row: int  # the request's row of simulated draws
    # Mark the whole shared prefix for caching (explicit-cache providers), or the depths a tuple names
    # (``Decision.cache_write``, ``engine.core.cost.call_marks``).
    cache_write: bool | tuple[int, ...] = False
    # The sync body, fixed at the first try (``Provider.sync_body``) and journaled: every retry under the same
    # idempotency key, after a restart too, sends the same body, as a provider that honours the key requires.
    body: dict | None = None
    # Set by the dispatcher on a sync call over HTTP: a provider that makes a job it then polls (a video) awaits
    # it with the job's record once the create is answered (or the job is found again), before polling. The
    # dispatcher journals the record, so a restart polls that job rather than make (and pay for) another, and
    # frees the call's concurrency slot, which minutes of polls held (docs/providers.md, "Video").
    made: Callable[[dict], Awaitable[None]] | None = None
    # At the provider's flex tier (OpenAI's ``service_tier: "flex"``): billed at flex prices when served there,
    # and refused at times (``CallOutcome.refused``), when the dispatcher sends it again at the standard tier.
    flex: bool = False
    # ``idempotency_key(key, body)`` of ``body``, where the dispatcher computed it already (the hub's index of its
    # sync calls keeps it, ``actors._sync_index``): the digest of a 10 KB body is 35-40 us, once per call is enough.
    ikey: str | None = None


class CallOutcome(NamedTuple):
    ok: bool
    at: float  # engine time the call ended (answer or error)
    cost: float  # USD billed for it (0 when it failed: a failed call is not billed)
    retry_after_s: float | None = None  # a 429's Retry-After
    output: str | None = None
    usage: Usage | None = None
    provider_request_id: str | None = None
    raw: dict | None = None
    error: str | None = None
    retryable: bool = True  # False: the request itself is wrong (a 400); trying again cannot help
    real: bool = False
    # The provider answered 409: an earlier call under this Idempotency-Key, with another body, succeeded and
    # was billed; its answer cannot be read back (docs/reliability.md).
    key_reused: bool = False
    # No answer came (a timeout) though the call reached the provider: it may have been billed (docs/budgets.md).
    maybe_billed: bool = False
    warm_blocks: int = 0  # leading prompt-prefix blocks the call read or wrote in the provider's prompt cache
    # The provider answered with an earlier call's answer under this Idempotency-Key (``Idempotent-Replayed``),
    # billing nothing again; ``cost`` is that earlier call's, which this engine counts only if it never had it.
    replayed: bool = False
    tool_calls: list | None = None  # the tool calls of the answer, as the provider gave them (``Result.tool_calls``)
    finish: str | None = None  # how the answer ended (``Result.finish``)
    # A 429 of a rate limit: waited out as the provider asks and sent again while the deadline leaves room, not
    # counted as one of the request's tries (it billed nothing; docs/providers.md).
    rate_limited: bool = False
    # The provider refused it for the account's billing (no credit, a spend limit): no wait lifts that.
    quota: bool = False
    # This answer is of the one job an earlier unanswered try of the request made (found again, e.g. a video
    # listed after its create's answer was lost): those tries billed nothing apart from it.
    recovered: bool = False
    # A flex call the provider had no capacity for (OpenAI's 429 "Resource Unavailable"): billed nothing, not a
    # failed try; the dispatcher sends it again at the standard tier at once.
    refused: bool = False
    flex: bool = False  # answered at the flex tier and billed at its prices (``cost`` is the flex price)
    # A job's polls gave up while it may still be billed (``maybe_billed``), and the provider keeps the job: the
    # request's next try polls that same job, whose end settles this try's bound (not one bound more per try).
    job_kept: bool = False
    # Failed with every member its batch's responses leave unnamed, beside this many responses that named no member
    # and may be billed (``actors.providers._batch_members``): of those members, only that many ran, which cannot
    # be told apart. Each keeps its own bound (any may be one that ran); a count of what ran counts that many.
    unnamed_ran: int = 0


class BatchState(NamedTuple):
    # "finalizing": every member has run and the results are being written (OpenAI); it ends with them all.
    status: Literal["running", "cancelling", "finalizing", "ended"]
    next_poll_s: float  # engine seconds until a poll is worth making


_REFUSED_AS = re.compile(r"status '(\w+)'")
_ENDED_AS = frozenset({"completed", "ended", "expired", "cancelled", "canceled", "failed"})


def refusal_state(exc: BaseException) -> BatchState | None:
    """Where a batch stands by a provider's refusal of its cancel ("Cannot cancel a batch with status
    'completed'"), when it says: ended, or finalizing (every member ran); None otherwise."""
    m = _REFUSED_AS.search(str(exc))
    word = m.group(1) if m else None
    return BatchState("ended", 0.0) if word in _ENDED_AS else BatchState("finalizing", 0.0) if word == "finalizing" \
        else None


def call_key(tenant: str, request_id: str, model: str, attempt: int = 0) -> str:
    """The idempotency key of a request's call to ``model``: stable across retries and restarts, unique per
    tenant and id, and a valid custom_id for every batch API (Anthropic allows ``[A-Za-z0-9_-]{1,64}``).

    Sync calls use ``attempt=0`` on every try, sent as ``idempotency_key(key, body)``: a provider that honours
    ``Idempotency-Key`` (keeping successes only) then answers a retry after a timeout with the answer it already
    billed, and a retry after a definite error afresh, so a call is never paid twice. The model is part of the key because a fallback model is a new
    call."""
    h = hashlib.blake2b(f"{tenant}\x1f{request_id}\x1f{model}".encode(), digest_size=12).hexdigest()
    return f"sb-{h}-{attempt}"


def idempotency_key(key: str, body: Mapping[str, Any]) -> str:
    """The ``Idempotency-Key`` header of a sync call: its ``call_key`` and a digest of the exact body sent (of an
    Anthropic batch create too: its journal key and its body, which a 429 waited out may make smaller).

    A key names one body, so the same key can never carry two bodies (a provider answers that with 409,
    ``idempotency_key_reused``, and keeps the first call billed). A body is not a function of the request alone:
    Anthropic's cache breakpoints follow which prefixes are warm at the provider *now*, and a policy may ask
    for a cache write on one dispatch and not on the next. The dispatcher fixes the body at a call's first try
    (and journals it), so every retry of that call, after a restart too, sends the same key and body; a body
    built afresh (a new run of the same trace, an id used again after its retention, a record a crash lost)
    that differs is a new call under a new key, never a 409, and one that is the same gets the same key: a
    provider that honours keys answers it with the first call's answer, unbilled, and the engine counts it at
    0 (``Idempotent-Replayed``; one that does not bills it again). The call key's own ``-`` suffix stays last
    but one, so ``key.rsplit("-", 1)[0]`` still names the request."""
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8", "surrogatepass")
    return f"{key}_{hashlib.blake2b(raw, digest_size=8).hexdigest()}"


def sent_key(job: CallJob, body: Mapping[str, Any]) -> str:
    """The ``Idempotency-Key`` of ``job``'s call sending ``body``: the one the dispatcher computed with it
    (``CallJob.ikey``) where ``body`` is the body it passed, else ``idempotency_key``."""
    return job.ikey if job.ikey is not None and body is job.body else idempotency_key(job.key, body)


class Secret:
    """An API key that never prints: its repr and str are masked, so a log line, a result or an exception
    that formats it shows nothing of the key.

    The checks a start makes of a key are methods here, so the raw text is never a local of the code that reads
    it: an error tracker (Sentry), ``rich.traceback``'s ``show_locals``, ``pytest -l`` and
    ``TracebackException(capture_locals=True)`` print every frame's locals of an exception, each by its repr
    (keys85). ``get()`` goes straight into the call that needs the key, never into a name."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def empty(self) -> bool:
        return not self._value

    def fits_header(self) -> bool:
        """Whether an HTTP header can carry it: no space at either end, no control or non-ASCII character."""
        return self._value.strip() == self._value and all(0x20 <= ord(c) < 0x7F for c in self._value)

    def sha256(self) -> str:
        return hashlib.sha256(self._value.encode()).hexdigest()

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __reduce__(self):
        return Secret, (self._value,)


@runtime_checkable
class Provider(Protocol):
    """What the dispatcher asks of a provider. Every method is async; none raises for a provider's refusal
    or failure (those are outcomes), only for a bug."""

    name: str
    real: bool  # True: calls leave over HTTP; False: simulated
    # A call made again under its idempotency key gets the first answer, billed once (ProviderEndpoint's
    # ``honours_idempotency_key``): False, a retry that succeeds after an unanswered call may be a second bill.
    honours_keys: bool
    # Its batches carry a name the engine gave them (OpenAI's metadata): a batch whose create got no answer is
    # found by it. False (Anthropic): only by its size among batches this process did not make.
    names_batches: bool
    # It sends a flex call (``CallJob.flex``) at the provider's flex tier; False: the dispatcher sends it standard.
    takes_flex: bool

    def sync_body(self, job: CallJob) -> dict | None:
        """The body ``call`` would send for ``job`` now (None: nothing is sent). The dispatcher fixes it at the
        first try and passes it back in ``CallJob.body`` on every retry of the same key."""

    async def call(self, job: CallJob) -> CallOutcome:
        """One synchronous call, with ``job.body`` when it is set; returns when it ends."""

    def resume_jobs(self, records: Sequence[dict]) -> None:
        """After a restart: the jobs a call of the last process made (the records it gave ``CallJob.made``), so
        the same call made again polls its job rather than make another."""

    def batch_body(self, jobs: Sequence[CallJob]) -> Any:
        """What ``submit_batch`` will send, when it must be the same on a second try (None: build it then). The
        dispatcher journals it before the create, so a create made again after a restart sends the same body."""

    def create_slot(self, n: int) -> AbstractAsyncContextManager:
        """Held by the dispatcher from a batch of ``n`` requests' journaling until its handle is journaled (its
        create, or the lookup of a create that got no answer): where nothing names a batch but its size
        (Anthropic), one at a time per size, so such a lookup never meets a look-alike of the dispatcher's own."""

    async def submit_batch(self, jobs: Sequence[CallJob], hedge_at: float | None, ref: str,
                           body: Any = None, wanted: Callable[[], bool] | None = None) -> Any:
        """Submit a batch-API batch named ``ref`` (unique per batch, the same on every try); returns a handle for
        ``poll``/``cancel``/``fetch``. ``wanted``, where the create leaves after a step of its own (OpenAI's
        upload of the input file), is asked then: False (a member was withdrawn meanwhile), nothing is created
        and what the step left is deleted; returns None."""

    async def find_batch(self, jobs: Sequence[CallJob], ref: str, known: frozenset[str] = frozenset()) -> Any:
        """After a create got no answer (or a restart cut it): the handle of the batch named ``ref`` if the
        provider has it, else None (it was never created; a create under ``ref`` follows). ``known``: the ids of
        the batches the dispatcher follows, never the one looked for."""

    def reattach(self, bid: str, jobs: Sequence[CallJob], hedge_at: float | None, model: str | None = None) -> Any:
        """The handle of the batch the provider knows as ``bid`` (``""`` for one simulated), made by an earlier
        process whose journal record was lost: what ``submit_batch`` returned, without asking the provider. ``model``:
        its members' model, for a handle made with no ``jobs`` (to cancel it), where the route depends on it."""

    async def poll(self, handle: Any) -> BatchState:
        """Where the batch stands."""

    async def cancel(self, handle: Any) -> BatchState | None:
        """Ask for a cancel; the batch ends (``poll`` says ``ended``) once the provider has stopped it. Returns
        where the batch stands by the cancel's answer, when the answer says (None: ``poll`` tells)."""

    async def fetch(self, handle: Any) -> Mapping[str, CallOutcome]:
        """Outcomes of the members that finished, by ``CallJob.key`` (ok, or failed inside the batch). A member
        absent from the map did not run (cancelled or expired): it was not billed and may be sent again."""

    def results_at(self, handle: Any) -> str:
        """Where an ended batch's results are kept at the provider, for a user to fetch them when the engine could
        not read them: the batch's id and its results files (OpenAI's output and error files)."""

    async def discard(self, handle: Any) -> int:
        """After an ended batch's results were read: delete at the provider what it kept for that batch and
        nothing reads again (OpenAI: its input file, which holds the prompts). Returns how many things were
        deleted (0: nothing to delete, or already gone); raises ``ProviderError`` when the provider refused."""

    def queue_refusal(self, handle: Any) -> int | None:
        """For an ended batch the provider refused whole because its batch queue was full (OpenAI's
        ``token_limit_exceeded``): the limit it named, in tokens (0: it named none). None for any other batch."""

    async def close(self) -> None:
        """Release connections."""
