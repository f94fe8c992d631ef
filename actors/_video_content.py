"""A video's bytes, and how far the videos under way are, at a dispatcher (a mixin, so the dispatcher module stays
the carrying-out core).

The endpoint's ``GET /v1/videos/{id}/content`` is asked here rather than by the endpoint's own client: the
dispatcher holds the provider's key (a ``Secret`` read from the driver's environment at start), where the endpoint's
replica, on a cluster ``serve --address`` attached to, may not have the key's variable at all (as the token count,
``_count_tokens``). A download is a read: it takes no slot of the rate gate, reserves nothing and is journaled
nowhere. But one under way holds one of the dispatcher actor's method slots and a connection of the provider's
client, so no more than ``CONTENT_CONCURRENCY`` are under way at once: one more is a 429 at once, never sent.

The progress is what the provider's polls of each video read last (``progress_by``): asked for many videos in one
call, it asks nothing of the provider."""

from __future__ import annotations

from typing import Any

from actors.providers._video_content import ContentAnswer, content_refusal
from engine.core.settings import Settings

__all__ = ["CONTENT_CONCURRENCY", "VideoContent", "content_by", "progress_by"]

CONTENT_CONCURRENCY = 16  # downloads under way at one dispatcher


async def content_by(provider: Any, name: str, settings: Settings, url: str, variant: str) -> ContentAnswer:
    """The video at ``url`` fetched by ``provider`` (the dispatcher's, named ``name``), or a 501 where it makes no
    video over HTTP (a simulated provider: its output is no address)."""
    fetch = getattr(provider, "video_content", None)
    if fetch is None:
        return content_refusal(501, f"this engine does not call provider {name!r} over HTTP (providers.mode="
                               f"{settings.providers.mode!r}: its videos are simulated), so there are no bytes to "
                               "send; run the engine with SMARTBATCH_PROVIDERS__MODE=http and the provider's "
                               "endpoint", code="video_simulated")
    return await fetch(url, variant)


def progress_by(provider: Any, uids: list[str]) -> dict[str, int]:
    """The last polled progress (0-99) of the videos of requests ``uids`` that ``provider`` is polling; none
    for the others, and none at all where it makes no video over HTTP (simulated) or reads no figure (Veo)."""
    read = getattr(provider, "video_progress", None)
    return read(uids) if read is not None else {}


class VideoContent:
    """Mixed into ``Dispatcher``; uses its ``provider``, ``name`` and ``settings``."""

    _fetching = 0  # downloads under way

    async def video_content(self, url: str, variant: str) -> ContentAnswer:
        """(status, bytes or error body, content type) of the video at ``url`` (``content_by``), or a 429 when
        ``CONTENT_CONCURRENCY`` are under way."""
        if self._fetching >= CONTENT_CONCURRENCY:
            return content_refusal(429, f"{CONTENT_CONCURRENCY} video downloads are under way at this engine's "
                                   f"dispatcher of {self.name!r}; ask again in a second", code="rate_limit_exceeded")
        self._fetching += 1
        try:
            return await content_by(self.provider, self.name, self.settings, url, variant)
        finally:
            self._fetching -= 1

    async def video_progress(self, uids: list[str]) -> dict[str, int]:
        """``progress_by`` of this dispatcher's provider (the endpoint's retrieve, for all its open videos at once)."""
        return progress_by(self.provider, uids)
