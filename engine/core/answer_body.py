"""The body of an answer in the shape of the API a caller used (OpenAI's chat completions, Responses, images;
Anthropic's Messages): what the endpoint and batch files return for a request, whichever provider made it, or the
cache."""

from __future__ import annotations

import hashlib

from engine.core.request import Request
from engine.core.result import Result
from engine.core.tool_calls import answer_text, as_chat_calls, as_response_items, as_tool_use_blocks

__all__ = ["MESSAGES_URL", "response_body"]

MESSAGES_URL = "/v1/messages"  # Anthropic's Messages API
# How an answer ended (``Result.finish``, in OpenAI chat's words) -> Anthropic's ``stop_reason``.
_STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def _in_shape(url: str, raw: dict) -> bool:
    if url == "/v1/images/generations":
        return isinstance(raw.get("data"), list)
    if url == MESSAGES_URL:
        return raw.get("type") == "message" and isinstance(raw.get("content"), list)
    return raw.get("object") == ("response" if url == "/v1/responses" else "chat.completion")


_TOOL_CHOICES = ("auto", "none", "required")


def _echoed(body: dict) -> dict:
    """What a Responses body repeats of its request, where the request gave it in the Responses API's own shapes
    (a text ``instructions``, function tools with their ``name`` at the top): another shape (a chat or Anthropic
    body the engine took, text parts as instructions) would fail a strict reading of the answer (a review), so
    the defaults stand for it."""
    tools = body.get("tools") or []
    own = "messages" not in body and all(isinstance(t, dict) and t.get("type") == "function" and "name" in t
                                         for t in tools)
    choice = body.get("tool_choice", "auto")
    if not (choice in _TOOL_CHOICES or isinstance(choice, dict) and choice.get("type") == "function"
            and "name" in choice):
        choice = "auto"
    instructions = body.get("instructions")
    return {"instructions": instructions if isinstance(instructions, str) else None,
            "max_output_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
            "top_p": body.get("top_p"), "tools": tools if own else [], "tool_choice": choice if own else "auto"}


def response_body(url: str, req: Request, res: Result, created: int = 0) -> dict:
    """The response body of one line: the provider's raw body when it was called over HTTP and answered in
    ``url``'s shape, else one built in that shape from the result's output, calls, end and usage (simulated
    providers, reuse, and a provider with a wire format of its own, e.g. Anthropic's messages in an OpenAI batch
    file). An answer cut at its cap says so (``finish_reason: "length"``, Responses ``status: "incomplete"``):
    read as finished, an application that continues a cut answer kept it (a hunt)."""
    if res.raw is not None and _in_shape(url, res.raw):
        return res.raw
    usage = res.usage or {}
    n_in, n_out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
    # The input read from and written to the provider's prompt cache (Anthropic's cache_read_input_tokens and
    # cache_creation_input_tokens), under OpenAI's names: a chat answer said neither, so an application that
    # reads usage.prompt_tokens_details.cached_tokens, as OpenAI always sends it, failed or saw no cache.
    read, write = int(usage.get("cache_read", 0)), int(usage.get("cache_write", 0))
    rid = hashlib.sha256(f"{res.uid}".encode()).hexdigest()[:24]
    calls, said, text = res.tool_calls or [], answer_text(res.output, res.tool_calls), res.output or ""
    finish = res.finish or ("tool_calls" if calls else "stop")
    if url == "/v1/images/generations":
        item = {"url": text} if "://" in text else {"b64_json": text}
        return {"created": created, "data": [item]}
    if url == MESSAGES_URL:  # a copy from the cache, or a simulated answer: no provider body to give back
        return _message(req, res, rid, said if calls else text, calls, finish)
    if url == "/v1/responses":  # every field the SDK's Response type requires (strict validation passes)
        cut = finish in ("length", "content_filter")
        status = "incomplete" if cut else "completed"
        return {"id": f"resp_{rid}", "object": "response", "created_at": created, "model": res.model or req.model,
                "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens" if finish == "length" else finish} if cut else None,
                **_echoed(req.body or {}), "metadata": {}, "parallel_tool_calls": True,
                "output": [*([] if calls and said is None else [  # calls alone: no empty message, as the API
                    {"type": "message", "id": f"msg_{rid}", "status": status, "role": "assistant",
                     "content": [{"type": "output_text", "text": said or "", "annotations": []}]}]),
                           *as_response_items(calls)],
                "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out,
                          "input_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
                          "output_tokens_details": {"reasoning_tokens": 0}}}
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": res.model or req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": said if calls else text,
                                                 **({"tool_calls": as_chat_calls(calls)} if calls else {})},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out,
                      "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write, "audio_tokens": 0},
                      # OpenAI always sends it, every key: usage.completion_tokens_details.reasoning_tokens was an
                      # AttributeError on None for a Claude model's answer or a copy (a helper's tour), and a copy
                      # of an OpenAI answer read None where the answer it copied said 0 (a user's tour)
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0,
                                                    "rejected_prediction_tokens": 0}}}


def _message(req: Request, res: Result, rid: str, text: str | None, calls: list[dict], finish: str) -> dict:
    """An Anthropic Message built from the result. Its ``usage.input_tokens`` is the input neither read from nor
    written to the prompt cache, as Anthropic counts it (the result's counts every input token). A stop at one of
    the request's ``stop_sequences`` reads as ``end_turn``: the result keeps no word of which one it was."""
    usage = res.usage or {}
    read, write = int(usage.get("cache_read", 0)), int(usage.get("cache_write", 0))
    content = ([{"type": "text", "text": text}] if text or not calls else []) + as_tool_use_blocks(calls)
    return {"id": f"msg_{rid}", "type": "message", "role": "assistant", "model": res.model or req.model,
            "content": content, "stop_reason": _STOP_REASON.get(finish, "end_turn"), "stop_sequence": None,
            "usage": {"input_tokens": max(int(usage.get("input_tokens", 0)) - read - write, 0),
                      "output_tokens": int(usage.get("output_tokens", 0)),
                      "cache_creation_input_tokens": write, "cache_read_input_tokens": read}}
