"""A dispatcher's tally journaled: what its report counts, the settlements and charges the budget controller had not
taken and the calls still unanswered, kept per incarnation so a restart adds them back. Split from
``actors._dispatch_recovery`` (a mixin placed first in ``Recovery``'s bases)."""

from __future__ import annotations

import asyncio

from actors._batch_api import _short
from actors._incarnations import began, drop_earlier, earlier, next_epoch, own_key
from engine.core._logkeys import get_logger

__all__ = ["TALLY", "TALLY_STEM", "TallyJournal", "_ZERO_TALLY"]

log = get_logger("smartbatch.dispatcher")

# What the report counts per dispatcher (``Dispatcher.stats``), journaled so a restart does not zero it: a report
# read after a restart said 0 paid twice where the bill had members paid twice (a hunt). And the unanswered calls
# of each request still open, so a call cut by two restarts is charged as two (``Outbox._maybe_billed``).
TALLY = ("paid_twice", "paid_twice_usd", "possibly_billed", "possibly_billed_usd", "reattached", "resumed_calls",
         "batches_cancelled", "members_saved_by_cancel", "key_conflicts", "rerouted")
# Then the settlements and charges the budget controller had not taken (``Outbox._to_budget``), sent again; then
# the flex calls of each open request given up at their timeout and the flex counts (after the rest: a tally
# journaled before them reads as before). A restart forgot them: a flex call that may have been billed left the
# ledger, and the report lost it (a hunt). Last, the open requests whose last try gave up polling a job (``_kept``):
# its bound is charged if the request ends with no try that polls it again. Then ``journal_lost``: kept in memory
# alone, the next restart (its seal written again, no loss to say) read 0, and the report no longer said it (a review).
# Then ``journal_unread``, for the same reason: the next restart that read its journal counted 0 (stop 77).
_ZERO_TALLY = (*(0 for _ in TALLY), {}, {}, {}, 0, 0, (), 0, 0)
# Each incarnation journals its tally under a key of its own, ``tally@<incarnation>``, as (epoch, start, change,
# tally), and a restart adds back the newest (``actors._incarnations``): in one key (until stop 73), a dead
# incarnation's write landing after its successor's replaced the newer tally, which holds the dead one's too, until
# the successor's next change (rare: it changes with faults); a restart meanwhile lost the successor's counts and
# the settlements it held for a restarting budget controller (their claims held until ``reservation_ttl_s``).
TALLY_STEM = "tally"


class TallyJournal:
    """``Dispatcher``'s tally (its counts and state are ``Dispatcher``'s)."""

    @property
    def _tally_space(self) -> str:
        return f"tally:{self.name}"

    def _tally(self) -> tuple:
        return (*(getattr(self, k) for k in TALLY), dict(self._unanswered), dict(self._undelivered),
                dict(self._flex_unanswered), self.flex_refused, self.flex_timed_out, tuple(sorted(self._kept)),
                self.journal_lost, self.journal_unread)

    @property
    def _tally_key(self) -> str:
        return own_key(TALLY_STEM, self.incarnation)

    def _take_back_tally(self, records: dict) -> None:
        """Add back the newest tally of the incarnations before this one (read back from the tally space)."""
        if self.__dict__.get("_tally_taken"):  # (by a tally's write, before the recovery read them)
            return
        self._tally_taken, self._tally_unread = True, False
        saved = earlier(records, TALLY_STEM, self._tally_key)
        self._tally_superseded = list(saved)
        ranked = [v if k != TALLY_STEM else (0, 0.0, 0, v) for k, v in saved.items()]  # (one key before stop 73)
        self._tally_epoch = next_epoch(r[0] for r in ranked)
        if ranked:
            newest = max(ranked, key=lambda r: r[:3])
            self._tally_change = newest[2]
            self._add_tally(newest[3])

    def _add_tally(self, saved: tuple | None) -> None:
        """Add what the last process counted (it died with it) to what this one counts, and send again what it
        had not delivered to the budget controller."""
        if saved is None:
            return
        counts, rest = saved[:len(TALLY)], saved[len(TALLY):]
        rest = (*rest, *_ZERO_TALLY[len(TALLY) + len(rest):])  # (a tally of before: none of the later parts)
        unanswered, undelivered, flex, refused, timed_out, kept, lost, unread = rest[:8]
        for k, v in zip(TALLY, counts):
            setattr(self, k, getattr(self, k) + v)
        self._unanswered.update(unanswered)
        self._flex_unanswered.update(flex)
        self._kept.update(kept)
        self.flex_refused += refused
        self.flex_timed_out += timed_out
        self.journal_lost += lost
        self.journal_unread += unread
        if undelivered:
            self._deliver_again(undelivered)

    async def _journal_tally(self) -> None:
        """Write the tally when it changed (each flush asks; it changes with faults, rarely). A write that fails
        is tried again after a pause that doubles, up to a minute: asked by every flush, or kept among what a flush
        waits to send, it was tried every 5 ms while the journal was away (a review)."""
        tally = self._tally()
        if tally == self._tally_sent or self.__dict__.get("_tally_retry"):
            return
        try:
            if self.__dict__.get("_tally_unread"):
                # A restart whose journal read gave up: its tally, written without its predecessors', outranked
                # theirs, and the next restart lost their counts and undelivered settlements (a review, stop 77).
                self._take_back_tally(await self.journal.items(self._tally_space))
                tally = self._tally()
            self._tally_change += 1
            await self.journal.put(self._tally_space, self._tally_key,
                                   (self._tally_epoch, began(self), self._tally_change, tally))
            self._tally_sent, self._tally_wait = tally, 1.0
        except Exception as exc:
            wait = self.__dict__.get("_tally_wait", 1.0)
            log.warning("dispatcher %s: could not journal its tally (%s); trying again in %.0f s", self.name,
                        _short(exc), wait)
            self._tally_wait, self._tally_retry = min(2 * wait, 60.0), True

            def again() -> None:
                self._tally_retry = False
                self._tally_task = asyncio.ensure_future(self._journal_tally())  # held: a task may be collected

            asyncio.get_running_loop().call_later(wait, again)
            return
        await drop_earlier(self.journal, self._tally_space, self.__dict__.pop("_tally_superseded", None) or [],
                           f"dispatcher {self.name}")
