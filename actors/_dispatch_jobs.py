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
The jobs of calls that ended are journaled too, as one list (the ``ENDED_KEEP`` newest) per incarnation (key
``ended@<incarnation>``): a restart gives them back (``"ended": True``) so a cut create's look-up never takes a video
another request made and was answered with (the last process held its id in memory only: both requests were
answered with one video). A restart merges every incarnation's list (each holds what its incarnation read), and the
older keys go once its own list landed: in one key (until stop 73), a dead incarnation's write landing after its
successor's replaced the successor's list, and a restart before its next video ended forgot the jobs it had added.
At a stop the jobs still under way are said (``open_jobs``): they complete and are billed at the provider."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from actors._incarnations import earlier, own_key
from actors.journal import JournalWriter

__all__ = ["ENDED", "ENDED_KEEP", "CallSlot", "MadeJobs"]

ENDED = "ended"  # the stem of the keys of the lists of ended calls' jobs (no call key starts so: they start with
# the tenant)
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
        self._jobs_journal.put_soon(self._ended_key, list(self._ended.items()))

    @property
    def _ended_key(self) -> str:
        return own_key(ENDED, self.incarnation)

    async def _ended_merged(self, older: list[str]) -> None:
        """Journal the merged list under this incarnation's key, then remove the older incarnations' lists."""
        if await self._jobs_journal.put(self._ended_key, list(self._ended.items())):
            for key in older:
                self._jobs_journal.delete(key)

    def _resume_jobs(self, records: dict[str, dict], resumed: set[str]) -> None:
        """After a restart: the jobs of the calls made again (``resumed``, their keys) go back to the provider;
        the records of the others (their calls ended, or left) are cleared."""
        records = dict(records)
        records.pop(self._ended_key, None)  # (its own, written after a read that failed: it holds no call)
        lists = earlier(records, ENDED, self._ended_key)
        for key, items in lists.items():
            del records[key]
            self._ended.update(dict(items or []))
        while len(self._ended) > ENDED_KEEP:
            del self._ended[next(iter(self._ended))]
        if lists:  # held: a task may be collected
            self._ended_merge = asyncio.ensure_future(self._ended_merged(list(lists)))
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
        return {**self._jobs, self._ended_key: list(self._ended.items())} if self._ended else self._jobs

    @property
    def open_jobs(self) -> int:
        """Jobs made and polled by calls under way (each billed when it completes)."""
        return len(self._jobs)
