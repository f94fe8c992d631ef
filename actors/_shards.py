"""One keyed role spread over several actors, and the keys that route to them.

The result hub shards by request id (``uid_shard``): everything it keeps is per id. Ingest, the cache and the
groupers shard by compatibility class (``class_shard``): an exact duplicate has the same fingerprint, hence the
same class, and near duplicates are only ever searched within a class, so a class's whole reuse and batching
state lives in one actor, and reaches it through one ingest shard in submission order. (That an id names one
content across ingest shards, the hub shard of the id checks: ``ResultHub.admit``.) With one shard every message
goes whole to it, as before sharding.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from actors._peer import Peer, as_peer
from engine.core.features import compat_key
from engine.core.request import Request

__all__ = ["Shards", "by_job_class", "by_result_uid", "class_shard", "key_shard", "shard_kind",
           "uid_shard"]


def key_shard(key: Any, n: int) -> int:
    return 0 if n == 1 else zlib.crc32(repr(key).encode()) % n


def class_shard(req: Request, n: int) -> int:
    """The ingest, cache and grouper shard that own a request: by its compatibility key, so requests that may
    share a batch or a cached result (and a request's retries) always meet in one actor."""
    return 0 if n == 1 else key_shard(compat_key(req), n)


def uid_shard(uid: str, n: int) -> int:
    """The hub shard of a request id (``Request.uid``)."""
    return 0 if n == 1 else zlib.crc32(uid.encode()) % n


def by_result_uid(r: Any, n: int) -> int:
    """A ``Result`` or ``Request``: by its uid."""
    return uid_shard(r.uid, n)


def by_job_class(job: Any, n: int) -> int:
    """A ``Job``: by its request's class."""
    return class_shard(job.req, n)


def shard_kind(base: str, k: int) -> str:
    """The actor kind of shard ``k`` of ``base`` ("hub", "hub-1", "hub-2" ...): shard 0 keeps the plain name."""
    return base if k == 0 else f"{base}-{k}"


Route = Callable[[Any, int], int] | Sequence[int]


class Shards(list):
    """The peers of one sharded role, in shard order. ``send``/``call`` split ``items`` (and lists parallel to
    it) by ``route`` (a function of an item and the shard count, or each item's shard) and give each shard its
    part: one message per shard that owns any, none for an empty share. ``lead`` are arguments that come first
    and go whole to every part (a driver's id, say)."""

    def __init__(self, peers: Any):
        seq = peers if isinstance(peers, (list, tuple)) else [peers]
        super().__init__(as_peer(p) for p in seq if p is not None)

    @property
    def first(self) -> Peer | None:
        """Shard 0: the one that also keeps what is not sharded (the hub's journal, logs and metrics)."""
        return self[0] if self else None

    def _parts(self, route: Route, items: Sequence, parallel: tuple) -> list[tuple[int, list[int] | None, tuple]]:
        """(shard, positions in ``items`` or None for all, the arguments split) per shard owning any item."""
        n = len(self)
        if n == 0:  # no such role (an engine without a cache, say): nobody to tell
            return []
        if n == 1:
            return [(0, None, (items, *parallel))] if len(items) else []
        pos: list[list[int]] = [[] for _ in range(n)]
        if callable(route):
            for k, it in enumerate(items):
                pos[route(it, n)].append(k)
        else:
            for k, s in enumerate(route):
                pos[s].append(k)
        return [(s, p, tuple([seq[k] for k in p] for seq in (items, *parallel))) for s, p in enumerate(pos) if p]

    def send(self, method: str, route: Route, items: Sequence, *parallel: Sequence, lead: tuple = ()) -> None:
        for s, _, args in self._parts(route, items, parallel):
            self[s].send(method, *lead, *args)

    async def call(self, method: str, route: Route, items: Sequence, *parallel: Sequence,
                   lead: tuple = ()) -> list[tuple[list[int] | None, Any]]:
        """Each shard's answer with the positions (in ``items``) of the part it got (None: all of them).
        Raises the first failure, once every part has been answered or has failed."""
        answers, errors = await self.call_partial(method, route, items, *parallel, lead=lead)
        if errors:
            raise errors[0]
        return answers

    async def call_partial(self, method: str, route: Route, items: Sequence, *parallel: Sequence,
                           lead: tuple = ()) -> tuple[list[tuple[list[int] | None, Any]], list[BaseException]]:
        """As ``call``, but the answers of the shards that answered and the failures of the others: where an
        answer changed the shard's state (it handed over followers, refused an id), it must not be lost
        because another shard failed."""
        parts = self._parts(route, items, parallel)
        got = await asyncio.gather(*(self[s].call(method, *lead, *args) for s, _, args in parts),
                                   return_exceptions=True)
        answers = [(pos, a) for (_, pos, _), a in zip(parts, got) if not isinstance(a, BaseException)]
        return answers, [a for a in got if isinstance(a, BaseException)]
