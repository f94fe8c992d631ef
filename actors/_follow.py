"""In-flight followers of ``ResultCache`` and their release times. A mixin of ``ResultCache``: it uses the
cache's state (``inflight``, ``clock``, ``groupers``, ``stats``)."""

from __future__ import annotations

import asyncio
import heapq
import math

from actors._near_index import Item
from actors._types import send_sharded
from engine.runtime.admission import Follow

__all__ = ["Following"]

PRUNE_AT = 4096  # release entries kept before those of answered followers are dropped


class Following:
    """Attach requests to a leader in flight (``engine.runtime.admission.may_follow``), and send on its own
    each follower whose release time comes before its leader's result, as the simulator's ``on_release``."""

    def _attach(self, item: Item) -> bool:
        """Follow an identical request in flight, under ``admission.may_follow``."""
        if self._follow(item.fp, item, "in_flight"):
            self.stats["in_flight"] += 1
            return True
        return False

    def _follow(self, fp: str, item: Item, hit: Follow) -> bool:
        """Attach ``item`` to the leader of ``fp``; a release time, if it has one, is kept and its timer set."""
        until = self.inflight.follow(fp, item.req, item, hit, self._now())
        if until is None:
            return False
        if until < math.inf:
            if len(self._releases) > PRUNE_AT and len(self._releases) > 2 * self.inflight.n_following():
                # Most entries are of followers answered long before their release time (a day, for some):
                # drop those rather than keep them to their time.
                waiting = {id(f) for f in self.inflight.following()}
                self._releases = [e for e in self._releases if id(e[3]) in waiting]
                heapq.heapify(self._releases)
            heapq.heappush(self._releases, (until, next(self._release_seq), fp, item))
            if self._releases[0][3] is item:
                self._arm_release()
        return True

    def _arm_release(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._release_timer = None
        rel = self._releases
        # Entries of followers answered or orphaned before their time go from the top now, not at their time:
        # a clock that cannot wake the cache (a test's manual clock) is polled, and for them it was polled on
        # until that time, which may never come.
        while rel and not self.inflight.waits(rel[0][2], rel[0][3]):
            heapq.heappop(rel)
        if rel and self.clock is not None:  # without a clock no time passes: ``set_clock`` arms it
            # At least a poll's worth of real time: a test's manual clock says 0 for any wait.
            delay = max(self.clock.real_delay(rel[0][0] - self._now()), 0.01)
            self._release_timer = asyncio.get_running_loop().call_later(delay, self._release_due)

    def _answered(self) -> None:
        """Followers left the in-flight table (answered or orphaned): the timer waits for the next that waits."""
        rel = self._releases
        if rel and not self.inflight.waits(rel[0][2], rel[0][3]):
            self._arm_release()

    def _release_due(self) -> None:
        """Followers whose release time came and whose leader has no result yet go on their own: to the
        groupers, like a miss (kept in ``released`` for a caller without groupers)."""
        self._release_timer = None
        now, out = self._now(), []
        while self._releases and self._releases[0][0] <= now:
            until, _, fp, item = heapq.heappop(self._releases)
            hit = self.inflight.release(fp, item, until)
            # It follows another copy in flight due no later than itself, or is generated after all.
            if hit is not None and not self._follow(fp, item, hit):
                self._lead(item)
                out.append(item)
        self.stats["released"] += len(out)
        if out:
            if self.groupers:
                send_sharded(self.groupers, out)
            else:
                self.released.extend(out)
        self._arm_release()

