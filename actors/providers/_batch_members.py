"""An ended batch's responses matched to its members by the key each was sent with (OpenAI's and Anthropic's
``custom_id``, Google's ``metadata.key``), never by position (Google's may come back out of order:
googleapis/python-genai #1909). A member no response names is sent again as one that never ran, unless some
response named no member: then it may be the one that ran (billed), and sent again it would be paid twice."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.core._logkeys import get_logger
from engine.core.cost import reserve_bound
from engine.core.provider_api import CallJob, CallOutcome

__all__ = ["BatchMembers"]

log = get_logger("smartbatch.providers")


class BatchMembers:
    """A mixin of ``HttpBase``: the members of a batch (a ``BatchHandle``) its results name, and those they
    cannot be matched to. Reads ``name``, ``catalog`` and ``clock``."""

    def _possibly_billed(self, job: CallJob, error: str, unnamed_ran: int = 0) -> CallOutcome:
        """``job`` failed, not sent again, its budget keeping its upper bound at the batch price."""
        return CallOutcome(False, self.clock.now(), reserve_bound(job.req, self.catalog, "batch_api", None),
                           retryable=False, real=True, maybe_billed=True, error=error, unnamed_ran=unnamed_ran)

    @staticmethod
    def _put(out: dict[str, CallOutcome], key: str, outcome: CallOutcome) -> None:
        """``key``'s outcome from one of its results lines. A results file may name a member twice (a write made
        again, a provider's fault): a member that ran keeps its answer, and a refusal never replaces an answer or a
        line that could not be read (possibly billed). A later line's refusal replaced it, and the billed member
        went back to be sent again and paid twice, its first answer on no ledger (a helper's hunt)."""
        had = out.get(key)
        if had is None or (outcome.ok and not had.ok) or not (had.ok or had.maybe_billed):
            out[key] = outcome

    def _unread_members(self, handle: Any, unread: list[str | None], out: dict[str, CallOutcome]) -> None:
        """Members whose result line could not be read: they ran, so they may be billed, and sent again they
        would be paid twice. Each fails, its budget keeping its upper bound at the batch price. A line naming no
        member is left to ``_unnamed``, which the caller counts it for."""
        if not unread:
            return
        for cid in unread:
            job = handle.jobs.get(cid) if cid is not None else None
            if job is not None:
                self._put(out, job.key, self._possibly_billed(job, f"{self.name}: batch {handle.id} answered this request "
                                                     "with a line that could not be read (not JSON, or not of the "
                                                     "shape documented); it ran and may be billed, so it is not "
                                                     "sent again"))
        unnamed = sum(1 for cid in unread if cid is None or cid not in handle.jobs)
        log.error("%s: batch %s: %d result line(s) could not be read%s", self.name, handle.id, len(unread),
                  f"; {unnamed} name no member of it" if unnamed else "")

    @staticmethod
    def _member(handle: Any, custom_id: Any) -> CallJob | None:
        """The member a results line names; None for a name of another type (a list cannot key the map)."""
        return handle.jobs.get(custom_id) if isinstance(custom_id, str) else None

    def _unnamed(self, handle: Any, out: dict[str, CallOutcome], named: Iterable[Any], keyless: int,
                 field: str) -> None:
        """After a batch's results were read: ``keyless`` responses that may be billed (an answer, or one that
        cannot be read) named no member of it (``field`` missing, or a key it does not hold: googleapis
        python-genai #2008, js-genai #1191 report Google's inline responses without their ``metadata``). Every
        member no response names (``named``: the keys the responses gave, refusals and cancelled ones too) and
        ``out`` leaves unanswered may then be one that ran: each fails possibly billed at its batch bound, never
        sent again. All of them, not ``keyless`` of them: which ran cannot be told, and any one sent again may be
        paid twice. None keyless: they are left out, sent again as never run (a cancelled batch's unfinished)."""
        if not keyless:
            return
        names = {n for n in named if isinstance(n, str)}
        left = [j for k, j in handle.jobs.items() if k not in names and k not in out]
        err = (f"{self.name}: batch {handle.id} ended with {keyless} response(s) that name no member of it (no "
               f"{field}, or one it does not hold) and none naming this request: it may be one that ran and is "
               "billed, so it is not sent again")
        for job in left:  # (``unnamed_ran``: a watch counts that many of them paid twice, not all)
            out[job.key] = self._possibly_billed(job, err, keyless)
        log.error("%s: batch %s: %d response(s) without their key (%s); the %d member(s) no response names fail "
                  "possibly billed, not sent again", self.name, handle.id, keyless, field, len(left))
