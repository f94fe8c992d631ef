"""One bounded wait for every layer: the providers' calls, the dispatchers' cancels and reads, the driver's
futures (``within``). Here, below ``actors`` and ``engine.app``, so each takes it from the core."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

__all__ = ["within"]


async def within(aw: Any, seconds: float) -> Any:
    """``aw``'s result, or ``TimeoutError`` past ``seconds``. Not ``asyncio.wait_for`` (before Python 3.12): a
    cancel that comes as ``aw`` ends is swallowed there, its result returned and the cancelled task running on
    (a dispatcher's follow-up cancelled at a death or a stop read its batch to the end: a flaky test showed it,
    once polls were bounded); ``asyncio.timeout`` (3.11) passes the cancel on."""
    if sys.version_info < (3, 11):
        return await asyncio.wait_for(aw, seconds)
    async with asyncio.timeout(seconds):
        return await aw
