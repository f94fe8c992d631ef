"""Taking back, after a restart, the batches an endpoint's state directory holds (a mixin of
``FilesAndBatches``): an ended one as it was, an open one by asking the engine again for the lines it had no
result for, under the same request ids."""

from __future__ import annotations

import asyncio
from pathlib import Path

from engine.app._endpoint_job import CANCELLED_LINE, BatchJob, for_endpoint
from engine.app._endpoint_wire import ApiError
from engine.core._logkeys import get_logger
from engine.core.answer_body import MESSAGES_URL
from engine.core.batchfile import BatchFile, parse_batch_file
from engine.core.budgets import Charge
from engine.core.result import Result

__all__ = ["TakeBack"]

log = get_logger("smartbatch.endpoint")


class TakeBack:
    """Needs ``state``, ``batches``, ``catalog``, ``engine``, ``speedup``, ``_now``, ``_enter``, ``_save``,
    ``_finish``, ``_submit``, ``_collect`` and ``_remember_create``."""

    _fresh_ledger = False  # the engine's budget ledger did not see what the state directory kept (``resume``)

    async def resume(self) -> None:
        """Take back the batches the state directory holds (after a restart): an ended one as it was; an open one
        with the results it had, its other lines asked of the engine again (see the module docstring), or
        ended at once if it was cancelling or its window has passed."""
        if self.state is None:
            return
        if (share := getattr(self.engine, "share_owners", None)) is not None and len(self.responses.owners):
            # The ids its log gave back are known to the engine's other drivers too (``actors._hub_owners``).
            await asyncio.to_thread(share)
        current = await self._ledger_id()
        before = self.state.ledger_id()  # the new one is recorded once every kept line is counted
        self._fresh_ledger = current is not None and before is not None and before != current
        self._uncounted = 0
        for rec, input_path, results in self.state.batches():
            try:
                await self._take_back(rec, input_path, results)
            except Exception as exc:  # one bad record never keeps the endpoint from starting
                self.batches.pop(rec.get("id"), None)
                self.state.set_aside(str(rec.get("id")), exc)
        if current is not None and not self._uncounted:  # else the next start counts them (idempotent per line)
            self.state.record_ledger_id(current)

    async def _take_back(self, rec: dict, input_path: Path, results: dict[str, Result]) -> None:
        assert self.state is not None
        job = BatchJob.from_record(rec, self.retries.keyed)
        job.speedup = self.speedup
        if rec.get("retry_key") is not None:  # its plain hash, by the version before: written again keyed (revlog)
            self.state.save_batch(job.record())
        self.batches[job.id] = job
        self._remember_create(job)  # its create's retry may come after the restart
        if job.final is not None:
            self.state.ended(job.id)  # what a crash after its end left behind
            return
        try:
            data = input_path.read_bytes()
        except OSError as exc:
            log.error("endpoint state: batch %s has lost its input (%s); it fails", job.id, exc)
            why = "the endpoint restarted and this batch's input was not found in its state directory"
            if job.endpoint == MESSAGES_URL:
                # Anthropic's results are per request: those refused at the create stay so, and each one known by
                # a result ends errored. Given one error of OpenAI's shape, with no custom_id, the batch's
                # retrieve and the whole list of Message Batches answered 500 (a helper's hunt).
                job.errors = [*job.errors, *({"custom_id": cid, "message": f"{why}: its result came before the "
                                              "restart (an answer is billed) and went with it", "sent": True}
                                             for cid in results)]
            else:
                job.errors = [{"code": "server_error", "message": why, "param": None, "line": None}]
            self._enter(job, "failed")
            job.release()
            self._save(job)
            return
        # Checked as at its create (``live``): this engine may refuse what the last one took (``simulate_others``
        # is decided at each start), and one line it refuses failed the whole submission, every open line. A
        # line answered before stays answered (paid for).
        bf, kept = (parse_batch_file(data, source=job.input_file_id, window_s=job.window_s, tenant=job.tenant,
                                     catalog=self.catalog, settings=self.engine.settings, live=live)
                    for live in (True, False))
        bf = BatchFile(bf.source, [k if ln.request is None and any(q.id in results for q in k.choices) else ln
                                   for ln, k in zip(bf.lines, kept.lines, strict=True)], bf.file_problems)
        # As at its create: a line naming an id not its tenant's is an error line (one answered before stays so).
        # The ids its lines took then are in the state directory's log, read back; the engine is asked about the
        # rest (an engine that does not answer leaves them unknown: no caller is there to send a 503 to).
        await self.responses.ask([ln.request.body for ln in bf.lines if ln.request is not None])
        job.bf, job.results = self.responses.lines(for_endpoint(bf, job.endpoint), job.tenant, results), results
        # The window counts engine seconds (a line's deadline), the time since the create real ones.
        left_s = job.window_s - (self._now() - job.created_at) * self.speedup
        todo = [r for r in job.bf.requests if r.id not in results]
        if job.status == "cancelling" or left_s <= 0 or not todo:
            why = CANCELLED_LINE
            if job.status != "cancelling":  # its window passed while the endpoint was down: it expires
                why = "the batch's completion window passed while the endpoint was down"
                for r in todo:
                    job.results[r.id] = Result(id=r.id, status="expired", tenant=job.tenant, error=why)
            self._finish(job, why)
            return
        if self._fresh_ledger:
            try:
                await self._count_kept(job, results)
            except Exception as exc:  # the budget actor restarting: the batch goes on, counted at the next start
                self._uncounted += 1
                log.error("endpoint: batch %s's kept lines were not counted against the budgets (%s)", job.id,
                          type(exc).__name__)
        try:
            await self._submit(job, todo, left_s)
        except ApiError as exc:  # the engine refused them (stopped, full): the batch ends, saying why
            log.error("endpoint: batch %s could not be taken back: %s", job.id, exc.message)
            self._finish(job, f"the endpoint restarted and the engine refused this line: {exc.message}")
            return
        job.task = asyncio.create_task(self._collect(job), name=f"smartbatch-{job.id}")
        log.warning("endpoint: batch %s taken back after a restart: %d line(s) in, %d asked again", job.id,
                    len(results), len(todo))

    async def _ledger_id(self) -> str | None:
        """The id of the engine's own budget ledger (None: its budgets live in Redis, which holds the earlier spend,
        or it has none, or it did not answer). Kept lines are counted only against a ledger that did not see them:
        a new engine's, not the one of an engine whose endpoint alone restarted."""
        b = self.engine.settings.budgets
        if b.redis_url or not b.specs:
            return None
        try:
            return (await asyncio.to_thread(self.engine.report)).get("budget", {}).get("ledger_id")
        except Exception as exc:
            log.warning("endpoint: the budget ledger did not answer (%s); kept lines are not counted again",
                        type(exc).__name__)
            return None

    async def _count_kept(self, job: BatchJob, results: dict[str, Result]) -> None:
        """The lines an open batch kept from before the restart were paid for: counted against this engine's
        budgets before the rest is sent, as ``smartbatch batch --resume`` counts its kept lines. Not counted, a
        restart let the batch spend its hard budget again (a hunt: $0.008064 billed against a $0.006 limit)."""
        # At what each may have billed (``Result.billed_bound_usd``): an answer's cost and the bound of its calls
        # that got no answer (a flex call given up at its timeout), a failure kept back at its bound (not sent
        # again: a call of it may be on the bill). At the cost alone, those bounds were spent again (a review).
        charges = [Charge(f"endpoint:{job.id}:{rid}", job.tenant, r.provider, r.model, usd)
                   for rid, r in results.items() if (usd := r.billed_bound_usd) and r.provider and r.model]
        if charges:
            await asyncio.to_thread(self.engine.count_spent, charges)
