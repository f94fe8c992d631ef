"""Ingest: admits requests in batches, drops duplicate ids, fingerprints, asks the cache, forwards misses.

With a Redis journal configured (``journal.redis_url``, else the budgets' or the cache's URL), every accepted
request is written to it (space ``accepted``) before ``submit`` returns, and deleted when the driver forgets it
(past its retention window): the engine's record of what it owes, which outlives the driver's memory. Without
Redis the driver's memory is that record (a non-detached engine dies with its driver)."""

from __future__ import annotations

import asyncio
import time

from actors._ingest_admit import HubAdmission, _other_content
from actors._ingest_adopt import hand_over, recall_from
from actors._ingest_holders import Holders
from actors._peer import Warm, as_peer
from actors._shards import Shards, by_job_class, by_result_uid, class_shard, uid_shard
from actors._types import OWN_ROWS, Held, Job, send_sharded
from actors.journal import redis_journal
from engine.core._logkeys import get_logger
from engine.core.features import fingerprint
from engine.core.request import Request
from engine.core.result import Result

__all__ = ["Ingest"]

log = get_logger("smartbatch.ingest")

ACCEPTED = "accepted"  # the journal space of accepted requests
JOURNAL_RETRY_S = 5.0  # after a failed journal write, submits skip the journal this long (real seconds)
REPEAT_LOOK_S = 5.0  # real seconds between the two looks for a repeated id's request before it counts as gone


class Ingest(HubAdmission, Holders, Warm):
    def __init__(self, groupers: list, cache=None, share_across_tenants: bool = False, dispatchers: list = (),
                 hub=None, settings=None, engine: str = "engine", shard: tuple[int, int] = (0, 1)):
        self.groupers = [as_peer(g) for g in groupers]
        self.hubs = Shards(hub)  # by request id
        self.dispatchers = [as_peer(d) for d in dispatchers]
        self.readmitted = 0
        self._reborn = False  # restarted by Ray: ``seen`` was lost (``reconstructed``)
        self._reborn_at: float | None = None  # when (monotonic): its holders rebuild meanwhile (``others``)
        self.caches = Shards(cache)  # by compatibility class
        self.seen: dict[str, str] = {}  # admitted id -> its content's fingerprint
        # id -> the driver(s) that submitted it (a string, mostly): forgotten when its last driver forgets it
        self.holders: dict[str, str | set[str]] = {}
        self._moving: set[str] = set()  # admitted, on their way to the cache and the groupers
        # In ``seen``, waiting for the hub's ``admit``: counted per admission (a re-admission and another driver's
        # submit of the id may overlap), so one's end leaves the other's mark (``reregister``)
        self._admitting = Held()
        # Fresh ids of a sharded submit awaiting the hub's verdict, until marked ``_moving`` or let go: a
        # re-admission waits for the verdict (``_decided``) before it asks who holds them
        self._deciding = Held()
        self._verdict: asyncio.Future | None = None
        self._leaving: dict[str, asyncio.TimerHandle] = {}  # driver -> the forget of the ids only it holds
        self._drops_seen, self._drops_check_at = 0, 0.0  # the hub's dropped drivers read, and the next look
        self._drops_task: asyncio.Task | None = None
        self.next_seq = 0  # requests admitted here
        self.shard = shard  # (this shard, of how many)
        self._turn: asyncio.Future | None = None  # set once the last sharded submit's lookups have left
        self._lookups: list[tuple[list[Job], asyncio.Future]] = []  # waiting for the lookup out to return
        self._looking: asyncio.Task | None = None
        self.duplicates, self.share = 0, share_across_tenants
        # Only a Redis journal: without one, the driver's memory is the record (see the module's docstring).
        self.journal = redis_journal(settings, engine) if settings is not None else None
        self.journal_failures, self._journal_back_at = 0, 0.0  # accepted micro-batches not journaled (Redis down)

    def __repr__(self) -> str:
        return f"Ingest(admitted={self.next_seq}, duplicates={self.duplicates})"

    async def forget(self, uids: list[str], client: str | None = None) -> None:
        """Requests finished past the driver's retention window: their ids may name new requests, so the actors
        that remember finished ones forget them too; an id of several drivers, once the last (``client``) does."""
        if client is not None:
            uids = [u for u in uids if self._release(u, client)]
        for u in uids:
            self.seen.pop(u, None)
        if not uids:
            return
        for p in (*self._rememberers(hubs=False), *self.groupers):  # groupers keep the requests that ended there
            p.send("forget", uids)
        # Awaited: the driver sends a new request under one of these ids once this returns, and a hub that has
        # not forgotten the id answers it with the old result.
        try:
            await self.hubs.call("forget", uid_shard, uids)
        except Exception as exc:  # a hub restarting has forgotten everything anyway
            log.warning("ingest: a hub did not take a forget (%s)", type(exc).__name__)
        if self.journal is not None:
            try:
                await self.journal.delete(ACCEPTED, uids)
            except Exception as exc:  # a stale record costs a re-admission that finds the request finished
                log.warning("ingest: could not clear %d accepted record(s): %s", len(uids), type(exc).__name__)

    async def accepted(self) -> list[Request]:
        """The accepted requests the journal holds (those not yet forgotten): what a driver that lost its
        memory re-admits (``readmit`` sends each on only if no actor has it). Empty without a Redis journal."""
        if self.journal is None:
            return []
        return list((await self.journal.items(ACCEPTED)).values())

    async def _journal(self, jobs: list[Job]) -> None:
        if self.journal is None:
            return
        if time.monotonic() < self._journal_back_at:  # down lately: do not make every submit wait its timeout
            self.journal_failures += 1
            return
        try:
            await self.journal.put_many(ACCEPTED, {j.req.uid: j.req for j in jobs})
        except Exception as exc:  # Redis is down: the driver's memory still holds them; go on, say so
            self.journal_failures += 1
            self._journal_back_at = time.monotonic() + JOURNAL_RETRY_S
            log.warning("ingest: %d accepted request(s) not journaled (%s); the driver still holds them; "
                        "trying again in %.0f s", len(jobs), type(exc).__name__, JOURNAL_RETRY_S)

    def _rememberers(self, caches: bool = True, hubs: bool = True) -> list:
        """The actors that remember requests they carry or finished: asked by ``readmit``, told by ``forget``.
        (Requests carry no class here, so every cache shard is asked; the hub's by id.)"""
        return [*self.dispatchers, *(self.caches if caches else ()), *(self.hubs if hubs else ())]

    def _job(self, r: Request, seq: int | None = None) -> Job:
        """``seq``: the row of the request's simulated draws, as the driver numbered it in submission order
        (so the live engine draws what the simulator draws for the same trace). Without one (a re-admission),
        a row of this shard's own, far from the drivers'."""
        fp = self.seen[r.uid] = fingerprint(r, share_across_tenants=self.share)
        if seq is None:
            k, n = self.shard
            seq = OWN_ROWS + self.next_seq * n + k
        self.next_seq += 1
        return Job(seq, r, fp, cache_shard=class_shard(r, len(self.caches)) if self.caches else 0)

    def _sort(self, requests: list[Request], client: str | None) -> list[Request]:
        """The requests whose id is new or whose content matches its id's, recorded as held by driver
        ``client``. The rest are refused: ``client`` gets a failed result naming the id, never the result of
        another content."""
        ok: list[Request] = []
        refused: list[Result] = []
        for r in requests:
            old = self.seen.get(r.uid)
            if old is not None and old != fingerprint(r, share_across_tenants=self.share):
                refused.append(_other_content(r))
            else:
                ok.append(r)
        if client is not None and self.hubs:
            if refused:
                self.hubs.send("refuse", by_result_uid, refused, lead=(client,))
            if (back := self._leaving.pop(client, None)) is not None:  # dropped as idle, yet here: only paused
                back.cancel()
            holders = self.holders
            for r in ok:
                h = holders.get(r.uid)
                if h is None:
                    holders[r.uid] = client
                elif isinstance(h, set):
                    h.add(client)
                elif h != client:
                    holders[r.uid] = {h, client}
        return ok

    async def submit(self, requests: list[Request], client: str | None = None, seqs: list[int] | None = None) -> int:
        """Admit a batch; returns how many were new. A repeated (tenant, id) is the same request (the
        idempotency key): it is never generated twice, and driver ``client`` gets its result. With other content
        (a driver of a shared engine reusing an id another driver sent) it is refused: ``client`` gets a failed
        result naming the id. ``seqs``: the rows of the requests' simulated draws (see ``_job``)."""
        if client is not None:
            self._check_drops()
        ok = self._sort(requests, client)
        row = dict(zip((r.uid for r in requests), seqs)) if seqs is not None else {}
        jobs = [self._job(r, row.get(r.uid)) for r in ok if r.uid not in self.seen]
        fresh = {j.req.uid for j in jobs}
        # Repeats (rare): each id once (its copies passed the content check).
        repeats = list({r.uid: r for r in ok if r.uid not in fresh}.values()) if len(jobs) < len(ok) else []
        self.duplicates += len(requests) - len(jobs)
        # Sharded by class, another ingest shard may hold the same id with other content: the hub shard of the id
        # decides, before the jobs move on. The cache lookups still leave in submission order (``_turn``).
        # So does a restarted one, ``seen`` lost (a hunt: other content under an old id got the old result).
        across = bool(jobs) and (self.shard[1] > 1 or self._reborn) and client is not None and bool(self.hubs)
        if across:
            prev, mine = self._turn, asyncio.get_running_loop().create_future()
            self._turn = mine
        try:
            if client is not None and self.hubs:
                if across:
                    jobs = await self._admit_deciding(client, jobs)
                    fresh = {j.req.uid for j in jobs}
                elif jobs:  # before the jobs move on (a result that comes first is handed over at the claim), with
                    # the fingerprints the hub checks a restarted ingest's admissions against
                    self.hubs.send("claim", uid_shard, [j.req.uid for j in jobs], [j.fp for j in jobs], lead=(client,))
            self._moving.update(fresh)  # before any await, ``_admit_deciding``'s verdict included
            try:
                if repeats and client is not None and self.hubs:
                    await self._claim_repeats(client, repeats)
                if not jobs:
                    return 0
                await self._journal(jobs)
                if across and prev is not None:
                    await prev
                lookup = asyncio.ensure_future(self._lookup(jobs)) if self.caches else None
                if across:
                    mine.set_result(None)  # the next submit's lookups leave after these
                misses = await lookup if lookup is not None else jobs
                send_sharded(self.groupers, misses)
            finally:
                self._moving.difference_update(fresh)
            return len(jobs)
        finally:
            if across and not mine.done():
                mine.set_result(None)

    def reconstructed(self) -> None:  # restarted by Ray: ids admitted before are checked at the hub (``submit``)
        self._reborn = True
        self._reborn_at = time.monotonic()  # its holders rebuild as the drivers re-admit (``others``)

    async def _claim_repeats(self, client: str, reqs: list[Request], checked: bool = False,
                             missing: set[str] | None = None) -> None:
        """A request submitted again (another driver's, or this one's before it lost its memory): claim its
        result. One the hub no longer holds (delivered long ago) is sent again by whoever finished it; one
        still under way comes to the claim. One that nobody holds, after a second look ``REPEAT_LOOK_S`` later
        (a request may be between two actors at the first), finished so long ago that its result is gone:
        the driver is told so, rather than left waiting or the request generated and paid a second time.
        ``missing``: claimed already (``_admit_across``), these were not at the hub."""
        if missing is None:
            try:
                answers = await self.hubs.call("claim", uid_shard, [r.uid for r in reqs], lead=(client,))
                missing = {u for _, part in answers for u in part}
            except Exception as exc:  # the hub is restarting: the driver's re-admission claims them again
                log.warning("ingest: claim failed (%s: %s)", type(exc).__name__, exc)
                return
        if not missing:
            return
        missing -= await self._recall(self._rememberers(hubs=False) + self.groupers, sorted(missing))
        lost = [r for r in reqs if r.uid in missing and r.uid not in self._moving and r.uid in self.seen]
        if not lost:
            return
        if not checked:
            asyncio.get_running_loop().call_later(
                REPEAT_LOOK_S, lambda: asyncio.ensure_future(self._claim_repeats(client, lost, True)))
            return
        self.hubs.send("refuse", by_result_uid, [Result(
            id=r.id, tenant=r.tenant, status="failed", arrival_s=r.arrival_s,
            error=f"field 'id': tenant {r.tenant!r} id {r.id!r} was answered long ago (for another driver of "
                  "this engine, or before a restart) and its result is no longer held; it is not generated "
                  "again under the same id: use a new id to ask again") for r in lost], lead=(client,))

    async def _lookup(self, jobs: list[Job]) -> list[Job]:
        """The jobs no cache shard resolved, attached or sent on to its grouper itself (an engine's caches do:
        ``ResultCache.lookup``; then none). One lookup is out at a time: the submits that come
        meanwhile go together in the next, in the order they came (a group commit). Under load the batches
        grow instead of the calls: a replay at 100x submitting every few milliseconds had 800 lookups queued
        at the cache, each paying a call's fixed cost, and urgent requests reached their dispatcher minutes
        of engine time late."""
        fut = asyncio.get_running_loop().create_future()
        self._lookups.append((jobs, fut))
        if self._looking is None or self._looking.done():
            self._looking = asyncio.ensure_future(self._look_up_queued())
        return await fut

    async def _look_up_queued(self) -> None:
        while self._lookups:
            queued, self._lookups = self._lookups, []
            alljobs = [j for jobs, _ in queued for j in jobs]
            try:
                answers = await self.caches.call("lookup", by_job_class, alljobs)
            except Exception as exc:  # each submit fails as its own lookup would have
                for _, fut in queued:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            missed = {id(alljobs[k if pos is None else pos[k]]) for pos, ks in answers for k in ks}
            for jobs, fut in queued:
                if not fut.done():
                    fut.set_result([j for j in jobs if id(j) in missed])

    async def _recall(self, peers: list, uids: list[str], caches: list = (), detach: bool = False,
                      held: dict | None = None) -> set[str]:
        return await recall_from(peers, uids, caches, detach, held)

    async def readmit(self, requests: list[Request], client: str | None = None, force: bool = False) -> int:
        """Requests accepted earlier that a restarted actor may have lost (driver ``client`` sends every
        unfinished one, claimed again here). Each goes on only if no dispatcher, grouper, cache or hub holds it:
        those carry it out, send its result again, or have it. The rest go straight to their groupers (no cache
        lookup: a request that is in fact still in flight somewhere must not be answered a second time from the
        cache), which keep one copy of each. (Its own grouper is not the only one to ask: one rerouted to a
        fallback model waits in the fallback class's, and was billed under both models.) ``force`` (the driver's
        sweep, for requests open long past their deadline): the cache lets go of those still following an
        identical request (whose result may never reach them: the leader's end was lost with a restarted actor),
        and they are generated themselves; who still says it holds one is logged."""
        requests = self._sort(requests, client)
        if client is not None and self.hubs and requests and (self.shard[1] > 1 or self._reborn):
            # The hub checks that an id names one content, here too: across ingest shards (a refusal a failed
            # submit lost, a hub shard that restarted) and after this ingest restarted (its ``seen`` lost).
            fps = [fingerprint(r, share_across_tenants=self.share) for r in requests]
            refused = (await self._admit_ids(client, requests, fps))[0]
            requests = [r for r in requests if r.uid not in refused]
        uids = [r.uid for r in requests]
        if client is not None and self.hubs and uids and self.shard[1] == 1 and not self._reborn:
            self.hubs.send("claim", uid_shard, uids, lead=(client,))
        # The hub too: a result it holds but the driver had not pulled when it listed its unfinished requests.
        peers = [*self._rememberers(caches=False), *self.groupers]
        held: dict = {}  # what each peer said it holds (``hand_over``)
        known = await self._recall(peers, uids, caches=list(self.caches), detach=force, held=held)
        while any(u in self._deciding for u in uids):  # a submit of one awaits the hub's verdict: ask once it has it
            await self._decided(uids)
            held.clear()
            known = await self._recall(peers, uids, caches=list(self.caches), detach=force, held=held)
        if force and known:
            log.warning("ingest: %d request(s) open long past their deadline are still held by a dispatcher, "
                        "a grouper or the hub: %s", len(known), sorted(known)[:5])
        # A dispatcher whose journal lost a batch's record holds its members until it has their requests
        await hand_over(self.dispatchers, [r for r in requests if r.uid in known], held, force)
        # Still in their cache lookup (a busy cache keeps one past the sweep's grace): that lookup sends them on,
        # so sent from here too they were generated and paid twice.
        jobs = [self._job(r) for r in requests if r.uid not in known and r.uid not in self._moving]
        send_sharded(self.groupers, jobs)
        self.readmitted += len(jobs)
        return len(jobs)
