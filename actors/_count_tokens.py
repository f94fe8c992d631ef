"""Anthropic's token count at a dispatcher (a mixin, so the dispatcher module stays the carrying-out core).

The endpoint's ``POST /v1/messages/count_tokens`` is asked here rather than by the endpoint's own client: the
dispatcher holds the provider's key (a ``Secret`` read from the driver's environment at start), where the endpoint's
replica, on a cluster ``serve --address`` attached to, may not have the key's variable at all. A count is free:
it takes no slot of the rate gate, reserves nothing and is journaled nowhere. But a count under way holds one of
the dispatcher actor's method slots (shared with the groupers' dispatches and the driver's calls) and a connection
of the provider's client for up to a minute, so no more than ``COUNT_CONCURRENCY`` are under way at once: one more
is a 429 at once (Anthropic's ``rate_limit_error``, ``retry-after: 1``), never sent."""

from __future__ import annotations

from typing import Any

from actors.providers._anthropic_count import NO_RETRY, CountAnswer, refusal
from engine.core.settings import Settings

__all__ = ["COUNT_CONCURRENCY", "CountTokens", "count_by"]

COUNT_CONCURRENCY = 32  # counts under way at one dispatcher; more piled on its actor's 1,000 method slots


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

    _counting = 0  # counts under way

    async def count_tokens(self, body: dict[str, Any]) -> CountAnswer:
        """(status, body, headers) of Anthropic's count of the Messages ``body`` (``count_by``), or a 429 when
        ``COUNT_CONCURRENCY`` are under way."""
        if self._counting >= COUNT_CONCURRENCY:
            return 429, {"type": "error", "error": {
                "type": "rate_limit_error", "message": f"{COUNT_CONCURRENCY} token counts are under way at this "
                f"engine's dispatcher of {self.name!r}; send it again in a second"}}, {"retry-after": "1"}
        self._counting += 1
        try:
            return await count_by(self.provider, self.name, self.settings, body)
        finally:
            self._counting -= 1
