"""The driver's calls to ingest, one lane per ingest shard, with a group commit.

A replay or a busy service submits a few requests every millisecond. Sent as they come, each would be an ingest
call, and each ingest call costs ingest three calls of its own (the hub's claim, the cache lookup, the groupers'
add) whatever its size: at 100x time compression the 3,000 first Azure requests made 2,499 ingest calls (711
with the lanes; ``benchmarks/bench_live_parity.py --azure 3000`` prints the count) and kept two cores busy with
call overhead while urgent requests waited. So at most ``MAX_OUT`` calls are out per shard; what is submitted
meanwhile waits here and leaves in one call when one returns. An idle engine sends at once (no added latency); a
busy one sends fewer, larger calls, as ingest's own lookups do. Urgent requests get ``URGENT_EXTRA`` more calls
of room: while one waits, the lane sends its parts in order until it is out or that room is used (beyond it, a
stream of urgent requests is group-committed too, or each would be a call of its own). An urgent request never
overtakes what was submitted before it (the draw rows, and the order in which a class's requests reach its
cache, are submission order), so it leaves at once behind up to ``URGENT_EXTRA`` micro-batches of waiting bulk;
behind a larger backlog (a big ``submit_many`` just before it) it waits for calls to return, as it would wait
behind that backlog at ingest anyway. A call that does not return within
``STALL_S`` (an ingest restarting) does not hold the lane: what waits goes anyway, and the driver's failure
handling covers the rest.

Mixed into ``Engine``; uses its ``_lock``, ``_buffer``, ``_next_row``, ``_micro_batch``, ``_h``, ``_client``,
``_inflight_refs``, ``_wake`` and ``_flush_s``.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from engine.core._logkeys import get_logger
from engine.core.request import Request

log = get_logger("smartbatch")

MAX_OUT = 2  # calls out per ingest shard: one in its lookup while the next is admitted
URGENT_EXTRA = 2  # more calls out when an urgent request waits (a stream of them still leaves in batches)
IDLE_S = 1.0  # longest sleep of an idle flush thread (a submit wakes it sooner)
STALL_S = 1.0  # real seconds after which a lane stops waiting for its calls (an ingest that hangs)


def _n_urgent(reqs: list[Request]) -> int:
    return sum(r.priority == "urgent" for r in reqs)


class _Lane:
    __slots__ = ("failing", "out", "urgent", "waiting")

    def __init__(self) -> None:
        self.out: dict[Any, float] = {}  # call -> when it left (monotonic)
        self.waiting: list[tuple[list[Request], list[int]]] = []  # (requests, their draw rows), in order
        # Urgent requests among them: read at every drain, under the lock, so counted rather than scanned (a
        # backlog of 100,000 took 9 ms a scan).
        self.urgent = 0
        self.failing = False  # the last call could not be made (said once, not at every retry)

    def queue(self, part: tuple[list[Request], list[int]]) -> None:
        self.waiting.append(part)
        self.urgent += _n_urgent(part[0])

    def take(self, k: int) -> None:
        """The first ``k`` parts left in a call."""
        self.urgent -= sum(_n_urgent(reqs) for reqs, _ in self.waiting[:k])
        del self.waiting[:k]

    def keep(self, parts: list[tuple[list[Request], list[int]]]) -> None:
        self.waiting = parts
        self.urgent = sum(_n_urgent(reqs) for reqs, _ in parts)


class IngestLanes:
    """Lane methods of ``Engine``."""

    def _init_lanes(self) -> None:
        self._lanes: dict[int, _Lane] = collections.defaultdict(_Lane)
        # Calls that returned, appended by Ray's callback thread and read by the flush thread. The callback takes
        # no lock: it runs on a thread that a ``.remote()`` made under the lock may wait on.
        self._returned: collections.deque[tuple[int, Any]] = collections.deque()
        self._idle = False  # the flush thread sleeps until woken: a submit must wake it
        self.ingest_calls = 0  # calls made to ingest with new requests (benchmarks print it)

    def _flush(self) -> None:
        """Send what is buffered: split into micro-batches and by ingest shard, queued on each shard's lane.
        Taken from the buffer and queued under one hold of the lock: two threads flushing at once (a submit
        that filled a micro-batch, the flush thread) must not queue their parts out of submission order, which
        is the order of the draw rows."""
        from actors._shards import class_shard

        with self._lock:
            # Taken from the buffer once its parts are all queued: a Ctrl-C while they are leaves it to the next
            # flush, which queues them again (ingest takes a request sent twice once). Taken first, the parts not
            # yet queued were dropped, accepted and never sent (a helper's hunt).
            batch, first = self._buffer, self._next_row
            if not batch:
                return
            n = len(self._h["ingests"])
            touched: set[int] = set()
            for k in range(0, len(batch), self._micro_batch):
                part = batch[k:k + self._micro_batch]
                rows = list(range(first + k, first + k + len(part)))
                if n == 1:
                    self._lanes[0].queue((part, rows))
                    touched.add(0)
                    continue
                shares: list[tuple[list[Request], list[int]]] = [([], []) for _ in range(n)]
                for r, row in zip(part, rows):
                    s = shares[class_shard(r, n)]
                    s[0].append(r)
                    s[1].append(row)
                for i, share in enumerate(shares):
                    if share[0]:
                        self._lanes[i].queue(share)
                        touched.add(i)
            self._buffer, self._next_row = [], first + len(batch)
            sent = [c for i in sorted(touched) for c in self._drain(i)]
        self._watch(sent)

    def _drain(self, i: int, force: bool = False) -> list[tuple[int, Any]]:
        """Under the lock: send lane ``i``'s waiting parts while it has room (or an urgent request waits, or
        ``force``), merged up to a micro-batch per call. Returns the calls sent, for ``_watch``."""
        from actors._wire import pack

        lane, sent = self._lanes[i], []
        # A call out longer than STALL_S (an ingest that hangs or restarts) no longer holds its place: the lane
        # goes on sending, still merged, rather than everything at once, which would end the group commit
        # just when a slow ingest needs it.
        stale = time.monotonic() - STALL_S
        live = sum(t >= stale for t in lane.out.values())
        while lane.waiting and (force or live < MAX_OUT or (live < MAX_OUT + URGENT_EXTRA and lane.urgent)):
            reqs, rows = list(lane.waiting[0][0]), list(lane.waiting[0][1])
            k = 1
            while k < len(lane.waiting) and len(reqs) + len(lane.waiting[k][0]) <= self._micro_batch:
                reqs += lane.waiting[k][0]
                rows += lane.waiting[k][1]
                k += 1
            # Ingest claims their results for this driver at the hub (see actors.hub).
            try:
                ref = self._h["ingests"][i].submit.remote(pack(reqs), self._client, rows)  # as columns
            except Exception as exc:  # Ray refused the call (shutting down, say): the parts wait, for the next turn
                if not lane.failing:
                    log.warning("smartbatch: a call to ingest could not be made (%s: %s); %d request(s) wait and "
                                "are tried again", type(exc).__name__, exc, len(reqs))
                lane.failing = True
                break
            lane.failing = False
            self.ingest_calls += 1
            lane.take(k)
            self._inflight_refs[ref] = ([r.uid for r in reqs], 0)
            lane.out[ref] = time.monotonic()
            live += 1
            sent.append((i, ref))
        return sent

    def _watch(self, sent: list[tuple[int, Any]]) -> None:
        """Outside the lock (a callback may run at once, in this thread): learn when each call returns."""
        for i, ref in sent:
            ref.future().add_done_callback(lambda _f, i=i, ref=ref: self._call_returned(i, ref))

    def _call_returned(self, i: int, ref: Any) -> None:
        self._returned.append((i, ref))
        self._wake.set()

    def _lanes_turn(self, force: bool = False) -> None:
        """In the flush thread: free the lanes of the calls that returned and send what waits and has room
        (also what Ray refused before, and what waits behind a call out longer than ``STALL_S``). ``force``:
        send everything that waits (stop)."""
        sent = []
        with self._lock:
            while self._returned:
                i, ref = self._returned.popleft()
                self._lanes[i].out.pop(ref, None)
            for i, lane in self._lanes.items():
                if lane.waiting:
                    sent += self._drain(i, force=force)
        self._watch(sent)

    def _drop_unsent(self, uids: set[str]) -> None:
        """Under the lock: take requests whose futures were just failed out of the buffer and the lanes, so they
        are never sent (and paid) behind a result that says they failed."""
        self._buffer = [r for r in self._buffer if r.uid not in uids]
        for lane in self._lanes.values():
            parts = []
            for reqs, rows in lane.waiting:
                keep = [k for k, r in enumerate(reqs) if r.uid not in uids]
                if keep:
                    parts.append(([reqs[k] for k in keep], [rows[k] for k in keep]))
            lane.keep(parts)

    def _lane_uids(self) -> set[str]:
        """Under the lock: the ids of requests waiting in a lane (submitted, not sent yet)."""
        return {r.uid for lane in self._lanes.values() for reqs, _ in lane.waiting for r in reqs}

    def _flush_loop(self) -> None:
        # Every ``flush_ms`` while anything is buffered, waits in a lane or is out at ingest; otherwise it sleeps
        # until a submit wakes it (``_admit`` does when ``_idle`` is set): an idle engine costs no wake-ups, and
        # the first request after a pause leaves at once.
        while self._running:
            try:
                self._flush_turn()
            except Exception:  # the thread must outlive any one turn, or every later submit waits for the sweep
                log.exception("smartbatch: the flush thread's turn failed; it goes on")

    def _flush_turn(self) -> None:
        lanes = list(self._lanes.values())
        busy = bool(self._buffer or self._returned) or any(lane.waiting or lane.out for lane in lanes)
        self._idle = not busy
        if not busy and not self._buffer:  # (a submit may have come since ``busy`` was read)
            self._wake.wait(IDLE_S)
        else:
            self._wake.wait(self._flush_s)
        self._idle = False
        self._wake.clear()
        if self._returned or any(lane.waiting for lane in lanes):
            self._lanes_turn()
        if self._buffer:
            self._flush()
