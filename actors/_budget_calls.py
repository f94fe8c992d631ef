"""The ledger's calls through a Redis outage (a mixin of ``actors.budget.BudgetController``): while Redis is down
a claim is answered ``budget_unavailable`` at once, and settlements and charges wait in the outbox until it
answers; a spend no ledger can count (NaN, negative) is counted at 0, said at ERROR."""

from __future__ import annotations

import itertools
import math
import time

from actors._budget_replay import ScriptRefused
from engine.core._logkeys import get_logger
from engine.core.budgets import LEDGER, Verdict

__all__ = ["LedgerCalls"]

log = get_logger("smartbatch.budget")


class LedgerCalls:
    """Needs the controller's ``book``, ``settings``, ``_errors``, ``_url``, ``_outbox``, ``_charges``, ``_settling``,
    ``refusals`` and the outbox journal's ``_taken``, ``_keep_pending`` and ``_arm_flush``."""

    def _describe(self, exc: BaseException) -> str:
        """The error, never showing the URL's password."""
        from urllib.parse import urlsplit

        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if text == "ClusterError: TTL exhausted.":  # redis-py's word when each try met TRYAGAIN, MOVED or ASK
            text += " (TRYAGAIN, MOVED or ASK at each try: the ledger's slot moving between nodes?)"
        try:
            pw = urlsplit(self.settings.redis_url or "").password
        except ValueError:
            pw = None
        return text.replace(pw, "***") if pw else text

    def _usable(self) -> bool:
        return self._down_until is None or time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        self._last_error = self._describe(exc)
        if self._down_until is None:
            log.warning("budget ledger: Redis at %s unavailable (%s): claims wait (budget_unavailable), "
                        "settlements are kept until it answers; retrying every %.1f s",
                        self._url, self._last_error, self.settings.redis_retry_s)
        self._down_until = time.monotonic() + self.settings.redis_retry_s
        doubt = getattr(self.book, "doubt_server", None)  # a Redis book: the next call first reads who answers
        if doubt is not None:
            doubt()

    def _recovered(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            log.warning("budget ledger: Redis at %s answers again", self._url)

    def _unavailable(self, n: int) -> list[Verdict]:
        self.refusals["budget_unavailable"] += n
        return [Verdict(False, "budget_unavailable", budget=LEDGER,
                        detail=f"Redis at {self._url} is unavailable ({self._last_error})")] * n

    async def _settle(self, items: list[tuple[str, float]]) -> bool:
        """Settle ``items`` after whatever the outbox holds; on a Redis failure keep them all in the outbox
        (settling is idempotent per claim, so a replay of one Redis did take changes nothing)."""
        items = [*self._outbox, *items]
        self._outbox = []
        if not items:
            return True
        if self._usable():
            self._settling += len(items)
            try:
                try:
                    lost = await self._maybe(self.book.settle_many(items))
                except ScriptRefused:  # one or more that the script cannot take: settled one by one
                    lost = await self._settle_apart(items)
            except self._errors as exc:
                self._failed(exc)
            else:
                self._recovered()
                await self._taken(items)
                if lost:
                    self.lost_records += lost
                    log.warning("budget ledger: %d settlement(s) found their claim's record gone from Redis at %s "
                                "(restarted without persistence, or its keys evicted): their spend is counted "
                                "from this engine's copy; what was spent before is forgotten (docs/budgets.md)",
                                lost, self._url)
                return True
            finally:
                self._settling -= len(items)
        # Bounded by the claims open when Redis went away: no reservation succeeds while it is away.
        self._outbox = items + self._outbox
        self._arm_flush()
        await self._keep_pending(items)  # in the journal before the call that handed them over is answered
        return False

    async def _settle_apart(self, items: list[tuple[str, float]]) -> int:
        """Settle ``items`` one at a time, dropping (with an ERROR) each that the ledger's script refuses: kept
        in the outbox, one such item failed every later call with it and kept the ledger down for the run."""
        lost = 0
        for item in items:
            try:
                lost += await self._maybe(self.book.settle_many([item]))
            except ScriptRefused as exc:
                self.rejected_settlements += 1
                log.error("budget ledger: Redis at %s refuses the settlement of claim %s (%r USD): %s; dropped, "
                          "its reservation held until it expires", self._url, item[0], item[1], str(exc)[:200])
        return lost

    async def _charge(self) -> bool:
        items, self._charges = self._charges, []
        if not items:
            return True
        if self._usable():
            # Counted while out: a report read meanwhile said 0 unsettled with the charge not counted yet.
            self._settling += len(items)
            try:
                for t, group in itertools.groupby(items, key=lambda item: item[1]):
                    await self._maybe(self.book.charge_many([c for c, _ in group], t))
            except self._errors as exc:  # all kept: a charge Redis did take counts nothing when replayed
                self._failed(exc)
            else:
                self._recovered()
                await self._taken(charges=items)
                return True
            finally:
                self._settling -= len(items)
        self._charges = items + self._charges
        self._arm_flush()
        await self._keep_pending(charges=items)
        return False


def _spend(what: str, usd: float) -> float:
    """Spend as the ledgers may count it: finite and not below 0. One NaN settlement made the Redis ledger's
    script fail, kept the outbox at its head and every later call failing, the ledger down for good; a negative
    one gave spend back (a helper's hunt). Counted at 0, said loudly: no bound is known here."""
    if math.isfinite(usd) and usd >= 0:
        return usd
    log.error("budget ledger: %s came with spend %r USD, counted as 0 (a provider's answer or a bug)", what, usd)
    return 0.0
