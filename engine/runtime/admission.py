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
_Waiter = tuple[T, Follow, Request, float]  # a follower, how it follows, its request, until when it follows


def release_lead(catalog: Catalog, reuse: ReuseSettings) -> Lead | None:
    """How long before its deadline a request that follows a leader due after it must be sent on its own:
    twice its own call's p99 (the catalog's latency model: a failed attempt and its retry) plus
    ``reuse.follow_margin_s`` (queueing at a rate gate). None for all when the policy sets no margin, and None
    (it follows only a leader due no later than itself) for a request that
    - is text with a batch-API lever: sent on its own late, it would lose the discount it could have had from
      arrival. Not so a hosted image (OpenAI's since stop 71): it costs as much as its leader's whole image, and
      waiting for a leader in a batch was worth $1.91 / $5.39 / $6.38 more than going its own way (``synth(20000)``
      seeds 1-3, against $2.18 / $9.96 / $9.50 that the batches saved), no deadline lost;
    - is GPU-priced: released late, it joins a lane whose backlog no lead here can see. Measured on
      ``synth(20000)`` seeds 2 and 3, where the GPU provider is saturated: 44 and 163 requests missed
      deadlines that the rule on deadlines alone met (docs/cache.md, step 2)."""
    margin = reuse.follow_margin_s
    if margin is None or not reuse.in_flight:
        return None

    def lead(req: Request) -> float | None:
        provider = catalog.providers.get(req.provider)
        spec = provider.models.get(req.model) if provider is not None else None
        if spec is None or spec.gpu_priced or spec.kind == "text" and provider.supports_batch_api(req.kind, req.model):
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
    """Requests being generated, the copies of each fingerprint that later copies may follow (its *leaders*),
    and the requests that wait for each leader's result. ``T`` is how a runtime names a request (the simulator:
    its index; the cache: its job).

    A fingerprint has more than one leader when a copy due sooner than every copy being generated is generated
    too (it could not follow them: they are due later): it leads as well, so a third copy due between the two
    follows it instead of being generated a third time (a video paid three times at $1.20, a helper's fault
    hunt). A result of any leader answers the followers of all of them: the same output (a leader moved to its
    fallback model answers with that model's, as it would its own followers)."""

    __slots__ = ("reuse", "lead_of", "_leaders", "_followers", "_orphaned")

    def __init__(self, reuse: ReuseSettings, lead_of: Lead | None = None):
        self.reuse = reuse
        self.lead_of = lead_of  # see ``may_follow``; None: only leaders due no later than the follower are followed
        self._leaders: dict[str, list[tuple[Request, T]]] = {}  # in the order they came to lead
        self._followers: dict[tuple[str, str], list[_Waiter[T]]] = {}  # by (fingerprint, leader's uid)
        # Followers of a leader that failed, set aside until the runtime asks for them (``orphans``), by
        # fingerprint and the failed leader's uid. A result of the fingerprint meanwhile answers them too.
        self._orphaned: dict[str, dict[str, list[_Waiter[T]]]] = {}

    def __len__(self) -> int:
        return len(self._leaders)

    def leader(self, fp: str) -> T | None:
        """The first of ``fp``'s leaders, or None."""
        got = self._leaders.get(fp)
        return None if not got else got[0][1]

    def lead(self, fp: str, req: Request, who: T) -> bool:
        """``who`` is generated; it leads ``fp`` unless a copy due no later than it already does. Returns
        whether it leads."""
        got = self._leaders.setdefault(fp, [])
        if any(w == who for _, w in got):
            return True
        if got and req.deadline_at >= min(r.deadline_at for r, _ in got):
            return False
        got.append((req, who))
        return True

    def follow(self, fp: str, req: Request, who: T, hit: Follow = "in_flight", now: float = 0.0) -> float | None:
        """Attach ``who`` to a leader of ``fp`` if :func:`may_follow` allows it: the first due no later than
        ``req``, else (under a release time) the one due first. Returns until when it follows (``inf``: until
        a leader's result; a finite time: the runtime then calls :meth:`release`), or None if it does not."""
        got = self._leaders.get(fp)
        if not got:
            return None
        leader = next((r for r, _ in got if r.deadline_at <= req.deadline_at), None)
        if leader is None:
            leader = min((r for r, _ in got), key=lambda r: r.deadline_at)
        until = may_follow(self.reuse, leader, req, now, self.lead_of)
        if until is not None:
            self._followers.setdefault((fp, leader.uid), []).append((who, hit, req, until))
        return until

    def _waiting(self, fp: str) -> Iterator[tuple[tuple[str, str], list[_Waiter[T]]]]:
        for r, _ in self._leaders.get(fp, ()):
            fs = self._followers.get((fp, r.uid))
            if fs:
                yield (fp, r.uid), fs

    def release(self, fp: str, who: T, at: float | None = None) -> Follow | None:
        """``who``'s release time ``at`` came: if it still waits for a leader of ``fp`` under that release time,
        it no longer does, and the runtime sends it on its own (how it followed is returned), else None: it was
        resolved or orphaned meanwhile (the orphans' path generates those: taking one here too would bill it
        twice), or it follows again, under another time or none (an orphan that took another leader: its old
        timer released it, in the simulator only, and it was paid though its new leader answered it)."""
        for key, fs in self._waiting(fp):
            for k, (w, hit, _, until) in enumerate(fs):
                if w == who:
                    if at is not None and until != at:
                        return None
                    del fs[k]
                    if not fs:
                        del self._followers[key]
                    return hit
        return None

    def waits(self, fp: str, who: T) -> bool:
        """Whether ``who`` still waits for a leader of ``fp`` (what :meth:`release` would take)."""
        return any(f[0] == who for _, fs in self._waiting(fp) for f in fs)

    def done(self, fp: str, who: T) -> list[tuple[T, Follow]]:
        """``who`` has its result: it no longer leads ``fp``, and the requests attached to every leader of
        ``fp`` are handed back, to resolve with that result, and so are those of a failed leader not yet taken
        back (:meth:`orphans`: the cache takes them after the results of the same moment, and generated one that
        this result could answer). A request that failed goes through :meth:`orphans` instead."""
        out = [(f[0], f[1]) for _, fs in list(self._waiting(fp)) for f in fs]
        out += [(f[0], f[1]) for fs in self._orphaned.pop(fp, {}).values() for f in fs]
        got = self._leaders.get(fp, [])
        for r, _ in got:
            self._followers.pop((fp, r.uid), None)
        rest = [(r, w) for r, w in got if w != who]
        if rest:
            self._leaders[fp] = rest
        else:
            self._leaders.pop(fp, None)
        return out

    def drop(self, fp: str, uid: str) -> None:
        """The request ``uid`` failed for good. If it leads ``fp``, it no longer does, and its followers are set
        aside for :meth:`orphans`; a request that does not lead ``fp`` takes nobody's followers with it."""
        got = self._leaders.get(fp)
        if not got or all(r.uid != uid for r, _ in got):
            return
        rest = [(r, w) for r, w in got if r.uid != uid]
        if rest:
            self._leaders[fp] = rest
        else:
            del self._leaders[fp]
        fs = self._followers.pop((fp, uid), None)
        if fs:
            self._orphaned.setdefault(fp, {})[uid] = fs

    def orphans(self, fp: str, uid: str) -> list[tuple[T, Follow]]:
        """The followers of ``uid``, which failed for good leading ``fp``, in the order a runtime admits them
        again. Each may follow another leader of ``fp`` (a runtime tries :meth:`follow` first; a near copy
        then its own fingerprint's); the first that cannot is generated and leads, and those after it may
        follow it. Generated each on its own, three identical orphans made three paid calls where one would
        do (a helper's fault hunt)."""
        self.drop(fp, uid)
        held = self._orphaned.get(fp, {})
        fs = held.pop(uid, [])
        if not held:
            self._orphaned.pop(fp, None)
        # Identical copies first, the one due first at the head: it leads, and every other copy is due no
        # earlier, so it may follow it. Near copies after, by deadline too. (A stable sort: ties keep the
        # order they followed in, the same in both runtimes.)
        fs.sort(key=lambda f: (f[1] != "in_flight", f[2].deadline_at))
        return [(f[0], f[1]) for f in fs]

    def take(self, pick: Callable[[T], bool]) -> list[T]:
        """Take out every waiting request ``pick`` chooses, followers and orphans alike: no leader's result
        resolves them now, nor the orphans' path; the runtime generates them itself."""
        out: list[T] = []
        for waiting in (self._followers, *self._orphaned.values()):
            for k, fs in list(waiting.items()):
                keep = [f for f in fs if not pick(f[0])]
                if len(keep) < len(fs):
                    out += [f[0] for f in fs if pick(f[0])]
                    if keep:
                        waiting[k] = keep
                    else:
                        del waiting[k]
        for fp in [fp for fp, held in self._orphaned.items() if not held]:
            del self._orphaned[fp]
        return out

    def _lists(self) -> Iterator[list[_Waiter[T]]]:
        yield from self._followers.values()
        for held in self._orphaned.values():
            yield from held.values()

    def following(self) -> Iterator[T]:
        for fs in self._lists():
            for f in fs:
                yield f[0]

    def n_following(self) -> int:
        return sum(len(fs) for fs in self._lists())
