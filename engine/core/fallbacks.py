"""The fallback calendar: the provider calls that the batches under way may need when they fall back to sync.

Pure runtime state, no I/O: the runtime's ``GroupTable`` reserves each batch dispatch's fallback and frees it when
the batch's members come back; a policy asks ``latest`` where a new batch's fallback fits (``policies._text``).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable

__all__ = ["FallbackCalendar"]


class FallbackCalendar:
    """The provider's concurrent calls that the batches under way may need for their sync fallbacks: each
    batch's members, from its final hedge to its earliest deadline (less the margin), ``calls`` of about
    ``call_s`` each. A batch's hedge leaves room for its own members' calls; batches that hedge together share
    the provider's calls, so a policy moves a new batch's hedge earlier until, served in turn, its calls and
    every reservation's finish in time (a helper's property test: three lanes hedged at one instant at a provider
    of one call, and two fallbacks missed deadlines naive met). Runtime state that a policy reads, like
    ``LaneRates``: the table reserves every batch dispatch's fallback, and frees it when its members come back
    (cancelled at a checkpoint or hedge) or its end has passed (a batch back in time is not told apart: it errs
    on the safe side). Holds only the reservations not yet ended, and their members' ids."""

    __slots__ = ("_by", "_ends", "_of", "_seq")

    def __init__(self) -> None:
        self._by: dict[str, list[list]] = {}  # provider -> [start, end, calls, call_s, provider, uids] by start
        self._ends: list[tuple] = []  # heap of (end, seq, reservation): each goes once its end has passed
        self._of: dict[str, list] = {}  # member uid -> its batch's reservation
        self._seq = itertools.count()

    def reserve(self, provider: str, fallback: tuple[float, float, int, float], uids: Iterable[str],
                now: float) -> None:
        """``fallback``: (start, end, calls, call_s) of a batch whose members are ``uids``."""
        self._expire(now)
        r = [*fallback, provider, tuple(uids)]
        bisect.insort(self._by.setdefault(provider, []), r, key=lambda x: x[0])
        heapq.heappush(self._ends, (r[1], next(self._seq), r))
        for u in r[5]:
            self._of[u] = r

    def free(self, uid: str) -> None:
        """``uid``'s batch was cancelled (its members come back to be decided again): its calls are free."""
        r = self._of.get(uid)
        if r is not None:
            self._drop(r)

    def _expire(self, now: float) -> None:
        while self._ends and self._ends[0][0] < now:
            self._drop(heapq.heappop(self._ends)[2])

    def _drop(self, r: list) -> None:
        for u in r[5]:
            if self._of.get(u) is r:
                del self._of[u]
        book = self._by.get(r[4], [])
        k = bisect.bisect_left(book, r[0], key=lambda x: x[0])
        while k < len(book) and book[k] is not r and book[k][0] == r[0]:
            k += 1
        if k < len(book) and book[k] is r:
            del book[k]

    def latest(self, provider: str, start: float, end: float, calls: int, call_s: float, conc: int,
               now: float) -> float:
        """The latest start, at ``start`` or before, of ``calls`` more of ``call_s`` each, due by ``end``, at which
        the provider's ``conc`` calls, served in the order the fallbacks come, finish ours by ``end`` and every
        reservation by its own end (or no later than it would without ours): ``start``, else just before a
        reservation in its way begins or as it ends, within three durations (ours or the longest reservation's)
        earlier; failing that, the earliest of those."""
        self._expire(now)
        book = self._by.get(provider)
        if not book:
            return start
        dur = end - start
        floor = start - 3 * max(dur, max(r[1] - r[0] for r in book), 1.0)
        near = [r for r in book if r[1] > floor]  # by start; those past our end too: ours may delay them in turn
        if calls + sum(r[2] for r in near) <= conc:
            return start  # all of them at once
        tries = sorted({start, *(x for r in near for x in (r[0] - dur, r[0] - 1e-6, r[1] - dur)
                                if floor <= x < start)}, reverse=True)[:16]
        # Served first come, first served, a job's finish depends only on the jobs before it. So each try starts
        # from the provider's calls as they stand before its place (kept from serving ``near`` alone), and stops
        # at the first job that would finish too late: the same sums in the same order as serving all of them
        # again for each try, which took a quarter of a Mooncake run's time.
        starts = [r[0] for r in near]
        at = {t: bisect.bisect_right(starts, t) for t in tries}  # ours goes after the reservations starting with it
        alone, before = _finishes(near, conc, set(at.values()))
        for t in tries:
            k = at[t]
            free = list(before[k])
            if _serve(free, t, calls, call_s) <= t + dur + 1e-6 and all(
                    _serve(free, r[0], r[2], r[3]) <= max(r[1], was) + 1e-6 for r, was in zip(near[k:], alone[k:])):
                return t
        return tries[-1]

    def __len__(self) -> int:
        return sum(len(b) for b in self._by.values())


def _finishes(jobs: list, conc: int, keep: set[int] = frozenset()) -> tuple[list[float], dict[int, list[float]]]:
    """When each of ``jobs`` ([start, end, calls, call_s, ...], by start) has its last call done, its calls served
    in the order the jobs start by ``conc`` calls at once, each by the call that frees first; and, for each index
    in ``keep``, the provider's calls as they stood before that job (a heap of when each is next free)."""
    free = [-math.inf] * conc
    out, before = [], {}
    for k, (start, _, n, call, *_) in enumerate(jobs):
        if k in keep:
            before[k] = list(free)
        out.append(_serve(free, start, n, call))
    if len(jobs) in keep:
        before[len(jobs)] = free
    return out, before


def _serve(free: list[float], start: float, n: int, call: float) -> float:
    """Serve ``n`` calls of ``call`` seconds from ``start`` on the calls ``free`` (a heap, updated); the last's end."""
    last = start
    for _ in range(n):
        at = max(start, free[0]) + call
        heapq.heapreplace(free, at)
        last = at if at > last else last
    return last
