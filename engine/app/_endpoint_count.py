"""Anthropic's token count, ``POST /v1/messages/count_tokens`` (the SDK's ``client.messages.count_tokens``):
``{"input_tokens": N}`` for a Messages body without ``max_tokens``. Before, it was a 404.

Anthropic's count is free, and exact only at Anthropic: the engine's own estimate (``chars_per_token``) can be
off either way. So the body goes, as it came, to the Anthropic provider the engine calls the model's provider
through (the endpoint's ``base_url`` and the key in its ``api_key_env``, read from the environment of the process
that serves the endpoint at the first count), with the SDK's retries off and a timeout; the answer, or Anthropic's
error at its status, comes back as it is. The key is never logged, and never in an answer: a provider's message
that quoted it is masked. A count is not a request of the engine: nothing is billed, budgeted, cached or
journaled, and no deadline or priority applies. Where the provider is not called over HTTP (the simulated
providers of ``providers.mode=sim``) there is nobody to count exactly, and the count is refused saying so."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from engine.app._endpoint_messages import AnthropicError, claude_model, in_anthropic_shape
from engine.app._endpoint_wire import ApiError, json_body
from engine.core.catalog import Catalog
from engine.core.errors import CatalogError
from engine.core.settings import Settings

__all__ = ["COUNT_TIMEOUT_S", "COUNT_URL", "TokenCounter", "count_router"]

COUNT_URL = "/v1/messages/count_tokens"
COUNT_TIMEOUT_S = 60.0  # real seconds a count may take at most (the endpoint's own timeout_s, if shorter)
_NO_RETRY = {"x-should-retry": "false"}  # a configuration the caller cannot change: a retry answers the same


class TokenCounter:
    """One Anthropic client per provider, made at its first count on the serving loop (where it lives), closed
    by ``close``. ``environ``: where keys are read (the process's environment by default)."""

    def __init__(self, settings: Settings, environ: Mapping[str, str] | None = None):
        self._settings = settings
        self._environ = environ
        self._clients: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"TokenCounter(clients={sorted(self._clients)})"

    def _client(self, provider: str) -> tuple[Any, str]:
        prov = self._settings.providers
        ep = prov.endpoints.get(provider)
        if ep is None or ep.api != "anthropic" or provider not in prov.http_providers([provider]):
            raise AnthropicError(501, f"count_tokens asks Anthropic, and this engine does not call provider "
                                      f"{provider!r} over HTTP (providers.mode={prov.mode!r}: its answers are "
                                      "simulated), so nobody can count exactly; run the engine with "
                                      "SMARTBATCH_PROVIDERS__MODE=http and its Anthropic endpoint",
                                 headers=_NO_RETRY)
        env = os.environ if self._environ is None else self._environ
        key = env.get(ep.api_key_env)
        if not key:
            raise AnthropicError(503, f"count_tokens asks Anthropic with the engine's key, and {ep.api_key_env} is "
                                      "not set where the endpoint runs; export it in the environment of "
                                      "`smartbatch serve`", headers=_NO_RETRY)
        if provider not in self._clients:
            import anthropic

            self._clients[provider] = anthropic.AsyncAnthropic(
                api_key=key, base_url=ep.address(env), max_retries=0,
                timeout=min(ep.timeout_s, COUNT_TIMEOUT_S))
        return self._clients[provider], key

    async def count(self, provider: str, body: dict[str, Any]) -> JSONResponse:
        """The provider's answer to ``body``: its count, or its error in Anthropic's shape at its status."""
        import anthropic

        client, key = self._client(provider)
        try:
            answer = await client.post(COUNT_URL, body=body, cast_to=object)
        except anthropic.APIStatusError as exc:
            err = exc.body if isinstance(exc.body, dict) else None
            if not (err and err.get("type") == "error" and isinstance(err.get("error"), dict)):
                err = {"type": "error", "error": {"type": "api_error", "message": str(exc)}}
            headers = {k: v for k in ("retry-after", "x-should-retry") if (v := exc.response.headers.get(k))}
            return JSONResponse(_masked(err, key), status_code=exc.status_code, headers=headers)
        except anthropic.APITimeoutError:
            raise AnthropicError(504, f"Anthropic did not answer the count within {client.timeout:g} s; send it "
                                      "again") from None
        except anthropic.APIConnectionError as exc:
            raise AnthropicError(502, _masked(f"Anthropic could not be reached for the count: {exc}", key)) from None
        return JSONResponse(answer)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()


def _masked(value: Any, key: str) -> Any:
    """``value`` (text, or an error body) with the key, wherever a provider quoted it, masked."""
    if isinstance(value, str):
        return value.replace(key, "**********")
    if isinstance(value, dict):
        return {k: _masked(v, key) for k, v in value.items()}
    return value


def count_router(counter: TokenCounter, catalog: Catalog, settings: Settings) -> APIRouter:
    """``POST /v1/messages/count_tokens``: the Messages route's checks of the fields a count shares with it (no
    ``anthropic-beta``; a model the catalog knows and calls through Anthropic's Messages API, an unknown one a 404
    as Anthropic answers it; ``messages`` a non-empty list), then ``counter``."""
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
        return await counter.count(provider, body)

    return router
