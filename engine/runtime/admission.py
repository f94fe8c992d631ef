"""Admission, the runtime kernel's first step: which reuse a request may take. One copy of each rule, used by
the simulator and by the cache actor alike.

A request that allows reuse is, in this order: served from a stored result (exact, then near); attached to an
identical or near request in flight (:class:`InFlight`, under :func:`may_follow`); or it leads: it is
generated, and from then on it is a source that later identical and near requests may follow. A leader is a
source from the moment it leads, not from the moment its last attempt starts: no runtime can tell in advance
which attempt will succeed, so neither may the simulator.

A request may follow a leader due before it: the leader's deadline is its promise. One due *after* it may
still be followed, under a release time (``release_lead``): until then it waits for the leader's result, and
if none has come it is sent on its own, with time left for its own call. Media duplicates are the case: a
campaign re-sends a video while the first, sent with a longer deadline, is being generated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Literal, TypeVar

from engine.core.catalog import Catalog
from engine.core.grouping import ReuseSettings
from engine.core.latency import Z99, sync_latency_median
from engine.core.request import Request

__all__ = ["Follow", "InFlight", "Lead", "may_follow", "release_lead"]

T = TypeVar("T", bound=Hashable)
Follow = Literal["in_flight", "near"]


Lead = Callable[[Request], "float | None"]


def release_lead(catalog: Catalog, reuse: ReuseSettings) -> Lead | None:
    """How long before its deadline a request that follows a leader due after it must be sent on its own:
    twice its own call's p99 (the catalog's latency model: a failed attempt and its retry) plus
    ``reuse.follow_margin_s`` (queueing at a rate gate). None for all when the policy sets no margin, and None
    (it follows only a leader due no later than itself) for a request that
    - has a batch-API lever: sent on its own late, it would lose the discount it could have had from arrival;
    - is GPU-priced: released late, it joins a lane whose backlog no lead here can see. Measured on
      ``synth(20000)`` seeds 2 and 3, where the GPU provider is saturated: 44 and 163 requests missed
      deadlines that the rule on deadlines alone met (docs/cache.md, step 2)."""
    margin = reuse.follow_margin_s
    if margin is None or not reuse.in_flight:
        return None

    def lead(req: Request) -> float | None:
        provider = catalog.providers.get(req.provider)
        spec = provider.models.get(req.model) if provider is not None else None
        if spec is None or spec.gpu_priced or provider.supports_batch_api(req.kind):
            return None
        sigma = provider.sync_latency.sigma if spec.kind == "text" else provider.media_latency.sigma
        return 2 * sync_latency_median(provider, spec, req) * math.exp(Z99 * sigma) + margin

    return lead


def may_follow(reuse: ReuseSettings, leader: Request, req: Request, now: float = 0.0,
               lead: Lead | None = None) -> float | None:
    """Until when ``req`` may wait for the result of ``leader``, an identical (or near) request still in
    flight (None: it may not). The policy must allow in-flight reuse. A leader due no later than ``req`` is
    followed until its result comes (``inf``): a runtime cannot know when a call will finish, and the leader's
    deadline is the promise it has. A leader due later is followed only with a ``lead`` for ``req``
    (``release_lead``), until ``req``'s deadline minus that lead, if that is still ahead."""
    if not reuse.in_flight:
        return None
    if leader.deadline_at <= req.deadline_at:
        return math.inf
    s = lead(req) if lead is not None else None
    if s is None:
        return None
    until = req.deadline_at - s
    return until if until > now else None


class InFlight(Generic[T]):
    """Requests being generated, one leader per fingerprint, and the requests that wait for each leader's
    result. ``T`` is how a runtime names a request (the simulator: its index; the cache: its job)."""

    __slots__ = ("reuse", "lead_of", "_leaders", "_followers", "_orphaned")

    def __init__(self, reuse: ReuseSettings, lead_of: Lead | None = None):
        self.reuse = reuse
        self.lead_of = lead_of  # see ``may_follow``; None: only leaders due no later than the follower are followed
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

    def follow(self, fp: str, req: Request, who: T, hit: Follow = "in_flight", now: float = 0.0) -> float | None:
        """Attach ``who`` to the leader of ``fp`` if :func:`may_follow` allows it. Returns until when it
        follows (``inf``: until the leader's result; a finite time: the runtime then calls :meth:`release`),
        or None if it does not."""
        got = self._leaders.get(fp)
        if got is None:
            return None
        until = may_follow(self.reuse, got[0], req, now, self.lead_of)
        if until is not None:
            self._followers.setdefault(fp, []).append((who, hit))
        return until

    def release(self, fp: str, who: T) -> bool:
        """``who``'s release time came: if it still waits for the leader of ``fp``, it no longer does, and the
        runtime sends it on its own (True). False if it was resolved or orphaned meanwhile (the orphans' path
        generates those: taking one here too would bill it twice)."""
        fs = self._followers.get(fp)
        if not fs:
            return False
        for k, (w, _) in enumerate(fs):
            if w == who:
                del fs[k]
                if not fs:
                    del self._followers[fp]
                return True
        return False

    def waits(self, fp: str, who: T) -> bool:
        """Whether ``who`` still waits for the leader of ``fp`` (what :meth:`release` would take)."""
        return any(w == who for w, _ in self._followers.get(fp, ()))

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

    def take(self, pick: Callable[[T], bool]) -> list[T]:
        """Take out every waiting request ``pick`` chooses, followers and orphans alike: no leader's result
        resolves them now, nor the orphans' path; the runtime generates them itself."""
        out: list[T] = []
        for waiting in (self._followers, self._orphaned):
            for k, fs in list(waiting.items()):
                keep = [(w, h) for w, h in fs if not pick(w)]
                if len(keep) < len(fs):
                    out += [w for w, _ in fs if pick(w)]
                    if keep:
                        waiting[k] = keep
                    else:
                        del waiting[k]
        return out

    def following(self) -> Iterator[T]:
        for fs in (*self._followers.values(), *self._orphaned.values()):
            for who, _ in fs:
                yield who

    def n_following(self) -> int:
        return sum(len(fs) for fs in (*self._followers.values(), *self._orphaned.values()))
