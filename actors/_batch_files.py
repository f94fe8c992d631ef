"""What an ended provider batch left at the provider, deleted once its results were read (``Provider.discard``:
OpenAI's input file, which holds the prompts and counts against the project's file storage). Best effort: a
delete runs beside the members' resolution, never before it, and one that keeps failing is logged, counted and
given up on (OpenAI deletes a batch's files 30 days after their creation)."""

from __future__ import annotations

import asyncio
from typing import Any

from actors.providers._wire import redact
from engine.core._logkeys import get_logger

__all__ = ["DISCARD_TRIES", "FileCleanup"]

log = get_logger("smartbatch.dispatcher")

DISCARD_TRIES = 3  # deletes of one batch's files, RETRY_S real seconds apart, doubling
RETRY_S = 0.5
# Real seconds the engine's stop waits for the deletes under way (within the stop's wait for the dispatchers'
# cancels, ``actors._stop_dispatchers._cancel_batches``): a batch that ended is out of the journal, so a delete the stop cut
# left its prompts at the provider, known to no later start.
STOP_WAIT_S = 3.0


class FileCleanup:
    """One dispatcher's deletes of its ended batches' files: each a task of its own, counted."""

    def __init__(self, name: str):
        self.name = name
        self.deleted = 0  # files deleted
        self.undeleted = 0  # batches whose files a delete failed to remove after every try
        self.tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"FileCleanup({self.name}, deleted={self.deleted}, undeleted={self.undeleted}, running={len(self.tasks)})"

    def discard(self, provider: Any, handle: Any) -> None:
        """Delete what ``handle``'s batch left at ``provider``, in the background (its results were read)."""
        if handle is None or not provider.real:
            return
        task = asyncio.get_running_loop().create_task(self._discard(provider, handle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _discard(self, provider: Any, handle: Any) -> None:
        for attempt in range(DISCARD_TRIES):
            try:
                n = await provider.discard(handle)  # (``+= await``: read before the await, lost by a twin)
                self.deleted += n
                return
            except Exception as exc:  # a blip, or a refusal: never the members' concern
                if attempt + 1 < DISCARD_TRIES:
                    await asyncio.sleep(RETRY_S * 2 ** attempt)
                    continue
                self.undeleted += 1
                log.warning("dispatcher %s: the files of batch %s could not be deleted at the provider (%s); "
                            "they stay until the provider expires them", self.name, getattr(handle, "id", "?"),
                            redact(f"{type(exc).__name__}: {exc}")[:200])

    async def drain(self) -> int:
        """Wait for the deletes under way, ``STOP_WAIT_S`` at most (the engine stops); how many still run, logged."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=STOP_WAIT_S)
        left = sum(not t.done() for t in self.tasks)
        if left:
            log.warning("dispatcher %s: the stop cut the deletes of %d ended batch(es)' input files; they stay until "
                        "the provider expires them", self.name, left)
        return left

    def stats(self) -> dict[str, int]:
        return {"files_deleted": self.deleted, "files_undeleted": self.undeleted}
