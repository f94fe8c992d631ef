"""The simulator's near-duplicate and in-flight reuse steps (``engine.runtime.admission`` holds the rules, which
the cache actor applies too). A mixin of the simulator: it uses its state."""

from __future__ import annotations

import math

from engine.core.features import near_text
from engine.core.request import Request
from engine.runtime.admission import Follow


class SimReuse:
    """Reuse methods of the simulator."""

    def near(self, i: int, r: Request, now: float) -> bool:
        """Reuse or follow the top near match, found by its fingerprint: a stored result, or a source still in
        flight under the rule for identical ones (``admission.may_follow``)."""
        h = self.index.near(self.near_cls[i], self.vecs[i], near_text(r), self.near_threshold,
                            self.reuse.guards)
        if h is None:
            return False
        found = self.index.exact(h.source)
        if found is not None and found[1] <= now:
            self.resolve_reused(i, now, 3)
            return True
        return self.follow(h.source, r, i, "near")

    def follow(self, fp: str, r: Request, i: int, hit: Follow) -> bool:
        until = self.inflight.follow(fp, r, i, hit, self.now)
        if until is not None and until < math.inf:
            self.push(until, "release", (fp, i, until))
        return until is not None

    def on_release(self, payload: tuple[str, int, float]) -> None:
        """Its leader is late: it follows another copy in flight due no later than itself, or goes on its own."""
        fp, i, at = payload
        hit = self.inflight.release(fp, i, at)
        if hit is not None and not self.follow(fp, self.reqs[i], i, hit):
            self.admit(i, fresh=False)

    def follow_again(self, fp: str, i: int, hit: Follow) -> bool:
        """An orphan of a failed leader of ``fp`` follows another copy in flight: of ``fp``, or, a near copy, of
        its own fingerprint (an identical near copy led it after the failure)."""
        r = self.reqs[i]
        return self.follow(fp, r, i, hit) or (self.fps[i] != fp and self.follow(self.fps[i], r, i, "in_flight"))

    def index_near(self, i: int, fp: str, done: float) -> None:
        """A source for near duplicates, from when it leads (or, if it never led, when it completes)."""
        vec = self.vecs.get(i)
        if vec is None or fp in self.near_indexed:
            return
        self.near_indexed.add(fp)
        self.index.add_near(self.near_cls[i], vec[None, :], [fp], [near_text(self.reqs[i])],
                            [done])
