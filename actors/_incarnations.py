"""Snapshots an actor keeps in a journal (the budget controller's memory ledger, ``actors._budget_journal``; a
dispatcher's tally, ``actors._dispatch_tally``), each incarnation of the actor (each run Ray restarts) under a key
of its own, ``<stem>@<incarnation>``, and taken back by rank: (epoch, start, change). (A dispatcher's list of ended
videos, ``actors._dispatch_jobs``, is a union: every incarnation's is read back and merged, none ranked.)

One key for every incarnation let a dead one's write still on its way (Ray killed the actor after its call to the
hub, Redis or Ray's store left) land after its successor's and replace the newer snapshot with the older (until stop
72 for the ledger's copy in Ray's store, stop 73 for the ledger in the hub's journal and the tally). Under a key of
its own the late write replaces nothing, and ranks below the successor's:

- the epoch is one past that of every snapshot a restart read: an incarnation ranks above every one it read;
- the start (when the incarnation first wrote, wall time) orders two of one epoch, which read the same snapshots
  and not each other's: Ray runs one incarnation at a time, so the later began after the earlier died, and the
  earlier's snapshot is a write that landed after the later had read. By change number it could rank above: both
  go on from the same snapshot, and the dead one's write may hold more changes (never answered) than the other's;
- the change number orders one incarnation's snapshots in two stores (the ledger's in the hub and in Ray's store).

The earlier incarnations' keys are removed from a store once this one's own snapshot landed there (until then they
are what a restart reads); a late write after that re-creates its key, ranked below, removed by the next restore.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from engine.core._logkeys import get_logger

__all__ = ["began", "drop_earlier", "earlier", "next_epoch", "own_key"]

log = get_logger("smartbatch.journal")
DROP_TIMEOUT_S = 10.0  # a removal of older snapshots that takes longer is given up (they rank below: harmless)


def own_key(stem: str, incarnation: str) -> str:
    return f"{stem}@{incarnation}"


def earlier(records: dict[str, Any], stem: str, own: str) -> dict[str, Any]:
    """The snapshots of the incarnations before this one (key ``own``) among a space's ``records``: those under
    ``stem@...``, and under ``stem`` alone (the one key of a journal written before stop 73)."""
    return {k: v for k, v in records.items() if (k == stem or k.startswith(stem + "@")) and k != own}


def next_epoch(epochs: Iterable[int]) -> int:
    """This incarnation's epoch: one past every snapshot its restore read."""
    return max(epochs, default=0) + 1


def began(actor: Any) -> float:
    """When ``actor``'s incarnation began: the wall time of its first snapshot, kept for the incarnation (before its
    death, so before any successor's start). Wall clocks of two nodes differ by milliseconds; two incarnations of one
    actor begin a restart apart at least."""
    return actor.__dict__.setdefault("_began", time.time())


async def drop_earlier(journal: Any, space: str, keys: list[str], who: str,
                       timeout_s: float = DROP_TIMEOUT_S) -> None:
    """Remove ``keys`` (earlier incarnations' snapshots) from ``journal``'s ``space``, now that this incarnation's
    own landed there. A failure is logged: they stay, ranked below, until the next restore or the engine's stop."""
    if not keys:
        return
    try:
        await asyncio.wait_for(journal.delete(space, keys), timeout_s)
    except Exception as exc:
        log.info("%s: older snapshots not removed (%s: %s)", who, type(exc).__name__, exc)
