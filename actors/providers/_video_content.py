"""A video's bytes, ``GET {base_url}/videos/{id}/content``, fetched through an OpenAI provider's own client (its key,
``base_url`` and ``max_retries=0``), for the endpoint's ``GET /v1/videos/{id}/content``.

A result's ``output`` is that address (``_openai_video``): only an address under the provider's own ``base_url``
is fetched, so the key goes nowhere else (an address of another server, an engine restarted on another endpoint,
is refused, not sent the key). A fetch is a read of a video made and billed already: no idempotency key, no rate
gate, no budget, no journal. Answers cross Ray as plain data, ``(status, bytes or error body, content type)``; the
error body is OpenAI's shape, with a key the provider quoted masked."""

from __future__ import annotations

import warnings
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from actors.providers._wire import call_timeout, redact
from engine.core._logkeys import url_secrets
from engine.core.provider_api import Secret

__all__ = ["CONTENT_TIMEOUT_S", "ContentAnswer", "content_address", "content_at", "content_refusal"]

CONTENT_TIMEOUT_S = 120.0  # real seconds a download may take at most (an MP4 of up to tens of MB)

ContentAnswer = tuple[int, Any, str]  # (HTTP status, the bytes or an OpenAI error body, content type)


def _bare(url: str) -> str:
    """``url`` without its user part: a base URL's credentials are its client's, never a result's (rvmask83)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def content_address(base_url: str, video_id: str) -> str:
    """A video's content address under ``base_url`` (a result's ``output``), without the base URL's credentials:
    a result is journaled, kept by the endpoint and shown to its caller, and the address held the password of a
    base URL that has one (rvmask83)."""
    return f"{_bare(base_url).rstrip('/')}/videos/{video_id}/content"


def content_refusal(status: int, message: str, code: str | None = None, param: str | None = None) -> ContentAnswer:
    """A download the engine itself refuses or could not make, in OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, "application/json"


async def content_at(client: Any, sdk: Any, key: Secret, url: str, variant: str, timeout_s: float) -> ContentAnswer:
    """The bytes at ``url`` (a video's content address under ``client``'s ``base_url``; an ``openai.AsyncOpenAI``,
    ``sdk`` its module), as ``variant`` ("video", "thumbnail", "spritesheet"), within ``timeout_s``; ``key``: the
    client's key, masked wherever an answer quotes it."""
    # Both bare: an address made before (rvmask83) holds the base URL's credentials, a new one does not
    base, url = _bare(str(client.base_url)).rstrip("/") + "/videos/", _bare(url)
    secrets = [key, *url_secrets(str(client.base_url))]  # the SDK sends a base URL's as Basic, in the key's place
    vid = url[len(base):].removesuffix("/content") if url.startswith(base) and url.endswith("/content") else ""
    if not vid or "/" in vid:
        return content_refusal(409, "the video's address is not at this engine's endpoint of its provider (the "
                               "endpoint changed since it was made?): it cannot be fetched with its key here",
                               code="video_address_elsewhere")
    try:
        with warnings.catch_warnings():  # the SDK's notice that the Sora API shuts down (docs/providers.md)
            warnings.simplefilter("ignore", DeprecationWarning)
            got = client.videos.download_content(vid, variant=variant,
                                                 timeout=call_timeout(client, sdk, timeout_s))
        got = await got
    except sdk.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else None
        err = body.get("error", body) if body is not None else None
        err = err if isinstance(err, dict) else {}

        def said(name: str) -> str | None:  # a field of the provider's error, as text, the key masked in it too
            v = err.get(name)
            return redact(v, secrets) if isinstance(v, str) else None

        return content_refusal(exc.status_code, redact(f"the provider answered {exc.status_code}: "
                                                       f"{said('message') or exc.message}", secrets),
                               code=said("code"), param=said("param"))
    except sdk.APITimeoutError:
        return content_refusal(504, f"the provider did not send the video within {timeout_s:g} s; ask again")
    except sdk.APIConnectionError as exc:
        return content_refusal(502, redact(f"the provider could not be reached for the video: {exc}", secrets))
    return 200, got.content, got.response.headers.get("content-type", "application/octet-stream")
