"""The room a dispatcher gives image batches' results as it reads them: an image's results line holds it in
base64 (1-8 MB), and the reads of many batches at once held gigabytes in one actor. One batch reads at a time (the
slot); one whose hedge has passed while another read held the slot may read beside it within a second allowance,
``spare`` bytes (one batch's worth, ``batch_results_max_mb``), shared by every read beyond the slot. So a read that
stalls holds no batch past its hedge while memory stays at most two batches' results. A mixin of the dispatcher's
batch-API methods (``_batch_api``), with the room itself."""

from __future__ import annotations

import asyncio
import contextlib

from actors._batch_parts import file_parts, line_bound, read_bound_s, results_parts
from engine.core._logkeys import get_logger
from engine.core._within import within
from engine.core.cost import reserve_bound
from engine.core.provider_api import CallJob, CallOutcome

log = get_logger("smartbatch.dispatcher")

__all__ = ["ResultsReads", "ResultsRoom"]


class ResultsRoom:
    """The slot (one read) and the spare allowance (``spare`` bytes) of a dispatcher's image results reads. A read
    waits for the slot until its own bound (its batch's hedge), then for whichever frees first: the slot, or room
    in the spare for its batch's bound. Every wait ends on a release (all waiters look again) or its bound; nothing
    is taken by a waiter that is cancelled."""

    def __init__(self, spare: int) -> None:
        self.spare = max(1, spare)  # bytes the reads beyond the slot may hold together
        self.slot = False  # one read holds it
        self.spare_used = 0
        self._waiters: list[asyncio.Future] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def take(self, weight: int, slot_wait_s: float | None) -> int:
        """Room for a read whose results weigh at most ``weight`` bytes: 0 for the slot, else the spare bytes taken
        (its weight, at most ``spare``: a batch heavier than the bound still reads, alone in the spare). The slot
        is waited for ``slot_wait_s`` real seconds at most (None: for as long as it takes), then either."""
        need = max(1, min(weight, self.spare))
        loop = asyncio.get_running_loop()
        end = None if slot_wait_s is None else loop.time() + slot_wait_s
        past = slot_wait_s is not None and slot_wait_s <= 0
        while True:
            if not self.slot:
                self.slot = True
                return 0
            if past and self.spare_used + need <= self.spare:
                self.spare_used += need
                return need
            woken = loop.create_future()
            self._waiters.append(woken)
            try:
                if end is None or past:
                    await woken
                else:  # the slot's wait is bounded: past it, the spare is taken too
                    await asyncio.wait([woken], timeout=max(end - loop.time(), 0.0))
                    past = past or not woken.done()
            finally:
                self._waiters.remove(woken)

    def give(self, taken: int) -> None:
        """Give back what ``take`` gave; every waiter looks again (a release of the spare may fit one, not another)."""
        if taken == 0:
            self.slot = False
        else:
            self.spare_used -= taken
        for w in self._waiters:
            if not w.done():
                w.set_result(None)

    def __repr__(self) -> str:
        return (f"ResultsRoom(slot={'held' if self.slot else 'free'}, spare={self.spare_used}/{self.spare}, "
                f"waiting={self.waiting})")


class ResultsReads:
    """The dispatcher's image results room (``_image_reads``), the cut that bounds each batch's results, and the
    time a try at reading them may take."""

    def _read_bound_s(self, cjobs: list[CallJob]) -> float | None:
        """Real seconds a try at reading the results of a batch of ``cjobs`` may take (``read_bound_s``); None: a
        simulated provider, which answers at once."""
        if not self.provider.real or not cjobs:
            return None
        return read_bound_s(self.catalog, self.settings, self.name, cjobs)

    async def _read_results(self, handle, cjobs: list[CallJob]) -> dict:
        """One try at reading an ended batch's results, given up (``asyncio.TimeoutError``) past ``_read_bound_s``."""
        # (within: wait_for swallowed a death's or a stop's cancel that came as the read ended: the follow-up went on)
        return dict(await within(self.provider.fetch(handle), self._read_bound_s(cjobs)))

    def _unread_batch(self, handle, cjobs: list[CallJob], at: float) -> dict[str, CallOutcome]:
        """Every member of a batch whose results could not be read by ``batch_results_read_max_s``: failed and
        possibly billed at its bound (the batch ran; what it finished is on the bill), never sent again (paid
        twice), with where its results are to fetch by hand. Better than a future that never resolves. ``at``: when
        the reads began, which a read then would have told (a turnaround learned from the give-up ran an hour long)."""
        where = self.provider.results_at(handle)
        err = (f"{self.name}: the results of {where} could not be read: every try outlasted its bound (its calls' "
               f"timeout_s and its size at batch_results_min_kib_s={self.settings.batch_results_min_kib_s:g}) for "
               f"batch_results_read_max_s={self.settings.batch_results_read_max_s:g} s; the request ran and may be "
               "billed, so it is not sent again: fetch its line from that file")
        log.error("dispatcher %s: %s", self.name, err)
        return {cj.key: CallOutcome(False, at, reserve_bound(cj.req, self.catalog, "batch_api", None),
                                    retryable=False, real=True, maybe_billed=True, error=err) for cj in cjobs}

    def _line_bytes(self, job) -> int | None:
        """The bound of ``job``'s results line (``line_bound``): None for a model that is no image one."""
        return line_bound(self.catalog, self.name, job.req)

    def _file_parts(self, jobs: list) -> list[list]:
        """``jobs`` in parts that each fit the provider's limit on one batch (``file_parts``) and, for images, whose
        results weigh at most ``batch_results_max_mb`` (``results_parts``). An image's results line holds it in
        base64 (1-8 MB): read whole, the results of a batch of the provider's 50,000 members held ~75 GB in this
        actor, which died, was restarted by Ray and read them again."""
        parts = file_parts(jobs, self._max_file_mb(jobs), self.settings.chars_per_token)
        return results_parts(parts, self._line_bytes, self.settings.batch_results_max_mb)

    @contextlib.asynccontextmanager
    async def _results_slot(self, jobs: list, until: float | None = None):
        """Held while a batch of images has its results read and handed on: k image batches ending together
        hold one results file's images in this actor, not k. Text's results pass freely. The slot is waited for
        until ``until`` (engine time: the batch's hedge), then the slot or the spare (``ResultsRoom``): a read
        that stalls (a download trickling for its timeout, five times over) held every other image batch behind
        it, finished members past their deadlines and hedged ones never sent again (a review); and with no
        spare, every batch past its hedge read beside it, memory without a bound (a review). A clock that does not
        move by itself (no real bound) waits for the slot alone until its hedge has passed."""
        weights = [w for j in jobs if (w := self._line_bytes(j)) is not None]
        if not weights:
            yield
            return
        left = None if until is None else until - self.clock.now()
        wait_s = None if left is None else 0.0 if left <= 0 else (self.clock.real_delay(left) or None)
        room = self._image_reads
        taken = await room.take(sum(weights), wait_s)
        if taken:
            log.warning("dispatcher %s: another image batch's results read outlasted this one's hedge: read beside "
                        "it, within the spare allowance (%s)", self.name, room)
        try:
            yield
        finally:
            room.give(taken)
