"""Whether a Redis journal lost its holder's records, told by the restarted holder, which remembers nothing.

A Redis restarted without persistence (or back from a snapshot older than the records) while a dispatcher has a
batch under way loses the batch's record; the journal's watch (``actors._journal_watch``) writes it again at its
next check, within a second. A dispatcher that dies within that second restarts to an empty journal, which reads
the same as a dispatcher that had nothing under way: its batch's members, re-admitted, were sent again, paid twice,
and nothing said so. Two marks tell the two apart:

- the **seal**, a field of ``<journal>:~seal`` named for the holder, written in the transaction of its first record
  of each incarnation, then by the watch once it wrote every record again: a Redis that holds it holds every record
  since its last loss (carried by every write, the first record after a loss put it back, the loss unseen);
- the **witness**, in the result hub's memory, which outlives the holder's death: written once per incarnation of
  the holder, after its first record landed, it says "this holder wrote records to that Redis".

At the restart, a witness with no seal in Redis means records were lost (``lost``). A witness never written (the
holder wrote nothing, or the hub restarted since and the holder had nothing open to write again) means nothing was.
Both are read after the records, so a loss while they are read is said too. What it cannot tell: whether what was
lost was still open (records of work that had all ended read as a loss: an ERROR that says "may", nothing sent);
and a snapshot taken after the holder's first record and before its later ones keeps the seal, the later records
lost unseen. Said, the loss is made good where the hub's index of the holder's batches and sync calls has them
(``actors._batch_index``, ``actors._sync_index``)."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

from actors._peer import Peer, as_peer
from engine.core._logkeys import get_logger

__all__ = ["SEAL", "JournalSeal", "lost_records"]

log = get_logger("smartbatch.journal")

SEAL = "~seal"  # the journal's space holding one field per holder that wrote records (beside the records' spaces)
_WITNESS_SPACE = "journal-seals"  # the hub's memory journal space: one key per Redis journal and holder
HUB_ASK_S = 5.0  # real seconds a restarted holder waits for the hub's witness (one restarting too) before it goes on


class JournalSeal:
    """The seal of one holder (``holder``: a dispatcher's name) of a Redis journal, with its witness in ``hub``."""

    def __init__(self, hub: Any, holder: str):
        self.hub: Peer = as_peer(hub)
        self.holder = holder
        self.witnessed = False  # this incarnation's witness is in the hub (written again after the hub's restart)
        self._telling: asyncio.Task | None = None

    def _key(self, base: str) -> str:
        return base + self.holder

    def witness(self, base: str) -> None:
        """Once its first record landed (and again after the hub restarted, ``unwitness``): tell the hub, in the
        background (a hub that restarts would hold the record's write, and a batch's create behind it). A failure
        is logged and tried at the next write: until then a loss reads as nothing written, as before."""
        if self.witnessed or self._telling is not None:
            return

        async def tell() -> None:
            try:
                await self.hub.call("journal_put", _WITNESS_SPACE, self._key(base), pickle.dumps(True))
                self.witnessed = True
            except Exception as exc:
                log.warning("journal %s: could not tell the hub that %s writes records there (%s: %s); a loss of "
                            "them before the next write would go unseen by its restart", base, self.holder,
                            type(exc).__name__, exc)
            finally:
                if self._telling is asyncio.current_task():  # (not a telling that an ``unwitness`` replaced)
                    self._telling = None

        self._telling = asyncio.get_running_loop().create_task(tell())

    def close(self) -> None:
        if self._telling is not None:
            self._telling.cancel()

    def unwitness(self) -> None:
        """The hub restarted without the witness: written again with the next record (a telling under way may have
        reached the hub that died: cancelled, so it does not mark the witness written)."""
        self.witnessed = False
        if self._telling is not None:
            self._telling.cancel()
            self._telling = None

    async def lost(self, base: str, sealed: bool) -> bool:
        """Whether records were lost: the hub says ``holder`` wrote records to this journal, and Redis has no
        seal (``sealed``, read after the records, so a loss while they are read is taken for one). A hub that
        does not answer within ``HUB_ASK_S`` tells nothing (False, logged): the restart reads its journal as before."""
        if sealed:
            return False
        try:
            said = await asyncio.wait_for(self.hub.call("journal_items", _WITNESS_SPACE), HUB_ASK_S)
        except Exception as exc:
            log.warning("journal %s: could not ask the hub whether %s wrote records there (%s: %s)", base,
                        self.holder, type(exc).__name__, exc)
            return False
        return self._key(base) in said


async def lost_records(journal: Any, who: str) -> bool:
    """Whether ``journal`` (a restarted holder's, read just now) lost records ``who`` wrote, said at ERROR: before,
    an empty journal read as nothing under way, and nothing said its batches' members were sent again."""
    lost = getattr(journal, "lost_records", None)
    try:
        if lost is None or not await lost():
            return False
    except Exception as exc:  # (Redis away again: its records were read just now)
        log.warning("%s: could not tell whether its journal lost records (%s: %s)", who, type(exc).__name__, exc)
        return False
    log.error("%s: its journal's Redis lost the records it wrote (restarted without persistence, or back from an "
              "older snapshot, before the journal's watch wrote them again): batches and sync calls under way at the "
              "provider are taken up only where the hub's index has them (``actors._batch_index``, "
              "``actors._sync_index``); the requests of any other are sent again when re-admitted, paid twice", who)
    return True
