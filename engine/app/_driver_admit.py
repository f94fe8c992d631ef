"""A driver's admission of submitted requests (a mixin of ``Engine``): one future per (tenant, id), room
within ``max_pending``, and the resolution that frees it. Its state is the engine's (``Engine.__init__``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

from engine.app._driver_reject import check_ids, listed
from engine.app._future import ResultFuture
from engine.core.errors import ConfigError, EngineStopped, Overloaded, RequestError
from engine.core.request import Request
from engine.core.response_owners import ResponseOwners
from engine.core.result import ID_TAKEN, Result

__all__ = ["Admitting", "admission_lock"]


def admission_lock() -> tuple[threading.RLock, threading.Condition]:
    """The engine's lock, and the condition signalled when room frees under ``max_pending`` (``Engine.__init__``).
    An ``RLock``: a wait for room takes the lock back as it wakes (``Condition.wait``), and a plain lock's acquire
    there is interrupted by a signal (a Ctrl-C, as another thread holds the lock): the wait raised without it, and
    the submit's ``with`` block then released the lock of the thread that held it, which ran on unguarded and whose
    own release raised (in the result thread, its end). An RLock's is taken back uninterrupted, and only its owner
    releases it (a review of stop 78)."""
    lock = threading.RLock()
    return lock, threading.Condition(lock)


class Admitting:
    _kept = None  # answers an earlier, killed run of the job paid for (``engine.app._driver_resume``)
    _kept_due: list  # (future, kept answer) to resolve once the lock is let go (``_give_kept``)
    _failing: frozenset = frozenset()  # threads in ``_fail_each`` (replaced whole, under the lock)
    _inboxes: tuple = ()  # of each call waiting for room, the ids others queue meanwhile (replaced whole, under it)
    _waited: dict | None = None  # request -> its first refusal by a restarting ingest (``Readmitting``'s)
    responses: ResponseOwners  # whose each response id is (``Engine.__init__``)

    def _replay_order(self, requests: Sequence[Request | Mapping]) -> list[Request]:
        """``requests`` checked, all before any is sent (an id twice with other content too: it raised when the
        second one's arrival came, the first already sent), sorted by arrival. A dict without one arrives at 0."""
        given = [self._as_request(r, k, now=0.0) for k, r in enumerate(listed(requests, "replay"))]
        # Without the lock (a million requests would hold it a second from every resolution): a look only, the
        # admission of each slice checks again under it.
        check_ids(given, self._futs)
        return sorted(given, key=lambda r: r.arrival_s)

    def _admit(self, reqs: list[Request], gave_up: threading.Event | None = None) -> tuple[list[ResultFuture], bool]:
        """Futures for ``reqs`` (existing ones for a repeated (tenant, id)), queuing the new ones; waits for
        room as ``overload`` says, unless ``gave_up`` is set meanwhile (``Overloaded``). Holds the lock."""
        _check_waited(gave_up)  # (set before this call took the lock: its notify came before any wait here)
        if not self._running:
            raise EngineStopped("this engine was stopped; start a new one with Engine.start()" if self._owner else
                                f"this driver left engine {self.name!r}; attach again with Engine.connect()")
        if self._gone is not None:
            raise EngineStopped(f"{self._gone}; start a new one with Engine.start(), or connect to another")
        if self._h.get("cancelled"):  # accepted, it only ended failed "cancelled" (a helper's tour)
            raise EngineStopped("this engine was cancelled (Engine.cancel) and takes no more work; start a new one")
        futs: dict[str, ResultFuture] = {}  # by uid: the existing future, or a new one
        new: list[Request] = []
        kept: list[Request] = []  # answered from what a killed run of the job paid for: never sent, no room taken
        for r in reqs:
            fut = self._futs.get(r.uid) or futs.get(r.uid)
            if fut is not None:
                _same_content(r, fut)
            else:
                fut = ResultFuture(r, self)
                (kept if self._kept is not None and self._kept.holds(r) else new).append(r)
            futs[r.uid] = fut
        mine: list[ResultFuture] = []  # of ``new``, queued by earlier parts of this call
        if new:
            if self._overload == "raise" and len(new) > self._max_pending:
                raise ConfigError(f"this call has {len(new):,} new requests, more than max_pending="
                                  f"{self._max_pending:,}, and overload='raise' admits a call whole or not at all: "
                                  f"nothing was queued. Submit at most {self._max_pending:,} per call, or start the "
                                  "engine with overload='block' (a larger call is admitted in parts as room frees) "
                                  "or a larger max_pending")
            if len(new) > self._max_pending - self._pending:
                new = self._by_parts(new, futs, mine, gave_up)
        if kept:  # after the wait for room: one that raised left no kept future behind, open for good
            self._take_kept(kept, futs)
        if new:
            self._queue(new, futs)
        return [futs[r.uid] for r in reqs], bool(new or mine)

    def _by_parts(self, new: list[Request], futs: dict[str, ResultFuture], mine: list[ResultFuture],
                  gave_up: threading.Event | None) -> list[Request]:
        """Under the lock: queue ``new`` (fresh requests whose futures ``futs`` holds) part by part, each as much as
        the room holds, waiting for room between (``mine`` gets the futures of each part), until the rest fits: it
        is returned. Raises as ``_admit`` says."""
        # A call larger than the room goes in parts: max_pending bounds what is unfinished, a call of a million
        # requests included (admitted whole once nothing else was unfinished, it held them all at once).
        # submit_timeout_s bounds each wait, restarted by every part let in.
        total, at, deadline = len(new), 0, time.monotonic() + self._submit_timeout_s
        # What other submits queue while this one waits (``_queue``), read after each wait: looking up every
        # request of the rest instead cost a call of n requests let in by k parts about n*k/2 looks, under the lock.
        taken: set[str] = set()  # of new[at:], queued meanwhile by another submit (with the future it made)
        inbox: list[str] = []
        self._inboxes = (*self._inboxes, inbox)
        try:
            while len(new) - at - len(taken) > self._max_pending - self._pending:
                if self._overload == "raise" or self._delivering():  # before any part: all or nothing
                    # (in the result thread, a done-callback's submit: that thread frees the room it would wait for)
                    raise Overloaded(f"{self._pending:,} requests are unfinished (max_pending={self._max_pending:,}) "
                                     f"and this call has {total:,} new ones: none was queued; retry later, or "
                                     "start the engine with a larger max_pending" +
                                     (" (a done-callback waits for room in the thread that frees it: submit from a "
                                      "thread of your own)" if self._delivering() else ""))
                room = self._max_pending - self._pending
                if room > 0:
                    part, at = ([], at) if taken else (new[at:at + room], at + room)
                    while len(part) < room:  # (some of the rest taken by another submit: skipped, one by one)
                        r, at = new[at], at + 1
                        if r.uid in taken:
                            taken.discard(r.uid)
                        else:
                            part.append(r)
                    self._queue(part, futs)
                    mine += [futs[r.uid] for r in part]
                    deadline = time.monotonic() + self._submit_timeout_s
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _timed_out(mine, total, self._pending, self._max_pending, self._submit_timeout_s)
                self._room.wait(left)
                _check_waited(gave_up, mine)
                if not self._running or self._gone is not None:
                    stopped = EngineStopped(self._gone or "the engine was stopped while this submit waited for room")
                elif self._h.get("cancelled"):  # (its cancel freed the room waited for: the rest went in after it)
                    stopped = EngineStopped(f"this engine was cancelled (Engine.cancel) while this call waited for "
                                            f"room: {len(mine):,} of its requests were let in before, ended by the "
                                            "cancel, and no more; start a new engine")
                else:
                    stopped = None
                if stopped is not None:  # the parts let in were sent: the endpoint's answer is final (billed?)
                    stopped.admitted = len(mine)
                    raise stopped
                for uid in inbox:
                    # Of the rest: a future of this call's own, never queued, so never claimed (open is not enough:
                    # a part's, refused for its id, is freed before its result is set, and another submit may queue
                    # the id anew meanwhile; taken for the rest's, the rest came one short and passed max_pending)
                    if uid not in taken and (f := futs.get(uid)) is not None and not f._claimed and \
                            self._futs.get(uid) not in (None, f):
                        self._queued_meanwhile(f._req, futs, len(mine))
                        taken.add(uid)
                inbox.clear()
        finally:
            self._inboxes = tuple(b for b in self._inboxes if b is not inbox)
        return [r for r in new[at:] if r.uid not in taken]

    def _queue(self, new: list[Request], futs: dict[str, ResultFuture]) -> None:
        """Under the lock: queue ``new`` (fresh requests whose futures ``futs`` holds), taking their room."""
        # Buffered first, each step one call: a Ctrl-C (raised after a call returns) then leaves the requests
        # sent with no future at worst, which the same ids submitted again follow (ingest takes a request
        # once). Registered first, their futures were never sent, and submitted again the same ids got those
        # futures back, answered by the sweep past their deadlines (a helper's hunt). Holding the signal
        # instead cost more than validating the request. The calls waiting for room are told before the
        # futures are registered: told after, a Ctrl-C as the registration returned left one blind to them, and it
        # queued such an id again under a future of its own, which replaced the first (sent twice, the first never
        # resolved nor its room freed); told first, a Ctrl-C leaves it ids it does not find, and sends its own.
        added, n = {r.uid: futs[r.uid] for r in new}, len(new)
        self._buffer.extend(new)
        for box in self._inboxes:  # the calls waiting for room: one may hold some of these ids in its rest
            box.extend(added)
        self._pending += n
        self._futs.update(added)
        if self._idle:  # (a part queued before a wait is sent by the flush thread while the call waits)
            self._wake.set()

    def _delivering(self) -> bool:
        """Whether this thread delivers results now, and so runs their done-callbacks: the pull thread, or one
        failing what is open (``_fail_each``: a stop, the check thread). A wait there for a result, or for the room
        a result frees, could only end by its timeout: every result held, or (a stop) the stop itself hung."""
        me = threading.current_thread()
        return me is getattr(self, "_puller", None) or me in self._failing

    def _fail_each(self, uids: Sequence[str], error: str) -> None:
        """Fail the open futures of ``uids``, one at a time (their callbacks run here)."""
        me = threading.current_thread()
        with self._lock:
            self._failing = self._failing | {me}
        try:
            for uid in uids:
                with self._lock:
                    fut = self._futs.get(uid)
                if fut is not None and not fut.done():
                    self._resolve(fut, Result(id=fut.request_id, tenant=fut.tenant, status="failed", error=error))
        finally:
            with self._lock:
                self._failing = self._failing - {me}

    def _take_kept(self, kept: list[Request], futs: dict[str, ResultFuture]) -> None:
        """Register the futures of ``kept``, to resolve with their kept answers once the lock is let go
        (``_give_kept``). Counted under ``max_pending`` only until then: taken before the wait for room, they held
        places of their own submit, and a rerun whose new requests just fit waited for room they held, and was refused."""
        for r in kept:  # first: one refused for its content leaves none of them registered
            if (fut := self._futs.get(r.uid)) is not None:  # another submit took it while this one waited
                _same_content(r, fut)
                futs[r.uid] = fut
        for r in kept:
            if r.uid not in self._futs:
                fut = self._futs[r.uid] = futs[r.uid]
                self._pending += 1
                self._kept_due.append((fut, self._kept.take(r)))

    def _give_kept(self) -> None:
        """Resolve the futures ``_admit`` answered from kept answers, out of the lock (a callback may submit)."""
        if self._kept is None:
            return
        with self._lock:
            due, self._kept_due = self._kept_due, []
        for fut, res in due:
            self._resolve(fut, res)

    def _let_in(self, reqs: Sequence[Request], have: Sequence[ResultFuture]) -> list[ResultFuture]:
        """The futures of ``reqs`` this driver holds and ``have`` does not, in their order: what a call that raised
        had let in (its earlier parts), found by id since the raise carried none of them. Only of these requests: an
        id another submit took with other content (the raise, a ``RequestError``) names another request's future."""
        seen = set(map(id, have))
        with self._lock:
            found = [(r, self._futs.get(r.uid)) for r in reqs]
        return list(dict.fromkeys(f for r, f in found if f is not None and id(f) not in seen and _same(r, f)))

    def _queued_meanwhile(self, r: Request, futs: dict[str, ResultFuture], let_in: int) -> None:
        """The wait for room let the lock go, and another submit queued ``r`` (of this call's rest) meanwhile: it
        takes that future (``futs``). Queued again under a second future, such a request was sent twice, and that
        future never resolved nor freed its room; with other content, one of the two was billed and answered nobody
        (a helper's fault hunt): refused then, saying what the call's earlier parts (``let_in`` requests) let in."""
        fut = self._futs[r.uid]
        _same_content(r, fut, let_in)
        futs[r.uid] = fut

    def _resolve(self, fut: ResultFuture, res: Result) -> None:
        # The place is freed before the result is set: a caller woken by its result (or a done-callback) that
        # submits the next request finds the room. Freed after, it was still taken for a moment, and a submit
        # with overload="raise" right after an awaited result was refused (CI of stop 67). The claim under the
        # lock lets one of two threads resolving one future count it; whoever claims it sets it, even through a
        # Ctrl-C (a rerun's kept answers resolve in the submitting thread): claimed and never set, it hung for good
        # and no later resolution could set it, nor could the check thread forget anything finished after it.
        mine = False
        self._learn_response(res)  # before its caller can read the answer's id and continue from it
        try:
            with self._room:
                if fut._claimed:
                    return
                fut._claimed = mine = True
                self._pending -= 1
                if self._waited and self._futs.get(fut._req.uid) is fut:
                    # Ended, it waits for ingest no more. Kept while it sat held behind a probe (up to 100 probes,
                    # 5 s apart), a submit of its id later, refused as restarting, counted from the old refusal.
                    self._drop_wait(fut._req.uid)
                if res.reason == ID_TAKEN and self._futs.get(fut._req.uid) is fut:
                    del self._futs[fut._req.uid]  # refused for its id, taken elsewhere: free for the right content
                else:
                    self._finished.append((time.monotonic(), fut._req.uid))
                self._room.notify_all()
        finally:
            if mine:
                fut.set_result(res)  # out of the lock: a done-callback may submit


    def _owned(self, r: Request, at: int | None) -> Request:
        """``r``, unless its body names a response (``previous_response_id``, ``conversation``) that an answer this
        driver got for another tenant carried: refused then, naming the field, as OpenAI refuses an unknown id. An
        id it never saw goes (a script continues what an earlier process of its own got)."""
        no = self.responses.refusal(r.tenant, r.body, strict=False) if r.body else None
        if no is not None:
            raise RequestError(r.id, no.field, no.message, at, code=no.code)
        return r

    def _learn_response(self, res: Result) -> None:
        """A called answer's response id (``raw``) is its tenant's; a copy from the cache carries its source's."""
        if res.status == "ok" and res.raw is not None:
            self.responses.learn(res.tenant, res.raw)


def _check_waited(gave_up: threading.Event | None, mine: Sequence[ResultFuture] = ()) -> None:
    """Raise once an asyncio caller whose admission waits for room in a worker thread has stopped waiting."""
    if gave_up is not None and gave_up.is_set():
        raise Overloaded("the caller stopped waiting for room (its task was cancelled): " +
                         (f"{len(mine):,} of its requests were queued in earlier parts and run on (submit the same "
                          "requests again for their futures), the others were not" if mine else
                          "its requests were not queued"), mine)


def _timed_out(mine: list[ResultFuture], total: int, pending: int, max_pending: int, timeout_s: float) -> Overloaded:
    """The refusal of a call that waited ``timeout_s`` for room in vain, ``mine`` (futures) of its ``total`` new
    requests let in by earlier parts."""
    queued = len(mine)
    said = (f"no room freed for submit_timeout_s={timeout_s:g} s ({pending:,} requests are unfinished, "
            f"max_pending={max_pending:,})")
    if not queued:
        return Overloaded(f"{said}: none of this call's {total:,} new requests was queued; retry later, or start "
                          "the engine with a larger max_pending")
    return Overloaded(f"{said}: {queued:,} of this call's {total:,} new requests were queued, in the order given, "
                      "and run on; the others were not. Submit the same requests again to go on: those queued give "
                      "back their futures and are not sent twice (within retention_s of their end)", mine)


def _same(r: Request, fut: ResultFuture) -> bool:
    """Whether ``fut`` is the future of ``r``: the same tenant, id and content (its arrival aside)."""
    return r.model_copy(update={"arrival_s": fut._req.arrival_s}) == fut._req


def _same_content(r: Request, fut: ResultFuture, let_in: int = 0) -> None:
    """Refuse ``r`` unless ``fut`` is its future; ``let_in``: how many of its call's requests earlier parts queued."""
    if not _same(r, fut):
        # (Found as a call let in by parts waits: its first parts run on, where a RequestError says nothing was.)
        parts = (f"; {let_in:,} of this call's requests were let in by its earlier parts before another submit took "
                 "this id, and run on: submit the call again without this request (or with a new id for it) for "
                 "their futures, none sent twice") if let_in else ""
        raise RequestError(r.id, "id", f"tenant {r.tenant!r} already submitted id {r.id!r} with other content; an "
                           f"id names one request: use a new id for a new request{parts}", code=ID_TAKEN)
