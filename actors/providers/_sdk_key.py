"""An SDK client given its key after it is made, never as its constructor's argument.

A constructor's frame holds its arguments among its locals while it runs code that can raise: the OpenAI and
Anthropic clients build an httpx client there, which refuses a malformed proxy variable (``HTTPS_PROXY``) with a
``ValueError``, and an error tracker, ``rich.traceback``'s ``show_locals`` or ``pytest -l`` prints each frame's
locals, the key among them (keys85). Both SDKs read ``client.api_key`` at each request, and their default headers
from the mapping they were given, so setting either once the client is made sends the same key."""

from __future__ import annotations

from typing import Any

from engine.core.provider_api import Secret

__all__ = ["STAND_IN", "keyed"]

STAND_IN = "unset"  # what the constructor is given: never empty, or the SDK reads its own variable instead


def keyed(client: Any, key: Secret, header: str | None = None) -> Any:
    """``client``, made with ``api_key=STAND_IN`` (and ``default_headers={header: STAND_IN}``), now sending ``key``."""
    client.api_key = key.get() or STAND_IN
    if header is not None:
        client._custom_headers[header] = key.get() or STAND_IN  # the mapping its default_headers merge
    return client
