"""Requests that end at the grouper (a mixin of ``actors.grouper.Grouper``): refused by a budget, failed by a
policy error, cancelled or withdrawn. Their results go to the hub, their claims are let go, and the identical
requests following them in the cache are handed back and generated after all."""

from __future__ import annotations

from actors._dispatch_outbox import maybe_billed_error
from actors._shards import by_result_uid
from actors._types import Job
from engine.core._logkeys import get_logger
from engine.core.result import Result
from engine.runtime.outcomes import refused_result

__all__ = ["GroupEnds"]

log = get_logger("smartbatch.grouper")

ENDED_KEEP = 65_536  # results of requests ended here, for copies re-admitted after a restart


class GroupEnds:
    """Needs the grouper's ``pending``, ``dispatchers``, ``budget``, ``hubs``, ``caches``, ``clock``, ``_reserving``,
    ``_ended`` and ``add``."""

    async def _resolve(self, results: list[tuple[Job, Result]], release: list[str] = ()) -> None:
        """Deliver results of requests that end here (rejected, policy error). Identical requests may be
        following them in the cache: they are handed back and generated after all, never left waiting."""
        # Held as under way until they are ended: a copy re-admitted while the dispatchers are asked below was
        # neither pending nor ended, and went on to be billed beside the failure its driver got. ``release``: the
        # marks a caller set for them (``_retry_parked``), let go once they are ended.
        uids = [j.req.uid for j, _ in results]
        self._reserving.update(uids)
        try:
            await self._end(results)
        finally:
            self._reserving.difference_update(uids)
            self._reserving.difference_update(release)

    async def _end(self, results: list[tuple[Job, Result]]) -> None:
        # After a restart, a re-admitted copy of a request may have been dispatched while this one waited here:
        # the dispatcher's result stands, and this copy (rejected, never sent) is dropped. Rare enough (results
        # that end here) for one question per provider.
        by_provider: dict[str, list[str]] = {}
        for j, _ in results:
            by_provider.setdefault(j.req.provider, []).append(j.req.uid)
        served: set[str] = set()
        for provider, uids in by_provider.items():
            d = self.dispatchers.get(provider)
            if d is not None:
                try:
                    served.update(await d.call("holds", uids))
                except Exception as exc:
                    log.warning("grouper %s: dispatcher %s did not answer: %s", self.name, provider, exc)
        if served:
            dropped = [j for j, _ in results if j.req.uid in served]
            results = [(j, r) for j, r in results if j.req.uid not in served]
            claims = [(j.claim, 0.0) for j in dropped if j.claim is not None]
            if claims:
                self.budget.deliver("settle_many", claims)
            if not results:
                return
        # A peer that died (and restarts) loses these results or followers; the driver re-admits what it never
        # heard of, so the grouper goes on rather than dropping the dispatches of the same call.
        ended = self._ended
        for _, r in results:
            ended[r.uid] = r
        while len(ended) > ENDED_KEEP:
            ended.popitem(last=False)
        # Claims let go before the results leave, as a dispatcher's outbox does (``spend_told``): settled after the
        # hub's answer, a withdrawn member's bound still held the ledger when its driver read the report.
        held = [(j.claim, 0.0) for j, _ in results if j.claim is not None]
        if held:
            self.budget.deliver("settle_many", held)
        try:
            await self.hubs.call("push", by_result_uid, [r for _, r in results], [0.0] * len(results))
        except Exception as exc:
            log.warning("grouper %s: hub did not take %d result(s): %s", self.name, len(results), exc)
        if self.caches:
            answers, errors = await self.caches.call_partial("orphans", [j.cache_shard for j, _ in results],
                                                             [(j.fp, j.req.uid) for j, _ in results])
            followers = [f for _, part in answers for f in part]
            for exc in errors:
                log.warning("grouper %s: cache did not answer for orphans: %s", self.name, exc)
            if followers:  # the same fingerprint, so the same compatibility key: this grouper's shard
                await self.add(followers)

    def _fail_members(self, members, cause: BaseException) -> list[tuple[Job, Result]]:
        """The pending jobs of ``members`` (a group whose decision failed), each failed naming the error."""
        jobs = [self.pending.pop(r.uid) for r in members if r.uid in self.pending]
        return [(j, self._failed(j, f"policy error: {cause}")) for j in jobs]

    def _failed(self, job: Job, error: str, status: str = "failed", reason: str = "") -> Result:
        res = refused_result(job.req, at=self.clock.now(), status=status, error=error, reason=reason)
        if job.billed_usd:  # a call of it on the model it was rerouted from may be billed (``Job.billed_usd``)
            res = res.model_copy(update={"possibly_billed_usd": job.billed_usd,
                                         "error": maybe_billed_error(res.error, job.billed_usd)})
        return res
