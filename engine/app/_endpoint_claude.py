"""A chat completions body for a model called through Anthropic's Messages API (the default catalog's Claude
models): the OpenAI fields an OpenAI-SDK application sends that have a Messages counterpart go under that name.
They were refused ("Anthropic's is stop_sequences"), so an application could not change only its ``model`` to a
Claude one (a helper's tour). Messages, a system message among them, ``max_tokens``, ``temperature`` and
``top_p`` pass as they are; the answer comes back in the chat shape (``answer_body.response_body``: Anthropic's
``stop_reason`` as ``finish_reason``, its usage as ``prompt_tokens`` with the cached input counted).

Renamed here, at the endpoint, where the body is known to be OpenAI's; a driver's or a batch file's body to a Claude
model is the caller's own and keeps its refusals. A field with no counterpart (``seed``, ``logprobs``,
``response_format`` ...) stays refused by the engine, naming it and the fix, never dropped: it changes the
answer."""

from __future__ import annotations

from typing import Any

from engine.app._endpoint_wire import ApiError
from engine.core.catalog import Catalog
from engine.core.errors import CatalogError
from engine.core.settings import Settings

__all__ = ["for_messages_api", "in_callers_words"]


def _wire(model: Any, catalog: Catalog, settings: Settings) -> str | None:
    """The wire format ``model``'s provider is called in, or None (unknown: the engine says why)."""
    try:
        provider, _ = catalog.find_model(model) if isinstance(model, str) else (None, None)
    except CatalogError:
        return None
    endpoint = settings.providers.endpoints.get(provider) if provider else None
    return endpoint.api if endpoint is not None else None


def for_messages_api(body: dict[str, Any], catalog: Catalog, settings: Settings) -> tuple[dict[str, Any],
                                                                                        dict[str, str]]:
    """``body`` with its OpenAI fields under their Messages names when its model is called through Anthropic's
    Messages API (else as it is), and which Messages field came from which of the caller's (for an error's
    ``param``). ``stop`` -> ``stop_sequences`` (a string as a list of one), ``max_completion_tokens`` ->
    ``max_tokens``, ``user`` -> ``metadata.user_id``; ``store`` false (OpenAI's keeping of the completion, which
    Messages has no field for) is left out, true is a 400."""
    if _wire(body.get("model"), catalog, settings) != "anthropic":
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
        out["metadata"], came["metadata"] = {"user_id": user}, "user"
    store = out.pop("store", None)
    if store:
        raise ApiError(400, "store=true asks OpenAI to keep the completion, which Anthropic's Messages API does "
                            "not: leave it out for a Claude model", param="store")
    return out, came


def in_callers_words(exc: ApiError, came: dict[str, str]) -> ApiError:
    """``exc`` with the fields ``for_messages_api`` renamed (``came``) named as the caller sent them: the param
    was the caller's, but the engine's message named the Messages field ("field 'body.max_tokens': ...") that the
    caller never sent (a review)."""
    if exc.param not in came.values():
        return exc
    for new, old in came.items():
        exc.message = exc.message.replace(f"body.{new}", old)
    exc.args = (exc.message,)
    return exc
