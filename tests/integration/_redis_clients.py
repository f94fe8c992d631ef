"""The test process's own ``redis.asyncio`` clients, closed on every way out.

A client left open (an assertion failing before its ``aclose``; a budget book's watch woken after it, connecting
again) is collected whenever the collector runs, and its ``unclosed Connection`` ResourceWarning, under
``filterwarnings = error``, failed whichever test of the worker that was: stop 80's CI run failed that way a test
that uses no Redis in its process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["redis_books"]


@contextlib.asynccontextmanager
async def redis_books(url: str, **kw: Any) -> AsyncIterator[tuple[Any, Callable[..., Any]]]:
    """``(client, new_book)``: a ``redis.asyncio`` client of ``url`` (``kw``: its options) and a maker of
    ``RedisBudgetBook`` on it (``new_book(specs, ...)``, the book's own arguments after the client). On the way
    out, a failed assertion's too, the books' watches end first (a watch reads Redis each second while its book
    holds open claims), then the client closes."""
    import redis.asyncio as aioredis

    from actors.budget_redis import RedisBudgetBook

    client, books = aioredis.Redis.from_url(url, **kw), []

    def new_book(*args: Any, **kwargs: Any) -> RedisBudgetBook:
        books.append(RedisBudgetBook(client, *args, **kwargs))
        return books[-1]
    try:
        yield client, new_book
    finally:
        for book in books:
            book.stop_watch()
        watches = [b._watcher for b in books if b._watcher is not None and not b._watcher.done()]
        if watches:  # bounded: a cancelled watch ends at its next await
            await asyncio.wait(watches, timeout=5.0)
        await client.aclose()
