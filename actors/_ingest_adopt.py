"""Who holds re-admitted requests (``Ingest.readmit``), and the requests handed to a dispatcher that holds members
of batches whose journal records its Redis lost and waits for their requests (``actors._batch_index``)."""

from __future__ import annotations

import asyncio

from engine.core._logkeys import get_logger
from engine.core.request import Request

__all__ = ["hand_over", "recall_from"]

log = get_logger("smartbatch.ingest")


async def recall_from(peers: list, uids: list[str], caches: list = (), detach: bool = False,
                      held: dict | None = None) -> set[str]:
    """Who holds ``uids``. One that cannot answer holds nothing (a restarted dispatcher reads its journal first).
    ``held``: filled with what each peer holds, by its ``id``."""
    known: set[str] = set()

    async def ask(peer, *more):
        try:
            got = await peer.call("recall", uids, *more)
            known.update(got)
            if held is not None and got:
                held[id(peer)] = list(got)
        except Exception as exc:
            log.warning("ingest: recall failed (%s: %s)", type(exc).__name__, exc)

    await asyncio.gather(*(ask(p) for p in peers), *(ask(c, detach) for c in caches))
    return known


async def hand_over(dispatchers: list, requests: list[Request], held: dict | None = None, force: bool = False) -> None:
    """Of ``requests`` (re-admitted, and held by someone), hand each dispatcher those it waits for: members of a
    batch it found in the hub's index, its record lost, followed once they are all back. Held, they are not sent
    again from here; not handed over, they would wait for good. One small call per dispatcher (the ids), and the
    requests only to one that waits for them. ``held`` (``recall_from``'s): only a dispatcher that said it holds
    some of them is asked, of those alone (a re-admission after any restart asks for every open request, most held
    by groupers and other dispatchers: each dispatcher was sent every id again, one call more each, for nothing).
    ``force``: the driver's sweep's (``Dispatcher.adopt``)."""
    if not requests:
        return
    uids = [r.uid for r in requests]

    async def one(d) -> None:
        ids = uids if held is None else held.get(id(d))
        if not ids:
            return
        try:
            if want := set(await d.call("wanted", ids)):
                await d.call("adopt", [r for r in requests if r.uid in want], force)
        except Exception as exc:  # (a dispatcher that restarts again reads the index again, and is asked again)
            log.warning("ingest: could not hand a dispatcher the requests it waits for (%s: %s)",
                        type(exc).__name__, exc)

    await asyncio.gather(*(one(d) for d in dispatchers))
