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

    __slots__ = ("_by", "_durs", "_ends", "_of", "_seq")

    def __init__(self) -> None:
        self._by: dict[str, list[list]] = {}  # provider -> [start, end, calls, call_s, provider, uids] by start
        self._durs: dict[str, list[float]] = {}  # provider -> its reservations' end - start, sorted
        self._ends: list[tuple] = []  # heap of (end, seq, reservation): each goes once its end has passed
        self._of: dict[str, list] = {}  # member uid -> its batch's reservation
        self._seq = itertools.count()

    def reserve(self, provider: str, fallback: tuple[float, float, int, float], uids: Iterable[str],
                now: float) -> None:
        """``fallback``: (start, end, calls, call_s) of a batch whose members are ``uids``."""
        self._expire(now)
        r = [*fallback, provider, tuple(uids)]
        bisect.insort(self._by.setdefault(provider, []), r, key=lambda x: x[0])
        bisect.insort(self._durs.setdefault(provider, []), r[1] - r[0])
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
            durs = self._durs[r[4]]
            del durs[bisect.bisect_left(durs, r[1] - r[0])]

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
        durs = self._durs[provider]
        dur = end - start
        floor = start - 3 * max(dur, durs[-1], 1.0)
        near = _Near(book, floor, durs[-1], conc)  # by start; those past our end too: ours may delay them in turn
        if not near.more_calls_than(conc - calls):
            return start  # all of them at once
        # Every try comes from a reservation starting before our start or end (less the shortest duration).
        near.read_to(bound := max(start + max(dur, 1e-6), end - durs[0]) + _SLACK_S)
        tries = sorted({start, *(x for r in near.jobs[:bisect.bisect_left(near.jobs, bound, key=_start)]
                                for x in (r[0] - dur, r[0] - 1e-6, r[1] - dur) if floor <= x < start)},
                       reverse=True)[:16]
        # Served first come, first served, a job's finish depends only on the jobs before it. So each try starts
        # from the provider's calls as they stand before its place (kept from serving ``near`` alone), and stops
        # at the first job that would finish too late: the same sums in the same order as serving all of them
        # again for each try, which took a quarter of a Mooncake run's time.
        # Ours goes after the reservations starting with it.
        at = {t: bisect.bisect_right(near.jobs, t, key=_start) for t in tries}
        near.keep(set(at.values()))
        for t in tries:
            if near.fits(at[t], t, dur, calls, call_s):
                return t
        return tries[-1]

    def __len__(self) -> int:
        return sum(len(b) for b in self._by.values())


_SLACK_S = 1.0  # seconds read past a bound computed from an end - start, against its rounding


class _Near:
    """The reservations of one ``latest`` that end after ``floor``, by start, read from the book only as far as a
    question needs: with every batch sent at once (``batch_gather_s: 0``) a provider holds thousands, up to a day
    ahead, and reading all of them and serving their calls again on every ask took 70 % of a run (stop 61). Keeps
    their calls served alone (``alone``: when each has its last call done) and the provider's calls as they stood
    before each index asked for (``before``)."""

    __slots__ = ("_at", "_book", "_floor", "_free", "_keep", "alone", "before", "jobs")

    def __init__(self, book: list[list], floor: float, longest: float, conc: int) -> None:
        # One that starts at ``floor - longest`` or before ends by ``floor``: none of those is near.
        self._at = bisect.bisect_left(book, floor - longest - _SLACK_S, key=lambda x: x[0])
        self._book, self._floor = book, floor
        self._free = [-math.inf] * conc
        self._keep: set[int] = set()
        self.jobs: list[list] = []
        self.alone: list[float] = []
        self.before: dict[int, list[float]] = {}

    def more_calls_than(self, n: int) -> bool:
        """Whether ``near``'s reservations hold more than ``n`` calls, read until they do (or the book ends)."""
        book, jobs, floor, i = self._book, self.jobs, self._floor, self._at
        total = sum(r[2] for r in jobs)
        while total <= n and i < len(book):
            r = book[i]
            i += 1
            if r[1] > floor:
                jobs.append(r)
                total += r[2]
        self._at = i
        return total > n

    def _read_one(self) -> bool:
        """Read the next reservation of ``near``; False at the book's end."""
        book, jobs, floor = self._book, self.jobs, self._floor
        while self._at < len(book):
            r = book[self._at]
            self._at += 1
            if r[1] > floor:
                jobs.append(r)
                return True
        return False

    def read_to(self, t: float) -> None:
        """Read every reservation that starts before ``t``."""
        book, jobs = self._book, self.jobs
        while self._at < len(book) and book[self._at][0] < t:
            r = book[self._at]
            self._at += 1
            if r[1] > self._floor:
                jobs.append(r)

    def keep(self, ks: set[int]) -> None:
        """Keep the provider's calls as they stand before each index of ``ks`` (all within those read)."""
        self._keep = ks
        self._serve_to(max(ks))

    def _serve_to(self, n: int) -> None:
        free, alone, jobs = self._free, self.alone, self.jobs
        while len(alone) < n:
            k = len(alone)
            if k in self._keep:
                self.before[k] = list(free)
            start, _, calls, call, *_ = jobs[k]
            alone.append(_serve(free, start, calls, call))
        if n in self._keep and n not in self.before:
            self.before[n] = list(free)

    def fits(self, k: int, t: float, dur: float, calls: int, call_s: float) -> bool:
        """Whether ours, placed at index ``k`` and started at ``t``, finishes by ``t + dur`` and every reservation
        after it by its own end (or no later than alone). The serving stops at the first one that starts with
        every call free: our calls only ever delay the others' (each call frees no earlier with them), so from
        there each finishes as alone, and ends the check as the remaining ones (all in time) would."""
        free = list(self.before[k])
        busy = max(free)
        fin = _serve(free, t, calls, call_s)
        if fin > t + dur + 1e-6:
            return False
        busy, jobs, alone, j = max(busy, fin), self.jobs, self.alone, k
        while j < len(jobs) or self._read_one():
            r = jobs[j]
            if busy <= r[0]:
                return True
            if j == len(alone):  # past every index kept (``keep``): no snapshot to take
                alone.append(_serve(self._free, r[0], r[2], r[3]))
            f = _serve(free, r[0], r[2], r[3])
            if f > max(r[1], alone[j]) + 1e-6:
                return False
            busy, j = max(busy, f), j + 1
        return True


def _start(r: list) -> float:
    return r[0]


def _serve(free: list[float], start: float, n: int, call: float) -> float:
    """Serve ``n`` calls of ``call`` seconds from ``start`` on the calls ``free`` (a heap, updated); the last's end."""
    if n == 1:  # most batches of a lane that sends each request at once: the loop below, once
        at = (free[0] if free[0] > start else start) + call  # max(start, free[0]), its tie included
        heapq.heapreplace(free, at)
        return at if at > start else start
    last = start
    for _ in range(n):
        at = max(start, free[0]) + call
        heapq.heapreplace(free, at)
        last = at if at > last else last
    return last
