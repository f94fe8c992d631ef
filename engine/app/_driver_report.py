"""The engine's report as a driver reads it (a mixin of ``Engine``): merged from every hub shard after the
dispatchers and groupers said their spend reached the ledger, asked again through an actor's restart, and the
report kept at the engine's stop, read again once the stop settled what it cut short."""

from __future__ import annotations

import copy
import time
from typing import Any

from engine.app._actor_errors import masked_actor_errors
from engine.app._driver_reject import with_refused
from engine.core._logkeys import get_logger
from engine.core.errors import EngineStopped

__all__ = ["Reporting"]

LAST_REPORT_S = 5.0  # at most this long a stop waits for the report it keeps
REPORT_WAIT_S = 60.0  # at most this long (real seconds) ``report()`` waits for actors Ray restarts
log = get_logger("smartbatch.driver")


class Reporting:
    """Needs ``_ray``, ``_h``, ``_running``, ``_owner``, ``name``, ``settings``, ``_kept``, ``_ledger_dir``,
    ``_last_report`` and ``_left_at_stop``."""

    @masked_actor_errors
    def report(self) -> dict:
        """Spend, saving against each request's list price, hits, deadlines, per provider, and the budgets
        (``budget``: each budget's window, spend per tenant/provider/model, refusals by reason). After ``stop()``
        of an engine this driver started: the report as the engine stood when it stopped."""
        if not self._running:
            if self._last_report is not None:
                return with_refused(copy.deepcopy(self._last_report), self)
            raise EngineStopped(f"engine {self.name!r} was stopped" + (
                ", and its report could not be read then" if self._owner else
                " for this driver: attach again with Engine.connect() for its report"))
        try:
            return with_refused(self._read_report(timeout_s=REPORT_WAIT_S), self)
        except self._ray.exceptions.ActorDiedError as exc:  # a Ray error named nothing to do (a helper's hunt)
            raise EngineStopped(f"engine {self.name!r} failed: one of its actors died for good, so its report "
                                f"cannot be read ({exc.__class__.__name__}); start a new engine") from None

    def _read_report(self, timeout_s: float | None = None) -> dict:
        ray = self._ray
        from actors.hub import merge_reports, sum_figures

        end = time.monotonic() + (timeout_s if timeout_s is not None else REPORT_WAIT_S)

        def get(actors, method):  # asked again through an actor's restart (a raw Ray error, a helper's hunt)
            return _through_restarts(ray, lambda: [getattr(a, method).remote() for a in actors], end)

        rep = merge_reports(get(self._h["hubs"], "report"))
        # The ledger after the dispatchers say it took what they settled: their results' spend is then in it; and
        # the groupers, the claims they let go (a withdrawn member's bound stayed reserved after its result).
        get([*self._h["dispatchers"].values(), *self._h["groupers"]], "spend_told")
        rep["budget"] = get([self._h["budget"]], "report")[0]
        # ``refusals`` counts the ledger's verdicts (each "wait" of a held request); these are the requests the
        # budgets rejected for good, which a user read there as 0 (a helper's tour).
        rep["budget"]["rejected"] = {k: v for k, v in rep.get("rejected", {}).items() if k.startswith("budget_")}
        # Per provider: were its calls real (http) or simulated, and what its batches did.
        rep["providers"] = {s["provider"]: {k: v for k, v in s.items() if k != "provider"}
                            for s in get(list(self._h["dispatchers"].values()), "stats")}
        if self._kept is not None:  # answered from what a killed run of the job paid for: counted nowhere else
            rep["taken_back"] = {"answers": self._kept.given, "cost_usd": self._kept.given_usd}
        if self._h["caches"]:  # read from the cache itself: the hub's copy is pushed every 0.5 s
            rep["cache"] = sum_figures(get(self._h["caches"], "stats_now"))
        return rep

    def _keep_last_report(self) -> None:
        """Keep the report before the actors go (bounded: an engine whose actors died has none to give); its
        budget part is read again once the dispatchers settled what the stop cut short (``_keep_ledger``)."""
        try:  # (after the dispatchers' and groupers' settlements reached the ledger: ``_read_report``)
            self._last_report = self._read_report(timeout_s=LAST_REPORT_S)
        except Exception as exc:
            log.warning("engine %s: no report could be kept at its stop (%s)", self.name, type(exc).__name__)

    def _keep_ledger(self) -> None:
        """Called by the stop (``kill_engine``) once the other actors are gone and the dispatchers have cancelled
        their provider batches and settled what the stop cut short (possibly billed, at its bound), before the
        budget controller goes. A Redis ledger's settlements and charges waiting for its Redis are given it a
        bounded time, then kept on disk for the next engine on that ledger (``actors._budget_kept``); the kept
        report's budget and providers say what the stop settled and what was left. Asked before the cancel, the
        controller was killed before it took those settlements: counted by no ledger, in no file."""
        from engine.app._ledger_stop import keep_ledger

        left = keep_ledger(self._ray, self.name, self._h.get("budget"), list(self._h["dispatchers"].values()),
                           self.settings, self._ledger_dir)  # (its start's directory: ``ledger_home``)
        if self._h.get("kept") is not None:  # the files taken back at the start: deleted, or given back
            self._h["kept"].finish(left)
        rep = self._last_report
        if rep is None:
            return
        end = time.monotonic() + LAST_REPORT_S
        # Each on its own: a dispatcher that died in the stop and was not back left the budget unread (the claims
        # the stop settled since still reserved) and every provider's row as it was before its cancel (a review).
        asks = [("budget", lambda: [self._h["budget"].report.remote()])]
        asks += [(f"provider {p}", lambda d=d: [d.stats.remote()]) for p, d in self._h["dispatchers"].items()]
        for part, ask in asks:
            try:
                (got,) = _through_restarts(self._ray, ask, end)
            except Exception as exc:  # the report before the cancel stays
                log.warning("engine %s: the report's %s could not be read after the stop's settlements (%s)",
                            self.name, part, type(exc).__name__)
            else:
                if part == "budget":
                    rep["budget"] = {**got, "rejected": rep.get("budget", {}).get("rejected", {})}
                else:
                    rep.setdefault("providers", {})[got["provider"]] = {k: v for k, v in got.items() if k != "provider"}
        # What the stop did for those not back (``did``: ``left`` is the ledger's, kept below; reused, the
        # ledger's row held the last dispatcher's instead, a review of stop 81).
        for name, did in self._left_at_stop.items():
            said = rep.setdefault("providers", {}).setdefault(name.removeprefix("dispatcher-"), {})
            said["possibly_billed"] = said.get("possibly_billed", 0) + len(did.settled)
            said["possibly_billed_usd"] = said.get("possibly_billed_usd", 0.0) + sum(u for _, u in did.settled)
            said["left_at_stop"] = {"cancelled": did.cancelled, "not_cancelled": [b for b, _ in did.not_cancelled],
                                    "unread": did.unread}
        if left is not None:
            rep.setdefault("budget", {}).setdefault("ledger", {})["left_at_stop"] = left

    def _note_left(self, name: str, left: Any) -> None:
        """The stop cancelled the batches of dispatcher ``name`` itself (``actors._stop_left``): for the report."""
        self._left_at_stop[name] = left



def _through_restarts(ray: Any, call, end: float) -> Any:
    """``ray.get(call())``, made again while an actor it asks is restarting (Ray refuses its calls until the new
    incarnation is up, seconds on a loaded machine), until ``end`` (``time.monotonic()``)."""
    pause = 0.05
    while True:
        try:
            return ray.get(call(), timeout=max(end - time.monotonic(), 0.001))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() + pause >= end:
                raise
            time.sleep(pause)  # backoff between asks of a restarting actor, not a wait for a result
            pause = min(2 * pause, 1.0)
