"""The result hub's index of a dispatcher's open batches, for a restart whose Redis journal lost their records.

A Redis restarted without persistence loses the records of the batches under way; the journal's watch writes
them again within a second (``actors._journal_watch``), and a dispatcher that dies in that second restarts to an
empty journal: the loss is told (``actors._journal_seal``), and before this index its batches' members, re-admitted
by the driver, were sent again, paid twice. The hub outlives the dispatcher, so it keeps, beside the seal's witness,
one small entry per batch record, written when the record is and dropped with it (one hub message per record, not
per request): the record's key, its ``BatchJob`` without members, start, tokens, the provider's batch id once
created, and per member its uid, draw row, fingerprint, attempts, claim and the like; no request, no body (about
110 bytes a member pickled, and 160 a batch).

A restart that reads a loss takes the entries missing from its journal as its own: their members are held
(``holds``/``recall``), so the driver's re-admission does not send them through a policy again; ingest, which
re-admits them and has their requests, hands them over (``wanted``, ``adopt``, ``actors._ingest_adopt``). Once a
batch's members are all back it is taken up as a journaled one is: followed by the provider's batch id
(``Provider.reattach``), or, where its create was cut before the id was known, looked for under its key
(``find_batch``) and, not found, created under it with the requests ingest handed over. Its members keep their
attempts (their ``custom_id``) and settle their first claim, and its record is journaled again. One taken up at
the driver's sweep without some of its members (their driver gone) reads their lines too, each settled on its
claim and kept for a late re-admission of its request (``actors._batch_strays``)."""

from __future__ import annotations

import asyncio
import pickle

from actors._batch_strays import BatchStrays, Strays
from actors._dispatch_jobs import JOB
from actors._journal_seal import HUB_ASK_S
from actors._sync_index import SYNC, SyncIndex
from actors._types import Job
from engine.core._logkeys import get_logger
from engine.core.request import Request

__all__ = ["INDEX", "BatchIndex", "entry"]

log = get_logger("smartbatch.dispatcher")

INDEX = "batch-index:"  # the hub's memory-journal space of one holder of one Redis journal: INDEX + base + holder


def entry(rec: tuple) -> bytes:
    """A batch record (``Dispatcher._open``'s value) as its index entry: no request, no body."""
    b, jobs, start, tokens, handle, body = rec
    bid = None if handle is None else str(getattr(handle, "id", ""))  # ("": simulated, drawn again)
    members = tuple((j.req.uid, j.seq, j.fp, *j[3:]) for j in jobs)
    # What its members were sent as: one rerouted here (``asked``) is re-admitted as the driver sent it, to its first
    # model, which names another call key (custom_id): its line of the batch was missed and it was sent again
    sent_as = {j.req.uid: (j.req.provider, j.req.model) for j in jobs if j.asked is not None}
    if isinstance(body, Strays):  # its strays, members again for a restart that loses its record (``_batch_strays``)
        members += tuple(e[4][0] for e, _ in body.of)
        sent_as.update((u, to) for e, _ in body.of if len(e) > 5 for u, to in e[5].items() if u == e[4][0][0])
    model = jobs[0].req.model if jobs else None  # (the route of a cancel made with no member, ``_cancel_held``)
    return pickle.dumps((b._replace(jobs=[]), start, tokens, bid, members, sent_as, model))


class BatchIndex(BatchStrays, SyncIndex):
    """Mixed into ``Dispatcher``: the index's writes, its read at a restart that lost records, and the adoption (of
    its sync calls too: ``SyncIndex``; of a batch's strays: ``BatchStrays``)."""

    def _index_space(self) -> str | None:
        seal = getattr(self.journal, "seal", None)  # only a Redis journal loses what the hub keeps
        return None if seal is None else INDEX + self.journal._base + seal.holder

    def _index_put(self, keys, journaled: bool = False) -> None:
        """Batch records ``keys`` were journaled (``journaled``), or the hub lost its index: their entries, in one
        message."""
        space = self._index_space()
        blobs = {k: entry(self._open[k]) for k in keys if k in self._open}
        if space is not None and blobs:
            self.hub.send("journal_put_many", space, blobs)
        if journaled:
            self._journaled_again(keys)

    def _index_rewrite(self) -> None:
        """The hub restarted without its index: every entry again, those still waiting for their requests too
        (lost with the hub, a restart before the re-admission found them nowhere and sent their members again)."""
        self._index_put(list(self._open))
        if (space := self._index_space()) is not None and (waiting := self.__dict__.get("_adopting")):
            self.hub.send("journal_put_many", space, {k: pickle.dumps(e) for k, (e, _) in waiting.items()})
        if space is not None:
            self._sync_index_rewrite(space)

    def _index_drop(self, keys: list[str]) -> None:
        space = self._index_space()
        if space is not None and keys:
            self.hub.send("journal_del", space, keys)
        self._journaled_again(keys)  # (ended: nothing of them left to journal)

    def _journaled_again(self, keys) -> None:
        """Of the batches a restart took from the index, ``keys`` are journaled again (or ended): once none is left,
        the journal is sealed again. Until then it is not (``RedisJournal.seal_held``): sealed by the restart's
        first write, a second restart before the re-admission read no loss, and sent their members again."""
        left = self.__dict__.get("_unsealed")
        if not left:
            return
        left.difference_update(keys)
        if not left and (release_seal := getattr(self.journal, "release_seal", None)) is not None:
            async def release() -> None:  # (a Redis journal's; the unit tests' stand-in has none)
                try:
                    await release_seal()
                except Exception as exc:  # sealed by the watch's next rewrite of every record
                    log.warning("dispatcher %s: could not seal its journal again (%s: %s)", self.name,
                                type(exc).__name__, exc)
            self._sealing = asyncio.ensure_future(release())  # (held: a task may be collected)

    async def _index_take(self, records: dict, bodies: dict, jobs: dict | None = None) -> int:
        """After a loss (``lost_records``): hold the members of the batches the index has and the journal lost,
        and the requests of its lost sync calls (``bodies``: the sync records read, ``actors._sync_index``), until
        ingest hands their requests over (``adopt``); the lost job records (videos) go among those read (``jobs``,
        ``_jobs_lost``). Returns how many batches."""
        space = self._index_space()
        try:
            got = await asyncio.wait_for(self.hub.call("journal_items", space), HUB_ASK_S)
        except Exception as exc:
            log.error("dispatcher %s: could not read the hub's index of its batches (%s: %s): their members may "
                      "be sent again, paid twice", self.name, type(exc).__name__, exc)
            return 0
        calls = {k: got.pop(k) for k in [k for k in got if k.startswith(SYNC)]}
        made = {k: got.pop(k) for k in [k for k in got if k.startswith(JOB)]}
        if jobs is not None:
            self._jobs_lost(made, jobs)
        lost = {k: pickle.loads(v) for k, v in got.items() if k not in records and k not in self._open}
        ended = await self._ended_at_hub([m[0] for e in lost.values() for m in e[4]]
                                         + [pickle.loads(v)[1][0] for v in calls.values()])
        self._sync_take(calls, bodies, ended)
        waiting = self.__dict__.setdefault("_adopting", {})
        self._held_at = {}
        for key, (b, start, tokens, bid, members, *sent_as) in lost.items():
            members = [m for m in members if m[0] not in ended and m[0] not in self._known and m[0] not in self._done]
            if not members:
                self._index_drop([key])
                continue
            waiting[key] = ((b, start, tokens, bid, members, *sent_as), {})
            self._known.update(m[0] for m in members)
            self._held_at.update((m[0], key) for m in members)
        if waiting:  # unsealed until they are journaled again: a restart before that reads the loss again
            self.__dict__.setdefault("_unsealed", set()).update(waiting)
            self.journal.seal_held = True
            log.warning("dispatcher %s: %d batch(es) under way found in the hub's index, their records lost: their "
                        "members are held, and followed once their requests are re-admitted", self.name, len(waiting))
        return len(waiting)

    _held_at: dict[str, str] = {}  # (read only) uid -> the key of the batch a restart took it in from the index

    def _spare_claim(self, j: Job) -> str | None:
        """The claim to let go of ``j``, a copy of work carried here, dropped as a duplicate: its own; but a copy of a
        member taken from the index (its entry outlived a hedge whose index drop the death cut) carries the claim its
        grouper reserved anew, letting the member's go (``_reserve``): the member goes on under the copy's. Before (a
        review), the copy's was let go, and the member's cost was settled on a claim released already: ignored.
        A copy of a stray (``_batch_strays``; ingest's recall missed this dispatcher): its request is taken, answered
        with the stray's line, and its claim let go (the stray's own is settled at that line's cost)."""
        if (copy := self._sync_copy(j)) is not None:  # a held sync call's: it takes its request (``_sync_index``)
            return copy[0]
        if j.req.uid in (self.__dict__.get("_stray") or {}):  # (its content the stray's: ``_fresh``)
            self._strays_back([j.req], checked=True)
            return j.claim
        if j.claim is None:
            return None
        key = self._held_at.get(j.req.uid)
        held = self.__dict__.get("_adopting", {}).get(key)
        jobs = held[0][4] if held is not None else self._open[key][1] if key in self._open else ()
        for i, m in enumerate(jobs):
            uid, claim = (m[0], m[5]) if held is not None else (m.req.uid, m.claim)
            if uid == j.req.uid:
                if claim == j.claim:
                    return None
                jobs[i] = (*m[:5], j.claim, *m[6:]) if held is not None else m._replace(claim=j.claim)
                return claim
        return j.claim

    async def wanted(self, uids: list[str]) -> list[str]:
        """Of ``uids`` (re-admitted, held here), those whose request this dispatcher waits for (``adopt``)."""
        await self._ready()
        want = {m[0] for e, _ in self.__dict__.get("_adopting", {}).values() for m in e[4]}
        want |= self._strays_wanted(uids) | self._sync_wanted()
        return [u for u in uids if u in want]

    async def adopt(self, requests: list[Request], force: bool = False) -> int:
        """The requests of members of lost batches (``_index_take``), from ingest's re-admission: a batch whose
        members are all back is taken up. ``force`` (the driver's sweep, for requests long past their deadline): a
        batch some of whose members are back is taken up with those; the others, which no driver re-admitted (its
        driver gone), run in it as strays (``actors._batch_strays``): their lines counted on their claims, a late
        re-admission answered with them. Held until all came back, they held the rest for good, their results never
        made. Returns how many batches."""
        await self._ready()
        waiting, n = self.__dict__.get("_adopting", {}), 0
        by_uid = {r.uid: r for r in requests}
        self._strays_back(requests)
        for key, (e, reqs) in list(waiting.items()):
            reqs.update((m[0], by_uid[m[0]]) for m in e[4] if m[0] in by_uid)
            if len(reqs) == len(e[4]) or force and any(m[0] in by_uid for m in e[4]):
                del waiting[key]
                gone = [m for m in e[4] if m[0] not in reqs]
                if gone:
                    log.warning("dispatcher %s: batch %s taken up with the %d of its %d members re-admitted; the "
                                "others' lines it runs are counted on their claims and kept for their requests",
                                self.name, key, len(reqs), len(e[4]))
                    e = (*e[:4], [m for m in e[4] if m[0] in reqs], *e[5:])
                    if e[3] is None:  # its create cut: looked for by its size, or made again, as a part of itself,
                        self._known.difference_update(m[0] for m in gone)  # it was not found, and made again
                        self._let_go(key, e, reqs)  # beside itself
                        continue
                self._take_up(key, e, reqs, gone)
                n += 1
        calls = self._sync_adopt(by_uid)  # (its lost sync calls: made again as they were)
        self.reattached += n
        if n or calls:
            self._kick()
            await self._journal_tally()  # its count kept by now, as a recovery's is
        return n

    async def _cancel_held(self, wait_s: float) -> tuple[int, int]:
        """The engine stops while batches taken from the index still wait for their members' requests: each one the
        provider knows by an id is cancelled by it (nobody waits for its members now). Unknown to the stop before, it
        ran on, billed, counted nowhere. Returns how many, and how many no cancel reached (they run on, billed).
        Their members' claims stay held (``reservation_ttl_s``): the entry has no request to bound them."""
        waiting = self.__dict__.get("_adopting") or {}

        async def one(key: str, b, bid: str | None, model: str | None) -> int:
            try:
                if bid is None:  # its create cut before its id was known: not looked for now
                    raise LookupError("its create was cut before the provider's id was known")
                await asyncio.wait_for(self.provider.cancel(self.provider.reattach(bid, [], b.hedge_at, model=model)),
                                       wait_s)
                return 0
            except Exception as exc:
                log.error("dispatcher %s: the engine stops, and batch %s (%s), held for its members' requests since its "
                          "record was lost, could not be cancelled (%s: %s): it runs on, billed", self.name, key, bid,
                          type(exc).__name__, exc)
                return 1
        # (bid "": simulated, nothing runs anywhere but in its draws, never read now)
        missed = await asyncio.gather(*(one(k, e[0], e[3], e[6] if len(e) > 6 else None)
                                        for k, (e, _) in waiting.items() if e[3] != ""))
        return len(waiting), sum(missed)

    def _jobs_of(self, e: tuple, reqs: dict[str, Request]) -> list[Job]:
        """The members of entry ``e`` with their re-admitted requests, those rerouted here as they were sent (the
        fallback's provider and model: ``Dispatcher._start_reroute``)."""
        sent_as = e[5] if len(e) > 5 else {}
        for uid, (provider, model) in sent_as.items():
            if uid in reqs:
                reqs[uid] = reqs[uid].model_copy(update={"provider": provider, "model": model})
        return [Job(m[1], reqs[m[0]], m[2], *m[3:]) for m in e[4]]

    def _let_go(self, key: str, e: tuple, reqs: dict[str, Request]) -> None:
        """A batch whose create was cut before its id was known, some of its members never re-admitted: those that
        were go to their policy again, with their claims, as at a hedge; the batch is not looked for."""
        log.error("dispatcher %s: batch %s, its create cut before the provider's id was known and some of its members "
                  "never re-admitted, is not looked for: those re-admitted go again; if it was made, what it finishes "
                  "is paid twice, uncounted", self.name, key)
        self._known.difference_update(reqs)
        # Marked as hedged: sent once (its batch may run), never a request the engine's stop may name unsent
        # (``actors._stop_cut.never_sent``), whose retry paid it again.
        self._readmit.extend(j._replace(hedges=j.hedges + 1) for j in self._jobs_of(e, reqs))
        self._index_drop([key])
        self._kick()

    def _take_up(self, key: str, e: tuple, reqs: dict[str, Request], gone: list[tuple] = ()) -> None:
        b, start, tokens, bid = e[:4]
        jobs = self._jobs_of(e, reqs)
        b = b._replace(jobs=jobs)
        cjobs = [self._call_job(j, start, batch=True) for j in jobs]
        strays = self._stray_calls(key, e, list(gone), jobs, start) if gone else []  # (their lines read too)
        handle = None
        try:
            handle = None if bid is None else self.provider.reattach(bid, cjobs + strays, b.hedge_at)
        except Exception as exc:  # (a provider that cannot make one from an id): looked for under its key instead
            log.warning("dispatcher %s: could not re-attach to batch %s by its id (%s: %s); looked for under its "
                        "key", self.name, bid, type(exc).__name__, exc)
        self._open[key] = (b, jobs, start, tokens, handle, None if handle is None else self._strays_of(key))
        stem = key.rpartition("#")[0]
        if not stem or stem not in self._parts_left:  # one dispatch holds its tokens once, for all its parts
            self._count_reattached(tokens, jobs)
        if stem:  # a part of a split dispatch: its last part releases its tokens
            self._parts_left[stem] = self._parts_left.get(stem, 0) + 1
        self.in_flight += len(jobs)
        if handle is None:  # its create was cut: found at the provider under its key, or created under it
            self._spawn(self._run_batch(b, jobs, start, tokens, key), jobs, b)
        else:  # journaled again, for a later restart to follow it from its record
            self._spawn(self._journal_put(key), [], b)
            self._spawn(self._follow_batch(key, b, jobs, start, tokens, handle, cjobs), jobs, b)
