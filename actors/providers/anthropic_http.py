"""Anthropic over HTTP (the official ``anthropic`` SDK): Messages and Message Batches (create, retrieve, results
stream, cancel; cancelled members are not billed, succeeded ones are), with prompt caching by ``cache_control``
breakpoints on the shared prefix blocks, billed from ``cache_creation_input_tokens``/``cache_read_input_tokens``.

Breakpoints: at the end of the prefix a request believes warm (so the read is found) and where its batch or the
policy asks for a write (``body``). Warmth is learnt from the usage the provider returns, for the cache's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from actors.providers import _wire
from actors.providers._anthropic_count import COUNT_TIMEOUT_S, CountAnswer, count_at
from actors.providers._anthropic_stream import stream_bound, streamed_call, whole_call
from actors.providers._http import (
    BatchHandle,
    HttpBase,
    PollBackoff,
    Unreadable,
    jsonl_records,
    whole_read,
)
from actors.providers._sdk_key import STAND_IN, keyed
from actors.providers._wire import broke_at, error_message, error_of, message_parts, paced, tokens
from engine.core._cost_cache import call_marks, mark_room
from engine.core.cost import entry_marks, min_cacheable_tokens, shared_prefix_depths, warm_run
from engine.core.errors import ProviderError
from engine.core.grouping import PrefixWarmth, WarmNote
from engine.core.provider_api import BatchState, CallJob, CallOutcome, Usage, idempotency_key, sent_key
from engine.core.responses_input import as_messages
from engine.core.tool_calls import answer_output

__all__ = ["AnthropicProvider"]

_EPHEMERAL = {"type": "ephemeral"}
FIND_SCAN = 200  # most recent Message Batches looked through for a cut create's batch
MADE_KEEP = 10_000  # ids of the batches this provider made or adopted, never taken for a cut create's
PARTS_KEEP = 100_000  # batch members whose shallower breakpoints wait for their answer (``_parts``)
FIND_ENDED = 3  # ended look-alikes whose results are read to tell which one holds these members


def _usage(u: Mapping | None) -> Usage:
    u = u or {}
    read = tokens(u.get("cache_read_input_tokens"))
    write = tokens(u.get("cache_creation_input_tokens"))
    return Usage(tokens(u.get("input_tokens")) + read + write, tokens(u.get("output_tokens")), read, write)


# The HTTP status of Anthropic's error type (its API reference, "Errors"). A batch member's error carries the type
# alone; said with its status, as a sync call's error is, it reads as the caller's own 400 (provider_status), not
# as the endpoint's 502, which the SDKs retry: a Message Batch answered a bad member as a retryable api_error.
_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
           "permission_error": 403, "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
           "api_error": 500, "overloaded_error": 529}

# Anthropic's stop_reason in OpenAI chat's words (``Result.finish``): a cut answer must read as cut.
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
           "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}


def _answered(c: Any) -> int:
    """The requests an ended Message Batch answered, each with a line of its results (its request counts; 0
    where none are known)."""
    return sum(getattr(c, k, 0) or 0 for k in ("succeeded", "errored", "canceled", "expired"))


def _text(msg: Mapping) -> tuple[str | None, list | None]:
    """(output, tool_calls): the text, and the ``tool_use`` blocks (``answer_output``)."""
    content = msg.get("content") or []
    parts = [c.get("text", "") for c in content if c.get("type") == "text"]
    return answer_output("".join(parts) if parts else None, [c for c in content if c.get("type") == "tool_use"])


class AnthropicProvider(HttpBase):
    names_batches = False  # a Message Batch carries nothing that names it (``find_batch``)
    home_host, standard_tier = "api.anthropic.com", "standard_only"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        import anthropic

        self._sdk = anthropic
        # The key goes in x-api-key, where Anthropic's API reads an API key: the SDK (2.17) sends ``api_key`` as an
        # ``Authorization: Bearer``, an OAuth token's header, refused for a key (rvkeys85); the header is left out.
        self.client = keyed(anthropic.AsyncAnthropic(api_key=STAND_IN, base_url=self.endpoint.base_url,
                                                     max_retries=0, timeout=self.endpoint.http_timeout(anthropic),
                                                     default_headers={"X-Api-Key": STAND_IN,
                                                                      "Authorization": anthropic.Omit()}),
                            self._key, "X-Api-Key")
        # What its calls read or wrote, warm for one TTL from their answer (the groupers' belief, ``WarmNote``,
        # counts from the call's start: it must hold wherever in a batch a member ran).
        self._warm = PrefixWarmth(max((pc.ttl_s for m in self.spec.models if (pc := self.spec.cache_of(m))),
                                      default=300.0))  # the longest of its models' TTLs: a note carries its own
        self._made: dict[str, None] = {}  # ordered: the oldest go first past MADE_KEEP
        # Per batch name whose create got no answer: the newest batch made before it (the lookup stops there).
        self._marks: dict[str, str | None] = {}
        self._slots: dict[int, list] = {}  # by batch size: [its lock, how many hold or wait for it]
        # By batch member key: the shallower entries its body breaks at (``entry_marks``), noted warm with its answer.
        self._parts: dict[str, tuple[int, ...]] = {}

    def route(self, job: CallJob) -> str:
        return "/v1/messages"

    def _warm_blocks(self, job: CallJob) -> int:
        r = job.req
        # Only up to where a believed entry ends, in the blocks the body renders whole (``message_parts``): a
        # mark inside an entry, or short of one that ends in the tail, finds none and writes that prefix.
        held = r.prefix_blocks[:r.input_tokens // self.settings.prefix_block_tokens]
        return self._warm.leading(self.name, r.model, held, self.clock.now(), exact=True)[0]

    def _keep_warm(self, job: CallJob, usage: Usage) -> int:
        """Believe warm the leading blocks the call read or wrote past its body's head (``entry_blocks``: the
        rest drew the next breakpoint past the cached prefix, where the provider writes); returns how many."""
        n, parts = self._warm_of(job, usage), self._parts.pop(job.key, ())
        n = min(_wire.entry_blocks(job.req, usage.cache_read + usage.cache_write, self.settings, self.catalog), n)
        if n:
            now, blocks = self.clock.now(), job.req.prefix_blocks
            until = now + self.spec.cache_of(job.req.model).ttl_s
            # A hit refreshes the entry it read, which ends short of one the call wrote: noted alone, it went cold
            # in the belief while Anthropic kept it, and the next call sent it plain. Its write left an entry at
            # each breakpoint past the read too, noted here, as the simulator keeps it, should its member fail.
            read = min(_wire.entry_blocks(job.req, usage.cache_read, self.settings, self.catalog), n)
            # A sync call's as its body broke (drawn again at the read, they named depths never marked: a review).
            parts = parts or broke_at(job.req, job.body)
            ends = {read, n} | {k for k in parts if read < k < n}
            self._warm.see([WarmNote(self.name, job.req.model, tuple(blocks[:k]), until) for k in ends if k], now)
        return n

    def body(self, job: CallJob, warm_blocks: int = 0, mark_blocks: int = 0,
             parts: Sequence[int] = ()) -> dict[str, Any]:
        """The Messages body. Breakpoints (``cache_control``) go at the end of the prefix believed warm
        (``warm_blocks``: so the read is found), at the end of the prefix a later member of its batch shares
        (``mark_blocks``: written once, read by the others), where later members part from it sooner (``parts``:
        entries of the same write, ``entry_marks``) and, when the policy asks for a write, at the end of its
        whole shared prefix."""
        r = job.req
        body: dict[str, Any] = as_messages(dict(r.body or {}), "anthropic", "chat")  # a Responses body, checked
        body["model"] = r.model
        if "max_tokens" not in body:
            # Required by the Messages API: the request's cap, else the model's maximum (never a hidden cut).
            spec = self.spec.models[r.model]
            room = spec.context_window - r.input_tokens if spec.context_window else spec.max_output_tokens
            body["max_tokens"] = r.max_output_tokens or max(min(spec.max_output_tokens, room), 1)
        if "messages" in body:
            return body
        blocks, tail = message_parts(r, self.settings.prefix_block_tokens, self.settings.chars_per_token,
                                         self.settings.providers.replay)
        content: list[dict[str, Any]] = [{"type": "text", "text": t} for t in blocks]
        # A prefix that ends in a partial block (a trace's last block id, shorter than a block) is rendered
        # up to its last whole block: the rest goes with the tail. A count of the request's own blocks that
        # reaches past the rendered ones marks the last rendered block, the longest prefix a call can cache
        # (dropped, the shared prefix of a batch was written by nobody and missed by every later member).
        parts = (*parts, *call_marks(job.cache_write, warm_blocks, len(blocks), self.settings.prefix_block_tokens,
                                     self.spec, self.spec.models[r.model], mark_room(body)))  # a call's depths
        whole = len(blocks) if job.cache_write and not isinstance(job.cache_write, tuple) else 0
        marks = {min(k, len(blocks)) - 1 for k in (warm_blocks, mark_blocks, *parts, whole)
                 if 0 < k <= len(r.prefix_blocks) and blocks}
        # Beside the body's own marks (its system or tools, as a replayed request carries them) Anthropic takes
        # four in all: the furthest are kept, as a read looks back from a mark (a review: five went on the wire).
        for k in sorted(marks, reverse=True)[:mark_room(body)]:
            content[k]["cache_control"] = _EPHEMERAL
        content.append({"type": "text", "text": tail})
        body["messages"] = [{"role": "user", "content": content}]
        return body

    def _outcome(self, job: CallJob, msg: dict, rid: str | None, mode: str) -> CallOutcome:
        usage = _usage(msg.get("usage"))
        self._check_tier((msg.get("usage") or {}).get("service_tier"))
        warm = self._keep_warm(job, usage)
        output, calls = _text(msg)
        return CallOutcome(True, self.clock.now(), self._priced(job, usage, mode), output=output, usage=usage,
                           provider_request_id=rid or msg.get("id"), raw=msg, real=True, warm_blocks=warm,
                           tool_calls=calls, finish=_FINISH.get(msg.get("stop_reason") or ""))

    def sync_body(self, job: CallJob) -> dict[str, Any]:
        return self._pinned(self.body(job, self._warm_blocks(job)), str(self.client.base_url))

    def sync_bodies(self, job: CallJob) -> Iterator[dict[str, Any]]:
        """The bodies a sync call of ``job`` may have been sent with, by how many of its leading blocks were warm
        then (its cache marks): a restart, which lost the body and the warmth, finds the one sent by its key
        (``actors._sync_index``); rebuilt with no warmth, it went under a new key, billed again."""
        for k in range(len(job.req.prefix_blocks) + 1):
            yield self._pinned(self.body(job, k), str(self.client.base_url))

    async def call(self, job: CallJob) -> CallOutcome:
        sdk = self._sdk
        # The dispatcher passes the body it fixed at the first try; the key names that body (idempotency_key).
        body = job.body if job.body is not None else self.sync_body(job)
        key = sent_key(job, body)
        try:
            # Streamed (``_anthropic_stream``): a long answer keeps its events coming, where a whole one sent
            # nothing until done and was cut at timeout_s after it was billed, then paid again.
            try:
                msg, rid, replayed = await streamed_call(self.client.messages, sdk, body, key,
                                                         self.endpoint.timeout_s, stream_bound(body, self.endpoint.timeout_s))
            except sdk.APIStatusError as exc:
                if not self._error(exc, sdk.APIStatusError, sdk.APITimeoutError, key).key_reused:
                    raise
                # The key was first sent whole (before stop 80), and a provider that keeps keys refuses it with
                # ``stream`` (another body): asked whole, it replays the answer it billed. Failed at the 409, it
                # was paid and lost (a review). A key truly used with another body is refused again, unbilled.
                msg, rid, replayed = await whole_call(self.client.messages, body, key, self.client.timeout,
                                                      self._call_bound())
        except sdk.APIError as exc:
            return self._error(exc, sdk.APIStatusError, sdk.APITimeoutError, key)
        except TypeError as exc:
            return CallOutcome(False, self.clock.now(), 0.0, error=f"{self.name}: bad request body: {exc}",
                               retryable=False)
        except Unreadable as exc:
            return self._unreadable(exc)
        try:
            out = self._outcome(job._replace(body=body), msg, rid, "sync")  # the belief reads its marks
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # an answer of another shape
            return self._unreadable(exc)
        return out._replace(replayed=True) if replayed else out

    def batch_body(self, jobs: Sequence[CallJob]) -> list[dict]:
        # Members run in order: a prefix an earlier member writes (or that is warm) is read by the later ones,
        # as the cost model prices a batch (engine.core.cost.price_batch). Built once: which prefixes are warm
        # changes, and a create made again under its key must send the same body.
        bt = self.settings.prefix_block_tokens
        least = max(min_cacheable_tokens(self.spec, self.spec.models[jobs[0].req.model]), 1)
        depths = shared_prefix_depths([j.req for j in jobs], bt, least)
        # An entry ends where an earlier member's breakpoint drew a write (Anthropic reads none that stops inside
        # one): a member is marked at the last of those its prompt holds whole, not at the run of blocks earlier
        # ones held, which drew a write no entry ends at (1.25x where the simulator prices it plain, a review).
        ends: set[int] = set()
        reqs = []
        for j, shared in zip(jobs, depths, strict=True):
            blocks, mark, room = j.req.prefix_blocks, shared[0] if shared else 0, mark_room(j.req.body)
            # The blocks the body renders (``message_parts``); none marked where its own marks leave no room.
            whole = min(len(blocks), j.req.input_tokens // bt) if room else 0
            at = min(max(self._warm_blocks(j), warm_run(blocks[:whole], ends.__contains__, False)), whole)
            parts = entry_marks(shared, at, whole, bt, least, room)[1:]  # as ``price_batch`` prices its entries
            reqs.append({"custom_id": j.key, "params": self.body(j, at, mark, parts)})
            ends.update(blocks[k - 1] for k in (at, min(mark, whole), *parts) if k >= at and k * bt >= least)
            if parts:  # dropped when its answer is read (``fetch``); one never read, the oldest past PARTS_KEEP
                self._parts[j.key] = parts
        while len(self._parts) > PARTS_KEEP:
            self._parts.pop(next(iter(self._parts)))
        return reqs

    async def find_batch(self, jobs: Sequence[CallJob], ref: str, known: frozenset[str] = frozenset()
                         ) -> BatchHandle | None:
        """The batch a cut create made, if Anthropic has it. A Message Batch carries no metadata, and Anthropic
        does not document ``Idempotency-Key``: a create made again makes a second batch, and both are billed. So
        it is looked for among the newest batches: one of exactly these many requests that this dispatcher does
        not follow (``known``, and those it made). Of those still running, it must be the only one (no batch's
        requests can be read before it ends); an ended one is taken only if its results carry these members'
        ``custom_id`` s. Only batches newer than the newest this provider had made when the create left are
        looked at (after a restart, all of the newest); the dispatcher holds ``create_slot`` meanwhile, so no
        other create of its own of as many requests is unanswered. None: not found (the caller creates it, under
        the key, for a server that honours one)."""
        n, running, ended = len(jobs), [], []
        mark = self._marks.get(ref)  # the newest batch this provider knew of when the create left
        with self._refused("batch lookup"):
            seen = 0
            async for b in self.client.messages.batches.list(limit=100):
                if b.id == mark:  # older batches were made before the create left: none is its batch
                    break
                c = b.request_counts
                if (b.id not in known and b.id not in self._made
                        and c.processing + c.succeeded + c.errored + c.canceled + c.expired == n):
                    (ended if b.processing_status == "ended" else running).append(b)
                seen += 1
                if seen >= FIND_SCAN:
                    break
            if len(running) == 1:
                self._marks.pop(ref, None)
                return self._adopt(running[0], jobs)
            if running:  # two look-alikes running (another client on this key?): neither can be told ours
                return None
            keys = {j.key for j in jobs}
            for b in ended[:FIND_ENDED]:
                lines, unread = await self._results(b.id)
                whole_read(lines, unread, n, f"{self.name}: batch {b.id}")
                ids = {line.get("custom_id") for line in lines} | set(unread)
                if ids == keys:
                    self._marks.pop(ref, None)
                    return self._adopt(b, jobs)
        return None

    @contextlib.asynccontextmanager
    async def create_slot(self, n: int) -> AsyncIterator[None]:
        """One batch of ``n`` requests at a time from its create to its journaled handle: a Message Batch carries
        nothing that names it, so the lookup of a create whose answer was lost (or that a restart cut) can tell
        its batch only from look-alikes this dispatcher does not know of. Two of its own, unanswered together,
        hid each other: the lookup gave up and the create was made again, its members billed in both."""
        slot = self._slots.setdefault(n, [asyncio.Lock(), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._slots[n]

    def _adopt(self, b: Any, jobs: Sequence[CallJob]) -> BatchHandle:
        self._made[b.id] = None
        handle = BatchHandle(b.id, jobs, PollBackoff(self.endpoint.poll_min_s, self.endpoint.poll_max_s))
        handle.batch = b
        return handle

    async def submit_batch(self, jobs: Sequence[CallJob], hedge_at: float | None, ref: str,
                           body: Any = None, wanted: Any = None) -> Any:
        # One request carries the body: no step before the create leaves for ``wanted`` to be asked after.
        reqs = body if body is not None else self.batch_body(jobs)
        self._marks.setdefault(ref, next(reversed(self._made), None))
        # The key names the body, as a sync call's does: a create made again after a lost answer sends the same
        # body (journaled), so the same key; one made without members withdrawn while a 429 was waited out (the
        # 429 made nothing) is another create, under another key, never a 409 where a server pinned the first.
        key = idempotency_key(ref, {"requests": reqs})
        with self._refused("batch submission"):
            b = await self.client.messages.batches.create(requests=reqs, extra_headers={"Idempotency-Key": key})
        self._marks.pop(ref, None)
        self._made[b.id] = None
        while len(self._made) > MADE_KEEP:  # oldest first
            del self._made[next(iter(self._made))]
        return BatchHandle(b.id, jobs, PollBackoff(self.endpoint.poll_min_s, self.endpoint.poll_max_s))

    async def poll(self, handle: BatchHandle) -> BatchState:
        with self._refused("batch poll"):
            handle.batch = b = await self._bounded(self.client.messages.batches.retrieve(handle.id), "batch poll")
        if b.processing_status == "ended":
            return BatchState("ended", 0.0)
        return BatchState("cancelling" if b.processing_status == "canceling" else "running", handle.backoff.next())

    async def cancel(self, handle: BatchHandle) -> BatchState | None:
        with self._refused("batch cancel"):
            handle.batch = b = await self._bounded(self.client.messages.batches.cancel(handle.id), "batch cancel")
        # A batch that ended before the cancel is answered as it is: "ended".
        return BatchState("ended", 0.0) if b.processing_status == "ended" else None

    async def fetch(self, handle: BatchHandle) -> Mapping[str, CallOutcome]:
        out: dict[str, CallOutcome] = {}
        if handle.batch is None or handle.batch.processing_status != "ended":  # as a poll before it ended left it,
            await self.poll(handle)  # or unread: read it now (it had no results, and every member went again)
            if handle.batch.processing_status != "ended":
                raise ProviderError(f"{self.name}: batch {handle.id} is {handle.batch.processing_status}, not ended")
        with self._refused("reading a batch's results"):
            lines, unread = await self._results(handle.id)
        # An ended batch has a line per request: fewer, and the read was cut short (read again, ``whole_read``).
        whole_read(lines, unread, _answered(getattr(handle.batch, "request_counts", None)),
                   f"{self.name}: batch {handle.id}", handle)
        self._unread_members(handle, unread, out)
        keyless = sum(self._member(handle, cid) is None for cid in unread)
        for item in lines:
            job = self._member(handle, item.get("custom_id"))
            res = item.get("result")
            kind = res.get("type") if isinstance(res, Mapping) else None
            if job is None:  # errored, canceled, expired: billed nothing; any other may be a member's, billed
                keyless += kind not in ("errored", "canceled", "expired")
                continue
            if kind == "succeeded":
                try:
                    self._put(out, job.key, self._outcome(job, res.get("message") or {}, handle.id, "batch_api"))
                except (AttributeError, KeyError, TypeError, ValueError):  # an answer of another shape: billed
                    self._unread_members(handle, [job.key], out)
            elif kind == "errored":
                etype = error_of(res.get("error")).get("type")
                etype = etype if isinstance(etype, str) and etype != "error" else "api_error"
                said = error_message(res.get("error")) or ""
                self._put(out, job.key, CallOutcome(
                    False, self.clock.now(), 0.0, retryable=etype != "invalid_request_error", real=True,
                    error=f"{self.name} batch member {etype} (HTTP {_STATUS.get(etype, 500)}): {self._redact(said)}"))
            elif kind not in ("canceled", "expired"):  # no result it documents: it may have run and been billed
                self._unread_members(handle, [job.key], out)
            # canceled / expired: never ran, not billed; absent, so it is sent again
        self._unnamed(handle, out, [*unread, *(x.get("custom_id") for x in lines)], keyless, "custom_id")
        for key in handle.jobs:  # a member that failed, or went unread, keeps no note of its breakpoints
            self._parts.pop(key, None)
        return out

    def results_at(self, handle: BatchHandle) -> str:
        return f"Message Batch {handle.id} (results at {getattr(handle.batch, 'results_url', None)})"

    async def _results(self, bid: str) -> tuple[list[dict], list[str | None]]:
        """A Message Batch's results, each line read on its own (``jsonl_records``): the SDK's stream reads them
        all or fails, and one line cut short sent every finished member again."""
        stream = await self.client.messages.batches.results(bid)
        try:
            r = stream.http_response  # (``paced``: bounded by its length, where it gives one)
            data = b"".join([c async for c in paced(r.aiter_bytes(), r.headers, self.settings, self.endpoint)])
        finally:
            await stream.close()
        return jsonl_records(data.decode("utf-8", errors="replace"))

    async def count_tokens(self, body: dict[str, Any]) -> CountAnswer:
        """Anthropic's count of the Messages ``body``, asked with this provider's client and key (free: none of a
        call's accounting, ``_anthropic_count``)."""
        return await count_at(self.client, self._sdk, self._key, body,
                              min(self.endpoint.timeout_s, COUNT_TIMEOUT_S))

    async def close(self) -> None:
        await self.client.close()
