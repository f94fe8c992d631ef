"""Anthropic's token count at a dispatcher (a mixin, so the dispatcher module stays the carrying-out core).

The endpoint's ``POST /v1/messages/count_tokens`` is asked here rather than by the endpoint's own client: the
dispatcher holds the provider's key (a ``Secret`` read from the driver's environment at start), where the endpoint's
replica, on a cluster ``serve --address`` attached to, may not have the key's variable at all. A count is free:
it takes no slot of the rate gate, reserves nothing and is journaled nowhere."""

from __future__ import annotations

from typing import Any

from actors.providers._anthropic_count import NO_RETRY, CountAnswer, refusal
from engine.core.settings import Settings

__all__ = ["CountTokens", "count_by"]


async def count_by(provider: Any, name: str, settings: Settings, body: dict[str, Any]) -> CountAnswer:
    """``body`` counted by ``provider`` (the dispatcher's, named ``name``), or a 501 where it asks nobody over
    Anthropic's API (a simulated provider: nobody can count exactly)."""
    count = getattr(provider, "count_tokens", None)
    if count is None:
        mode = settings.providers.mode
        return refusal(501, f"count_tokens asks Anthropic, and this engine does not call provider {name!r} over "
                            f"HTTP through Anthropic's API (providers.mode={mode!r}: its answers are simulated), so "
                            "nobody can count exactly; run the engine with SMARTBATCH_PROVIDERS__MODE=http and its "
                            "Anthropic endpoint", NO_RETRY)
    return await count(body)


class CountTokens:
    """Mixed into ``Dispatcher``; uses its ``provider``, ``name`` and ``settings``."""

    async def count_tokens(self, body: dict[str, Any]) -> CountAnswer:
        """(status, body, headers) of Anthropic's count of the Messages ``body`` (``count_by``)."""
        return await count_by(self.provider, self.name, self.settings, body)
