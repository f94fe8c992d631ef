"""Request bodies and usage, shared by the HTTP providers: what goes on the wire for a ``Request`` and how a
provider's answer becomes a ``CallOutcome``.

A request that carries the provider's own ``body`` is sent as it is (only ``model`` is set, since a circuit
breaker may have moved the request to a fallback model). A request with only a ``prompt`` becomes one user
message. A *replayed* trace line, whose prompt is a placeholder far shorter than its recorded token count, is
sent with a synthetic prompt of that size: its shared prefix blocks as deterministic text (so requests that
share blocks share a real prompt prefix and hit the provider's prompt cache), then its own tail, which names the
recorded output length as ``[[emulator:output_tokens=N]]`` (the loopback emulator answers that long).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from engine.core._cost_cache import mark_room
from engine.core._logkeys import redact  # one rule for keys, the loggers' filter's too
from engine.core.body_tokens import tool_chars, tool_prompt_tokens
from engine.core.request import Request, split_body
from engine.core.responses_input import as_messages

__all__ = ["billing_refusal", "broke_at", "call_timeout", "error_message", "error_of", "error_text", "message_parts", "paced", "quota_message",
           "redact", "renders_blocks", "retry_after", "tokens"]

_WORDS = ("alpha", "bravo", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kestrel", "lumen", "meadow", "nimbus", "onyx", "prairie", "quartz", "river", "saffron", "tundra")


def quota_message(name: str, status: int, said: str, msg: str) -> str:
    """A billing refusal's error, naming the cause and the fix."""
    return (f"{name} HTTP {status} {said}: {msg[:300]} -- the provider account is out of credit or past its spend "
            "limit: add credit or raise the limit in the provider's billing settings (check the plan), then submit "
            "again; not retried, and billed nothing")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(v: str | None) -> float | None:
    """OpenAI's reset durations (``12ms``, ``1.5s``, ``6m0s``) in seconds; None when absent or unreadable."""
    parts = _DURATION.findall(v or "")
    if not parts or "".join(a + u for a, u in parts) != (v or "").strip():
        return None
    return sum(float(a) * _UNIT_S[u] for a, u in parts)


def retry_after(headers, body=None) -> float | None:
    """Seconds from a ``Retry-After`` (or ``retry-after-ms``) header; else, as OpenAI's 429s may carry no
    ``Retry-After`` (openai-node issue 1477), from its ``x-ratelimit-reset-requests`` / ``-tokens`` (the reset of
    the limit whose ``remaining`` is 0; of both, the later, when neither says); else from the error ``body``'s
    ``google.rpc.RetryInfo`` detail, where Google says it (``"retryDelay": "36s"``), with no header at all. None
    when none is readable: an HTTP date, say (the engine's own backoff applies). Without them, a 429 of a minute's
    window was retried 1, 2 and 4 s later and the request failed (a helper's protocol hunt; Google's, a fault
    hunt)."""
    if headers is None:
        return _retry_delay(body)
    ms = headers.get("retry-after-ms")
    try:
        if ms is not None:
            return max(float(ms) / 1000.0, 0.0)
        v = headers.get("retry-after")
        if v is not None:
            return max(float(v), 0.0)
    except (TypeError, ValueError):
        return None
    resets = {k: _duration(headers.get(f"x-ratelimit-reset-{k}")) for k in ("requests", "tokens")}
    out = [r for k, r in resets.items() if r is not None and str(headers.get(f"x-ratelimit-remaining-{k}")) == "0"]
    out = out or [r for r in resets.values() if r is not None]
    return max(out) if out else _retry_delay(body)


_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_PROTO_DURATION = re.compile(r"(\d+(?:\.\d+)?)s")


def _retry_delay(body) -> float | None:
    """The ``retryDelay`` of a Google error's RetryInfo detail (a protobuf Duration, ``"36.4s"``), in seconds."""
    details = error_of(body).get("details")
    for d in details if isinstance(details, list) else ():
        if isinstance(d, dict) and d.get("@type") == _RETRY_INFO:
            m = _PROTO_DURATION.fullmatch(str(d.get("retryDelay") or "").strip())
            return float(m.group(1)) if m else None
    return None


def error_of(body) -> dict:
    """The error object of an error answer's body as the SDK kept it: OpenAI's ``error`` object (the SDK took it
    out), Anthropic's whole body (``{"type": "error", "error": {...}}``), or the list of one that Google's OpenAI
    compatibility layer answers (``[{"error": {"code": 400, "message": ..., "status": "INVALID_ARGUMENT"}}]``).
    {} for anything else."""
    if isinstance(body, list) and body:
        body = body[0]
    err = body.get("error", body) if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}


def error_message(said) -> str | None:
    """What an error says, whatever its shape: a bare string, or the message of ``error_of``'s object. A batch's
    results line is read by it, since a line of another shape than documented raised in the read of the whole
    file, and every member, the finished ones too, went again (a fault hunt)."""
    said = said if isinstance(said, str) else error_of(said).get("message")
    return said if isinstance(said, str) and said else None


def error_text(exc: BaseException) -> str:
    """An SDK error's text, with the provider's own words where the SDK left them out: the ``openai`` SDK takes
    the message of an object body only, so each error of Google's layer, a list, read "Error code: 400" and not
    a word of what was refused (a fault hunt). Not redacted: the caller redacts."""
    text = str(getattr(exc, "message", "") or exc)
    body = getattr(exc, "body", None)
    err = error_of(body) if isinstance(body, list) else {}  # an object's message is in the SDK's text already
    said, status = err.get("message"), err.get("status")
    if isinstance(said, str) and said:
        text += f" - {status}: {said}" if isinstance(status, str) and status else f" - {said}"
    return text


# OpenAI's codes (and types) of a 429 that no wait lifts: the account is out of credit or past a spend or usage
# limit. Its rate limits say ``rate_limit_exceeded`` (or nothing); those are waited out.
_QUOTA_CODES = frozenset({"insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
                          "project_spend_limit_exceeded", "organization_usage_limit_exceeded"})
# Anthropic says it by a 402 ``billing_error``, or by a 400 (or 403) whose message names the credit balance
# ("Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing ...") or the
# organisation's own spend limit ("You have reached your specified API usage limits").
_BILLING_WORDS = re.compile(r"credit balance|purchase credits|plans (?:&|and) billing|api usage limits", re.I)


def billing_refusal(status: int, body, message: str = "") -> str | None:
    """What a provider's error says is wrong with the account's billing, when it says so: the code or type it
    names (``insufficient_quota``, ``billing_error``, ...), else None. ``body``: the error body as the SDK kept
    it (``error_of``)."""
    err = error_of(body)
    code, kind = str(err.get("code") or ""), str(err.get("type") or "")
    if status == 429:
        return next((c for c in (code, kind) if c in _QUOTA_CODES), None)
    if status == 402 or kind == "billing_error":
        return kind or "billing_error"
    if status in (400, 403) and _BILLING_WORDS.search(f"{err.get('message') or ''} {message}"):
        return kind or "billing_error"
    return None


def _block_text(block: int, chars: int) -> str:
    seed = hashlib.blake2b(str(block).encode(), digest_size=8).digest()
    words = [_WORDS[b % len(_WORDS)] for b in seed]
    unit = f"[block {block}] " + " ".join(words) + " "
    return (unit * (chars // len(unit) + 1))[:chars]


def _filler(chars: int, seed: str) -> str:
    if chars <= 0:
        return ""
    unit = " " + " ".join(_WORDS[b % len(_WORDS)] for b in hashlib.blake2b(seed.encode(), digest_size=8).digest())
    return (unit * (chars // len(unit) + 1))[:chars]


def renders_blocks(req: Request, chars_per_token: float, replay: bool = False) -> bool:
    """Whether ``message_parts`` renders ``req``'s prefix blocks: a replayed line's, or a placeholder prompt's,
    never a body's outside a replay nor a prompt long enough for its count. One rule for the body and the belief
    of what it cached (``entry_blocks``)."""
    return replay or (req.body is None and len(req.prompt) <= (req.input_tokens - 1) * chars_per_token)


def message_parts(req: Request, block_tokens: int, chars_per_token: float,
                  replay: bool = False) -> tuple[list[str], str]:
    """The prompt of a request without a body: (texts of its shared prefix blocks, its own tail). A prompt
    long enough for its token count is sent as it is (no blocks); a replayed trace line (``replay``, or a
    placeholder prompt far shorter than its token count) is sent at its recorded size, exactly
    ``input_tokens * chars_per_token`` characters, naming its recorded output length. When the blocks leave less
    room than the marker needs (a tiny request, or one barely longer than its prefix), the blocks and the marker
    are kept and the prompt runs over by at most the marker's length plus one character."""
    cpt = chars_per_token
    prompt = req.prompt
    # Beside a body (a system prompt, instructions, tools), the prompt is the user's question, whatever the
    # estimate, which holds the body's text and tools too: taken whole, the question read as a placeholder and
    # filler went in its place (reviews). A trace's line has no body.
    if not renders_blocks(req, cpt, replay):
        return [], prompt or " "
    own = req.input_tokens - (math.ceil(len(split_body(req.body)[0]) / cpt) if req.body else 0)
    total = int(max(own, 1) * cpt)
    block_chars = int(block_tokens * cpt)
    blocks: list[str] = []
    used = 0
    for b in req.prefix_blocks:
        if used + block_chars > total:
            break
        blocks.append(_block_text(b, block_chars))
        used += block_chars
    marker = f" [[emulator:output_tokens={req.output_tokens}]]"
    # The tail starts with a digest of the request's identity, so lines that share blocks share no text after
    # them (a block's text starts "[block"; the digest holds no "["): a cache of one-token granularity (Gemini's)
    # reads their blocks alone, as the cost model splits them. Begun with the id, the common start of two ids
    # ("gemini-4-argon-s") was read too, billed at 0.1x where the simulator priced it plain (a parity hunt).
    # Four characters of two digests agree once in 64**4 pairs.
    tag = base64.urlsafe_b64encode(hashlib.blake2b(req.uid.encode(), digest_size=6).digest()).decode()
    head = f"{tag} [{req.id}] {prompt}"[: max(total - used - len(marker), 1)]
    tail = head + marker
    tail += _filler(total - used - len(tail), req.id)
    return blocks, tail


def tokens_of(text: str, chars_per_token: float) -> int:
    return math.ceil(len(text) / chars_per_token)


def tokens(value) -> int:
    """A token count from a provider's usage: never below 0. A negative one was priced as a negative cost, and
    the ledgers took it as spend given back, letting a hard limit be overrun (a helper's hunt)."""
    n = int(value or 0)
    return n if n > 0 else 0


def call_timeout(client: Any, sdk: Any, seconds: float) -> Any:
    """A call's own ``seconds`` (a flex call's, a count's, a download's) as a timeout of ``client`` (of ``sdk``'s),
    its connect still bounded by the client's (``connect_timeout_s``), if that is shorter. Given as a float, the SDK
    took it for the connect too: an unreachable endpoint held a flex call 900 s, not 5 (a review, stop 78)."""
    connect = getattr(client.timeout, "connect", None)
    return sdk.Timeout(seconds, connect=seconds if connect is None else min(connect, seconds))


async def paced(chunks: AsyncIterator[bytes], headers: Mapping[str, str], settings: Any,
                endpoint: Any) -> AsyncIterator[bytes]:
    """A results file's ``chunks``, cut (``asyncio.TimeoutError``, a try the dispatcher makes again) once the file
    has taken longer than its ``content-length`` at ``batch_results_min_kib_s``, and ``timeout_s`` more: its true
    size, where the dispatcher's bound of a try is its lines' caps (``ResultsReads._read_bound_s``), for a text
    batch sent without ``max_output_tokens`` days at the floor rate, each held that long by a trickle. A length
    is the bytes on the wire, compressed or not; none given, that bound alone."""
    length = headers.get("content-length", "")
    loop = asyncio.get_running_loop()
    end = (loop.time() + endpoint.timeout_s + int(length) / (settings.batch_results_min_kib_s * 1024)
           if length.isdigit() else None)
    async for chunk in chunks:
        if end is not None and loop.time() > end:
            raise asyncio.TimeoutError(f"a results file of {length} bytes read slower than "
                                       f"batch_results_min_kib_s={settings.batch_results_min_kib_s:g}")
        yield chunk


def broke_at(req: Request, body: dict | None) -> tuple[int, ...]:
    """The depths (leading prefix blocks) at which an Anthropic ``body`` of ``req`` breaks, where the engine
    rendered its prompt (``AnthropicProvider.body``: a text block a prefix block, then the tail); none for a body
    the caller wrote as messages, or one not known."""
    if body is None or "messages" in as_messages(dict(req.body or {}), "anthropic", "chat"):
        return ()
    msgs = body.get("messages")
    content = msgs[-1].get("content") if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else None
    if not isinstance(content, list):
        return ()
    return tuple(k + 1 for k, c in enumerate(content[:-1]) if isinstance(c, dict) and "cache_control" in c)


def entry_blocks(req: Request, cached: int, settings: Any, catalog: Any) -> int:
    """How many of ``req``'s leading prefix blocks an Anthropic entry of ``cached`` tokens (its usage's read, or
    read and write) covers, in the body ``message_parts`` renders. What a body puts before the blocks counts in the
    usage too: its tools, the system prompt Anthropic adds for them (``catalog``'s ``tool_prompt``) and its system
    text. Taken for prefix blocks, a 2-token system made a read of two blocks (1,026 tokens) three, an entry never
    written, and the next call marked it and paid a write the policy priced plain (a review of stop 86); a tool
    did so too (a review of ``fid86``). Rounded to the nearest block, as a real tokenizer counts the blocks and
    the head near, not exactly, what the renderer estimated. None where the body renders no block (a body of
    messages, one whose own marks leave the engine none, any body outside a replay): what it read is its own."""
    bt, cpt = settings.prefix_block_tokens, settings.chars_per_token
    if not mark_room(req.body) or not renders_blocks(req, cpt, settings.providers.replay):
        return 0
    head = 0
    if req.body:
        body = as_messages(dict(req.body), "anthropic", "chat")
        head = (math.ceil(len(split_body(body)[0]) / cpt) + math.ceil(tool_chars(body) / cpt)  # as the emulator
                + tool_prompt_tokens(body, catalog.tool_prompt(req.provider, req.model)))
    return max(cached - head + bt // 2, 0) // bt
