"""The driver's tries at a restarting ingest: one probe per ingest shard, the other waiting requests held.

While Ray restarts ingest every call to it is refused at once (``_driver_readmit``). A try of the requests waiting
for it sends one micro-batch of them to each ingest shard, its probe, and holds the rest. Taken, every request
held for that shard goes at once. Refused as restarting, they stay held: each past the wait's bound fails with a
refused call's error, and the next probe (the held micro-batch that has waited longest, so a request that
crashes ingest is not the only one ever tried) goes after a refused call's pause. Refused otherwise, they go
as they would have (the failure counts a try for the probe's requests alone); a probe Ray would not make counts
a try for each, as their own calls would have; a probe out ``PROBE_OUT_MAX_S`` lets them go in their own calls,
where the deadline sweep sees them (a review). Before, each try re-sent every waiting request: 100,000 of them
were 100 calls of pickled requests to a dead actor every 5 s (stop 82, scratch, a fake ingest that pickles what
it is sent: a minute of a dead ingest made 1,200 calls, 168 MB pickled, 4.4-5.0 s of CPU, 1.9 s of it the
driver's own; now 12 calls, 1.7 MB, 0.05 s).

Mixed into ``Readmitting``; uses its ``_lock``, ``_futs``, ``_waited``, ``_micro_batch``, ``_h``, ``_by_ingest``,
``_send``, ``_drop_wait``, ``_not_made``, ``_wait_for_ingest``, ``_readmit_open`` and ``settings``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["PROBE_OUT_MAX_S", "Probing"]

# A probe out this long (real seconds) lets its shard's held requests go in their own calls: refused, a probe
# returns at once; one out longer was taken by an ingest slow to answer it, or hanging in it while it answers
# its health checks (no hang check kills it). Held, a request is left by the deadline sweep (a review).
PROBE_OUT_MAX_S = 30.0


class _Held(NamedTuple):
    since: float  # the oldest first refusal of its requests (monotonic): the bound's clock
    uids: list[str]
    tries: int  # failures counted so far (not those of a restarting ingest)


class Probing:
    """Probe methods of ``Readmitting``."""

    def _init_probe(self) -> None:
        # Under ``_lock``. An ingest shard is its index in ``_h["ingests"]``.
        self._probes: dict[Any, tuple[int, float]] = {}  # a probe out (its call) -> (its shard, when sent)
        self._held: dict[int, list[_Held]] = {}  # shard -> requests held until a probe is taken, oldest first
        self._next_probe: dict[int, float] = {}  # shard -> when its next probe may go, one having been refused

    def _probe_tries(self, due: list[tuple[list[str], int]], now: float) -> None:
        """Hold the requests ``due`` (``(uids, tries)``, their pause over) by shard; send a probe to each shard
        that holds any, has none out and whose pause after a refused probe is over (``now``: monotonic, the
        clock ``_driver_readmit`` reads)."""
        for uids, tries in due:
            for key, ids in self._uids_by_shard(uids):
                with self._lock:
                    since = min(self._waited.get(u, now) for u in ids)
                    self._held.setdefault(key, []).append(_Held(since, ids, tries))
        if not self._held:
            return
        with self._lock:
            slow = [ref for ref, (_, at) in self._probes.items() if now - at >= PROBE_OUT_MAX_S]
            # (its call stays out, an ordinary one now: ``_check_ingest`` handles its return)
            slow = [self._probes.pop(ref)[0] for ref in slow]
        for key in slow:
            self._let_go(key)
        with self._lock:
            out = {key for key, _ in self._probes.values()}
            ready = [key for key in self._held if key not in out and self._next_probe.get(key, 0.0) <= now]
        for key in ready:
            self._probe(key, now)

    def _probe(self, key: int, now: float) -> None:
        """Send shard ``key``'s probe: the first open requests it holds, at most a micro-batch."""
        with self._lock:
            held = self._held.get(key, [])
            probe, tries = [], 0
            while held and not probe:
                w = held.pop(0)
                for u in w.uids:
                    if (f := self._futs.get(u)) is not None and not f.done():
                        probe.append(f._req)
                    else:  # ended meanwhile (answered, failed): no wait kept
                        self._drop_wait(u)
                tries = w.tries
                if len(probe) > self._micro_batch:
                    held.insert(0, w._replace(uids=[r.uid for r in probe[self._micro_batch:]]))
                    probe = probe[:self._micro_batch]
            if not held:
                self._held.pop(key, None)
        if not probe:
            return
        ref, exc = self._send(self._h["ingests"][key], probe, tries)
        with self._lock:
            if ref is not None:
                self._probes[ref] = (key, now)
                return
            held = self._held.pop(key, [])
        for w in held:  # Ray would not make the probe: nor their calls, a try each (``_not_made``)
            self._not_made(w.uids, w.tries, exc)

    def _probe_returned(self, key: int, exc: BaseException | None, now: float) -> None:
        """Shard ``key``'s probe returned, taken (``exc`` None) or failed: see the module's docstring. Called
        before the probe's own requests are handled, so they are held behind the others (the next probe)."""
        from engine.app._driver_readmit import READMIT_PAUSE_MAX_S, READMIT_PAUSE_S, READMIT_WAIT_MIN_S

        if exc is None or not isinstance(exc, self._ray.exceptions.ActorUnavailableError):
            self._let_go(key)
            return
        bound = max(READMIT_WAIT_MIN_S, self.settings.actor_restart_wait_s)
        with self._lock:
            held = self._held.get(key, [])
            late = [w for w in held if now - w.since >= bound]
            if late:
                held[:] = [w for w in held if now - w.since < bound]
            oldest = min((w.since for w in held), default=now)
            self._next_probe[key] = now + min(max(now - oldest, READMIT_PAUSE_S), READMIT_PAUSE_MAX_S)
        for w in late:  # fails those past the bound, saying so; any other waits again, then is held again
            self._wait_for_ingest(w.uids, w.tries, exc)

    def _let_go(self, key: int) -> None:
        """Send the requests held for shard ``key`` (at once, their tries unchanged)."""
        with self._lock:
            held = self._held.pop(key, [])
            self._next_probe.pop(key, None)
        for w in held:
            self._readmit_open(w.uids, w.tries)

    def _uids_by_shard(self, uids: list[str]) -> list[tuple[int, list[str]]]:
        """(shard, its open requests among ``uids``) for each shard that owns any."""
        with self._lock:
            pairs = [(u, f._req) for u in uids if (f := self._futs.get(u)) is not None and not f.done()]
        if not pairs:
            return []
        ingests = self._h["ingests"]
        parts = self._by_ingest([r for _, r in pairs])
        shard = {id(i): k for k, i in enumerate(ingests)}
        if len(parts) == 1:  # (one shard, most often: no request's id read again)
            return [(shard[id(parts[0][0])], [u for u, _ in pairs])]
        at = {id(r): u for u, r in pairs}
        return [(shard[id(i)], [at[id(r)] for r in part]) for i, part in parts]

    def _held_uids(self) -> set[str]:
        """Under the lock: the requests held behind a probe."""
        return {u for held in self._held.values() for w in held for u in w.uids}

    def _forget_probes(self) -> None:
        """Under the lock: a recovery re-admits every open request, the held ones too (ingest is back)."""
        self._held.clear()
        self._next_probe.clear()
