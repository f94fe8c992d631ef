"""Admission, the runtime kernel's first step: which reuse a request may take. One copy of each rule, used by
the simulator and by the cache actor alike.

A request that allows reuse is, in this order: served from a stored result (exact, then near); attached to an
identical or near request in flight (:class:`InFlight`, under :func:`may_follow`); or it leads: it is
generated, and from then on it is a source that later identical and near requests may follow. A leader is a
source from the moment it leads, not from the moment its last attempt starts: no runtime can tell in advance
which attempt will succeed, so neither may the simulator.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, Literal, TypeVar

from engine.core.grouping import ReuseSettings
from engine.core.request import Request

__all__ = ["Follow", "InFlight", "may_follow"]

T = TypeVar("T", bound=Hashable)
Follow = Literal["in_flight", "near"]


def may_follow(reuse: ReuseSettings, leader: Request, req: Request) -> bool:
    """Whether ``req`` may wait for the result of ``leader``, an identical (or near) request still in flight:
    only when the policy allows in-flight reuse and the leader is due no later than ``req``. A runtime cannot
    know when a call will finish, so the leader's deadline is the only promise it has."""
    return reuse.in_flight and leader.deadline_at <= req.deadline_at


class InFlight(Generic[T]):
    """Requests being generated, one leader per fingerprint, and the requests that wait for each leader's
    result. ``T`` is how a runtime names a request (the simulator: its index; the cache: its job)."""

    __slots__ = ("reuse", "_leaders", "_followers", "_orphaned")

    def __init__(self, reuse: ReuseSettings):
        self.reuse = reuse
        self._leaders: dict[str, tuple[Request, T]] = {}
        self._followers: dict[str, list[tuple[T, Follow]]] = {}
        # Followers of a leader that failed, set aside until the runtime asks for them (``orphans``): a request
        # that leads the fingerprint next gets followers of its own.
        self._orphaned: dict[tuple[str, str], list[tuple[T, Follow]]] = {}

    def __len__(self) -> int:
        return len(self._leaders)

    def leader(self, fp: str) -> T | None:
        got = self._leaders.get(fp)
        return None if got is None else got[1]

    def lead(self, fp: str, req: Request, who: T) -> bool:
        """``who`` is generated; it leads ``fp`` unless another request already does. Returns whether it leads."""
        return self._leaders.setdefault(fp, (req, who))[1] == who

    def follow(self, fp: str, req: Request, who: T, hit: Follow = "in_flight") -> bool:
        """Attach ``who`` to the leader of ``fp`` if :func:`may_follow` allows it; returns whether it did."""
        got = self._leaders.get(fp)
        if got is None or not may_follow(self.reuse, got[0], req):
            return False
        self._followers.setdefault(fp, []).append((who, hit))
        return True

    def done(self, fp: str, who: T) -> list[tuple[T, Follow]]:
        """``who`` has its result: it no longer leads ``fp``, and the requests attached to ``fp`` are handed
        back, to resolve with that result (a request that failed goes through :meth:`orphans` instead)."""
        got = self._leaders.get(fp)
        if got is not None and got[1] == who:
            del self._leaders[fp]
        return self._followers.pop(fp, [])

    def drop(self, fp: str, uid: str) -> None:
        """The request ``uid`` failed for good. If it leads ``fp``, it no longer does, and its followers are set
        aside for :meth:`orphans`; a request that does not lead ``fp`` takes nobody's followers with it."""
        got = self._leaders.get(fp)
        if got is None or got[0].uid != uid:
            return
        del self._leaders[fp]
        fs = self._followers.pop(fp, None)
        if fs:
            self._orphaned[(fp, uid)] = fs

    def orphans(self, fp: str, uid: str) -> list[tuple[T, Follow]]:
        """The followers of ``uid``, which failed for good leading ``fp``: they must be generated after all."""
        self.drop(fp, uid)
        return self._orphaned.pop((fp, uid), [])

    def following(self) -> Iterator[T]:
        for fs in (*self._followers.values(), *self._orphaned.values()):
            for who, _ in fs:
                yield who

    def n_following(self) -> int:
        return sum(len(fs) for fs in (*self._followers.values(), *self._orphaned.values()))
