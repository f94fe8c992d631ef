"""The driver's calls to ingest that failed, and the re-admission of their requests.

A call to ingest (a lane's ``submit``, a ``readmit``) fails when ingest dies, or a peer it calls does. Its
requests are sent again to ``Ingest.readmit``, which claims them again and keeps one copy of each: re-sending is
safe. While Ray restarts ingest (tens of seconds on a loaded machine) every call is refused at once
(``ActorUnavailableError``, "The actor is restarting"), so such a refusal counts no try: the requests wait for
their next one at a backoff (``READMIT_PAUSE_S`` doubling to ``READMIT_PAUSE_MAX_S``), driven by the check loop,
and once ingest is back the driver's recovery re-admits every open request anyway. Before, each refusal was a try
of five, re-sent at once: a loaded rehearsal spent them in about a second and failed 270 requests. The wait is
bounded all the same (a crash-looping ingest): a request refused as restarting, call after call, for the longer
of ``READMIT_WAIT_MIN_S`` and ``settings.actor_restart_wait_s`` fails with an error that says so; any other
failure counts a try, ``READMIT_TRIES`` of them failing the requests, as before; and so many restarts of ingest
that a request waits through untaken fail it too (one whose call crashes ingest: ``_ingest_restarted``). A try
sends one micro-batch to each ingest shard and holds the other requests until it is taken (``_driver_probe``).

Mixed into ``Engine`` by ``Supervised``; uses its ``_ray``, ``_lock``, ``_futs``, ``_buffer``, ``_inflight_refs``,
``_readmit_after``, ``_micro_batch``, ``_client``, ``_by_ingest``, ``_lane_uids``, ``_fail_ids`` and ``settings``.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from engine.app._driver_probe import Probing
from engine.core._logkeys import get_logger, words

__all__ = ["READMIT_PAUSE_MAX_S", "READMIT_PAUSE_S", "READMIT_TRIES", "READMIT_WAIT_MIN_S", "Readmitting"]

log = get_logger("smartbatch")

READMIT_TRIES = 5  # failures of one re-admission, other than ingest restarting, before its requests fail
READMIT_PAUSE_S = 0.1  # first wait before re-sending requests ingest refused as restarting ...
READMIT_PAUSE_MAX_S = 5.0  # ... doubling up to this (real seconds)
READMIT_WAIT_MIN_S = 120.0  # a request waits for a restarting ingest at least this long (actor_restart_wait_s if longer)


class _Waiting(NamedTuple):
    due: float  # monotonic seconds
    uids: list[str]
    tries: int  # failures counted so far (not those of a restarting ingest)


class Readmitting(Probing):
    """Re-admission methods of ``Engine``."""

    def _init_readmit(self) -> None:
        self._readmit_after: set = set()  # ingest calls out during a recovery: re-admit theirs when they return
        # Request -> when a call carrying it was first refused as restarting (monotonic), until one is taken: how
        # long it has waited for ingest, over every call and recovery in between (a crash loop resets nothing).
        self._waited: dict[str, float] = {}
        self._readmit_waits: list[_Waiting] = []  # requests waiting for their next try, under ``_lock``
        # Request -> restarts of ingest it waited through, until one of its calls is taken (``_ingest_restarted``).
        self._died_with: dict[str, int] = {}
        self._init_probe()

    def _readmit_open(self, uids: list[str] | None = None, tries: int = 0, force: bool = False) -> None:
        """Send unfinished requests (all of them, or ``uids``) to ``Ingest.readmit``, in micro-batches; ``tries``:
        the failures their last call counted."""
        with self._lock:
            queued = {r.uid for r in self._buffer}  # not sent yet: they leave with the next flush
            queued |= self._lane_uids()  # sent to their lane, waiting for its call to return
            if uids is None:
                # Requests whose call to ingest is still out are re-admitted once it returns, not now: re-admitted
                # before their cache lookup ends, they could both follow an identical request and be sent.
                for ref, (ids, _) in self._inflight_refs.items():
                    queued.update(ids)
                    self._readmit_after.add(ref)
                # Those waiting for their next try go now, and only now: their own try, made while this call is
                # out, would be a second re-admission of each at once.
                self._readmit_waits.clear()
                self._forget_probes()  # (a probe out is re-admitted once it returns, as any call out)
                if self._waited:  # (those answered meanwhile, the refused call having run after all, wait no more)
                    self._waited = {u: t for u, t in self._waited.items()
                                    if (f := self._futs.get(u)) is not None and not f.done()}
                    self._died_with = {u: n for u, n in self._died_with.items() if u in self._waited}
                reqs = [f._req for u, f in self._futs.items() if not f.done() and u not in queued]
            else:
                reqs = [f._req for u in uids if (f := self._futs.get(u)) is not None and not f.done()]
                if self._waited and len(reqs) < len(uids):  # ended meanwhile (answered, failed): no wait kept
                    for u in uids:
                        if (f := self._futs.get(u)) is None or f.done():
                            self._drop_wait(u)
        for k in range(0, len(reqs), self._micro_batch):
            for ingest, part in self._by_ingest(reqs[k:k + self._micro_batch]):
                self._send(ingest, part, tries, force)

    def _send(self, ingest, part: list, tries: int, force: bool = False) -> tuple[Any, BaseException | None]:
        """One call of ``Ingest.readmit``: (its ref, None), or (None, why) if Ray refused to make it."""
        try:
            ref = ingest.readmit.remote(part, self._client, force)  # claims them again: a restarted hub lost them
        except Exception as exc:  # noqa: BLE001 (Ray refused to make the call: they wait, not dropped)
            self._not_made([r.uid for r in part], tries, exc)
            return None, exc
        with self._lock:
            self._inflight_refs[ref] = ([r.uid for r in part], tries)
        return ref, None

    def _check_ingest(self) -> None:
        """Collect the ingest calls that returned: re-admit the requests of one that failed, or that was out
        during a recovery; send those whose wait for a restarting ingest is over."""
        self._readmit_due()
        with self._lock:
            refs = list(self._inflight_refs)
        if not refs:
            return
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            return
        try:  # one call for all that returned (hundreds at 100x): the per-call path only when one failed
            self._ray.get(ready)
            failed: set = set()
        except Exception:
            failed = {ref for ref in ready if self._failure(ref) is not None}
        with self._lock:
            done = [(ref, *self._inflight_refs.pop(ref, ([], 0)), ref in self._readmit_after) for ref in ready]
            self._readmit_after.difference_update(ready)
            if self._waited:  # taken: their wait for ingest is over
                for ref, ids, _, _ in done:
                    if ref not in failed:
                        for u in ids:
                            self._drop_wait(u)
            probes = [(self._probes.pop(ref)[0], ref) for ref in ready if ref in self._probes]
        for key, ref in probes:
            self._probe_returned(key, self._failure(ref) if ref in failed else None, time.monotonic())
        for ref, ids, tries, after in done:
            if ref in failed:
                self._submission_failed(ids, tries, self._failure(ref))
            elif after:  # a restart happened while this call was out: what it sent may have been lost
                self._readmit_open(ids, tries)

    def _failure(self, ref) -> BaseException | None:
        try:
            self._ray.get(ref)
        except Exception as exc:
            return exc
        return None

    def _submission_failed(self, uids: list[str], tries: int, exc: BaseException) -> None:
        """A call to ingest failed (it died, or a peer it called did): re-admit its requests, at once, or once
        ingest is back if it was restarting (the error a peer's restart raises in ingest is one too)."""
        if isinstance(exc, self._ray.exceptions.ActorUnavailableError):
            self._wait_for_ingest(uids, tries, exc)
            return
        tries = self._one_more_try(uids, tries, exc)
        if tries is None:
            return
        log.warning("smartbatch: a submission to ingest failed (%s); re-admitting its %d request(s)",
                    type(exc).__name__, len(uids))
        self._readmit_open(uids, tries)

    def _one_more_try(self, uids: list[str], tries: int, exc: BaseException) -> int | None:
        """``tries`` + 1, or None once that is ``READMIT_TRIES``: ``uids`` then failed, saying why."""
        tries += 1
        if tries < READMIT_TRIES:
            return tries
        self._forget_waits(uids)
        self._fail_ids(uids, f"ingest failed {tries} times: {words(exc)}")
        return None

    def _ingest_restarted(self) -> None:
        """The driver's recovery of a restarted ingest, before it re-admits every open request: a restart more for
        each request still waiting for ingest (refused, or out when it died, and not taken since); those at
        ``READMIT_TRIES`` restarts fail. Ray fails a call out when ingest died with ``ActorUnavailableError`` too
        (2.60: "Socket closed", "Connection reset by peer"; a call never run says "The actor is restarting"), so a
        request whose call crashes ingest (out of memory, say) waited as a refusal would, re-sent by every
        recovery and crashing ingest again, until the wait's bound, 600 s (a review). One slow restart is one."""
        if not self._waited:
            return
        with self._lock:
            for u in self._waited:
                self._died_with[u] = self._died_with.get(u, 0) + 1
            dead = [u for u, n in self._died_with.items() if n >= READMIT_TRIES]
        if dead:
            self._forget_waits(dead)
            self._fail_ids(dead, f"ingest failed: Ray restarted it {READMIT_TRIES} times while this request "
                                 "waited for it, and it took none of its calls (the request may be what crashes "
                                 "it: see its log)")

    def _drop_wait(self, u: str) -> None:
        """Under the lock: request ``u`` waits for ingest no more (taken, or ended)."""
        self._waited.pop(u, None)
        self._died_with.pop(u, None)

    def _wait_for_ingest(self, uids: list[str], tries: int, exc: BaseException) -> None:
        """Ingest refused the call as restarting: its requests try again after a pause as long as they have waited
        (0.1 s, 0.1, 0.2, 0.4 ... up to 5 s), or fail once they have waited past the bound."""
        now = time.monotonic()
        bound = max(READMIT_WAIT_MIN_S, self.settings.actor_restart_wait_s)
        with self._lock:
            # Once per restart, not per call: 100,000 open requests are 100 calls, each refused.
            first = not self._waited
            since = {u: self._waited.setdefault(u, now) for u in uids}
        late = [u for u in uids if now - since[u] >= bound]
        if late:
            waited = max(now - since[u] for u in late)
            with self._lock:
                for u in late:
                    self._drop_wait(u)
            self._fail_ids(late, f"ingest failed: Ray was restarting it (its calls refused) for {waited:.0f} s, "
                                 f"past the {bound:g} s the driver waits for it (the longer of "
                                 f"{READMIT_WAIT_MIN_S:g} s and settings.actor_restart_wait_s; it may be crashing "
                                 f"at each start: see its log) before failing the requests it could not take: "
                                 f"{words(exc)}")
        rest = [u for u in uids if now - since[u] < bound]
        if not rest:
            return
        pause = min(max(now - min(since[u] for u in rest), READMIT_PAUSE_S), READMIT_PAUSE_MAX_S)
        if first:  # once per wait, not at every try
            log.warning("smartbatch: ingest is restarting (%s); the requests whose calls it refuses (%d so far) "
                        "are sent again once it is back (waiting up to %g s)", type(exc).__name__, len(rest), bound)
        with self._lock:
            self._readmit_waits.append(_Waiting(now + pause, rest, tries))

    def _not_made(self, uids: list[str], tries: int, exc: BaseException) -> None:
        """Ray refused to make a call to ingest at all (``.remote()`` raised: Ray shutting down, say): a try, its
        requests sent again after a pause, by the check loop. Before, the error left the check loop (its thread
        ended: no health check after it) and, for a waiting request's re-send, took its wait with it."""
        tries = self._one_more_try(uids, tries, exc)
        if tries is None:
            return
        log.warning("smartbatch: a call to ingest could not be made (%s); its %d request(s) are sent again shortly",
                    type(exc).__name__, len(uids))
        with self._lock:
            self._readmit_waits.append(_Waiting(time.monotonic() + READMIT_PAUSE_S * 2 ** tries, uids, tries))

    def _readmit_due(self) -> None:
        """Try the requests whose pause is over (``_probe_tries``), but not those a call still out carries (a
        recovery's: it answers for them); and send the probes whose pause is over."""
        if not self._readmit_waits and not self._held:
            return
        now = time.monotonic()
        with self._lock:
            due = [w for w in self._readmit_waits if w.due <= now]
            if due:
                self._readmit_waits = [w for w in self._readmit_waits if w.due > now]
            # Which of theirs are out, by C's set intersection: a set of every id out cost 18 ms a turn with
            # 200,000 out, at every check where a wait ended (a fifth of a core, the GIL held), this 4 ms.
            want = {u for w in due for u in w.uids}
            out: set = set()
            for ids, _ in self._inflight_refs.values() if want else ():
                out.update(want.intersection(ids))
            for w in due:  # answered meanwhile (the refused call had run after all), or failed: no wait to keep
                for u in w.uids:
                    if (f := self._futs.get(u)) is None or f.done():
                        self._drop_wait(u)
        self._probe_tries([(uids, w.tries) for w in due if (uids := [u for u in w.uids if u not in out])], now)

    def _forget_waits(self, uids) -> None:
        """The waits of requests that ended: kept, a submit of the same id later, refused once as restarting,
        failed at once for a wait counted from the old one's first refusal."""
        with self._lock:
            for u in uids:
                self._drop_wait(u)

    def _waiting_uids(self) -> set[str]:
        """Under the lock: the requests waiting for their next try at a restarting ingest."""
        return {u for w in self._readmit_waits for u in w.uids} | self._held_uids()
