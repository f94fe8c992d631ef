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
At a stop the jobs still under way are said (``open_jobs``): they complete and are billed at the provider.

On a Redis journal each job record (not the ended lists) has an entry in the result hub's index beside its call's
body (``actors._sync_index``), written with it (one hub message per write: two a video, its intent and its job) and
dropped with it: a Redis restarted empty, the dispatcher dead before its watch wrote the records again, lost them,
and the restart made the call again as one with no job journaled: at an endpoint that honours no key (Veo, OpenAI's
Videos API) a second video, both billed. The restart now takes the lost records from the index (``_jobs_lost``)."""

from __future__ import annotations

import asyncio
import functools
import pickle
from collections.abc import Awaitable, Callable

from actors._incarnations import earlier, own_key
from actors.journal import JournalWriter

__all__ = ["ENDED", "ENDED_KEEP", "JOB", "CallSlot", "MadeJobs"]

ENDED = "ended"  # the stem of the keys of the lists of ended calls' jobs (no call key starts so: they start with
# the tenant)
ENDED_KEEP = 2000  # as many as the OpenAI video look-up holds (``_openai_video.HELD_KEEP``): older are past its look
JOB = "~job:"  # a job record's key in the hub's index space: JOB + its call's key (``actors._sync_index``)


def _ended_list(key: str) -> bool:
    return key == ENDED or key.startswith(ENDED + "@")


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
    """Needs the dispatcher's ``name``, ``journal``, ``clock``, ``_pump``, ``_unjournal``, ``hub``, ``_unanswered``,
    ``_kept`` and ``_index_space``."""

    def _init_jobs(self) -> None:
        self._jobs_journal = JournalWriter(self.journal, f"jobs:{self.name}", self._jobs_index_put)
        self._jobs: dict[str, dict] = {}  # call key -> the record of the job its call polls, until it ends
        self._ended: dict[str, str] = {}  # job -> its api, of calls that ended (the ENDED_KEEP newest)

    def _jobs_index_put(self, puts: dict) -> None:
        """``JournalWriter``'s hook: job records about to be written; their entries (the records themselves, a few
        hundred bytes: no request, no body), in one message."""
        if (space := self._index_space()) is None:  # (the hub's memory or files: it loses nothing the hub keeps)
            return
        if blobs := {JOB + k: pickle.dumps(rec) for k, rec in puts.items() if not _ended_list(k)}:
            self.hub.send("journal_put_many", space, blobs)

    def _jobs_lost(self, got: dict, records: dict) -> None:
        """After a loss: the job records of the hub's index (``got``, its JOB entries) the journal lost, put among
        those read (``records``), to be taken up with their calls (``_resume_jobs``) and journaled again."""
        for k, blob in got.items():
            if (key := k[len(JOB):]) not in records:
                records[key] = pickle.loads(blob)
                self.__dict__.setdefault("_jobs_unjournaled", set()).add(key)

    def _count_cut(self, uid: str, rec: dict) -> None:
        """A call made again after a restart, whose last try's end died with the last process (``rec``: its job
        record, or {}). One whose job (a video) was made was answered: made again it polls that job, one bound until a
        try polls it (``_kept``). One whose create's intent only is known was not (counted unanswered). A refused
        create's record says no create was under way: none unanswered but its ``lost`` ones. Whatever the record,
        its ``lost`` (the call's creates that got no answer, each of which may have made a video; an OpenAI intent
        counts its own) is a floor, not added to the journaled tally, which holds them already once flushed. A journal
        that lost the record lost the tally with it: taken from the hub's index, the call polled its job and the
        lost creates were counted nowhere (a review: a create cut, its video not found, the retry's video polled
        after the loss, $1.60 billed, $0.80 in the ledger, nothing possibly billed)."""
        if rec.get("job") is not None:  # (billed when it ends; ended unsent, the stop's cancel first, settled at 0
            self._kept.add(uid)  # before a review)
        elif not rec.get("refused"):
            self._unanswered[uid] += 1
        if (lost := rec.get("lost") or 0) > self._unanswered.get(uid, 0):
            self._unanswered[uid] = lost

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
        held, lost = self.__dict__.get("_adopting_sync", {}), self.__dict__.pop("_jobs_unjournaled", set())
        for key, rec in records.items():
            if key in resumed or key in held:  # (held: a call whose body record was lost, made once re-admitted)
                self._jobs[key] = rec
                back.append(rec)
                if key in lost:  # from the hub's index: journaled again, for a later restart to read
                    self._jobs_journal.put_soon(key, rec)
            elif key not in self._jobs:
                self._unjournal.append((self._jobs_journal.space, key))
        if back:
            self.provider.resume_jobs(back)

    def _jobs_index_rewrite(self) -> dict[str, bytes]:
        """The hub restarted without its index: the entries of the jobs under way (and of held calls)."""
        return {JOB + k: pickle.dumps(rec) for k, rec in self._jobs.items()}

    @property
    def _jobs_records(self) -> dict:
        """What the jobs space holds: the records of jobs under way, and the list of ended ones."""
        return {**self._jobs, self._ended_key: list(self._ended.items())} if self._ended else self._jobs

    @property
    def open_jobs(self) -> int:
        """Jobs made and polled by calls under way (each billed when it completes)."""
        return len(self._jobs)
