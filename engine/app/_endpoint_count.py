"""Anthropic's token count, ``POST /v1/messages/count_tokens`` (the SDK's ``client.messages.count_tokens``):
``{"input_tokens": N}`` for a Messages body without ``max_tokens``. Before, it was a 404.

Anthropic's count is free, and exact only at Anthropic: the engine's own estimate (``chars_per_token``) can be
off either way. So the body goes, as it came, to the dispatcher of the model's provider (``engine.count_tokens``),
which asks Anthropic with the client and key it already holds (the SDK's retries off, a timeout; the key read
from the driver's environment when the engine started, so the endpoint's own process needs none: on a cluster
``serve --address`` attached to, its replica may not have the variable). The answer, or Anthropic's error at its
status, comes back as it is. The key is never logged, and never in an answer: a provider's message that quoted
it is masked. A count is not a request of the engine: nothing is billed, budgeted, cached or journaled, and no
deadline or priority applies. Where the provider is not called over HTTP (the simulated providers of
``providers.mode=sim``) there is nobody to count exactly, and the count is refused saying so (a 501)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from engine.app._endpoint_messages import AnthropicError, claude_model, in_anthropic_shape
from engine.app._endpoint_wire import ApiError, AsyncEngine, json_body
from engine.core.catalog import Catalog
from engine.core.errors import CatalogError, EngineStopped, ProviderError
from engine.core.settings import Settings

__all__ = ["COUNT_URL", "count_router"]

COUNT_URL = "/v1/messages/count_tokens"


async def counted(engine: AsyncEngine, provider: str, body: dict[str, Any]) -> JSONResponse:
    """``engine``'s count of ``body`` at ``provider`` as the answer: its count, or the error in Anthropic's shape
    at its status; an engine that cannot ask (stopped, its dispatcher lost) a 503."""
    try:
        status, answer, headers = await engine.count_tokens(provider, body)
    except (EngineStopped, ProviderError) as exc:
        raise AnthropicError(503, f"count_tokens: {exc}") from None
    return JSONResponse(answer, status_code=status, headers=headers)


def count_router(engine: AsyncEngine, catalog: Catalog, settings: Settings) -> APIRouter:
    """``POST /v1/messages/count_tokens``: the Messages route's checks of the fields a count shares with it (no
    ``anthropic-beta``; a model the catalog knows and calls through Anthropic's Messages API, an unknown one a 404
    as Anthropic answers it; ``messages`` a non-empty list), then ``engine.count_tokens`` (``counted``)."""
    router = APIRouter()

    @router.post(COUNT_URL)
    async def count_tokens(http: HttpRequest) -> JSONResponse:
        try:
            body = await json_body(http)
            model = claude_model(body, http.headers, catalog, settings)
            try:
                provider, _ = catalog.find_model(model)
            except CatalogError as exc:  # its message names the close matches and the catalog overlay
                raise ApiError(404, f"model: {exc}", param="model") from None
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages is required: a non-empty list such as [{\"role\": \"user\", "
                                    "\"content\": \"...\"}]", param="messages")
        except ApiError as exc:
            raise in_anthropic_shape(exc) from None
        return await counted(engine, provider, body)

    return router
