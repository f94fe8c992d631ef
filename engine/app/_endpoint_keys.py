"""Who may call the endpoint, and as which tenant. The operator's key (``smartbatch serve --http-key-env``) may
name any tenant in ``X-Smartbatch-Tenant``; a tenant key (``--http-tenant-key TENANT=VAR``) acts for its tenant
alone, as an OpenAI project key acts for its project: its calls are that tenant's, and naming another is a 403.
Before, the header was the caller's word, and anyone with the one key read any tenant's files and batches and
spent against its budgets. Only SHA-256 digests are held, never a key."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest

from engine.app._endpoint_messages import AnthropicError
from engine.app._endpoint_models import anthropic_caller
from engine.app._endpoint_wire import HEADER_TENANT, ApiError
from engine.core._checks import tenant_problem
from engine.core.errors import ConfigError

__all__ = ["EndpointKeys", "key_tenant_problem"]

_TENANT = HEADER_TENANT.lower().encode("latin-1")  # as an ASGI scope names a header
# The headers a caller's key comes in: the two the endpoint takes, and Google's (a Gemini SDK pointed at the
# endpoint sends its own key there, which the endpoint neither reads nor needs).
_CREDENTIALS = (b"authorization", b"x-api-key", b"x-goog-api-key")


def key_tenant_problem(tenant: str) -> str | None:
    """Why ``tenant`` cannot be bound to a key, or None: a name the engine refuses, or one the endpoint could not
    carry in ``X-Smartbatch-Tenant`` (a key's calls carry their tenant there; Starlette reads a header as Latin-1,
    and HTTP strips its ends, so a caller naming such a tenant would be refused as naming another)."""
    why = tenant_problem(tenant)
    if why is not None:
        return why
    if tenant != tenant.strip():
        return "it begins or ends with a space, which HTTP strips from a header"
    try:
        tenant.encode("latin-1")
    except UnicodeEncodeError:
        return "it has a character an HTTP header cannot carry (Latin-1 only)"
    return None


def _digest(hex_digest: object, what: str) -> bytes:
    try:
        raw = bytes.fromhex(hex_digest) if isinstance(hex_digest, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != hashlib.sha256().digest_size:  # the digest itself is not quoted: it stands for a key
        raise ConfigError(f"{what} is not the hex SHA-256 of a key (64 hex digits); give "
                          "hashlib.sha256(key.encode()).hexdigest()")
    return raw


class EndpointKeys:
    """The keys an endpoint takes, as SHA-256 digests: ``admin_sha256``, the operator's (any tenant), and
    ``tenant_keys``, a key's digest -> the one tenant it acts for (several keys may share a tenant, so one can
    replace another). A bad entry is a ``ConfigError`` naming it, raised here, before the endpoint starts."""

    def __init__(self, admin_sha256: str | None = None, tenant_keys: Mapping[str, str] | None = None):
        self._admin = None if admin_sha256 is None else _digest(admin_sha256, "api_key_sha256")
        tenants: list[tuple[bytes, str]] = []
        for hex_digest, tenant in (tenant_keys or {}).items():
            if not isinstance(tenant, str) or (why := key_tenant_problem(tenant)) is not None:
                raise ConfigError(f"tenant_keys: tenant {tenant!r}: {why if isinstance(tenant, str) else 'not a str'};"
                                  " give a name of 1 to 256 Latin-1 characters, no control character, no space "
                                  "at either end")
            raw = _digest(hex_digest, f"tenant_keys: the key of tenant {tenant!r}")
            if self._admin is not None and hmac.compare_digest(raw, self._admin):
                raise ConfigError(f"tenant_keys: the key of tenant {tenant!r} is also api_key_sha256, the key that "
                                  "acts for every tenant; give the tenant a key of its own")
            tenants.append((raw, tenant))
        self._tenants = tuple(tenants)

    @property
    def asked(self) -> bool:
        """Whether a caller must send a key (without any, anyone who reaches the port uses the engine)."""
        return self._admin is not None or bool(self._tenants)

    def __repr__(self) -> str:
        names = sorted({t for _, t in self._tenants})
        return f"EndpointKeys(admin={self._admin is not None}, tenants={names})"

    def who(self, key: str) -> tuple[bool, str | None]:
        """Whether ``key`` is one of the endpoint's, and the tenant it acts for (None: the operator's, any).
        Every digest is compared, in constant time, whichever matches."""
        got = hashlib.sha256(key.encode()).digest()
        admin = self._admin is not None and hmac.compare_digest(got, self._admin)
        tenant = None
        for raw, name in self._tenants:
            if hmac.compare_digest(got, raw):
                tenant = name
        return admin or tenant is not None, tenant

    def guard(self, app: FastAPI) -> None:
        """Ask every route of ``app`` for a key: ``Authorization: Bearer <key>`` (the SDKs' ``api_key``) or
        ``x-api-key: <key>`` (the Anthropic SDK's), a 401 ``invalid_api_key`` otherwise; a tenant key's call is
        its tenant's (the header filled in), and one naming another tenant is a 403. Where no key is asked, the
        caller's key headers are dropped all the same (``_NoCallerKey``)."""
        if not self.asked:
            app.add_middleware(_NoCallerKey)
            return
        which = ("the endpoint's key (smartbatch serve --http-key-env)" if self._admin is not None else "")
        if self._tenants:
            which += (" or " if which else "") + "your tenant's key (smartbatch serve --http-tenant-key)"

        @app.middleware("http")
        async def check_key(http: HttpRequest, call_next):
            error = AnthropicError if anthropic_caller(http) else ApiError
            known, tenant = self._caller(http)
            if not known:
                return error(401, f"Incorrect API key provided: send {which} as 'Authorization: Bearer <key>' or "
                                  "'x-api-key: <key>', the SDK's api_key", code="invalid_api_key").response()
            if tenant is not None:
                named = http.headers.getlist(HEADER_TENANT)
                if (other := next((n for n in named if n != tenant), None)) is not None:
                    return error(403, f"{HEADER_TENANT} {other!r}: this key acts for tenant {tenant!r} alone; leave "
                                      f"the header out, send {tenant!r}, or call with a key of tenant {other!r}",
                                 param=HEADER_TENANT, code="permission_denied").response()
                # The routes read the tenant from the header (``tenant_of``): the key's, whatever was sent.
                http.scope["headers"] = [(k, v) for k, v in http.scope["headers"] if k.lower() != _TENANT]
                http.scope["headers"].append((_TENANT, tenant.encode("latin-1")))
            # Checked, the caller's key goes: the ASGI scope is a local of every frame the route runs under (the
            # frameworks' and this one), and an error tracker prints each frame's locals (keys86). No route reads it.
            http.scope["headers"] = _without_key(http.scope["headers"])
            return await call_next(http)

    def _caller(self, http: HttpRequest) -> tuple[bool, str | None]:
        """``who`` the caller's key is (``Authorization: Bearer <key>`` or ``x-api-key: <key>``), read here, so the
        key is a local of no frame that stays open while the route runs (``check_key``'s does)."""
        scheme, _, key = http.headers.get("authorization", "").partition(" ")
        if not scheme and (anthropic := http.headers.get("x-api-key")) is not None:
            scheme, key = "bearer", anthropic
        known, tenant = self.who(key.strip())
        return scheme.lower() == "bearer" and known, tenant


def _without_key(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() not in _CREDENTIALS]


class _NoCallerKey:
    """An endpoint that asks no key still gets one: an application moved to it by its ``base_url`` alone sends
    the key its SDK reads (``OPENAI_API_KEY``, a provider's real key) as ``Authorization``, and the ASGI scope, a
    local of every frame a failing route raises through, held it (rvkeys86). No route reads it: it is dropped
    before any runs. Plain ASGI, not ``BaseHTTPMiddleware``: a list filter a call, no task of its own."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["headers"] = _without_key(scope["headers"])
        await self.app(scope, receive, send)
