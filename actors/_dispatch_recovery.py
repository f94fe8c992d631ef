"""A dispatcher's recovery, after its own restart or another actor's: which requests it knows (``recall``,
``holds``), the finished results it sends again, and the journaled calls and batches it resumes (``recover``,
``rejournal``). A mixin of ``Dispatcher``: it uses the dispatcher's state."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import OrderedDict

from actors._batch_api import _short
from actors._dispatch_tally import _ZERO_TALLY, TallyJournal
from actors._journal_seal import lost_records
from actors._shards import uid_shard
from actors.journal import read_patiently
from engine.core._logkeys import get_logger
from engine.core.result import Result

log = get_logger("smartbatch.dispatcher")

# Finished requests kept to answer a re-admission (``recall``) rather than send it again: the newest DONE_KEEP, for
# DONE_KEEP_S; and of their outputs, the newest DONE_OUTPUT_MB. An image's is a base64 image of 1-6 MB, so a
# dispatch of images read batch after batch kept gigabytes here (a review); an output let go leaves its request
# known (never made again, never paid twice), answered again as failed, saying why.
DONE_KEEP, DONE_KEEP_S, DONE_OUTPUT_MB = 65_536, 300.0, 256.0


class Recovery(TallyJournal):
    """Recovery methods of ``Dispatcher``."""

    _outputs: OrderedDict[str, int]  # uid -> its kept output's length, oldest first (``_keep_done``)
    _output_bytes = 0

    def _keep_done(self, uid: str, res: Result, price: float) -> None:
        done, t = self._done, time.monotonic()
        self._output_bytes -= self._outputs.pop(uid, 0)
        done[uid] = (res, price, t)
        if res.output:
            self._outputs[uid] = len(res.output)
            self._output_bytes += len(res.output)
        while done and (len(done) > DONE_KEEP or next(iter(done.values()))[2] < t - DONE_KEEP_S):
            self._output_bytes -= self._outputs.pop(done.popitem(last=False)[0], 0)
        while self._output_bytes > DONE_OUTPUT_MB * 2**20:
            old, n = self._outputs.popitem(last=False)
            self._output_bytes -= n
            kept, p, when = done[old]
            done[old] = (kept.model_copy(update={"output": None, "status": "failed", "error": (
                f"made and billed (${kept.cost_usd:.6f}), but its output ({n:,} characters) was no longer kept when "
                f"the request was asked for again after a restart (a dispatcher keeps its newest {DONE_OUTPUT_MB:g} "
                "MB of outputs); not made again, so not paid twice")}), p, when)

    # -- recovery -----------------------------------------------------------------------------------------------
    # A dispatcher Ray restarted knows nothing until it has read its journal. The driver asks it to (``rewire``)
    # once it notices the restart, a health check later; work and questions can reach it before that (a grouper's
    # dispatch, ingest's recall during a sweep), and answered from an empty memory they send members of its open
    # batches again: billed twice. So a restarted one reads its journal first, whoever calls it first.
    _must_recover = False
    _tally_sent: tuple = _ZERO_TALLY  # the tally last journaled
    _tally_epoch = 0  # one past every tally this incarnation's restore read
    _tally_change = 0  # tallies journaled, numbered on across restarts
    _recovery: asyncio.Future | None = None
    journal_unread = 0  # recoveries that gave up on an unreadable journal (members sent again)
    journal_lost = 0  # recoveries that found the journal's Redis had lost records (``actors._journal_seal``)

    def reconstructed(self) -> None:
        """Ray restarted this actor (``actors.remote`` calls this after the constructor): it takes no work and
        answers no ``holds``/``recall`` until it has re-read its journal (``recover``)."""
        self._must_recover = True
        self._reborn = True  # for good: a stop names nothing it holds (``CutDispatches.cut_at_stop``)
        self._tally_unread = True  # its predecessors' tallies, until ``_take_back_tally``

    async def _ready(self) -> None:
        if self._must_recover:
            await self.recover()

    async def _recover_at_stop(self, clock, journal_copy: list | None) -> None:
        """Ray restarted this dispatcher in the engine's stop, or just before it (its process died), and no driver
        rewires it now: the stop gives it what ``actors.remote.rewire`` would, the engine ``clock`` (the stop has
        unpublished it) and, where the journal was the hub's memory, ``journal_copy``: ``[copy]``, or ``[ref]`` to
        it, of the hub's records (``MemoryJournalStore.journal_copy``; the stop has killed the hub). It is
        cancelled before it reads its journal: a create the restart cut is looked for, never made again, and a
        call it would make again is ended unsent. Its peers are found by name, so its settlements reach the budget
        controller, which the stop keeps until the dispatchers answer. Before, it answered the stop from an empty
        memory, or not at all: its batches ran on at the provider, billed, their spend counted by no ledger and
        their claims held until ``reservation_ttl_s``."""
        from actors.journal import HubJournal

        if clock is not None:
            await self.set_clock(clock)
        if self.clock is None:
            raise RuntimeError(f"dispatcher {self.name}: restarted in the engine's stop, and given no engine clock: "
                               "its batches under way are not cancelled, and may run on, billed")
        if journal_copy and isinstance(self.journal, HubJournal):
            try:
                got = journal_copy[0]
                self.journal.hold(await got if inspect.isawaitable(got) else got)
            except Exception as exc:  # (the hub is gone: its journal read below waits, then gives up)
                log.error("dispatcher %s: restarted in the engine's stop, it could not take the journal's copy "
                          "(%s): its batches under way may run on, billed", self.name, _short(exc))
        await self.cancel()
        await self._ready()

    async def holds(self, uids: list[str]) -> list[str]:
        """Of ``uids``, those this dispatcher is carrying out or has finished (nothing is sent again)."""
        await self._ready()
        return [u for u in uids if u in self._known or u in self._done]

    async def forget(self, uids: list[str]) -> None:
        """Finished requests past the driver's retention: a new request may use their ids."""
        for u in uids:
            self._done.pop(u, None)
            self._output_bytes -= self._outputs.pop(u, 0)
            if self._withdrawn:  # free again: a new request under it is sent (a review)
                self._withdrawn.pop(u, None)

    async def recall(self, uids: list[str]) -> list[str]:
        """Of ``uids`` (requests re-admitted after a restart), those this dispatcher knows: still carrying them
        out, or finished (their results are sent again). The rest are lost and must be dispatched afresh."""
        out = await self.holds(uids)
        for u in out:
            if u in self._done:
                self._send_again(u)
        if out:
            self._kick()
        return out

    def _send_again(self, uid: str) -> None:
        """Put a finished request's result in the outbox again (the hub counts it once)."""
        res, price, _ = self._done[uid]
        self._results.append(res)
        self._list_prices.append(price)

    async def recover(self) -> int:
        """After a restart: make again, under the same key and with the same body, the sync calls the journal
        says were under way, and re-attach to the batches it says were submitted, by their ids, following them
        to their end (their members are never submitted again). Returns how many batches: 0 when a recovery
        already ran (one at a time; a call while one runs waits for it), -1 when the journal stayed unreadable
        (the next call reads again)."""
        if self._recovery is not None:
            await asyncio.shield(self._recovery)
            return 0
        fut = self._recovery = asyncio.get_running_loop().create_future()
        try:
            return await self._recover_journal()
        finally:
            self._must_recover = False
            fut.set_result(None)

    async def _recover_journal(self) -> int:
        async def read() -> tuple[dict, dict, dict, dict, dict]:
            return (await self.journal.items(self._space), await self.journal.items(self._sync_journal.space),
                    await self.journal.items(self._watch_space), await self.journal.items(self._tally_space),
                    await self.journal.items(self._jobs_journal.space))

        wait_s = self.settings.journal.recover_wait_s
        try:
            records, bodies, watches, tally, jobs = await read_patiently(read, f"dispatcher {self.name}", wait_s)
        except Exception as exc:
            self._recovery = None  # the driver's rewire may try again
            self.journal_unread += 1
            log.error("dispatcher %s: journal unreadable after a restart (%s) for %.0f s; batches it had submitted "
                      "are not followed and their members are sent again", self.name, _short(exc), wait_s)
            return -1
        if await lost_records(self.journal, f"dispatcher {self.name}"):
            self.journal_lost += 1
            await self._index_take(records, bodies, jobs)  # what the hub's index has: held, taken up once re-admitted
        self._take_back_tally(tally)
        ended = await self._ended_at_hub([rec[1].req.uid for rec in bodies.values()]
                                         + [j.req.uid for rec in records.values() for j in rec[1]])
        n, held, resumed = 0, {}, set()
        for key, rec in bodies.items():
            b, j, cache_write, _ = rec
            if j.req.uid in ended:  # answered before the restart, which cut only its record's delete
                self._unjournal.append((self._sync_journal.space, key))
                continue
            # A call that may have reached the provider (and been billed): made again under its key with its
            # body, so a provider that honours the key answers it without billing it twice.
            if j.req.uid in self._known or key in self._sync_calls:
                continue
            self._sync_calls[key] = rec
            self._known.add(j.req.uid)
            # Whether that call was answered died with the last process: its retries settle at their real cost
            # if one is answered, and at the call's upper bound if all fail (``_maybe_billed``), not at 0. A call
            # whose job (a video) is journaled polls that job (``_resume_jobs``); one whose create's intent only is
            # journaled looks for the video it may have made (Veo's fails).
            self._count_cut(j.req.uid, jobs.get(key, {}))
            resumed.add(key)
            self.in_flight += 1
            # Its gate slot, as the gate's start takes one: its end (or a video's made-hook) frees it, not another's.
            self.sim.hold_sync(j.req.model, self.clock.now(), j.req.input_tokens + j.req.output_tokens)
            self._spawn(self._run_sync(b, j, cache_write, self.clock.now()), [j], b)
            self.resumed_calls += 1
        self._resume_jobs(jobs, resumed)  # before any await: the calls just spawned have not run yet
        named = self._stop_named(records)  # (``CutDispatches``: never in a batch under way again)
        for key, (b, jobs, start, tokens, handle, body) in records.items():
            jobs = self._named_out(jobs, handle, named, key)
            # Not those sent again (a hedged member sent sync) nor those answered before the restart: a record
            # outlives its batch until its results are with the hub, and a restart in its delete's retry window
            # re-attached to the ended batch and handed back members already served, to be sent and paid again.
            jobs = [j for j in jobs if j.req.uid not in self._known and j.req.uid not in ended]
            if key in watches:  # its members went again, its watch counts what it still finishes (below)
                jobs = []
            if not jobs and key not in self._open:
                self._unjournal.append((self._space, key))
            if key in self._open or not jobs:
                continue
            self._open[key] = (b, jobs, start, tokens, handle, body)
            self._strays_again(key, body)  # (members no driver re-admitted, run in it: ``_batch_strays``)
            stem = key.rpartition("#")[0]
            if stem:  # a part of a split dispatch: its last part releases its tokens
                self._parts_left[stem] = self._parts_left.get(stem, 0) + 1
            gated = held.setdefault(stem or key, [tokens, []])  # one dispatch holds its tokens once
            gated[1] += jobs
            self._known.update(j.req.uid for j in jobs)
            self.in_flight += len(jobs)
            if handle is None:  # its create was cut: find it at the provider, or create it under the same name
                self._spawn(self._run_batch(b, jobs, start, tokens, key, body), jobs, b)
            else:
                cjobs = [self._call_job(j, start, batch=True) for j in jobs]
                self._spawn(self._follow_batch(key, b, jobs, start, tokens, handle, cjobs), jobs, b)
            n += 1
        # On the batch queue's gate until each ends (``finish_batch``), as in the process that made them: uncounted,
        # new batches were created past the provider's limit. Before any await, so none of them has ended yet.
        for tokens, jobs in held.values():
            self._count_reattached(tokens, jobs)
        for key, (b, handle, jobs, start, cancel) in watches.items():
            if handle is None and not getattr(self.provider, "names_batches", True) and key not in self._watching:
                # A lost create's batch with no name (Anthropic): a restarted process no longer knows its own
                # batches, and took one of them, the same members sent again, for the lost one (a review).
                log.error("dispatcher %s: after a restart, the batch of lost create %s can no longer be told from "
                          "this engine's own; if it was made, what it finishes is paid twice, uncounted",
                          self.name, key)
                self._unjournal.append((self._watch_space, key))
                continue
            if key not in self._watching:  # a batch whose members went again: still cancelled, and counted
                await self._watch(b, key, jobs, start, handle, cancel)
        self.reattached += n
        if self._unjournal:
            self._kick()
        await self._journal_tally()
        if n or self.resumed_calls:
            log.warning("dispatcher %s: after a restart, re-attached to %d open batch(es) and resumed %d call(s)",
                        self.name, n, self.resumed_calls)
        return n

    async def _ended_at_hub(self, uids: list[str]) -> set[str]:
        """Of ``uids`` (work a restarted dispatcher's journal names), those whose result the hub holds: a record
        is deleted only after its results were pushed, so these ended; their records outlived them (a delete cut
        by the restart, or by a journal error and its retry)."""
        if not uids or not self.hubs:
            return set()
        try:
            answers = await self.hubs.call("recall", uid_shard, uids)
        except Exception as exc:  # resumed as before: a provider that honours the call's key bills it once
            log.warning("dispatcher %s: could not ask the hub what ended (%s)", self.name, _short(exc))
            return set()
        return {u for _, got in answers for u in got}

    async def _journal_back(self) -> None:
        """Another Redis process answers for the journal (``RedisJournal``'s watch): one restarted without
        persistence, or back from a snapshot, lost the records of the batches and calls under way, and a restart
        of this dispatcher would then send their members again, paid twice (a helper's hunt). A restarted one
        reads its journal first: its memory is no copy of what it had under way until then."""
        await self._ready()
        await self.rejournal(strict=True)

    async def rejournal(self, strict: bool = False) -> int:
        """Write every open batch and sync body to the journal again (after the hub, which keeps a memory
        journal, restarted, or a journal's Redis came back without them). ``strict``: a failed write raises, for
        the journal's watch of its Redis to try them all again; else it is logged."""
        if not strict and (seal := getattr(self.journal, "seal", None)) is not None:
            seal.unwitness()  # the hub restarted without its witness: told again with the records written below
            self._index_rewrite()  # and without its index of the batches (``_batch_index``)
        for space, recs in ((self._space, self._open), (self._sync_journal.space, self._sync_calls),
                            (self._watch_space, self._watching), (self._jobs_journal.space, self._jobs_records)):
            if recs:
                snap = dict(recs)
                try:
                    await self.journal.put_many(space, snap)
                except Exception as exc:
                    if strict:
                        raise
                    log.warning("dispatcher %s: could not journal %s: %s", self.name, space, _short(exc))
                # What ended while the write was out had its delete sent beside it, which Redis may run first (a
                # few bytes beside megabytes of bodies): written back, its record outlived it, for a restart to
                # take up again (a review). Deleted again after it, as any ended record is (``flush``).
                live = self._jobs_records if space == self._jobs_journal.space else recs  # (that one is a copy)
                if gone := [k for k in snap if k not in live]:
                    self._unjournal.extend((space, k) for k in gone)
                    self._kick()
        self._tally_sent = _ZERO_TALLY  # the journal lost it too
        await self._journal_tally()
        return len(self._open)

