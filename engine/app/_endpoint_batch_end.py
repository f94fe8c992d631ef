"""How a batch of the endpoint's Batches API ends (a mixin of ``_endpoint_batches.FilesAndBatches``): its lines
collected as the engine answers them, and its output and error files written once the last is in, the batch
cancelled, or the engine gave no result; a line the engine's stop failed leaves the batch open for the next
endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import json

from engine.app._driver_stop import ended_by_stop
from engine.app._endpoint_job import CANCELLED_LINE as _CANCELLED
from engine.app._endpoint_job import BatchJob, cut_by_cancel
from engine.core._logkeys import get_logger, words
from engine.core.batchfile import report, result_rows
from engine.core.result import Result

__all__ = ["BatchEnds"]

log = get_logger("smartbatch.endpoint")


class BatchEnds:
    """Needs the endpoint's ``engine``, ``catalog``, ``state``, ``responses``, ``_now``, ``_enter``, ``_save`` and
    ``_add_file``."""

    async def _collect(self, job: BatchJob) -> None:
        why = _CANCELLED
        cut = 0  # lines the engine's cancel ended unanswered
        stopped = False  # a line the engine's stop failed: the batch stays open for the next endpoint
        try:
            async for res in self.engine.as_completed(job.futures.values()):
                if ended_by_stop(res, self.engine.gone):
                    # Failed by the engine's stop, not answered (it ended "completed", every line the stop caught
                    # an error line, its input gone). Collected on: the driver's result thread may hand over an
                    # answer it got before the actors went (billed) after this failure. Ended here, that answer
                    # waited for a clean shutdown's ``_take_done``; after a kill it was asked again, paid twice.
                    if not stopped:
                        log.warning("endpoint: batch %s stays open: %s", job.id, res.error)
                    stopped = True
                    continue
                if cut_by_cancel(res):  # as by a stop, but the lines still in cancelled batches come after
                    cut += 1
                    continue
                if (cid := job.take(res)) is not None and self.state is not None:
                    self.state.add_result(job.id, job.results[cid])
            if stopped:
                return
            if cut and job.status != "cancelling":
                log.warning("endpoint: batch %s stays open: %d line(s) ended by the engine's cancel are asked "
                            "again at the next start", job.id, cut)
                return
        except asyncio.CancelledError:
            if job.status != "cancelling":
                raise  # shutdown: the batch stays open
        except Exception as exc:  # a future failed (e.g. the engine stopped): the lines without a result fail
            if stopped:  # not the stop's lines: they are asked again at the next start
                self._take_done(job)
                return
            why = f"the engine gave no result: {type(exc).__name__}: {words(exc)}"
        self._finish(job, why)

    def _take_done(self, job: BatchJob) -> None:
        """Take the lines finished but not yet delivered by ``as_completed``, not those the engine's stop failed
        (an answer of the last moment came after the stop's first failure: asked again, it was paid twice)."""
        for cid, fut in job.futures.items():
            if cid not in job.results and fut.done() and not fut.cancelled() and fut.exception() is None:
                res = fut.result()
                if not ended_by_stop(res, self.engine.gone) and not cut_by_cancel(res) and \
                        job.take(res) and self.state is not None:
                    self.state.add_result(job.id, job.results[cid])

    def _finish(self, job: BatchJob, why: str = _CANCELLED) -> None:
        """Write the output and error files from the results in; a line with none is an error (``why``)."""
        assert job.bf is not None
        self._take_done(job)
        self._enter(job, "finalizing")
        missing = {req.id for req in job.bf.requests if req.id not in job.results}
        for cid in missing:
            job.results[cid] = Result(id=cid, status="failed", tenant=job.tenant, error=why)
        results = [job.results[req.id] for req in job.bf.requests]
        # The lines the cancel cut: a line of n choices is one when any of its choices is.
        cut = {ln.custom_id for ln in job.bf.lines if any(q.id in missing for q in ln.choices)}
        out: list[bytes] = []
        err: list[bytes] = []
        bodies: list[tuple[str, dict]] = []  # (custom_id, Responses body) of each answered line
        for row in result_rows(job.bf, results, created=int(self._now())):
            # Line ids unique per batch, as OpenAI's are (batchfile's follow tenant and custom_id alone).
            row["id"] = "batch_req_" + hashlib.sha256(f"{job.id}/{row['id']}".encode()).hexdigest()[:32]
            if row["custom_id"] in cut and why == _CANCELLED:
                row["error"]["code"] = "batch_cancelled"
            text = json.dumps(row, separators=(",", ":")).encode() + b"\n"
            (out if row["error"] is None else err).append(text)
            if row["error"] is None and job.endpoint == "/v1/responses":
                bodies.append((row["custom_id"], row["response"]["body"]))
        # The ids of its called answers are its tenant's, before anyone reads them (a copy's are its source's).
        self.responses.learn(job.tenant, [body for cid, body in bodies if job.results[cid].status == "ok"])
        kept = True  # its files on disk: else the record stays open, with its results, for the next start
        for rows, kind in ((out, "output"), (err, "error")):
            if rows:  # named after the batch: an end written again after a crash replaces the file, never adds one
                setattr(job, f"{kind}_file_id", fid := f"file-{job.id}-{kind}")
                try:
                    self._add_file(f"{job.id}_{kind}.jsonl", "batch_output", b"".join(rows), fid, tenant=job.tenant)
                except OSError:  # (served from memory meanwhile; a helper's hunt: ended, then gone at a restart)
                    kept = False
        job.report = report(job.bf, results, self.catalog, window_s=job.window_s, policy="engine")
        # A line ended expired (its window passed while the endpoint was down: ``_endpoint_resume``) makes the
        # batch expired, as OpenAI reports one not done within its window; the lines done are in its output all
        # the same. One the engine answered late is an answer (paid for), counted late in the report.
        expired = any(r.status == "expired" for r in results)
        self._enter(job, "cancelled" if job.status == "cancelling" else "expired" if expired else "completed")
        job.release()
        if self.state is not None and kept:
            self._save(job)
            self.state.ended(job.id)
        elif self.state is not None:  # what the next start writes the end from, whole (its appends may have failed)
            self.state.rewrite_results(job.id, results)  # as its client saw them
