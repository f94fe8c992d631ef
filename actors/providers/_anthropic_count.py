"""Anthropic's token count, ``POST /v1/messages/count_tokens``, asked through an Anthropic provider's own client
(its key, ``base_url`` and ``max_retries=0``), for the endpoint's route of the same name.

A count is free and is no request of the engine: no idempotency key, no rate gate, no budget, no journal. The
body goes as it came and the provider's answer comes back as it is: its count, or its error at its status with
the headers that tell a client when (``retry-after``) or whether (``x-should-retry``) to try again. Answers cross
Ray as plain data, ``(status, body, headers)``, the body in Anthropic's wire shape; a key the provider quoted is
masked in it."""

from __future__ import annotations

from typing import Any

from actors.providers._wire import call_timeout, redact
from engine.core._logkeys import url_secrets
from engine.core.provider_api import Secret

__all__ = ["COUNT_TIMEOUT_S", "COUNT_URL", "NO_RETRY", "CountAnswer", "count_at", "refusal"]

COUNT_URL = "/v1/messages/count_tokens"
COUNT_TIMEOUT_S = 60.0  # real seconds a count may take at most (the endpoint's own timeout_s, if shorter)
NO_RETRY = {"x-should-retry": "false"}  # a configuration the caller cannot change: a retry answers the same
_PASSED = ("retry-after", "x-should-retry")  # the provider's headers a client reads to try again, or not

CountAnswer = tuple[int, Any, dict[str, str]]  # (HTTP status, answer body as JSON data, headers)


def refusal(status: int, message: str, headers: dict[str, str] | None = None) -> CountAnswer:
    """A count the engine itself cannot answer, in Anthropic's error shape (a server side ``api_error``)."""
    return status, {"type": "error", "error": {"type": "api_error", "message": message}}, dict(headers or {})


async def count_at(client: Any, sdk: Any, key: Secret, body: dict[str, Any], timeout_s: float) -> CountAnswer:
    """``body`` counted by the provider ``client`` calls (an ``anthropic.AsyncAnthropic``; ``sdk``: the module),
    within ``timeout_s``; ``key``: the client's key, masked wherever an answer quotes it."""
    secrets = [key, *url_secrets(str(client.base_url))]  # the SDK sends a base URL's as Basic (rvmask83)
    try:
        answer = await client.post(COUNT_URL, body=body, cast_to=object,
                                   options={"timeout": call_timeout(client, sdk, timeout_s)})
    except sdk.APIStatusError as exc:
        err = exc.body if isinstance(exc.body, dict) else None
        if not (err and err.get("type") == "error" and isinstance(err.get("error"), dict)):
            err = {"type": "error", "error": {"type": "api_error", "message": str(exc)}}
        headers = {k: v for k in _PASSED if (v := exc.response.headers.get(k))}
        return exc.status_code, _masked(err, secrets), headers
    except sdk.APITimeoutError:
        return refusal(504, f"Anthropic did not answer the count within {timeout_s:g} s; send it again")
    except sdk.APIConnectionError as exc:
        return refusal(502, _masked(f"Anthropic could not be reached for the count: {exc}", secrets))
    return 200, answer, {}


def _masked(value: Any, secrets: list[Any]) -> Any:
    """``value`` (text, or an error body) with the secrets, and anything shaped like a key, masked (``redact``)."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: _masked(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    return value
