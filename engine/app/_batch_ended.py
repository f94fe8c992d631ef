"""A journaled batch of an earlier run brought to its end and read, for a resume (``engine.app._batch_rescue``):
cancelled, polled until it ends, its results read, each try of that read bounded as the dispatcher bounds its own
(``actors._batch_parts.read_bound_s``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from actors._batch_parts import read_bound_s
from engine.core._logkeys import words

__all__ = ["GIVE_UP_FACTOR", "POLL_TRIES", "ProviderUnread", "brief", "ended", "retried"]

# Past the provider's own cancel allowance, this many times over, a batch that has not ended is given up on: its
# unfinished members are sent again (and paid twice if it still finishes them), with a warning.
GIVE_UP_FACTOR = 2.0
POLL_TRIES = 5  # failed polls (or reads) in a row before a batch is given up on


class ProviderUnread(Exception):
    """A batch of the earlier run that could not be read."""


def brief(exc: BaseException) -> str:
    """``exc`` in a line of the rescue's words (printed, raised in a ``ConfigError``), masked (``words``): the
    providers' errors are redacted where they are made, and this keeps a key out of any other's."""
    # Masked whole, then cut: a key or a URL cut at the 200th character has lost the shape the mask knows (a Google
    # key's 35, a password's "@"), and its first characters were shown (a review, rvkeylogs80)
    return f"{type(exc).__name__}: {words(exc)[:200]}"


async def retried(call, speed: float):
    """``await call()``, tried ``POLL_TRIES`` times a few seconds apart while it fails (a blip)."""
    for attempt in range(POLL_TRIES):
        try:
            return await call()
        except Exception:
            if attempt == POLL_TRIES - 1:
                raise
            await asyncio.sleep(min(2.0 ** attempt, 30.0) / max(speed, 1.0))
    raise AssertionError("unreachable")


def _read_bound_s(p: Any, handle: Any) -> float | None:
    """Real seconds a try at reading ``handle``'s results may take (``read_bound_s``); None where nothing is read
    over the wire (a provider that is not a real one)."""
    jobs = list((getattr(handle, "jobs", None) or {}).values())
    if not getattr(p, "real", False) or not jobs:
        return None
    return read_bound_s(p.catalog, p.settings, p.name, jobs)


async def _read(p: Any, handle: Any, speedup: float):
    """The batch's results, each try bounded (``_read_bound_s``): an SDK's timeout bounds only the wait between
    chunks, and a server that trickled a byte inside it held ``batch --resume`` for as long as it went on. Every
    try past its bound: ``ProviderUnread``, naming the batch and where its results are; the rescue then keeps
    the journal (sending the lines again would pay twice for what the batch finished)."""
    bound = _read_bound_s(p, handle)

    async def once():
        try:
            return await asyncio.wait_for(p.fetch(handle), bound)
        except asyncio.TimeoutError:
            s = p.settings
            raise ProviderUnread(
                f"the results of {p.results_at(handle)} could not be read: every try outlasted its bound of "
                f"{bound:.0f} s (its calls' timeout_s and its size at batch_results_min_kib_s="
                f"{s.batch_results_min_kib_s:g})") from None
    return await retried(once, speedup)


async def ended(p: Any, handle: Any, allowance: float, speedup: float):
    """Cancel ``handle``'s batch and wait for it to end; its members' outcomes. Raises if it cannot be read,
    or has not ended well after its cancel's allowance."""
    give_up = time.monotonic() + GIVE_UP_FACTOR * allowance / speedup + 30.0
    st = await retried(lambda: p.poll(handle), speedup)
    if st.status == "running":
        try:
            st = await p.cancel(handle) or await retried(lambda: p.poll(handle), speedup)
        except Exception:  # it ended meanwhile ("cannot cancel a completed batch"), or a blip: the polls tell
            st = await retried(lambda: p.poll(handle), speedup)
    while st.status != "ended":
        if time.monotonic() > give_up:
            raise ProviderUnread(f"not ended {allowance:.0f} s after its cancel (status {st.status})")
        await asyncio.sleep(min(max(st.next_poll_s, 1.0) / speedup, 30.0))
        st = await retried(lambda: p.poll(handle), speedup)
    return await _read(p, handle, speedup)
