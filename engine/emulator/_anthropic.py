"""Anthropic wire format: messages (whole, or streamed: ``_anthropic_stream``) and Message Batches.

Bodies follow the official SDK's types (anthropic/types), so ``Anthropic(base_url=...)`` parses them unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.core._api_fields import MIN_THINKING_BUDGET
from engine.emulator._anthropic_stream import stream_reply
from engine.emulator._anthropic_tools import check_tool_turns, check_tools, forced, tool_input
from engine.emulator._batches import MemberOutcome, MessageBatch, Schedule, newest_first
from engine.emulator._core import Core, TextCall
from engine.emulator._faults import FaultPlan
from engine.emulator._fields import check_fields
from engine.emulator._routing import Ctx, Route, route
from engine.emulator._schema import answer_of
from engine.emulator._text import anthropic_prompt, forced_tool
from engine.emulator._wire import ApiError, Reply, error_object, json_reply

__all__ = ["ROUTES", "message_result"]

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def message_result(core: Core, provider: str, body: dict, mode: str, at: float | None = None
                   ) -> tuple[TextCall, dict[str, Any]]:
    """One message: the call (priced, cache updated) and the response body. Bills nothing. ``body`` without
    ``stream: true``: a sync call's is taken out by ``_messages``; a Message Batch's request cannot stream."""
    if body.get("stream"):
        raise ApiError(400, "stream=true is not supported in a Message Batch's params; send stream=false (or omit "
                       "it)", param="stream")
    check_fields("messages", body, "anthropic")  # the SDK's MessageCreateParams (``_fields``)
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or set(meta) - {"user_id"}):
        raise ApiError(400, "metadata: only user_id is permitted", param="metadata")
    stops = body.get("stop_sequences")
    if isinstance(stops, list) and any(isinstance(s, str) and not s.strip() for s in stops):
        raise ApiError(400, "stop_sequences: each stop sequence must contain non-whitespace", param="stop_sequences")
    top_k = body.get("top_k")
    if top_k is not None and (type(top_k) is not int or top_k < 0):
        raise ApiError(400, f"top_k: Input should be an integer greater than or equal to 0, got {top_k!r}",
                       param="top_k")
    p, spec = core.model(provider, body.get("model"), "text")
    if body.get("max_tokens") is None:
        raise ApiError(400, "max_tokens: Field required", param="max_tokens")
    if spec.adaptive_only:
        _adaptive(body)
    _budget(body)
    choice = body.get("tool_choice")
    if not spec.forced_tool_choice and isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        raise ApiError(400, f"tool_choice.type: forcing tool use ({choice['type']!r}) is not supported for this model "
                       f"({body['model']}); use tool_choice.type 'auto' or 'none'", param="tool_choice")
    check_tools(body.get("tools"))
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    for k, m in enumerate(messages):
        if isinstance(m, dict) and m.get("content") in ("", []) and not (
                m.get("role") == "assistant" and k == len(messages) - 1):
            raise ApiError(400, f"messages.{k}: all messages must have non-empty content except for the optional "
                           "final assistant message", param=f"messages.{k}")
    _system_messages(messages, spec.mid_conversation_system)
    check_tool_turns(body.get("messages"))
    prompt = anthropic_prompt(body, spec.image_input or p.image_input, spec.tool_prompt or p.tool_prompt)
    tool = forced_tool(body)
    call = core.text_call(p, spec, body["model"], prompt, body["max_tokens"], "max_tokens", mode, at,
                          answer=answer_of(body, "anthropic", text=tool is None or not forced(body)))
    # A forced call is the whole answer (no text before it), its input what the tool's schema requires.
    out = {
        "id": core.new_id("msg_"), "type": "message", "role": "assistant", "model": body["model"],
        "content": [*([] if tool is not None and forced(body) else [{"type": "text", "text": call.text,
                                                                      "citations": None}]),
                    *([] if tool is None else [{"type": "tool_use", "id": core.new_id("toolu_"), "name": tool,
                                                "input": tool_input(call.args)}])],
        "stop_reason": "max_tokens" if call.capped else "end_turn" if tool is None else "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": call.split.plain, "output_tokens": call.output_tokens,
                  "cache_creation_input_tokens": call.split.write, "cache_read_input_tokens": call.split.read,
                  "cache_creation": {"ephemeral_5m_input_tokens": call.split.write - call.split.write_1h,
                                     "ephemeral_1h_input_tokens": call.split.write_1h},
                  "service_tier": "batch" if mode == "batch_api" else "standard"},
    }
    return call, out


def _budget(body: dict) -> None:
    """A manual thinking budget: a whole number of at least 1,024, and below max_tokens but where interleaved
    thinking with tools lets it reach past the cap."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if type(budget) is not int or budget < MIN_THINKING_BUDGET:
        raise ApiError(400, f"thinking.enabled.budget_tokens: Input should be greater than or equal to "
                       f"{MIN_THINKING_BUDGET}", param="thinking.budget_tokens")
    cap = body["max_tokens"]
    if not body.get("tools") and type(cap) is int and budget >= cap:
        raise ApiError(400, "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our "
                       "documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking",
                       param="max_tokens")


def _adaptive(body: dict) -> None:
    """What a Claude model that thinks adaptively only (Sonnet 5 on) answers 400 to."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        raise ApiError(400, f"thinking.type.enabled is not supported for this model ({body['model']}). Use "
                       "thinking.type.adaptive and output_config.effort to control thinking behavior.",
                       param="thinking")
    for key, default in (("temperature", (None, 1)), ("top_p", (None, 1)), ("top_k", (None,))):
        if body.get(key) not in default:
            raise ApiError(400, f"{key}: setting {key} to a non-default value is not supported for this model "
                           f"({body['model']}); remove it", param=key)


def _system_messages(messages: list, mid: bool) -> None:
    """A message of role system: the API's mid-conversation system message, taken only at a model that takes it
    (``mid``), never first, right after a user turn (or an assistant one ending in a server tool use), then last
    or before an assistant turn; elsewhere the system prompt is the top-level ``system``."""
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "system":
            continue
        if not mid:
            raise ApiError(400, f"messages.{k}.role: Unexpected role \"system\". This model takes the system prompt "
                           "as the top-level `system` parameter, not as a message", param=f"messages.{k}.role")
        if k == 0:
            raise ApiError(400, "messages.0: the initial system prompt goes in the top-level `system` parameter",
                           param="messages.0")
        before, after = messages[k - 1], messages[k + 1] if k + 1 < len(messages) else None
        content = before.get("content") if isinstance(before, dict) else None
        server_tool = isinstance(content, list) and content and isinstance(content[-1], dict) \
            and content[-1].get("type") == "server_tool_use"
        if not isinstance(before, dict) or not (before.get("role") == "user" or before.get("role") == "assistant"
                                                and server_tool):
            raise ApiError(400, f"messages.{k}: role 'system' must follow a 'user' message (or an 'assistant' "
                           "message ending in a server tool use)", param=f"messages.{k}")
        if after is not None and not (isinstance(after, dict) and after.get("role") == "assistant"):
            raise ApiError(400, f"messages.{k}: role 'system' must precede an 'assistant' message or end the array",
                           param=f"messages.{k}")


def _messages(ctx: Ctx) -> Reply:
    core, body = ctx.core, ctx.json()
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise ApiError(400, f"stream: Input should be a valid boolean, got {stream!r}", param="stream")
    call, out = message_result(core, ctx.provider, {k: v for k, v in body.items() if k != "stream"}, "sync")
    latency = core.text_latency_s(core.catalog.provider(ctx.provider), call.model, call)
    if stream:
        return stream_reply(core, ctx, call, out, latency)
    core.wait(latency)
    # Only once the answer is ready.
    core.bill_text(call, "sync", ctx.route, ctx.request_id, idempotency_key=ctx.headers.get("idempotency-key"))
    return json_reply("anthropic", 200, out, ctx.request_id)


def _count_tokens(ctx: Ctx) -> Reply:
    """The input tokens of a Messages body, by the same estimate ``message_result`` bills (``anthropic_prompt``):
    all of it, whether a call would read it from the prompt cache, write it there or neither, as Anthropic counts.
    Free, as Anthropic's count is: nothing billed, the prompt cache untouched."""
    body = ctx.json()
    # MessageCountTokensParams: a Messages body without its cap, sampling, stop or metadata fields
    check_fields("messages.count_tokens", body, "anthropic")
    p, spec = ctx.core.model(ctx.provider, body.get("model"), "text")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: Field required (a non-empty list)", param="messages")
    check_tools(body.get("tools"))
    check_tool_turns(messages)
    prompt = anthropic_prompt(body, spec.image_input or p.image_input, spec.tool_prompt or p.tool_prompt)
    return json_reply("anthropic", 200, {"input_tokens": prompt.tokens}, ctx.request_id)


def _create(ctx: Ctx) -> Reply:
    body, core = ctx.json(), ctx.core
    check_fields("messages.batches.create", body, "anthropic")
    reqs = body.get("requests")
    if not isinstance(reqs, list) or not reqs:
        raise ApiError(400, "requests: must be a non-empty list of {custom_id, params}", param="requests")
    p = core.catalog.provider(ctx.provider)
    if not p.supports_batch_api("text", "") or p.batch_api is None:
        raise ApiError(400, f"provider {ctx.provider} declares no batch API in the catalog")
    if len(reqs) > p.batch_api.max_requests:
        raise ApiError(400, f"a batch holds at most {p.batch_api.max_requests} requests, got {len(reqs)}")
    size = len(ctx.body)
    if p.batch_api.max_file_mb is not None and size > p.batch_api.max_file_mb * 2**20:
        raise ApiError(413, f"a batch may weigh at most {p.batch_api.max_file_mb:g} MB; this one is "
                       f"{size:,} bytes")
    members: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for i, r in enumerate(reqs):
        cid = r.get("custom_id") if isinstance(r, dict) else None
        params = r.get("params") if isinstance(r, dict) else None
        if not isinstance(cid, str) or not _CUSTOM_ID.fullmatch(cid):
            raise ApiError(400, f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$, got {cid!r}")
        if cid in seen:
            raise ApiError(400, f"requests.{i}.custom_id: {cid!r} is used more than once; custom_ids must be "
                           "unique")
        if not isinstance(params, dict):
            raise ApiError(400, f"requests.{i}.params: must be an object")
        # The request's own keys are checked here; its params only when it runs: the batch guide says they are
        # validated asynchronously, their errors coming back in the results once the batch has ended.
        check_fields("messages.batches.request", r, "anthropic", f"requests.{i}.")
        seen.add(cid)
        members.append((cid, params))
    now = core.now()
    turnaround = core.draw_turnaround(p)
    fraction = ctx.faults.take_expiry()
    nominal = now + p.batch_api.completion_window_s
    bid = core.new_id("msgbatch_")
    batch = MessageBatch(
        id=bid, provider=ctx.provider, members=members, created_at=now,
        schedule=Schedule(now, turnaround, len(members), core.members_together),
        expire_at=nominal if fraction is None else now + turnaround * fraction, expires_at=nominal,
        cancel_s=core.cancel_s, results_url=f"{ctx.origin}/{ctx.provider}/v1/messages/batches/{bid}/results")
    with core.lock:
        core.batches[bid] = batch
        core.advancers[bid] = lambda t: _advance(core, ctx.faults, batch, t)
        return json_reply("anthropic", 200, batch.view(now), ctx.request_id)


def _advance(core: Core, faults: FaultPlan, batch: MessageBatch, now: float) -> None:
    """Run the members due by ``now``; called under ``core.lock``."""
    def run(cid: str, params: dict, at: float) -> MemberOutcome:
        rid = core.new_id("req_")
        if faults.member_fails(cid):
            err = ApiError(500, "Internal server error (injected member fault).")
            return MemberOutcome(False, 500, error_object("anthropic", err, rid), rid, "api_error", err.message)
        try:
            call, out = message_result(core, batch.provider, params, "batch_api", at)
        except ApiError as err:
            return MemberOutcome(False, err.status, error_object("anthropic", err, rid), rid,
                                 err.code or "invalid_request_error", err.message)
        core.bill_text(call, "batch_api", "messages.batches", rid, cid)
        return MemberOutcome(True, 200, out, rid)

    batch.advance(now, run)


def _batch(ctx: Ctx) -> MessageBatch:
    batch = ctx.core.batches.get(ctx.params["batch_id"])
    if not isinstance(batch, MessageBatch) or batch.provider != ctx.provider:
        raise ApiError(404, f"No message batch with id {ctx.params['batch_id']!r}")
    return batch


def _retrieve(ctx: Ctx) -> Reply:
    with ctx.core.lock:  # one advance at a time, so a member is never run (or billed) twice
        batch, now = _batch(ctx), ctx.core.now()
        _advance(ctx.core, ctx.faults, batch, now)
        return json_reply("anthropic", 200, batch.view(now), ctx.request_id)


def _cancel(ctx: Ctx) -> Reply:
    with ctx.core.lock:
        batch, now = _batch(ctx), ctx.core.now()
        _advance(ctx.core, ctx.faults, batch, now)
        if batch.status(now) == "in_progress":
            batch.cancel_at = now
            _advance(ctx.core, ctx.faults, batch, now)
        return json_reply("anthropic", 200, batch.view(now), ctx.request_id)


def _results(ctx: Ctx) -> Reply:
    with ctx.core.lock:
        batch, now = _batch(ctx), ctx.core.now()
        _advance(ctx.core, ctx.faults, batch, now)
        if batch.status(now) != "ended":
            raise ApiError(400, f"Message Batch {batch.id} has not yet ended; results are available once "
                           "processing_status is 'ended'")
        data = "".join(ctx.faults.result_line(r.get("custom_id"), json.dumps(
            ctx.faults.keyed(r.get("custom_id"), r, "custom_id"), separators=(",", ":"))) + "\n"
                       for r in batch.results).encode()
    return Reply(200, {"content-type": "application/x-jsonl", "request-id": ctx.request_id}, data)


def _list(ctx: Ctx) -> Reply:
    """Newest first, up to 1,000 at a time after the cursor ``after_id``, as the Message Batches API lists them."""
    data, more = newest_first(ctx, MessageBatch, "after_id", 1000, _advance)
    return json_reply("anthropic", 200, {"data": data, "has_more": more,
                                         "first_id": data[0]["id"] if data else None,
                                         "last_id": data[-1]["id"] if data else None}, ctx.request_id)


ROUTES: list[Route] = [
    route("GET", "/v1/messages/batches", "anthropic", "messages.batches.list", _list),
    route("POST", "/v1/messages", "anthropic", "messages", _messages, generating=True),
    route("POST", "/v1/messages/count_tokens", "anthropic", "messages.count_tokens", _count_tokens),
    route("POST", "/v1/messages/batches", "anthropic", "messages.batches.create", _create, idempotent=True),
    route("GET", "/v1/messages/batches/{batch_id}", "anthropic", "messages.batches.retrieve", _retrieve),
    route("POST", "/v1/messages/batches/{batch_id}/cancel", "anthropic", "messages.batches.cancel", _cancel),
    route("GET", "/v1/messages/batches/{batch_id}/results", "anthropic", "messages.batches.results", _results),
]
