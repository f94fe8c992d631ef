"""OpenAI wire format: chat completions, Responses, image generations and files.

Bodies follow the official SDK's types (openai/types), so ``OpenAI(base_url=...)`` parses them unchanged.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import struct
import zlib
from typing import Any, NamedTuple

from engine.core.catalog import ModelSpec
from engine.core.request import Request
from engine.emulator._bill import BilledItem
from engine.emulator._core import EMULATED_AUTO_QUALITY, BillMode, Core, TextCall
from engine.emulator._fields import check_fields
from engine.emulator._gemini import gemini_image, gemini_image_answer, gemini_thoughts, gemini_usage
from engine.emulator._routing import Ctx, Route, route
from engine.emulator._schema import answer_of
from engine.emulator._text import chat_prompt, forced_tool, responses_prompt
from engine.emulator._wire import ApiError, Reply, json_reply

__all__ = ["ROUTES", "ImageCall", "chat_result", "form_names", "image_result", "multipart", "responses_result"]

_FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def _png_1x1() -> bytes:
    """A valid 1x1 transparent PNG, built rather than pasted so its checksums are right by construction."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00\x00"))
            + chunk(b"IEND", b""))


_PNG_B64 = base64.b64encode(_png_1x1()).decode()


def _no_stream(body: dict) -> None:
    if body.get("stream"):
        raise ApiError(400, "stream=true is not supported by the emulator; send stream=false (or omit it)",
                       param="stream")


def _cap(body: dict, *names: str) -> tuple[Any, str]:
    for name in names:
        if body.get(name) is not None:
            return body[name], name
    return None, names[0]


def _sampling(body: dict, spec: ModelSpec) -> None:
    """OpenAI's ranges, and what its reasoning models refuse (max_tokens; a temperature or top_p but 1 while they
    reason)."""
    if spec.reasoning and body.get("max_tokens") is not None:
        raise ApiError(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                       "'max_completion_tokens' instead.", param="max_tokens", code="unsupported_parameter")
    effort = spec.effort(body)
    if spec.reasoning and spec.efforts is not None and effort not in spec.efforts:
        param = "reasoning_effort" if body.get("reasoning_effort") else "reasoning.effort"
        raise ApiError(400, f"Unsupported value: '{param}' does not support {effort!r} with this model. Supported "
                       f"values are: {', '.join(repr(e) for e in spec.efforts)}.", param=param,
                       code="unsupported_value")
    for key, hi in (("temperature", 2), ("top_p", 1)):
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
            raise ApiError(400, f"Invalid '{key}': expected a number between 0 and {hi}, got {v!r}.", param=key,
                           code="invalid_value")
        if v != 1 and spec.fixed_sampling(body):
            raise ApiError(400, f"Unsupported value: '{key}' does not support {v!r} with this model. Only the "
                           "default (1) value is supported.", param=key, code="unsupported_value")


def _prompt_details(call: TextCall) -> dict[str, int]:
    return {"cached_tokens": call.split.read, "cache_write_tokens": call.split.write, "audio_tokens": 0}


def chat_result(core: Core, provider: str, body: dict, mode: str, at: float | None = None
                ) -> tuple[TextCall, dict[str, Any]]:
    """One chat completion: the call (priced, cache updated) and the response body. Bills nothing."""
    if core.catalog.providers[provider].compat is None:  # Google's layer checks its own fields (gemini_thoughts)
        check_fields("chat.completions", body, "openai")
    _no_stream(body)
    p, spec = core.model(provider, body.get("model"), "text")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "the emulator answers n=1 only", param="n")
    # Parsed before the cap, so a bad body is reported as such.
    prompt = chat_prompt(body, spec.image_input or p.image_input, spec.tool_prompt or p.tool_prompt)
    thoughts = gemini_thoughts(body, spec) if p.compat == "gemini" else 0
    _sampling(body, spec)
    cap, cap_param = _cap(body, "max_completion_tokens", "max_tokens")
    call = core.text_call(p, spec, body["model"], prompt, cap, cap_param, mode, at, thoughts, answer_of(body, "chat"))
    message: dict[str, Any] = {"role": "assistant", "content": call.text, "refusal": None, "annotations": []}
    finish = "length" if call.capped else "stop"
    if (tool := forced_tool(body)) is not None:  # the text, then the call (the API may send both)
        message["tool_calls"] = [{"id": core.new_id("call_"), "type": "function",
                                  "function": {"name": tool, "arguments": call.args or ""}}]
        finish = "length" if call.capped else "tool_calls"  # arguments cut at the cap are not a call
    out = {
        "id": core.new_id("chatcmpl-"), "object": "chat.completion",
        "created": int(core.now() if at is None else at),
        "model": body["model"], "system_fingerprint": "fp_emulator", "service_tier": _served(mode),
        "choices": [{"index": 0, "finish_reason": finish, "logprobs": None, "message": message}],
        "usage": {"prompt_tokens": call.input_tokens, "completion_tokens": call.output_tokens,
                  "total_tokens": call.input_tokens + call.output_tokens,
                  "prompt_tokens_details": _prompt_details(call),
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0,
                                                "rejected_prediction_tokens": 0}},
    }
    if p.compat == "gemini":
        out["usage"] = gemini_usage(call.input_tokens, call.split.read, call.output_tokens, call.thoughts)
    return call, out


def responses_result(core: Core, provider: str, body: dict, mode: str, at: float | None = None
                     ) -> tuple[TextCall, dict[str, Any]]:
    """One Responses call (minimal: text in, one output_text message out). Bills nothing."""
    check_fields("responses", body, "openai")
    _no_stream(body)
    p, spec = core.model(provider, body.get("model"), "text")
    prompt = responses_prompt(body, spec.image_input or p.image_input, spec.tool_prompt or p.tool_prompt)
    _sampling(body, spec)
    cap, cap_param = _cap(body, "max_output_tokens")
    call = core.text_call(p, spec, body["model"], prompt, cap, cap_param, mode, at,
                          answer=answer_of(body, "responses"))
    now = core.now() if at is None else at
    out = {
        "id": core.new_id("resp_"), "object": "response", "created_at": now, "completed_at": now,
        "model": body["model"], "status": "incomplete" if call.capped else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if call.capped else None, "error": None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata"), "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "prompt_cache_key": body.get("prompt_cache_key"), "service_tier": _served(mode),
        "output": [{"type": "message", "id": core.new_id("msg_"), "role": "assistant",
                    "status": "incomplete" if call.capped else "completed",
                    "content": [{"type": "output_text", "text": call.text, "annotations": []}]},
                   *_function_calls(core, body, call)],
        "usage": {"input_tokens": call.input_tokens,
                  "input_tokens_details": {"cached_tokens": call.split.read,
                                           "cache_write_tokens": call.split.write},
                  "output_tokens": call.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": call.input_tokens + call.output_tokens},
    }
    return call, out


def _function_calls(core: Core, body: dict, call: TextCall) -> list[dict]:
    tool = forced_tool(body)
    return [] if tool is None else [{"type": "function_call", "id": core.new_id("fc_"), "call_id": core.new_id("call_"),
                                     "name": tool, "arguments": call.args or "",
                                     "status": "incomplete" if call.capped else "completed"}]


def _served(mode: str) -> str:
    return "flex" if mode == "flex" else "default"


def _tier(ctx: Ctx, body: dict) -> BillMode:
    """The call's mode by its ``service_tier``: ``flex`` (batch prices, slower) for a model of the catalog's flex
    block, refused with a 400 naming the field for another model, as OpenAI does; else a standard call. A flex
    call the fault plan refuses (``refuse_flex``) gets OpenAI's 429 "Resource Unavailable", billed nothing."""
    if body.get("service_tier") != "flex":
        return "sync"
    p, _ = ctx.core.model(ctx.provider, body.get("model"), "text")
    if not p.supports_flex(body["model"]):
        flex = sorted(p.flex.models) if p.flex is not None else []
        raise ApiError(400, f"Invalid service_tier 'flex' for model {body['model']!r}: flex processing is "
                       f"available for {flex or 'no model of this provider'}; send 'auto' or 'default'",
                       param="service_tier", code="invalid_value")
    if ctx.faults.take_flex_refusal(ctx.provider):
        raise ApiError(429, "Resource Unavailable: flex processing has no capacity for this request now; try "
                       "again later or send it at the default tier (injected).", code="resource_unavailable")
    return "flex"


def _sync_text(ctx: Ctx, result: Any) -> Reply:
    body = ctx.json()
    mode = _tier(ctx, body)
    call, out = result(ctx.core, ctx.provider, body, mode)
    p = ctx.core.catalog.provider(ctx.provider)
    slow = p.flex.slowdown if mode == "flex" and p.flex is not None else 1.0
    ctx.core.wait(ctx.core.text_latency_s(p, call.model, call) * slow)
    # Billed once the answer is ready: a call cut short by the emulator stopping is never billed.
    ctx.core.bill_text(call, mode, ctx.route, ctx.request_id,
                       idempotency_key=ctx.headers.get("idempotency-key"))
    return json_reply("openai", 200, out, ctx.request_id)


def _chat(ctx: Ctx) -> Reply:
    return _sync_text(ctx, chat_result)


def _responses(ctx: Ctx) -> Reply:
    return _sync_text(ctx, responses_result)


class ImageCall(NamedTuple):
    """One image generation, priced in its mode (billed by the caller): what its bill line and latency need."""

    req: Request
    n: int
    size: str
    cost_usd: float

    def usage(self) -> dict[str, int | str]:
        return {"images": self.n, "size": self.size, "input_tokens": self.req.input_tokens}


def image_result(core: Core, provider: str, body: dict, mode: BillMode) -> tuple[ImageCall, dict[str, Any]]:
    """One image generation: the call (priced in ``mode``: a batch line at the batch API's discount, as the cost
    model prices it) and the response body. Bills nothing and waits for nothing (a batch member runs at its time)."""
    if core.catalog.providers[provider].compat is None:  # Google's layer checks its own fields (gemini_image)
        check_fields("images.generations", body, "openai")
    _no_stream(body)
    p, spec = core.model(provider, body.get("model"), "image")
    if p.compat == "gemini":
        gemini_image(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    n = body.get("n") if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10:
        raise ApiError(400, f"n must be an integer in [1, 10], got {n!r}", param="n")
    table = spec.per_image or spec.gpu_s_per_image or {}
    size = body.get("size") or "auto"
    size = spec.default_size if size == "auto" else size
    if size not in table:
        raise ApiError(400, f"size {size!r} is not offered by {body['model']}; use one of {sorted(table)}",
                       param="size")
    req = core.image_request(p, body["model"], prompt, size, body.get("quality"))
    price = core.image_price(req, mode)  # the prompt's text tokens billed once, beside n images
    out = {"created": int(core.now()), "data": [{"b64_json": _PNG_B64} for _ in range(n)], "size": size,
           "output_format": "png",
           "usage": {"input_tokens": req.input_tokens, "output_tokens": 0, "total_tokens": req.input_tokens,
                     "input_tokens_details": {"text_tokens": req.input_tokens, "image_tokens": 0}}}
    if spec.per_image_quality:  # as OpenAI's answer says which quality it made (its pick, under "auto")
        out["quality"] = req.params.get("quality", EMULATED_AUTO_QUALITY)
    if p.compat == "gemini":
        out = gemini_image_answer(out, n)
    return ImageCall(req, n, size, price.media * n + price.input), out


def _images(ctx: Ctx) -> Reply:
    core = ctx.core
    call, out = image_result(core, ctx.provider, ctx.json(), "sync")
    core.wait(core.image_latency_s(core.catalog.provider(ctx.provider), call.req))  # n images in parallel: one latency
    core.bill(BilledItem(provider=ctx.provider, model=call.req.model, mode="sync", route=ctx.route,
                         request_id=ctx.request_id, idempotency_key=ctx.headers.get("idempotency-key"),
                         usage=call.usage(), cost_usd=call.cost_usd))
    return json_reply("openai", 200, out, ctx.request_id)


def multipart(ctx: Ctx, takes: str = "POST /v1/files takes multipart/form-data with 'purpose' and 'file'"
              ) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart body: name -> (filename, bytes). ``takes``: the error of a body of another type."""
    ctype = ctx.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise ApiError(400, takes)
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + ctx.body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def form_names(fields: dict) -> set[str]:
    """The top-level fields of a form: the SDK sends an object's keys as ``name[key]`` parts (``expires_after[anchor]``)."""
    return {name.partition("[")[0] for name in fields}


def _files_create(ctx: Ctx) -> Reply:
    fields = multipart(ctx)
    check_fields("files.create", form_names(fields), "openai")
    purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace")
    if purpose not in _FILE_PURPOSES:
        raise ApiError(400, f"purpose must be one of {list(_FILE_PURPOSES)}, got {purpose!r}", param="purpose")
    if "file" not in fields:
        raise ApiError(400, "the form needs a 'file' part", param="file")
    filename, data = fields["file"]
    ba = ctx.core.catalog.provider(ctx.provider).batch_api
    if purpose == "batch" and ba is not None and ba.max_file_mb is not None and len(data) > ba.max_file_mb * 2**20:
        raise ApiError(400, f"a batch input file may be at most {ba.max_file_mb:g} MB; this one is "
                       f"{len(data):,} bytes", param="file")
    rec = ctx.core.add_file(filename or "upload", purpose, data)
    return json_reply("openai", 200, rec.view(), ctx.request_id)


def _files_retrieve(ctx: Ctx) -> Reply:
    return json_reply("openai", 200, ctx.core.file(ctx.params["file_id"]).view(), ctx.request_id)


def _files_delete(ctx: Ctx) -> Reply:
    """As OpenAI's ``DELETE /v1/files/{file_id}``: gone at once; a batch that names it as its input keeps what it
    read at its create (its members and results), and its content can no longer be read."""
    rec = ctx.core.drop_file(ctx.params["file_id"])
    return json_reply("openai", 200, {"id": rec.id, "object": "file", "deleted": True}, ctx.request_id)


def _files_content(ctx: Ctx) -> Reply:
    rec = ctx.core.file(ctx.params["file_id"])
    return Reply(200, {"content-type": "application/octet-stream", "x-request-id": ctx.request_id}, rec.data)


ROUTES: list[Route] = [
    route("POST", "/v1/chat/completions", "openai", "chat.completions", _chat, generating=True),
    route("POST", "/v1/responses", "openai", "responses", _responses, generating=True),
    route("POST", "/v1/images/generations", "openai", "images.generations", _images, generating=True),
    route("POST", "/v1/files", "openai", "files.create", _files_create),
    route("GET", "/v1/files/{file_id}", "openai", "files.retrieve", _files_retrieve),
    route("GET", "/v1/files/{file_id}/content", "openai", "files.content", _files_content),
    route("DELETE", "/v1/files/{file_id}", "openai", "files.delete", _files_delete),
]
