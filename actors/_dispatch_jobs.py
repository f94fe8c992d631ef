"""Jobs a provider makes for a sync call and then polls (a video, minutes long): the dispatcher's side. A mixin of
``Dispatcher``.

Once a job's create is answered, the provider hands its record to the call's ``CallJob.made`` (``_job_made``): the
call's concurrency slot is freed then, not when the job ends (a video held a slot for its whole poll, so 256
videos under way kept every text call of the provider waiting), and the record is journaled (space
``jobs:<provider>``, by the call's key), so a dispatcher Ray restarts gives it back to its provider before it makes
the call again: the call polls that job, billed once, rather than make another (``_resume_jobs``). The record is
cleared with the call's body record, once its result is with the hub; a job that failed (billed nothing) keeps
its record until its retry's create writes the new one (a restart between them polls the failed job once more).
A record with no job (``"job": None``) is a create's intent, journaled before the create is sent (OpenAI's videos,
Veo's): the slot stays held, and a restart gives it back so the call made again looks for the video that create
made (OpenAI), or fails rather than make a second (Veo, which has no listing to look in).
A create refused (no video made) replaces its intent by a record saying so (``"refused": True``): with the intent
kept, a restart during the retry's wait looked for a video that create never made and took another request's of
the same body (answered with it, its price counted twice); the restart counts the call unanswered only if an
earlier create of it got no answer (``lost``).
The jobs of calls that ended are journaled too, as one list (key ``ENDED``, the ``ENDED_KEEP`` newest): a restart
gives them back (``"ended": True``) so a cut create's look-up never takes a video another request made and was
answered with (the last process held its id in memory only: both requests were answered with one video).
At a stop the jobs still under way are said (``open_jobs``): they complete and are billed at the provider."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from actors.journal import JournalWriter

__all__ = ["ENDED", "ENDED_KEEP", "CallSlot", "MadeJobs"]

ENDED = "ended"  # the key of the list of ended calls' jobs (no call key is this: they start with the tenant)
ENDED_KEEP = 2000  # as many as the OpenAI video look-up holds (``_openai_video.HELD_KEEP``): older are past its look


class CallSlot:
    """A sync call's concurrency slot at its rate gate, freed once: when the call ends, or, for a job the provider
    polls, once its create is answered."""

    __slots__ = ("freed", "model", "sim")

    def __init__(self, sim, model: str):
        self.sim, self.model, self.freed = sim, model, False

    def free(self, at: float, extra_tokens: int = 0) -> bool:
        """Free it at engine time ``at``; False if it was freed already."""
        if self.freed:
            return False
        self.freed = True
        self.sim.finish_sync(self.model, at, extra_tokens)
        return True


class MadeJobs:
    """Needs the dispatcher's ``name``, ``journal``, ``clock``, ``_pump`` and ``_unjournal``."""

    def _init_jobs(self) -> None:
        self._jobs_journal = JournalWriter(self.journal, f"jobs:{self.name}")
        self._jobs: dict[str, dict] = {}  # call key -> the record of the job its call polls, until it ends
        self._ended: dict[str, str] = {}  # job -> its api, of calls that ended (the ENDED_KEEP newest)

    def _made_hook(self, key: str, slot: CallSlot) -> Callable[[dict], Awaitable[None]]:
        return functools.partial(self._job_made, key, slot)

    async def _job_made(self, key: str, slot: CallSlot, record: dict) -> None:
        # (a record without a job is a create's intent, journaled before it is sent: the slot is the create's)
        if record.get("job") is not None and slot.free(self.clock.now()):
            self._pump()  # the calls waiting at the gate for that slot start now
        self._jobs[key] = record
        await self._jobs_journal.put(key, record)  # a failed write is logged: only a restart now would lose it

    def _job_done(self, key: str) -> None:
        """The call of ``key`` left this dispatcher: its job's record goes with its body record."""
        rec = self._jobs.pop(key, None)
        if rec is not None:
            self._unjournal.append((self._jobs_journal.space, key))
            if rec.get("job") is not None:
                self._end_job(rec)

    def _end_job(self, rec: dict) -> None:
        self._ended[rec["job"]] = rec.get("api", "")
        while len(self._ended) > ENDED_KEEP:
            del self._ended[next(iter(self._ended))]
        self._jobs_journal.put_soon(ENDED, list(self._ended.items()))

    def _resume_jobs(self, records: dict[str, dict], resumed: set[str]) -> None:
        """After a restart: the jobs of the calls made again (``resumed``, their keys) go back to the provider;
        the records of the others (their calls ended, or left) are cleared."""
        records = dict(records)
        self._ended.update(dict(records.pop(ENDED, None) or []))
        back = [{"api": api, "job": job, "ended": True} for job, api in self._ended.items()]
        for key, rec in records.items():
            if key in resumed:
                self._jobs[key] = rec
                back.append(rec)
            elif key not in self._jobs:
                self._unjournal.append((self._jobs_journal.space, key))
        if back:
            self.provider.resume_jobs(back)

    @property
    def _jobs_records(self) -> dict:
        """What the jobs space holds: the records of jobs under way, and the list of ended ones."""
        return {**self._jobs, ENDED: list(self._ended.items())} if self._ended else self._jobs

    @property
    def open_jobs(self) -> int:
        """Jobs made and polled by calls under way (each billed when it completes)."""
        return len(self._jobs)
