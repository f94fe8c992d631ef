"""What the HTTP providers share: engine time, the poll backoff of a batch, pricing from real usage, and turning
an SDK error into an outcome (the engine retries; the SDK does not)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from actors.providers._batch_members import BatchMembers
from actors.providers._results_lines import jsonl_records, jsonl_stream, whole_read
from actors.providers._wire import (
    billing_refusal,
    call_timeout,
    error_of,
    error_text,
    quota_message,
    redact,
    retry_after,
)
from engine.core._logkeys import get_logger, masked_url, url_secrets
from engine.core._within import within
from engine.core.catalog import Catalog
from engine.core.cost import Mode, cached_blocks, min_cacheable_tokens, price_usage, reserve_bound
from engine.core.errors import ProviderError
from engine.core.latency import flex_timeout_s
from engine.core.provider_api import CallJob, CallOutcome, Secret, Usage
from engine.core.settings import ProviderEndpoint, Settings

__all__ = ["BatchHandle", "HttpBase", "PollBackoff", "Unreadable", "create_call", "jsonl_records", "jsonl_stream",
           "sdk_kwargs", "whole_read"]

log = get_logger("smartbatch.providers")

# A 4xx other than these means the request itself is wrong: sending it again cannot help.
_RETRYABLE_4XX = {408, 409, 429}
_GATEWAY = {502, 504}  # a proxy's or gateway's answer: the provider behind it may have run the call


def _never_connected(exc: BaseException) -> bool:
    """The SDK's connection or timeout error came from a connection that was never made (refused, unresolved,
    timed out connecting or waiting for a free connection of the pool): nothing was sent. Any other (a reset, a
    cut or a timeout while the answer was awaited) may have come after the provider ran the call. Read from the
    transport's error by its class names, which httpx and its forks share."""
    cause = exc.__cause__
    return cause is not None and any(c.__name__ in _UNSENT for c in type(cause).__mro__)


# LocalProtocolError: a request httpx would not put on the wire (an illegal header value).
_UNSENT = frozenset({"ConnectError", "ConnectTimeout", "PoolTimeout", "LocalProtocolError"})


def _key_reused(code: int, exc: BaseException) -> bool:
    """A 409 saying the Idempotency-Key was used before with another body (the emulator's code, or any
    provider's message naming idempotency), as against a 409 that is a passing conflict."""
    if code != 409:
        return False
    err = error_of(getattr(exc, "body", None))
    said = f"{err.get('code') or ''} {err.get('type') or ''} {error_text(exc)}".lower()
    return "idempoten" in said


# The SDK's own options, not fields of the body: a body key of that name is a field, sent on the wire (a body
# 'timeout' was taken as the client's timeout, and a body 'extra_body' was overwritten).
_OPTIONS = frozenset({"self", "extra_headers", "extra_query", "extra_body", "timeout"})


class Unreadable(Exception):
    """The provider answered a call (and so may have billed it), and its answer could not be read."""


class _Outlasted(Unreadable):
    """A call's answer not whole within its bound (``HttpBase._call_bound``): a flex call's, given up as at its
    timeout (``HttpBase._flex_error``)."""


async def create_call(create: Callable, raw_create: Callable, body: dict[str, Any], key: str,
                      timeout: Any = None, total_s: float | None = None) -> tuple[Any, bool]:
    """Make a sync call: ``body`` as ``create``'s arguments, sent by its raw-response twin under ``key``. Returns
    the answer and whether the provider replayed an earlier call's answer under that key (``Idempotent-Replayed``,
    as Stripe names it): a replay is not billed again, and was counted at its full price (a re-run, or
    ``--resume``, reported money the provider's bill never held; a helper's tour). Raises ``Unreadable`` for a
    success whose body is not JSON (cut short): a hunt saw it failed as an engine error and settled at $0.
    ``timeout``: this call's, in place of the client's (a flex call's, ``call_timeout``). ``total_s``: the whole
    call's bound (``HttpBase._call_bound``), past which it is ``Unreadable`` too: it was sent, and may be billed."""
    more = {} if timeout is None else {"timeout": timeout}

    async def answered() -> tuple[Any, bool]:
        resp = await raw_create(**sdk_kwargs(create, body), extra_headers={"Idempotency-Key": key}, **more)
        try:
            answer = resp.parse()  # the OpenAI SDK's parses at once, the Anthropic SDK's is awaited
            if inspect.isawaitable(answer):
                answer = await answer
        except ValueError as exc:  # json.JSONDecodeError, or a shape the SDK's models refuse
            raise Unreadable(f"{type(exc).__name__}: {exc}") from None
        return answer, str(resp.headers.get("idempotent-replayed", "")).lower() == "true"

    if total_s is None:
        return await answered()
    try:
        return await within(answered(), total_s)
    except asyncio.TimeoutError:
        raise _Outlasted(f"no whole answer within {total_s:g} s, twice the call's timeout (a server sending it "
                         "slowly)") from None


@functools.cache
def _named(fn: Callable) -> frozenset[str] | None:
    """The body fields ``fn`` names as arguments; None if it takes any (``**kwargs``: a wrapper, a test's spy)."""
    params = inspect.signature(fn).parameters.values()
    return None if any(p.kind is p.VAR_KEYWORD for p in params) else frozenset(p.name for p in params) - _OPTIONS


def sdk_kwargs(create: Callable, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as the keyword arguments of an SDK's ``create``: the fields it does not name go in ``extra_body``,
    so the wire carries the body as given, as a batch line does. An OpenAI-compatible server's own fields (vLLM's
    ``top_k``, guided decoding) reach it; the SDK refused them with a TypeError before any call. A provider that
    knows no such field answers a 400 naming it, unbilled."""
    named = _named(getattr(create, "__func__", create))
    if named is None:
        return body
    extra = {k: v for k, v in body.items() if k not in named}
    if not extra:
        return body
    return {**{k: v for k, v in body.items() if k in named}, "extra_body": extra}


class PollBackoff:
    """Waits between polls of one batch: ``poll_min_s`` growing by half each time up to ``poll_max_s``."""

    __slots__ = ("cur", "hi")

    def __init__(self, lo: float, hi: float):
        self.cur, self.hi = lo, hi

    def next(self) -> float:
        s = self.cur
        self.cur = min(self.cur * 1.5, self.hi)
        return s


class BatchHandle:
    """A submitted batch: its provider id, its members by key, its poll backoff and the last state read."""

    __slots__ = ("backoff", "batch", "cuts", "id", "jobs")

    def __init__(self, bid: str, jobs: Sequence[CallJob], backoff: PollBackoff):
        self.id, self.jobs, self.backoff, self.batch = bid, {j.key: j for j in jobs}, backoff, None
        self.cuts = 0  # reads of its results whose last line was cut short (``whole_read``)


class HttpBase(BatchMembers):
    real = True
    names_batches = True  # OpenAI's carry their name in their metadata (Anthropic's override it)

    def __init__(self, name: str, catalog: Catalog, settings: Settings, endpoint: ProviderEndpoint,
                 key: Secret | None, clock):
        self.name, self.catalog, self.settings, self.endpoint = name, catalog, settings, endpoint
        self.spec = catalog.provider(name)
        # Serves the flex tier: OpenAI and the emulator by address, another once it answered a flex call at flex.
        self.flex_served = endpoint.at_openai() or endpoint.at_emulator()
        self.honours_keys = endpoint.honours_idempotency_key
        self._key = key or Secret("")
        self.clock = clock
        self._tiers_told: set[str] = set()

    def queue_refusal(self, handle: BatchHandle) -> int | None:
        return None  # Anthropic names no batch queue limit (OpenAI overrides it)

    def reattach(self, bid: str, jobs: Sequence[CallJob], hedge_at: float | None,
                 model: str | None = None) -> BatchHandle:
        """The handle of batch ``bid``, created by an earlier process of the dispatcher (``actors._batch_index``)."""
        return BatchHandle(bid, jobs, PollBackoff(self.endpoint.poll_min_s, self.endpoint.poll_max_s))

    async def discard(self, handle: BatchHandle) -> int:
        """Nothing (OpenAI overrides it). A Message Batch holds its requests with its results and can be deleted
        once ended, but only with them: a resume or a take-back reads an ended batch's results again from the
        journal's archive (``engine.app._batch_rescue``), so it is left to the provider's 29 days."""
        return 0

    def resume_jobs(self, records: Sequence[dict]) -> None:
        """No job it polls (a provider that makes videos overrides this)."""

    def create_slot(self, n: int) -> contextlib.AbstractAsyncContextManager:
        """Nothing to hold where a batch carries its name (OpenAI's metadata); Anthropic overrides it."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        # Masked: Ray quotes an actor's repr (the dispatcher's holds this) in the error of each of its failed calls.
        url = self.endpoint.base_url
        return f"{type(self).__name__}({self.name}, base_url={url if url is None else masked_url(url)!r})"

    def _redact(self, text: str) -> str:
        """``text`` (a provider's or its SDK's words) masked: the key, and the base URL's credentials, which the SDKs
        send as ``Authorization: Basic`` in the key's place (a proxy's; a 500 echoing it showed them, mask83)."""
        return redact(text, [self._key, *url_secrets(self.endpoint.address())])

    @contextmanager
    def _refused(self, what: str) -> Iterator[None]:
        """An SDK error of a batch call (which the dispatcher catches and logs) as a ``ProviderError`` whose text
        cannot show the key: a provider's error may quote the key it was sent. ``from None``: the SDK error,
        unredacted, must not ride along as the cause either (a traceback would print it). An answer that could not be
        read (cut short, not JSON) came from a call that ran: ``maybe_done``, so a create's batch is looked for."""
        try:
            yield
        except ValueError as exc:  # json.JSONDecodeError, or a shape the SDK's models refuse
            err = ProviderError(f"{self.name}: {what}: its answer could not be read: {type(exc).__name__}: "
                                f"{self._redact(str(exc))[:200]}")
            err.maybe_done = True
            raise err from None
        except self._sdk.APIError as exc:
            err = ProviderError(f"{self.name}: {what} failed: {type(exc).__name__}: {self._redact(error_text(exc))}")
            # Timeouts are connection errors; a connection never made (refused) sent nothing.
            err.maybe_done = (isinstance(exc, self._sdk.APIConnectionError) and not _never_connected(exc)) or (
                isinstance(exc, self._sdk.APIStatusError) and exc.status_code >= 500)
            said = (billing_refusal(exc.status_code, exc.body, str(exc))
                    if isinstance(exc, self._sdk.APIStatusError) else None)
            if said is not None:  # no wait lifts it: not made again (``retry_after_s`` stays None)
                err.quota = quota_message(self.name, exc.status_code, said, self._redact(error_text(exc)))
            elif isinstance(exc, self._sdk.APIStatusError) and exc.status_code == 429:
                ra = retry_after(exc.response.headers, exc.body)
                err.retry_after_s = self.spec.retry_after_s if ra is None else ra
            raise err from None

    # The provider's own host, where a sync call asks for the standard tier that the catalog prices (``_pinned``):
    # a compatible server may not know the field's values (Groq's tiers are others).
    home_host = ""
    standard_tier = ""  # what the provider calls its standard tier in a request
    takes_flex = False  # whether a flex call goes at the flex tier (OpenAI's own API, the emulator: ``_flex_to``)

    def _flex_to(self) -> bool:
        """Whether flex calls go at the flex tier: the catalog has the tier, and the endpoint's server takes it
        (``ProviderEndpoint.serves_flex``: its ``flex_tier``, else whether it is OpenAI's own API). A
        wire-format-only server (vLLM, Groq) may not know the value: a flex decision is sent, and billed, standard
        (and the catalog the engine plans with has no flex tier there: ``engine.app.provider_setup.http_setup``)."""
        return self.spec.flex is not None and self.spec.compat != "gemini" and self.endpoint.serves_flex()

    @staticmethod
    def _tiered(job: CallJob, body: dict[str, Any]) -> dict[str, Any]:
        """A flex call's body asks for the tier, unless the request's own body names one (then it goes so)."""
        return {**body, "service_tier": "flex"} if job.flex and body.get("service_tier") in (None, "auto") else body

    def _call_bound(self, timeout: Any = None) -> float:
        """A sync call's whole time, real seconds: the wait for its answer (``timeout``'s read, else the endpoint's
        ``timeout_s``) and as long again for its body. The SDK's timeout bounds each read alone: a server that sent
        the body a byte inside it held the call, its request and its claim for hours (a helper's hunt)."""
        read = getattr(timeout, "read", None)
        return 2 * (read if isinstance(read, (int, float)) else self.endpoint.timeout_s)

    async def _bounded(self, call: Awaitable[Any], what: str) -> Any:
        """A batch's poll or cancel, its answer within ``_call_bound``: one that trickled (a byte inside the SDK's
        per-read timeout) held the batch's follow-up past its hedge, for days at the default timeout (a helper's
        hunt). Cut, it is a failed call (made again), which may have reached the provider (``maybe_done``)."""
        bound = self._call_bound()
        try:
            return await within(call, bound)
        except asyncio.TimeoutError:
            err = ProviderError(f"{self.name}: {what}: no whole answer within {bound:g} s, twice the call's timeout")
            err.maybe_done = True
            raise err from None

    def _flex_wait(self, job: CallJob) -> Any:
        """The timeout of a flex call: the real seconds it may run (``flex_timeout_s``: the tier's timeout, within
        the deadline's room for a standard call after it), its connect the client's (``call_timeout``); None for
        another call (the client's timeout)."""
        if not job.flex:
            return None
        seconds = max(self.clock.real_delay(flex_timeout_s(self.spec, job.req, self.clock.now())), 0.05)
        return call_timeout(self.client, self._sdk, seconds)

    def _flex_error(self, job: CallJob, exc: BaseException, out: CallOutcome) -> CallOutcome:
        """A flex call's failure that the tier explains, as a refusal (sent standard at once, no try spent): a 429
        that is no billing refusal (OpenAI's "Resource Unavailable", billed nothing), or its timeout, or its
        answer not whole within its bound (``_Outlasted``; a failed try before, made again at flex past its room:
        a review). Either may have run and been billed: ``maybe_billed`` stays."""
        if not job.flex or out.quota:
            return out
        if isinstance(exc, (self._sdk.APITimeoutError, _Outlasted)):
            return out._replace(refused=True, error=f"{self.name}: the flex call timed out (the tier's timeout_s, "
                                "or the room its deadline leaves a standard call after it); sent standard")
        if out.rate_limited:
            return out._replace(refused=True, rate_limited=False, retry_after_s=None)
        return out

    def _served_flex(self, job: CallJob, tier: Any) -> bool:
        """Whether ``job``'s answer was served, and so billed, at the flex tier. A flex call served at another
        tier is billed at the catalog's standard prices, said once per tier."""
        if not job.flex:
            self._check_tier(tier)
            return False
        if tier == "flex":
            self.flex_served = True
            return True
        self.flex_unserved = True  # billed standard: a flex call's claim (the flex price) no longer covers it
        if f"flex:{tier}" not in self._tiers_told:
            self._tiers_told.add(f"flex:{tier}")
            log.warning("%s: a flex call was served at service tier %r: counted at the standard prices "
                        "(docs/providers.md, \"Flex tier\")", self.name, tier)
        return False

    def _pinned(self, body: dict[str, Any], base_url: str) -> dict[str, Any]:
        """``body`` asking for the standard tier where it names none or "auto" (both providers' default): there a
        project or organisation with priority capacity is billed its priority prices, which the catalog does
        not hold (a hunt: a call answered at "priority" was counted at the standard price)."""
        if body.get("service_tier") not in (None, "auto") or urlsplit(base_url).hostname != self.home_host:
            return body
        return {**body, "service_tier": self.standard_tier}

    def _check_tier(self, tier: Any) -> None:
        """Say so, once per tier, when an answer was served at a tier the catalog does not price."""
        if tier in (None, "default", "standard", "batch") or not isinstance(tier, str):
            return
        if tier not in self._tiers_told:
            self._tiers_told.add(tier)
            log.warning("%s: a call was served at service tier %r; its cost is counted at the catalog's "
                        "standard prices, so the provider's bill may differ (docs/providers.md)", self.name, tier)

    def _unreadable(self, exc: BaseException) -> CallOutcome:
        """A sync call whose answer could not be read: it ran, so it may be billed (settled at its upper bound
        if no retry is answered, as a cut connection's)."""
        return CallOutcome(False, self.clock.now(), 0.0, error=f"{self.name}: the answer could not be read "
                           f"({self._redact(str(exc))[:200]})", real=True, maybe_billed=True)

    def _priced(self, job: CallJob, usage: Usage, mode: Mode) -> float:
        # A text answer that counts no input (no usage: a proxy or a compatible server dropped it) ran and is billed
        # all the same: priced at its count, 0, the budgets and the report missed it (a helper's hunt). It is
        # counted as a budget reserves it: its prompt at the dearest input price, its output as estimated or told.
        if not usage.input_tokens and self.catalog.model(job.req.provider, job.req.model).kind == "text":
            if f"usage:{job.req.model}" not in self._tiers_told:  # once a model: a server may never send it
                self._tiers_told.add(f"usage:{job.req.model}")
                log.warning("%s: an answer of %s without its usage; counted (as each such answer) at its upper "
                            "bound, as a budget reserves it", self.name, job.req.model)
            return reserve_bound(job.req, self.catalog, mode, max(job.req.output_tokens, usage.output_tokens))
        return price_usage(job.req, self.catalog, mode, input_tokens=usage.input_tokens,
                           output_tokens=usage.output_tokens, cache_read=usage.cache_read,
                           cache_write=usage.cache_write).total

    def _warm_of(self, job: CallJob, usage: Usage) -> int:
        """The leading prefix blocks a call left in the provider's cache, from its usage: those it read or wrote;
        at an automatic cache, its whole prefix once that reaches the model's minimum (the provider writes it)."""
        pc, r, bt = self.spec.cache_of(job.req.model), job.req, self.settings.prefix_block_tokens
        if pc is None or not r.prefix_blocks:
            return 0
        if pc.automatic:
            spec = self.spec.models[r.model]
            prefix = min(len(r.prefix_blocks) * bt, r.input_tokens)
            return len(r.prefix_blocks) if prefix >= min_cacheable_tokens(self.spec, spec) else 0
        return min(cached_blocks(usage.cache_read, usage.cache_write, bt), len(r.prefix_blocks))

    def _error(self, exc: BaseException, status_error: type, timeout_error: type, key: str = "") -> CallOutcome:
        """An SDK exception as a failed outcome, billed nothing as far as is known (``key``: the call's
        Idempotency-Key); ``maybe_billed`` where no answer came though the call may have reached the provider."""
        now = self.clock.now()
        if isinstance(exc, timeout_error):
            return CallOutcome(False, now, 0.0, error=f"{self.name}: timed out after {self.endpoint.timeout_s:g} s",
                               real=True, maybe_billed=not _never_connected(exc))
        if isinstance(exc, status_error):
            resp: Any = getattr(exc, "response", None)
            code = getattr(exc, "status_code", None) or getattr(resp, "status_code", 0)
            ra = retry_after(getattr(resp, "headers", None), getattr(exc, "body", None)) if code == 429 else None
            retryable = code >= 500 or code in _RETRYABLE_4XX
            msg = self._redact(error_text(exc))
            if _key_reused(code, exc):
                # An earlier call under this key, with another body, was answered and billed. Sending it again
                # under this key can only be refused again, and under a new key it would be paid twice; its
                # answer cannot be read back. So: failed at once, saying so (docs/reliability.md).
                return CallOutcome(False, now, 0.0, error=f"{self.name} HTTP 409: {msg} (Idempotency-Key {key}: "
                                   "the provider billed an earlier call under this key, with another body, whose "
                                   "answer cannot be read back; not sent again, so as not to pay twice)",
                                   retryable=False, real=True, key_reused=True)
            said = billing_refusal(code, getattr(exc, "body", None), msg)
            if said is not None:  # refused before it ran (billed nothing); every call fails alike until it is fixed
                return CallOutcome(False, now, 0.0, error=quota_message(self.name, code, said, msg), retryable=False,
                                   real=True, quota=True)
            return CallOutcome(False, now, 0.0, ra, error=f"{self.name} HTTP {code}: {msg}", retryable=retryable,
                               real=True, maybe_billed=code in _GATEWAY, rate_limited=code == 429)
        # A connection error: billed nothing if it never connected; cut after the request went, the call may have
        # been run and billed, as a timeout's (settled at the call's upper bound if every retry fails).
        return CallOutcome(False, now, 0.0, error=f"{self.name}: {type(exc).__name__}: {self._redact(str(exc))}",
                           real=True, maybe_billed=not _never_connected(exc))
