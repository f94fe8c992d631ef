"""A journal in Ray's own key-value store (the GCS, on the head node): its records outlive every actor of the engine,
the result hub too, and go with the Ray cluster.

Kept here: a Redis budget ledger's outbox, the settlements and charges its Redis could not take yet
(``actors._budget_outbox``). In the hub's memory, it was lost when the hub and the budget controller died together
while Redis was away (a node lost, both workers killed): spend uncounted, a hard budget passable unseen. Not a
journal on that Redis, which is the one away, nor a file under ``journal.dir``, which a controller Ray restarts on
another node cannot read. Written only while Redis is away, so Ray's store carries no steady load.

One key per record, ``<engine>:journal:<run>:<space>\\x1f<key>`` (a record may hold many: the outbox writes one
per flush, ``actors._budget_outbox``; a memory ledger's copy, one per incarnation of the controller,
``actors._budget_journal``) in Ray namespace ``smartbatch``; the engine's stop removes its engine's
(``drop_engine``), once its driver kept what a Redis ledger's outbox still held (``actors._budget_kept``). Ray's calls block, so each runs in a thread off the actor's event loop.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

__all__ = ["KvJournal", "drop_engine"]

_NS = "smartbatch"  # the namespace the engine's clock and layout are published in (``actors._peer``)
_SEP = "\x1f"


def _base(engine: str) -> str:
    return f"{engine}:journal:"


def drop_engine(engine: str) -> None:
    """Remove every record ``engine``'s runs kept here (its stop: nobody reads them after it)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_base(engine), del_by_prefix=True, namespace=_NS)


class KvJournal:
    """Journal records of one engine run in Ray's key-value store. Pickled with the actor's arguments: it holds
    names only, so the actor Ray restarts reads the same records."""

    durable = True
    closed = False  # it holds no connection of its own

    def __init__(self, engine: str, run: str):
        self.engine, self.run = engine, run

    def __repr__(self) -> str:
        return f"KvJournal({self.engine!r}, {self.run!r})"

    def _prefix(self, space: str) -> str:
        return f"{_base(self.engine)}{self.run}:{space}{_SEP}"

    async def put(self, space: str, key: str, value: Any) -> None:
        await self.put_many(space, {key: value})

    async def put_many(self, space: str, values: dict[str, Any]) -> None:
        # Pickled here: a value that cannot be pickled fails the write, before any of it is sent.
        blobs = {self._prefix(space) + k: pickle.dumps(v) for k, v in values.items()}

        def run() -> None:
            from ray.experimental import internal_kv

            for k, blob in blobs.items():
                internal_kv._internal_kv_put(k, blob, overwrite=True, namespace=_NS)
        await asyncio.to_thread(run)

    async def delete(self, space: str, keys: list[str]) -> None:
        if not keys:
            return
        names = [self._prefix(space) + k for k in keys]

        def run() -> None:
            from ray.experimental import internal_kv

            for k in names:
                internal_kv._internal_kv_del(k, namespace=_NS)
        await asyncio.to_thread(run)

    async def clear(self, space: str) -> None:
        """Remove every record of ``space`` in one call (Ray's store deletes one key a call, or a prefix)."""
        prefix = self._prefix(space)

        def run() -> None:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_del(prefix, del_by_prefix=True, namespace=_NS)
        await asyncio.to_thread(run)

    async def items(self, space: str) -> dict[str, Any]:
        prefix = self._prefix(space)

        def run() -> dict[str, Any]:
            from ray.experimental import internal_kv

            out = {}
            for k in internal_kv._internal_kv_list(prefix, namespace=_NS):
                blob = internal_kv._internal_kv_get(k, namespace=_NS)
                if blob is not None:  # deleted between the list and the read
                    out[k.decode()[len(prefix):]] = pickle.loads(blob)
            return out
        return await asyncio.to_thread(run)

    async def close(self) -> None:
        return None
