"""A chat completions body for a model called through Anthropic's Messages API (the default catalog's Claude
models): the OpenAI fields an OpenAI-SDK application sends that have a Messages counterpart go under that name.
They were refused ("Anthropic's is stop_sequences"), so an application could not change only its ``model`` to a
Claude one (a helper's tour). The leading system (and developer) messages go as Messages' top-level ``system``,
where every Claude model takes them (sent among the messages, the provider refused them); a later one stays where
it is, Anthropic's mid-conversation system message, which the engine refuses per request at a model that takes
none there (``ModelSpec.mid_conversation_system``) or where it does not follow a user turn; the other messages,
``max_tokens``, ``temperature`` and ``top_p`` pass as they are; the answer comes back in the chat shape
(``answer_body.response_body``: Anthropic's ``stop_reason`` as ``finish_reason``, its usage as ``prompt_tokens``
with the cached input counted).

Function calling too (``_endpoint_claude_tools``): OpenAI's function ``tools``, ``tool_choice`` and
``parallel_tool_calls``, an assistant's ``tool_calls`` and the ``role: tool`` messages that answer them, and image
parts go in Anthropic's shapes; the answer's ``tool_use`` blocks come back as ``tool_calls``
(``engine.core.tool_calls``). They were refused, so an application that calls functions could not switch.

Renamed here, at the endpoint, where the body is known to be OpenAI's; a driver's or a batch file's body to a Claude
model is the caller's own and keeps its refusals. A field with no counterpart (``seed``, ``logprobs``,
``response_format`` ...) stays refused by the engine, naming it and the fix, never dropped: it changes the
answer. Every field the translation moved is recorded (``came``), so a refusal names the caller's field."""

from __future__ import annotations

import re
from typing import Any

from engine.app._endpoint_claude_tools import claude_messages, claude_system, claude_tools
from engine.app._endpoint_wire import ApiError
from engine.core._callers import callers_field
from engine.core._checks import FieldProblem
from engine.core.catalog import Catalog, ModelSpec
from engine.core.errors import CatalogError
from engine.core.settings import Settings

__all__ = ["for_messages_api", "in_callers_words", "wire_of"]


def wire_of(model: Any, catalog: Catalog, settings: Settings) -> tuple[str | None, ModelSpec | None]:
    """The wire format ``model``'s provider is called in and the model's entry, or None (unknown: the engine says
    why)."""
    try:
        provider, spec = catalog.find_model(model) if isinstance(model, str) else (None, None)
    except CatalogError:
        return None, None
    endpoint = settings.providers.endpoints.get(provider) if provider else None
    return (endpoint.api if endpoint is not None else None), spec


def for_messages_api(body: dict[str, Any], catalog: Catalog, settings: Settings) -> tuple[dict[str, Any],
                                                                                        dict[str, str]]:
    """``body`` with its OpenAI fields under their Messages names when its model is called through Anthropic's
    Messages API (else as it is), and which Messages field came from which of the caller's (for an error's
    ``param``). ``stop`` -> ``stop_sequences`` (a string as a list of one), ``max_completion_tokens`` ->
    ``max_tokens``, ``user`` -> ``metadata.user_id``; ``store`` false (OpenAI's keeping of the completion, which
    Messages has no field for) is left out, true is a 400; function calling and images, ``_endpoint_claude_tools``.
    ``came`` maps a Messages path (dotted, ``messages.2.content.1``) to the caller's."""
    api, spec = wire_of(body.get("model"), catalog, settings)
    if api != "anthropic" or spec is None:
        return body, {}
    out, came = dict(body), {}
    stop = out.pop("stop", None)
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or "stop_sequences" in out:
            raise ApiError(400, f"stop {str(stop)[:60]!r} must be a string or a list of strings (given without "
                                "stop_sequences): it goes to Anthropic as stop_sequences", param="stop")
        out["stop_sequences"], came["stop_sequences"] = stop, "stop"
    cap = out.pop("max_completion_tokens", None)
    if cap is not None:
        if out.get("max_tokens") is not None:
            raise ApiError(400, "give max_completion_tokens or max_tokens, not both: they are one cap, Anthropic's "
                                "max_tokens", param="max_completion_tokens")
        out["max_tokens"], came["max_tokens"] = cap, "max_completion_tokens"
    user = out.pop("user", None)
    if user is not None:
        if not isinstance(user, str) or out.get("metadata") is not None:
            raise ApiError(400, "user must be a string, given without metadata: it goes to Anthropic as "
                                "metadata.user_id", param="user")
        out["metadata"], came["metadata"], came["metadata.user_id"] = {"user_id": user}, "user", "user"
    store = out.pop("store", None)
    if store:
        raise ApiError(400, "store=true asks OpenAI to keep the completion, which Anthropic's Messages API does "
                            "not: leave it out for a Claude model", param="store")
    try:
        claude_tools(out, came, spec.forced_tool_choice)
        if isinstance(out.get("messages"), list):
            out["messages"], lead = claude_messages(out["messages"], came)
            system = claude_system(out.pop("system", None), lead, came)
            if system is not None:
                out["system"] = system
    except FieldProblem as exc:
        raise ApiError(400, str(exc), param=exc.field) from None
    return out, came


_PATH = re.compile(r"\bbody\.([A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*)")


def in_callers_words(exc: ApiError, came: dict[str, str]) -> ApiError:
    """``exc`` with the fields ``for_messages_api`` moved (``came``) named as the caller sent them: the param
    was the caller's, but the engine's message named the Messages field ("field 'body.max_tokens': ...") that the
    caller never sent (a review); a path into a translated message or tool too."""
    if not came:
        return exc

    def name(m: re.Match) -> str:
        old = callers_field(m.group(1), came)
        return m.group(0) if old == m.group(1) else old

    exc.message = _PATH.sub(name, exc.message)
    exc.args = (exc.message,)
    return exc
