"""An SDK client that never holds its key where a frame of its own can show it: the key is put on each request by
the client's HTTP transport as the request is sent.

A constructor's frame holds its arguments among its locals while it runs code that can raise: the OpenAI and
Anthropic clients build an httpx client there, which refuses a malformed proxy variable (``HTTPS_PROXY``) with a
``ValueError``, and an error tracker, ``rich.traceback``'s ``show_locals`` or ``pytest -l`` prints each frame's
locals, the key among them (keys85). A key given to the client after it is made (``client.api_key``, its
``default_headers``) was still a local of the SDK's frames that build each request: its headers, which httpx's
repr masks for ``Authorization`` alone, so an ``x-api-key`` or ``x-goog-api-key`` showed whole where a body failed
to encode (a ``TypeError`` in ``_build_request``), and the whole ``Authorization`` (a plain dict in
``_build_headers``) where a header value was not ASCII (keys86). The client sends a stand-in there, and its HTTP
client's ``auth`` (httpx's hook, run as each request is sent, after every SDK frame that builds it) writes the key
over it; a copy of the client (``with_options``) shares its HTTP client, so it sends the key too. A copy given
an ``http_client`` of its own does not: it sends the stand-in (the provider's 401, never the key); the project
makes none, its tests do to read what is sent (rvkeys86)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from engine.core.provider_api import Secret

__all__ = ["STAND_IN", "keyed"]

STAND_IN = "unset"  # what the constructor is given: never empty, or the SDK reads its own variable instead


def keyed(client: Any, key: Secret, header: str | None = None) -> Any:
    """``client``, made with ``api_key=STAND_IN`` (and ``default_headers={header: STAND_IN}``), now sending ``key``
    in place of each stand-in: as its ``Authorization: Bearer`` (where it sends one) and in ``header``."""
    import httpx2

    class _SendKey(httpx2.Auth):
        def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
            if "authorization" in request.headers:  # the SDK's Bearer, made from its stand-in (not left out)
                request.headers["Authorization"] = f"Bearer {key.get() or STAND_IN}"
            if header is not None:
                request.headers[header] = key.get() or STAND_IN
            # A base URL's user and password go as Basic in the key's place, as httpx sends them without an auth
            # of the client's (the way before: rvmask83 masks them in what is shown).
            if request.url.username or request.url.password:
                yield from httpx2.BasicAuth(request.url.username, request.url.password).auth_flow(request)
            else:
                yield request

        def __repr__(self) -> str:
            return f"_SendKey({key!r}, {header!r})"

    client._client.auth = _SendKey()
    return client
