"""A batch whose members went again for their deadlines (its cancel outlasted ``cancel_s``, its results could not
be read, or its create got no answer) is followed to its end, journaled, so what it still finished (billed twice)
is counted and charged, never hidden. A mixin of the dispatcher's batch-API methods (``_batch_api``), with what
both use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors._types import BatchJob, Job
from actors.providers._wire import redact
from engine.core._logkeys import get_logger
from engine.core.budgets import Charge
from engine.core.provider_api import CallJob, CallOutcome

log = get_logger("smartbatch.dispatcher")

__all__ = ["CANCEL_RETRY_S", "POLL_RETRY_S", "WATCH_S", "BatchWatch", "known_ran"]

POLL_RETRY_S = 30.0  # engine seconds before polling again after a failed poll
CANCEL_RETRY_S = 10.0  # engine seconds before a cancel the provider did not take is made again
WATCH_S = 26 * 3600.0  # engine seconds a batch whose members went again is followed: its 24 h window and more
_UNKNOWN = object()  # no lookup of a lost create's batch was answered: whether the provider made it is unknown


def _short(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")[:200]


def known_ran(pairs: list[tuple[Any, CallOutcome]], group: Callable[[Any], Any] | None = None
              ) -> list[tuple[Any, CallOutcome]]:
    """``pairs`` (a member, its outcome) of a batch, less its members failed unnamed (``CallOutcome.unnamed_ran``)
    beyond as many as ran: which of them ran cannot be told, so the dearest bounds stand for those (never under
    the bill). ``group``: that many in each group of members (a tenant: the one billed may be any tenant's, and
    no budget is to be left under its bill). Before (a review, revkeys), each counted as run: a cancelled Gemini
    batch's unfinished members, never run, read as paid twice (charged) when it was followed, and as finished
    when its turnaround was learned."""
    unnamed = sorted((x for x in pairs if x[1].unnamed_ran), key=lambda x: -x[1].cost)  # (stable: ids replayable)
    counted: dict[Any, int] = {}
    kept = []
    for x in unnamed:
        k = group(x[0]) if group is not None else None
        counted[k] = counted.get(k, 0) + 1
        if counted[k] <= x[1].unnamed_ran:
            kept.append(x)
    return [x for x in pairs if not x[1].unnamed_ran] + kept


def _late(cjobs: list[CallJob], outs, group: Callable[[CallJob], Any] | None = None
          ) -> list[tuple[CallJob, CallOutcome]]:
    """What a batch whose members went again billed: its answered members and those possibly billed, as far as
    can be told (``known_ran``)."""
    return known_ran([(cj, o) for cj in cjobs if (o := outs.get(cj.key)) is not None and (o.ok or o.maybe_billed)],
                     group)


class BatchWatch:
    """The watch of a batch whose members went again; needs the dispatcher's ``_find_batch`` (``_batch_api``) and
    ``_results_slot`` (``_results_room``)."""

    @property
    def _watch_space(self) -> str:
        return self._space + ":watch"

    async def _watch(self, b: BatchJob, key: str, jobs: list[Job], start: float, handle, cancel: bool = False) -> None:
        """Follow a batch whose members go again (``_watch_late_cancel``), journaled first: its own record goes
        once its members are answered, and a restart then found nothing that named it. The batch ran on,
        uncancelled, and finished every member the sync calls also paid for, uncounted and uncharged (a helper's
        fault hunt)."""
        rec = self._watching[key] = (b._replace(jobs=[]), handle, jobs, start, cancel)
        try:
            await self.journal.put(self._watch_space, key, rec)
        except Exception as exc:  # it is still followed; only a restart of this dispatcher would lose it
            log.warning("dispatcher %s: could not journal the watch of batch %s: %s", self.name, key, _short(exc))
        cjobs = [self._call_job(j, start, batch=True) for j in jobs]
        self._spawn(self._watch_late_cancel(handle, cjobs, key, cancel=cancel), [], b)

    async def _watch_late_cancel(self, handle, cjobs: list[CallJob], key: str, cancel: bool = False) -> None:
        await self._watch_to_end(handle, cjobs, key, cancel)
        # Ended, or given up on: nothing is left to count. (Cancelled with the actor, its record stays.)
        if self._watching.pop(key, None) is not None:
            self._unjournal.append((self._watch_space, key))
            self._kick()

    async def _watch_to_end(self, handle, cjobs: list[CallJob], key: str, cancel: bool) -> None:
        """A batch whose members were sent again for their deadlines: its cancel outlasted ``cancel_s``, or its
        results could not be read. Follow it to its end and read its results, so any member it finished
        (billed twice) is counted, not hidden. ``cancel``: the provider never took its cancel, which is made
        again until it does: a batch left running finishes every member, each paid twice."""
        p = self.provider
        until = self.clock.now() + WATCH_S
        if handle is None:  # a create whose answer was lost, and no lookup of it answered before its hedge
            handle = await self._find_batch(cjobs, key, until, watch=True)
            if handle is None or handle is _UNKNOWN:  # never made (the provider says so), or never answered
                return
            cancel = True
        for _ in range(10_000):  # and a bound on tries, for a clock that does not move
            if cancel:
                try:
                    await p.cancel(handle)
                    cancel = False
                except Exception as exc:
                    log.warning("dispatcher %s: cancelling a batch whose members went again failed (%s)",
                                self.name, _short(exc))
            try:
                st = await p.poll(handle)
                outs = None
                if st.status == "ended":  # counted below with no await between: then let go, as in ``_follow_batch``
                    async with self._results_slot(cjobs):
                        outs = await self._read_results(handle, cjobs)  # bounded: a trickle held the slot
            except Exception as exc:  # a failed poll or read is tried again: ending here would hide the count
                log.warning("dispatcher %s: following a batch whose members went again failed (%s)", self.name,
                            _short(exc))
                if self.clock.now() >= until:
                    break
                await self._sleep(POLL_RETRY_S)
                continue
            if st.status in ("cancelling", "finalizing"):
                cancel = False  # taken (its answer was lost), or past cancelling: nothing is left to stop
            if outs is not None:
                self._files.discard(p, handle)
                late = _late(cjobs, outs)
                usd = sum(o.cost for _, o in late)
                self.paid_twice += len(late)
                self.paid_twice_usd += usd
                self._counts.paid_twice_members += len(late)
                self._counts.paid_twice_usd += usd
                # Charged: of members failed unnamed, as many as ran in each tenant (``known_ran``), so no tenant's
                # budget is left under its bill whichever ran; counted above: as many as ran.
                charged = _late(cjobs, outs, lambda cj: cj.req.tenant)
                if charged and self.budget is not None:  # on the bill, so on the budgets too (docs/budgets.md)
                    # One id per member of this batch (its journal key, unique per batch, and the custom_id): a
                    # replay counts nothing twice, and the same ids in another batch (another engine on the
                    # ledger, the same file run again) are charged again, as they are billed again.
                    self._to_budget("charge_many", [Charge(f"late:{key}:{cj.key}", cj.req.tenant, cj.req.provider,
                                                           cj.req.model, o.cost) for cj, o in charged])
                self._kick()
                return
            if self.clock.now() >= until:
                break
            await self._sleep(min(st.next_poll_s, CANCEL_RETRY_S) if cancel else st.next_poll_s)
        log.error("dispatcher %s: batch %s whose members went again did not end in %.0f h; what it finished after "
                  "they went is on the bill twice and not counted", self.name, key, WATCH_S / 3600)

