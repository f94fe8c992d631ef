"""The result hub's index of a dispatcher's sync calls under way over HTTP, beside its batches'
(``actors._batch_index``), for a restart whose Redis journal lost their body records.

A sync call's body is journaled before its first try (``SyncCalls._run_sync``), so a restart makes it again under
the same ``Idempotency-Key`` with the same body. A Redis restarted empty, the dispatcher dead before its watch wrote
the records again, loses them: before this index the restart did not make the call again, and the driver's
re-admission sent its request through its policy again; sent sync, it went under the same key (its attempt 0), but
a policy may put it in a batch, which ran it again beside the cut call the provider had finished and billed: paid
twice. Now each body record written has a small entry in the hub (no body, no request: the dispatch without its
jobs, the job's fields without its request, the model it was sent to where rerouted, and the ``Idempotency-Key``
sent), written with the record (one hub message per journal write, which coalesces the calls starting together) and
dropped with it (in the flush's one drop message, with the batches' entries).

A restart that reads a loss holds the requests of the entries its journal lacks, and when ingest hands them over
(``wanted``/``adopt``) makes each call again as the same sync call: the same dispatch (a flex one at the flex tier),
attempt and claim, and a body rebuilt from the re-admitted request (an Anthropic one with the cache marks of the
warmth it was sent with, found by its key); where that body's key is still not the one sent (a body made of a state
this process lost), the call goes under a new key, the cut call's upper bound charged, said at WARNING."""

from __future__ import annotations

import pickle

from actors._types import Job
from engine.core._logkeys import get_logger
from engine.core.budgets import Charge
from engine.core.cost import reserve_bound
from engine.core.provider_api import idempotency_key

__all__ = ["SYNC", "SyncIndex", "sync_entry"]

log = get_logger("smartbatch.dispatcher")

SYNC = "~sync:"  # a sync call's key in the index's space: SYNC + its call key (a batch's journal key never so)


def sync_entry(key: str, rec: tuple, bound: float | None = None, ikey: str | None = None) -> bytes:
    """A sync body record (``Dispatcher._sync_calls``' value) as its index entry: no request, no body. ``bound``:
    what the call may bill, for the engine's stop to settle its claim at while it is held (``_sync_held_at_stop``);
    ``ikey``: the body's ``Idempotency-Key``, where computed already."""
    b, j, cache_write, body = rec
    sent_as = (j.req.provider, j.req.model) if j.asked is not None else None  # rerouted: re-admitted as first asked
    if ikey is None and body is not None:
        ikey = idempotency_key(key, body)
    return pickle.dumps((b._replace(jobs=[]), (j.req.uid, j.seq, j.fp, *j[3:]), cache_write, sent_as, ikey, bound))


class SyncIndex:
    """Mixed into ``Dispatcher`` (through ``BatchIndex``): the sync calls' entries, and their resumption."""

    _adopting_sync: dict[str, tuple] = {}  # (read only) call key -> entry of a lost call, until its request comes

    def _sync_index_put(self, puts: dict) -> None:
        """``JournalWriter``'s hook: body records about to be written; their entries, in one message."""
        space = self._index_space()
        if space is not None and puts:
            self.hub.send("journal_put_many", space, {SYNC + k: self._sync_blob(k, rec) for k, rec in puts.items()})

    def _sync_blob(self, key: str, rec: tuple) -> bytes:
        b, j, body = rec[0], rec[1], rec[3]  # (a bound only where a claim is to be settled at it: 2-3 us more)
        ikey = None
        if body is not None:  # kept for the call (``CallJob.ikey``): the provider's digest of the body, made once
            ikey = idempotency_key(key, body)
            self.__dict__.setdefault("_ikeys", {})[key] = (body, ikey)
        return sync_entry(key, rec, None if j.claim is None else self._cut_bound(b, j.req), ikey)

    def _ikey_of(self, key: str, body) -> str | None:
        """The ``Idempotency-Key`` of call ``key`` sending ``body``, where its entry's digest is of that very body."""
        got = self.__dict__.get("_ikeys", {}).get(key)
        return got[1] if got is not None and got[0] is body else None

    def _sync_forget(self, keys) -> None:
        """Calls whose records went: their keys' digests go too."""
        if ikeys := self.__dict__.get("_ikeys"):
            for k in keys:
                ikeys.pop(k, None)

    def _cut_bound(self, b, r) -> float:
        """What a call of ``r`` in ``b``'s mode that got no answer may have billed."""
        return self._flex_lost_bound(r) if b.mode == "flex" else reserve_bound(r, self.catalog, "sync", None)

    def _sync_index_rewrite(self, space: str) -> None:
        """The hub restarted without its index: the entries of the calls under way and of those still held."""
        blobs = {SYNC + k: self._sync_blob(k, rec) for k, rec in self._sync_calls.items()}
        blobs.update((SYNC + k, pickle.dumps(e)) for k, e in self._adopting_sync.items())
        blobs.update(self._jobs_index_rewrite())  # (their jobs: ``actors._dispatch_jobs``)
        if blobs:
            self.hub.send("journal_put_many", space, blobs)

    def _sync_take(self, got: dict, bodies: dict, ended: set) -> int:
        """After a loss: hold the requests of the calls the index has and the journal lost (``bodies``: the
        records read), until ingest hands them over. Returns how many."""
        held, gone = self.__dict__.setdefault("_adopting_sync", {}), []
        for k, blob in got.items():
            key = k[len(SYNC):]
            if key in bodies or key in self._sync_calls:
                continue
            e = pickle.loads(blob)
            uid = e[1][0]
            if uid in ended or uid in self._known or uid in self._done:
                gone.append(k)
                continue
            held[key] = e
            self._known.add(uid)
        if gone:
            self._index_drop(gone)
        if held:
            self.__dict__.setdefault("_unsealed", set()).update(SYNC + k for k in held)
            self.journal.seal_held = True
            log.warning("dispatcher %s: %d sync call(s) under way found in the hub's index, their records lost: "
                        "their requests are held, and made again as the same calls once re-admitted", self.name,
                        len(held))
        return len(held)

    def _sync_wanted(self) -> set[str]:
        return {e[1][0] for e in self._adopting_sync.values()}

    def _sync_copy(self, j: Job) -> tuple[str | None] | None:
        """``j``, a copy of the request of a held call, sent here by its grouper (ingest's recall missed this
        dispatcher: one that cannot answer holds nothing), dropped as a duplicate: it hands the call its request,
        and its own claim is let go (the call's holds the cut call). Before (a review), the call waited for a
        hand-over that never came: the request never answered, its claim held until ``reservation_ttl_s``.
        Returns None if ``j`` is no such copy, else (the claim to let go,)."""
        uid = j.req.uid
        held = next((e[1][5] for e in self.__dict__.get("_adopting_sync", {}).values() if e[1][0] == uid), False)
        if held is False:
            return None
        r = j.req if j.asked is None else j.req.model_copy(update={"provider": j.asked[0], "model": j.asked[1]})
        self._sync_adopt({uid: r})
        return (None if j.claim == held else j.claim,)

    def _sync_held_at_stop(self, done: set) -> None:
        """The engine stops while calls are held for their requests: the cut call may have been billed, and nobody
        will make it again. Each claim is settled at the bound its entry keeps, counted possibly billed, as a call
        under way is (``_settle_cut_short``; ``done``: the claims settled so). Before (a review), the stop knew
        nothing of them: their claims held their room until ``reservation_ttl_s``, their spend counted nowhere."""
        for e in self.__dict__.get("_adopting_sync", {}).values():
            claim, usd = e[1][5], (e[5] if len(e) > 5 else None)
            if claim is None or claim in done or usd is None:
                continue
            done.add(claim)
            self._settle.append((claim, usd))
            self.possibly_billed += 1
            self.possibly_billed_usd += usd

    def _sync_adopt(self, by_uid: dict) -> int:
        """Of the held calls, each whose request ``by_uid`` has is made again: same dispatch, attempt and claim."""
        n, held = 0, self.__dict__.get("_adopting_sync", {})
        for key, e in list(held.items()):
            b, member, cache_write, sent_as, ikey = e[:5]
            if (r := by_uid.get(member[0])) is None:
                continue
            del held[key]
            if sent_as is not None:
                r = r.model_copy(update={"provider": sent_as[0], "model": sent_as[1]})
            j = Job(member[1], r, member[2], *member[3:])
            now = self.clock.now()
            self.in_flight += 1
            # The cut call may have been billed: its bound, if no retry is answered; or its job (a video), polled
            self._count_cut(r.uid, self._jobs.get(key, {}))
            self.sim.hold_sync(r.model, now, r.input_tokens + r.output_tokens)  # its slot, as a started call's
            self._spawn(self._resume_adopted(key, b, j, cache_write, ikey, now), [j], b)
            self.resumed_calls += 1
            n += 1
        return n

    async def _resume_adopted(self, key: str, b, j: Job, cache_write: bool, ikey: str | None, now: float) -> None:
        flex = self._as_call(b, j)[0] == "flex"
        cj = self._call_job(j, now, cache_write)._replace(flex=flex)
        body = self.provider.sync_body(cj)
        if ikey is not None and body is not None and idempotency_key(key, body) != ikey:
            # Made of a state this process lost (Anthropic's cache marks followed the warmth then): the one sent
            made = getattr(self.provider, "sync_bodies", None)
            body = next((x for x in made(cj) if idempotency_key(key, x) == ikey), None) if made else None
        if body is None and ikey is not None:
            body = self.provider.sync_body(cj)
            # Said on its result (``Job.billed_usd``; charged already, not settled again): answered, it said only
            # the new call's cost, and a batch file's report was short of the bill by the cut call (rvbill84).
            j = j._replace(billed_usd=j.billed_usd + self._lost_key(b, j, ikey))
        self._sync_calls[key] = rec = (b, j, cache_write, body)
        if await self._sync_journal.put(key, rec):  # (its entry with it): journaled again, the seal may come back
            self._journaled_again([SYNC + key])
        await self._run_sync(b, j, cache_write, now)

    def _lost_key(self, b, j: Job, ikey: str) -> float:
        """The body of a lost call, made again, is not the one sent (made of a state this process lost): under a new
        key, the cut call's answer is not found again, and where it was billed the new call is billed beside it. Its
        upper bound is charged (once per key sent) and counted as possibly billed, as a call that got no answer is:
        the new call's answer under a provider that honours keys took it as answered, and the ledger stayed under
        the bill."""
        r = j.req
        usd = self._cut_bound(b, r)
        self._unanswered[r.uid] -= 1  # (charged here: not again at its end, should every retry fail)
        self.possibly_billed += 1
        self.possibly_billed_usd += usd
        if self.budget is not None:
            self._to_budget("charge_many", [Charge(f"lost-body:{ikey}", r.tenant, r.provider, r.model, usd)])
        log.warning("dispatcher %s: the body of lost call %s, made again from its re-admitted request, is not the one "
                    "sent: it goes under a new Idempotency-Key, and the cut call's bound ($%.6f) is charged, possibly "
                    "billed", self.name, ikey, usd)
        return usd
