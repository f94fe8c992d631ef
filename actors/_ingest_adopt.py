"""Who holds re-admitted requests (``Ingest.readmit``), and the requests handed to a dispatcher that holds members
of batches whose journal records its Redis lost and waits for their requests (``actors._batch_index``)."""

from __future__ import annotations

import asyncio
import logging

from engine.core.request import Request

__all__ = ["hand_over", "recall_from"]

log = logging.getLogger("smartbatch.ingest")


async def recall_from(peers: list, uids: list[str], caches: list = (), detach: bool = False) -> set[str]:
    """Who holds ``uids``. One that cannot answer holds nothing (a restarted dispatcher reads its journal first)."""
    known: set[str] = set()

    async def ask(peer, *more):
        try:
            known.update(await peer.call("recall", uids, *more))
        except Exception as exc:
            log.warning("ingest: recall failed (%s: %s)", type(exc).__name__, exc)

    await asyncio.gather(*(ask(p) for p in peers), *(ask(c, detach) for c in caches))
    return known


async def hand_over(dispatchers: list, requests: list[Request]) -> None:
    """Of ``requests`` (re-admitted, and held by someone), hand each dispatcher those it waits for: members of a
    batch it found in the hub's index, its record lost, followed once they are all back. Held, they are not sent
    again from here; not handed over, they would wait for good. One small call per dispatcher (the ids), and the
    requests only to one that waits for them."""
    if not requests:
        return
    uids = [r.uid for r in requests]

    async def one(d) -> None:
        try:
            if want := set(await d.call("wanted", uids)):
                await d.call("adopt", [r for r in requests if r.uid in want])
        except Exception as exc:  # (a dispatcher that restarts again reads the index again, and is asked again)
            log.warning("ingest: could not hand a dispatcher the requests it waits for (%s: %s)",
                        type(exc).__name__, exc)

    await asyncio.gather(*(one(d) for d in dispatchers))
