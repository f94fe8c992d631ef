"""The driver's side of the sharded actors: which ingest shard a request goes to, which hub shard holds its
result, and the loop that pulls this driver's results from every hub shard (a mixin of ``Engine``)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors._ingest_holders import UNKNOWN_HOLDER
from engine.app._actor_errors import masked_actor_errors
from engine.app._driver_report import _through_restarts
from engine.app._future import ResultFuture
from engine.app._supervise import HEALTH_EVERY_S, HEALTH_TIMEOUT_S, HUB_BACK_S
from engine.core._logkeys import get_logger
from engine.core.errors import ConfigError, EngineStopped
from engine.core.request import Request
from engine.core.result import Result

__all__ = ["Pulling"]

PULL_WAIT_S = 0.2  # how long one pull waits at the hub when nothing is ready
WITHDRAWN_KEEP = 262_144  # withdrawn ids kept for the rewiring of a restarted actor (as the actors keep them)
QUIET_S = 10.0  # a driver that has not pulled for this long (real seconds) has left, for cancel_requests
FORGET_WAIT_S = 10.0  # at most this long a request under an id being forgotten waits for the forget
CHECK_EVERY_S = 0.05  # how often the check loop collects returned ingest calls and forgets finished requests
log = get_logger("smartbatch.driver")


@dataclass(slots=True)
class _Turn:
    """What one turn of the pull loop has still to resolve: replies ready and not read yet (``refs``, their shard in
    ``out``), answers read and not resolved yet (``due``), and the shards whose pull failed (``lost``)."""

    refs: deque
    out: dict
    due: deque = field(default_factory=deque)
    lost: list = field(default_factory=list)
    now: Any = None  # the future of the answer being resolved (taken off ``due``): held until it is claimed


class Pulling:
    """Needs ``_ray``, ``_h``, ``_client``, ``_lock``, ``_futs``, ``_forgetting``, ``_running``, ``_owner``, ``name``,
    ``_last_report``, ``_left_at_stop`` and the ``Supervised`` methods (and its hand-over count, ``_pull_turns``)."""

    _turn: _Turn | None = None  # the pull loop's turn under way (``_deliver_turn``)

    def drain(self, timeout_s: float | None = None) -> int:
        """Wait until every request this driver has submitted so far has its result, or ``timeout_s`` passes;
        returns how many are still open (0: all done). ``stop()``, and so leaving a ``with`` block, fails what is
        still open rather than wait (a request may be held for a batch for hours): call this first to wait for
        them. The engine keeps taking requests meanwhile."""
        with self._lock:
            open_ = [f for f in self._futs.values() if not f.done()]
        if not open_:
            return 0
        if self._delivering() and (timeout_s is None or timeout_s > 0):  # (as ``ResultFuture.result`` refuses it)
            raise ConfigError(f"drain() was called in a done-callback, in the thread that delivers results, with "
                              f"{len(open_)} request(s) open: that thread delivers the results it would wait for, so "
                              "it would wait for good; drain from a thread of your own")
        self._flush()  # what the flush thread has not sent yet leaves now, not after its next wake-up
        return len(concurrent.futures.wait(open_, timeout=timeout_s).not_done)

    @masked_actor_errors
    def cancel(self, timeout_s: float = 60.0) -> int:
        """Cancel this engine's work, as a provider cancels a batch: nothing more is sent; requests not sent yet
        end ``failed`` (``error`` "cancelled"), billed nothing; provider batches under way are cancelled, and what
        they finished (billed) is answered; calls under way finish. Every open future resolves: wait for them
        with ``drain()`` (a cancel takes up to 10 minutes at OpenAI and Anthropic). The engine takes no more
        work: start a new one. Only the driver that started the engine may cancel it: an engine shared by
        several drivers runs their work too. Returns how many provider batches were cancelled."""
        if not self._owner:
            raise ConfigError(f"engine {self.name!r} was started by another driver, and runs other drivers' work "
                              "too: cancel it from the driver that started it (or stop it: smartbatch stop)")
        if not self._running:
            raise EngineStopped(f"engine {self.name!r} was stopped: there is nothing left to cancel")
        from actors.remote import cancel_work

        self._flush()
        self._h["cancelled"] = True  # an actor Ray restarts is cancelled again when rewired (actors.remote)
        return cancel_work(self._h, timeout_s)

    @masked_actor_errors
    def wait_cancelled(self, timeout_s: float, interrupted: threading.Event | None = None) -> int:
        """After ``cancel()``: wait until the provider batches it cancelled have ended (a cancel takes up to 10
        minutes at OpenAI and Anthropic) and the answers of the members they finished (billed) have reached the
        drivers still pulling, or ``timeout_s`` real seconds pass, or ``interrupted`` is set. Returns what was left
        (0: nothing; else batches under way, or answers not yet taken). A stop right after the cancel left those
        members billed and unread: an endpoint taken back after its restart asked their lines again, each paid
        twice (``smartbatch serve``, stop 48: 124 of 300 lines)."""
        from actors.remote import settle

        return settle(self._h, timeout_s, interrupted)

    @masked_actor_errors
    def cancel_requests(self, futures: Iterable[ResultFuture], timeout_s: float = 60.0) -> int:
        """Withdraw some of this driver's open requests, as a provider cancels a batch's lines: a request not
        sent yet ends ``failed`` (``error`` "cancelled: withdrawn ..."), billed nothing; a provider batch whose
        members are all withdrawn is cancelled, and what it finished (billed) is answered. A request already in
        a call, or in a provider batch that carries other work, runs on and is billed. Every future resolves
        either way: wait for them as usual. Any driver may withdraw its own requests (one that another driver of
        a shared engine submitted too runs on); the engine goes on. Returns how many it asked the engine to
        withdraw (open, and this driver's alone): which of them ended withdrawn, and which ran on in a call or a
        batch and are billed, their results say (a count of 4 once read as 4 withdrawn, all 6 answered and billed)."""
        if not self._running:
            raise EngineStopped(f"engine {self.name!r} was stopped: there is nothing left to cancel")
        try:
            futures = list(dict.fromkeys(futures))  # each once: a future given twice was counted twice
        except TypeError:
            futures = [None]
        # (a request submit_many(on_invalid="reject") refused has a plain future, resolved: nothing to withdraw)
        if not all(isinstance(f, ResultFuture) or (isinstance(f, concurrent.futures.Future) and f.done())
                   for f in futures):
            raise ConfigError("cancel_requests takes the futures that submit() and submit_many() returned")
        with self._lock:
            reqs = [f._req for f in futures if isinstance(f, ResultFuture) and not f.done()
                    and self._futs.get(f._req.uid) is f]
        if not reqs:
            return 0
        self._flush()
        ray = self._ray
        # Only what no other live driver holds: a request another driver of a shared engine submitted too is
        # theirs as well, and runs on (a review: it was withdrawn for both). One that has stopped pulling (a
        # replica killed and replaced, whose successor asked the same ids again) holds nothing any more: counted,
        # it kept every line of a cancelled endpoint batch running and billed (a helper's hunt).
        parts = self._by_ingest(reqs)
        # Asked through a restart of ingest or the hub (their calls fail until the new incarnation is up): given
        # up there, the withdrawal was dropped whole, nothing recorded for the rewire, and a provider batch of
        # the withdrawn lines alone ran to its end, every member billed (a helper's hunt).
        end = time.monotonic() + timeout_s
        others = [o for ol in _through_restarts(ray, lambda: [i.others.remote([r.uid for r in rs], self._client)
                                                              for i, rs in parts], end) for o in ol]
        if any(UNKNOWN_HOLDER in o for o in others):  # a restarted ingest rebuilding: any driver pulling may
            live = [c for c in _through_restarts(ray, lambda: self._h["hubs"][0].pulling.remote(QUIET_S), end)
                    if c != self._client]
            others = [[*(c for c in o if c != UNKNOWN_HOLDER), *(live if UNKNOWN_HOLDER in o else ())]
                      for o in others]
        named = sorted({c for o in others for c in o})
        gone = set()
        if named:
            gone = set(_through_restarts(ray, lambda: self._h["hubs"][0].quiet.remote(named, QUIET_S), end))
        uids = [r.uid for (_, rs) in parts for r in rs]
        uids = [u for u, o in zip(uids, others, strict=True) if gone.issuperset(o)]
        if not uids:
            return 0
        # Kept for a rewire: a grouper or dispatcher Ray restarts knew nothing of it, and followed the withdrawn
        # members' batch to its end, billed (a helper's hunt). Replaced whole, under the lock ``_forget`` takes:
        # the supervisor's thread reads it, and two cancels (the endpoint's, in threads) may run at once.
        with self._lock:
            self._h["withdrawn"] = dict.fromkeys([*list(self._h.get("withdrawn", {}))[-WITHDRAWN_KEEP:], *uids])
        # The groupers first (a member a dispatcher hands back finds them told), then the dispatchers, even when
        # a grouper failed (a batch of withdrawn members alone ran on, billed: a review); the first error is
        # raised once all were told. One that is restarting does not answer, but its rewire tells it (the ids are
        # kept above): the withdrawal holds, where the Ray error told the caller it had failed (a helper's hunt).
        failed = []
        for actors in (self._h["groupers"], list(self._h["dispatchers"].values())):
            for ref in [a.withdraw.remote(uids) for a in actors]:
                try:
                    ray.get(ref, timeout=max(end - time.monotonic(), 0.001))
                except ray.exceptions.ActorUnavailableError:
                    pass
                except Exception as exc:  # noqa: BLE001 (raised below, once every actor was told)
                    failed.append(exc)
        if failed:
            raise failed[0]
        return len(uids)

    @masked_actor_errors
    def count_spent(self, charges: Sequence[Any], timeout_s: float = 60.0) -> None:
        """Spend the budgets did not see, counted against them (``engine.core.budgets.Charge``: once per ``cid``,
        past a limit if it must): what an earlier run of the same job paid for, when the budgets live in this
        engine (no ``budgets.redis_url``), as ``smartbatch batch --resume`` counts the lines it keeps."""
        if charges:
            self._ray.get(self._h["budget"].charge_many.remote(list(charges)), timeout=timeout_s)

    def _by_ingest(self, reqs: Sequence[Request]) -> list[tuple[Any, list[Request]]]:
        """(ingest shard, its share of ``reqs``) for each shard that owns any: by compatibility class, as the
        cache and the groupers, so the requests that may reuse or batch with each other reach the cache in the
        order they were submitted (through one ingest shard), as they reach the simulator's."""
        from actors._shards import class_shard

        ingests = self._h["ingests"]
        if len(ingests) == 1:
            return [(ingests[0], list(reqs))] if reqs else []
        parts: list[list[Request]] = [[] for _ in ingests]
        for r in reqs:
            parts[class_shard(r, len(ingests))].append(r)
        return [(i, p) for i, p in zip(ingests, parts) if p]

    def _forget(self, reqs: Sequence[Request]) -> None:
        """Tell ingest (which tells the actors that remember, the hub among them, once no other driver holds an
        id) that these requests' ids are free again. Until it has (``_forgotten``), a new request under one of
        them waits: reaching ingest or the hub first, it was taken for the old one and answered with its result
        (nothing orders two calls to an async actor, nor an actor's messages to two others)."""
        out = self._forgetting
        out[:] = [(ref, uids) for ref, uids in out if not self._ray.wait([ref], timeout=0)[0]]  # done: dropped
        if (withdrawn := self._h.get("withdrawn")) and not (freed := {r.uid for r in reqs}).isdisjoint(withdrawn):
            # Free again: a rewire must not withdraw a new request under one of them.
            self._h["withdrawn"] = {u: None for u in withdrawn if u not in freed}
        for i, part in self._by_ingest(reqs):
            uids = {r.uid for r in part}
            out.append((i.forget.remote(list(uids), self._client), uids))

    def _forgets_of(self, reqs: Sequence[Request]) -> list:
        """The forgets still out (``_forget``) that name any of these requests' ids."""
        if not self._forgetting:
            return []
        ids = {r.uid for r in reqs}
        return [ref for ref, uids in list(self._forgetting) if not uids.isdisjoint(ids)]

    def _forgotten(self, reqs: list[Request]) -> list[Request]:
        """``reqs``, once the forgets still out of any of their ids are done (waited for, bounded)."""
        refs = self._forgets_of(reqs)
        if refs:
            self._ray.wait(refs, num_returns=len(refs), timeout=FORGET_WAIT_S)
        return reqs

    def _hub_of(self, uid: str) -> Any:
        from actors._shards import uid_shard

        hubs = self._h["hubs"]
        return hubs[uid_shard(uid, len(hubs))]

    def _pull_loop(self) -> None:
        """Pull from every hub shard at once (one long-poll out per shard) and resolve what comes back."""
        try:
            self._pull_on()
        finally:
            with self._room:  # a failure waiting for this thread's hand-over (``_await_handover``) waits no more
                self._pull_ended = True
                self._room.notify_all()

    def _pull_on(self) -> None:
        from actors._shards import shard_kind

        ray = self._ray
        hubs = self._h["hubs"]
        out: dict[Any, int] = {}  # pull call -> hub shard
        while self._running:
            with self._room:  # a turn begins: every reply the last one got is handed over (``_await_handover``)
                self._pull_turns += 1
                if self._handover_wanted:
                    self._room.notify_all()
            waiting = set(out.values())
            for k, hub in enumerate(hubs):
                if k not in waiting:
                    out[hub.pull.remote(PULL_WAIT_S, self._client)] = k
            if len(out) == 1:  # one hub: its pull is the wait (one call per loop, not two)
                ready = list(out)
            else:
                ready, _ = ray.wait(list(out), num_returns=1, timeout=PULL_WAIT_S * 5)
                if ready:  # the others that are ready too
                    ready, _ = ray.wait(list(out), num_returns=len(out), timeout=0)
            turn = self._turn = _Turn(deque(ready), out)
            self._hand_over(turn)
            lost = turn.lost
            # After the answers the other shards' replies of this turn hold: a lost shard's end (a stop elsewhere)
            # fails what is open and ends this loop, and those replies, taken off their queues, were never read.
            # Every answer of this turn is handed over: a failure waits no longer while this thread waits for a
            # lost shard (up to HUB_BACK_S), nothing more comes until it is back (a review: a hub dead for good held
            # the check thread's failure of what is open HANDOVER_WAIT_S, 10 s, health checks and all).
            for exc, k in lost:
                self._waiting_hub(True)
                try:
                    if not self._hub_lost(exc, shard_kind("hub", k)):
                        return
                finally:
                    self._waiting_hub(False)

    def _hand_over(self, turn: _Turn) -> None:
        """Resolve what this turn of the pull loop got, reply by reply (each one's answers kept, then resolved, before
        the next reply is read). Run again by a ``stop()`` that a done-callback makes in this thread
        (``_deliver_turn``): what is left of the turn is then resolved there, each answer once (taken off ``turn``)."""
        ray = self._ray
        while turn.due or turn.refs:
            if turn.due:
                # Named in ``now`` before it leaves ``due``: ``_held_in_turn`` reads them from another thread.
                turn.now = turn.due[0][0]
                fut, res = turn.due.popleft()
                self._resolve(fut, res)
                continue
            ref = turn.refs.popleft()
            k = turn.out.pop(ref)
            try:
                results: list[Result] | None = ray.get(ref)
            except Exception as exc:  # that hub shard died: wait for its restart (see engine.app._supervise)
                turn.lost.append((exc, k))
                continue
            if results is None:  # the shard lost this driver's queue (it restarted, or took it for gone)
                if self._running:  # (a stopping engine fails what is open: nothing to claim again)
                    self._readmit_open()  # which claims every open request again
                continue
            with self._lock:
                due = [(f, res) for res in results if (f := self._futs.get(res.uid)) is not None]
            if self._kept is not None:  # kept before they resolve: a kill in between pays nothing again
                self._kept.record((f._req, res) for f, res in due)
            turn.due.extend(due)

    def _held_in_turn(self) -> set[str]:
        """The ids whose answers the result thread holds in its turn under way, not resolved yet: a failure of the
        supervisor's (a stop elsewhere, an actor gone) leaves them to that thread, however long the turn takes (a
        done-callback that writes to a slow database). Failed past ``HANDOVER_WAIT_S``, such an answer, paid for,
        read "engine 'prod' was stopped" and was dropped when its turn came (stop 86, ``cb86``). None in the thread
        running ``stop()``: it joins that thread first, and what is open then fails, so none hangs. Another thread's
        failure during a stop leaves them too: a stop a done-callback made in that very thread resolves them only
        once it has joined the check thread, which, reading the engine turned off, took them (a review, ``rvcb86``).
        None either once that thread's loop has ended (an error in it), the thread not ended yet: nothing resolves
        them then."""
        turn, puller, me = self._turn, getattr(self, "_puller", None), threading.current_thread()
        if (turn is None or puller is None or puller is me or getattr(self, "_stopper", None) is me
                or self._pull_ended or not puller.is_alive()):
            return set()
        # ``due`` first, then ``now``: an answer taken off ``due`` after the copy was named in ``now`` before.
        held = {f._req.uid for f, _ in turn.due.copy()}  # (a copy in one step: that thread pops as this reads)
        now = turn.now
        return held | ({now._req.uid} if now is not None and not now._claimed else set())

    def _deliver_turn(self) -> None:
        """In a ``stop()`` run by a done-callback in the result thread: resolve the rest of the turn that thread is
        in, as a stop from another thread lets it do before it fails what is open (it joins the thread). Failed
        first, those answers (paid for) read "engine stopped", and the loop then dropped each (claimed): a script
        that stops at its first failure, or after N results, lost the rest of the turn (stop 86, ``cb86``)."""
        turn = self._turn
        if turn is not None and threading.current_thread() is getattr(self, "_puller", None):
            self._hand_over(turn)

    def _waiting_hub(self, on: bool) -> None:
        with self._room:
            self._pull_stalled = on
            self._room.notify_all()

    def _check_loop(self) -> None:
        """What the pull loop must not wait for: ingest calls that returned (re-admitting a failed one's
        requests), forgetting finished requests, and every ``HEALTH_EVERY_S`` the actors' health."""
        last_check = time.monotonic()
        while self._running:
            time.sleep(CHECK_EVERY_S)  # a poll of local state and of calls already out, not a wait for an actor
            if not self._running:
                return
            self._check_ingest()
            self._forget_finished()
            if time.monotonic() - last_check > HEALTH_EVERY_S:
                last_check = time.monotonic()
                self._health()
                if self._h.get("kept") is not None:  # kept outbox files taken back: gone once Redis took theirs
                    self._h["kept"].drop_sent(self._ray, self._h["budget"])

    def _hub_lost(self, exc: BaseException, kind: str = "hub") -> bool:
        """A pull from hub shard ``kind`` failed: wait for Ray to restart it, rewire it and re-admit. False if it
        never came back (the open futures have then failed)."""
        ray = self._ray
        hub = self._h["named"][kind]
        until = time.monotonic() + HUB_BACK_S
        while self._running and time.monotonic() < until:
            if self._engine_stopped():
                return False
            try:
                tok = ray.get(hub.ping.remote(), timeout=HEALTH_TIMEOUT_S)
            except Exception:  # restarting (the ping waits) or refused at once: ask again shortly
                time.sleep(0.1)
                continue
            if tok != self._incarnation.get(kind):
                self._incarnation[kind] = tok
                self._recover([kind])
            else:
                # The same hub answers: the pull's reply was lost (a blip between nodes), and with it what the hub
                # had taken off this driver's queue for it. Claimed again, the open requests have the hub send those
                # results again (it keeps its recent ones); they waited for the sweep, past their deadlines.
                self._readmit_open()
            return True
        if self._running:
            self._end(f"engine failure: the result hub ({kind}) died ({type(exc).__name__}) and did not come back")
        return False
