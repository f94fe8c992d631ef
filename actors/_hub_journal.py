"""The journal kept in the result hub's memory (``actors.journal`` says when it is the one used): the store the
hub mixes in, and the journal its holders write through it."""

from __future__ import annotations

import pickle
import secrets
from typing import Any

from actors._peer import Peer, as_peer

__all__ = ["HubJournal", "MemoryJournalStore"]


class MemoryJournalStore:
    """The store behind ``HubJournal``: kept by the result hub (mixed into it)."""

    def _journal(self) -> dict[str, dict[str, bytes]]:
        j = self.__dict__.get("_journal_spaces")
        if j is None:
            j = self.__dict__["_journal_spaces"] = {}
        return j

    async def journal_put(self, space: str, key: str, blob: bytes) -> None:
        self._journal().setdefault(space, {})[key] = blob

    async def journal_put_many(self, space: str, blobs: dict[str, bytes]) -> None:
        self._journal().setdefault(space, {}).update(blobs)

    async def journal_put_checked(self, space: str, blobs: dict[str, bytes], store: str | None,
                                  seq: int | None = None) -> str:
        """Write ``blobs`` if this is the store ``store`` names (None: any), in one step; return this store's name
        either way. A hub restarted since has a new name and none of the records: a write that leaves out a record
        written before (the budget ledger's charge ids, written only when they change) is refused there. ``seq``:
        the writer's number for this write, refused ("" returned) if one of its keys took a later one: a write its
        caller gave up on (Ray runs it anyway) landing after the next paired a snapshot with older ids (stop 82)."""
        mine = self.__dict__.setdefault("_journal_store", secrets.token_hex(8))
        if store is not None and store != mine:
            return mine
        if seq is not None:
            seqs = self.__dict__.setdefault("_journal_seqs", {})
            if any(seqs.get((space, k), seq) > seq for k in blobs):
                return ""
            seqs.update(((space, k), seq) for k in blobs)
        self._journal().setdefault(space, {}).update(blobs)
        return mine

    async def journal_del(self, space: str, keys: list[str]) -> None:
        d, seqs = self._journal().get(space, {}), self.__dict__.get("_journal_seqs", {})
        for k in keys:
            d.pop(k, None)
            seqs.pop((space, k), None)

    async def journal_items(self, space: str) -> dict[str, bytes]:
        return dict(self._journal().get(space, {}))

    async def journal_copy(self) -> dict[str, dict[str, bytes]]:
        """Every record, by space: the engine's stop takes it before it kills this hub, for a dispatcher Ray
        restarts in the stop (``HubJournal.hold``), which would otherwise find no journal to read."""
        return {space: dict(d) for space, d in self._journal().items()}


class HubJournal:
    """Journal records kept in the result hub's memory."""

    durable = False
    closed = False  # it holds no connection of its own: the hub's peer outlives it

    def __init__(self, hub: Any):
        self.hub: Peer = as_peer(hub)

    async def put(self, space: str, key: str, value: Any) -> None:
        await self.hub.call("journal_put", space, key, pickle.dumps(value))

    async def put_many(self, space: str, values: dict[str, Any]) -> None:
        await self.hub.call("journal_put_many", space, {k: pickle.dumps(v) for k, v in values.items()})

    async def put_checked(self, space: str, values: dict[str, Any], store: str | None,
                          pickled: dict[str, bytes] | None = None, seq: int | None = None) -> str:
        """``put_many`` of ``values`` and of ``pickled`` (pickled already) if the hub is the store ``store`` names
        and no later ``seq`` took its keys (``MemoryJournalStore.journal_put_checked``); the hub's store's name."""
        blobs = {k: pickle.dumps(v) for k, v in values.items()} | (pickled or {})
        return await self.hub.call("journal_put_checked", space, blobs, store, seq)

    async def delete(self, space: str, keys: list[str]) -> None:
        if keys:
            await self.hub.call("journal_del", space, list(keys))

    async def items(self, space: str) -> dict[str, Any]:
        return {k: pickle.loads(v) for k, v in (await self.hub.call("journal_items", space)).items()}

    async def close(self) -> None:
        return None

    def hold(self, spaces: dict[str, dict[str, bytes]]) -> None:
        """Read and write ``spaces`` (a copy of the hub's records, ``MemoryJournalStore.journal_copy``) in this
        process from now on: the engine's stop killed the hub, and with it the records of the batches a dispatcher
        Ray restarts then must cancel (``Recovery._recover_at_stop``)."""
        store = MemoryJournalStore()
        store.__dict__["_journal_spaces"] = {space: dict(d) for space, d in spaces.items()}
        self.hub = as_peer(store)
