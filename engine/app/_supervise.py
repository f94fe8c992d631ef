"""The driver's side of supervision: notice a restarted actor, give it back its wiring, re-admit the work it
may have lost.

Ray restarts a dead engine actor (``max_restarts``) by running its constructor again, so it comes back without
its memory. Every actor answers ``ping`` with a token drawn at its start: a new token means a restart. The
driver then calls ``actors.remote.rewire`` for it (clock, peers, metrics port, journaled batches and ledger)
and sends every request it holds unfinished to ``Ingest.readmit``, where dispatchers and the cache keep what
they still carry (or send its result again) and the groupers keep one copy of the rest. The driver holds every
accepted request until its result arrives (with Redis, ingest also journals them: ``Ingest.accepted``).

An actor that does not come back (restarts exhausted, or killed for good) fails the open futures with its
name, as before: nothing hangs. An actor that is alive but answers nothing (a blocked event loop, a deadlock)
for ``settings.actor_hang_s`` is killed by the driver that started the engine, so Ray restarts it and the
recovery above takes over (as Ray Serve replaces a replica that fails its health checks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from engine.app._driver_readmit import Readmitting
from engine.core._logkeys import get_logger

__all__ = ["Supervised", "port_of"]

log = get_logger("smartbatch")

HEALTH_EVERY_S = 1.0  # how often the driver checks every engine actor
HEALTH_TIMEOUT_S = 2.0  # a busy (or restarting) actor may answer late; only repeated errors count as dead
DEAD_AFTER = 3  # consecutive failed checks before an actor counts as gone for good
REWIRE_WAIT_S = 300.0  # real seconds each step of a restarted actor's rewiring may wait for its peers
RESTART_SEEN_GAP_S = 10.0  # real seconds without a check seeing an actor restarting: a later restart is a new one
HUB_BACK_S = 60.0  # how long the driver waits for a restarted result hub before failing the open futures
# The safety net under every recovery path: a request still open this long (real seconds) past its deadline is
# re-admitted (idempotent: whoever still carries it says so, and nothing runs twice), at most every SWEEP_EVERY_S.
SWEEP_GRACE_S = 5.0
SWEEP_EVERY_S = 5.0
HANDOVER_WAIT_S = 10.0  # at most this long a failure of what is open waits for the answers the result thread holds


def port_of(url: str) -> int:
    """The port of a metrics URL (``http://host:port/metrics``)."""
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


class Supervised(Readmitting):
    """Mixin for ``Engine``: needs ``_ray``, ``_h``, ``_lock``, ``_futs``, ``_buffer``, ``_inflight_refs``,
    ``_micro_batch``, ``_fail_open``, ``_fail_ids``, ``_await_handover`` and ``metrics_port``/``settings``."""

    _pull_turns = 0  # turns the result thread's pull loop has begun: each begins once the last handed over its answers
    _pull_ended = False  # that loop has ended
    _pull_stalled = False  # it waits for a lost hub shard, its turn's answers handed over (``_pull_on``)
    _handover_wanted = 0  # failures waiting for its hand-over (``_await_handover``)

    def _init_supervision(self, attached: bool = False) -> None:
        ray = self._ray
        named = self._h["named"]
        self._incarnation: dict[str, str] = dict(zip(named, ray.get([a.ping.remote() for a in named.values()])))
        self._misses: dict[str, int] = {}
        # Actor kind -> (since when, last seen) Ray says it is restarting, monotonic seconds.
        self._restarting: dict[str, tuple[float, float]] = {}
        # Actor -> its oldest health check still unanswered (ref, when asked): an answer that comes after the
        # check's own wait still shows the actor alive, so silence counts from the oldest ping nobody answered.
        self._silent: dict[str, tuple[Any, float]] = {}
        self._starter = not attached  # this driver started the engine (detached or not): it alone kills a hung actor
        self.hung: dict[str, int] = {}  # actor kind -> times it was killed for answering nothing
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        self.swept = 0  # overdue requests re-admitted by the sweep
        self._sweeps: dict[str, int] = {}  # overdue request -> sweeps it has been open through
        self._recovering = threading.Lock()
        self._init_readmit()
        self._recovered = threading.Condition()
        self.restarts: dict[str, int] = {}  # actor kind -> restarts recovered from, for the report and tests
        # Actor log lines relayed so far: the driver that started the engine reads them all; one that attaches
        # reads those that come after it.
        self._log_seq: int | None = None if attached else 0
        self._gone: str | None = None  # why this driver can take no more work (the engine is gone)
        self._layout_seen, self._layout_missing = False, 0  # the engine's published layout, as last read
        self._init_owed()

    def _metrics_addr(self, kind: str) -> tuple[int, str] | None:
        """Where hub shard ``kind`` served its metrics (None: another kind, or not served)."""
        urls = getattr(self, "metrics_urls", None) or []
        if not kind.startswith("hub") or self.metrics_port is None or not urls:
            return None
        k = int(kind.split("-", 1)[1]) if "-" in kind else 0
        return (port_of(urls[k]) if k < len(urls) else 0), self.settings.metrics.host

    def _health(self) -> None:
        """Ping every actor: recover the ones that restarted; fail open futures if one is gone for good."""
        if self._engine_stopped():  # stopped elsewhere (smartbatch stop, shutdown): nothing to supervise
            return
        ray = self._ray
        named = self._h["named"]
        refs = {a.ping.remote(): kind for kind, a in named.items()}
        asked = time.monotonic()
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=HEALTH_TIMEOUT_S)
        self._watch_silence(refs, ready, asked)
        restarted, dead, stuck = [], [], []
        for ref in ready:
            kind = refs[ref]
            try:
                tok = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:  # restarting: it comes back as a new incarnation ...
                if self._restarting_too_long(kind):  # ... unless Ray cannot place it: its requests hung for good
                    stuck.append(kind)
                continue
            except Exception as exc:  # ActorDiedError: gone for good, or dying just as it was asked
                log.debug("smartbatch: %s did not answer its health check: %r", kind, exc)
                self._restarting.pop(kind, None)  # died, not stuck: its reason is its death
                self._misses[kind] = self._misses.get(kind, 0) + 1
                if self._misses[kind] >= DEAD_AFTER:
                    dead.append(kind)
                continue
            self._misses.pop(kind, None)
            self._restarting.pop(kind, None)
            if tok != self._incarnation.get(kind):
                self._incarnation[kind] = tok
                restarted.append(kind)
        # A ping to an actor Ray is restarting may outlast the check's wait on a loaded head: still restarting.
        for kind in set(refs.values()) - {refs[r] for r in ready}:
            if kind in self._restarting and self._restarting_too_long(kind):
                stuck.append(kind)
        self._sweep()
        self._relay_logs()
        if restarted:
            # In a thread of its own: rewiring waits on the restarted actor (seconds on a loaded machine), and
            # the pull loop that runs this check must keep delivering results meanwhile.
            threading.Thread(target=self._recover, args=(restarted,), name="smartbatch-recover", daemon=True).start()
        else:  # a rewired hub shard that has not taken this driver's record yet: given it again, alone
            self._retry_owed()
        if dead and not self._engine_stopped():
            # Requests may sit in the dead actor's groups or timers; nothing can resolve them now, so every open
            # future fails with the reason instead of hanging.
            self._fail_open(f"engine failure: actor(s) died: {', '.join(sorted(dead))}")
        if stuck and not self._engine_stopped():
            self._unstick(sorted(stuck))

    def _restarting_too_long(self, kind: str) -> bool:
        """``kind`` has been restarting, check after check, for more than ``settings.actor_restart_wait_s``. On a
        cluster, Ray cannot restart an actor where no live node offers its resources (a dispatcher's
        ``provider:<name>``, when the only such node is lost): it stays restarting, and every request it would
        serve stayed open for good, new ones too (a helper's hunt). A restart seen again after checks that did
        not see it is a new one: its wait starts afresh (one answered late in between cleared nothing)."""
        now = time.monotonic()
        since, last = self._restarting.get(kind, (now, now))
        if now - last > RESTART_SEEN_GAP_S:
            since = now
        self._restarting[kind] = (since, now)
        wait = self.settings.actor_restart_wait_s
        return bool(wait) and now - since > wait

    def _unstick(self, kinds: list[str]) -> None:
        """``kinds`` stayed restarting past the wait. A dispatcher's provider alone is cut off: its open requests
        fail, at every check while it stays so (new ones too), and the rest of the engine works on; it takes the
        provider's work again once Ray restarts it. Without any other actor the engine cannot work: this driver
        ends, as when its engine is stopped elsewhere."""
        from actors.remote import provider_resource

        try:
            have = self._ray.cluster_resources()
        except Exception:  # noqa: BLE001 (the resource is a hint; the failure stands without it)
            have = None
        wait = f"actor_restart_wait_s={self.settings.actor_restart_wait_s:g} s"
        others = [k for k in kinds if not k.startswith("dispatcher-")]
        if others:
            self._end(f"engine failure: actor(s) {', '.join(others)} could not be restarted within {wait}; "
                      "start a new engine")
            return
        for kind in kinds:
            provider = kind.split("-", 1)[1]
            res = provider_resource(provider)
            where = (f": no live node offers the resource {res!r} it needs; start one" if have is not None
                     and res not in have else "")
            self._fail_open(f"provider {provider!r} is cut off: its dispatcher could not be restarted within "
                            f"{wait}{where}. The engine takes its work again once it is back; a request that was "
                            "in a provider batch may still be billed", provider)

    def _watch_silence(self, refs: dict, ready: list, asked: float) -> None:
        """Kill an actor that has answered no health check for ``settings.actor_hang_s`` (only the driver that
        started the engine does, so two drivers never both kill it): Ray restarts it, and the next check sees
        the new incarnation and recovers it. A late answer to an earlier check counts: a busy actor that answers
        every ping after the check stopped waiting is alive."""
        answered = {refs[r] for r in ready}
        old = {ref: kind for kind, (ref, _) in self._silent.items() if kind not in answered}
        if old:
            late, _ = self._ray.wait(list(old), num_returns=len(old), timeout=0)
            answered.update(old[r] for r in late)
        for ref, kind in refs.items():
            if kind in answered:
                self._silent.pop(kind, None)
            elif kind not in self._silent:
                self._silent[kind] = (ref, asked)
        hang_s = self.settings.actor_hang_s
        if not hang_s or not self._starter or not self._running:
            return
        now = time.monotonic()
        for kind, (_, since) in list(self._silent.items()):
            if now - since < hang_s:
                continue
            del self._silent[kind]
            log.warning("smartbatch: engine actor %s has answered no health check for %.0f s; killing it so Ray "
                        "restarts it and its open work is re-admitted", kind, now - since)
            try:
                self._ray.kill(self._h["named"][kind], no_restart=False)
            except Exception as exc:  # gone meanwhile: the next check finds out
                log.warning("smartbatch: killing %s failed (%s)", kind, exc)
                continue
            self.hung[kind] = self.hung.get(kind, 0) + 1

    def _relay_logs(self) -> None:
        """The actors' latest log lines into this driver's Python logging, under their own loggers (e.g.
        ``smartbatch.cache``), each prefixed with the actor that wrote it."""
        try:
            lines, self._log_seq = self._ray.get(self._h["hub"].logs_since.remote(self._log_seq),
                                                 timeout=HEALTH_TIMEOUT_S)
        except Exception:  # the hub is busy or restarting: the lines wait for the next check
            return
        for created, name, level, actor, msg in lines:  # a ``smartbatch`` logger's (``ship_logs``): masked there
            get_logger(name).log(level, "[%s.%s] %s", self._h["engine"], actor, msg)  # and here

    def _sweep(self) -> None:
        """Re-admit requests open well past their deadline: if a fault lost one on a path no recovery saw,
        it is served late rather than never (the futures of a lost request would otherwise hang)."""
        if time.monotonic() < self._next_sweep or self._recovering.locked():
            # Not while an actor recovers: a restarted dispatcher that has not re-attached to its batches yet
            # would not recognise their members, and they would be sent (and paid) a second time.
            return
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        late = self.clock.now() - max(SWEEP_GRACE_S * getattr(self.clock, "speedup", 1.0), 60.0)
        with self._lock:
            # Not sent yet (buffered, or waiting in a lane for a call to return): not lost, and it leaves anyway.
            # Waiting for a restarting ingest: not lost either, their own try sends them.
            unsent = {r.uid for r in self._buffer} | self._lane_uids() | self._waiting_uids()
            overdue = [u for u, f in self._futs.items()
                       if not f.done() and f._req.deadline_at < late and u not in unsent]
        # Swept twice already and still open: past the cache too. A request following an identical one whose
        # result can no longer reach it (the leader's end was lost with a restarted actor) is generated itself.
        self._sweeps = {u: self._sweeps.get(u, 0) + 1 for u in overdue}
        if overdue:
            log.warning("smartbatch: %d request(s) open past their deadline; re-admitting them", len(overdue))
            self.swept += len(overdue)
            stuck = [u for u in overdue if self._sweeps[u] > 2]
            if stuck:
                self._readmit_open(stuck, force=True)
            self._readmit_open([u for u in overdue if self._sweeps[u] <= 2])

    def _recover(self, kinds: list[str]) -> None:
        with self._recovering:  # one recovery at a time: each re-admits everything still open
            self._recover_now(kinds)

    def _recover_now(self, kinds: list[str]) -> None:
        from actors.remote import rewire

        done, owed = [], []
        for kind in kinds:
            log.warning("smartbatch: engine actor %s restarted; recovering its state and re-admitting open work",
                        kind)
            try:
                # Bounded: a dispatcher's journal read waits up to journal.recover_wait_s, so well past that.
                rewire(self._h, kind, self._metrics_addr(kind),
                       timeout_s=max(REWIRE_WAIT_S, 3 * self.settings.journal.recover_wait_s))
            except Exception as exc:  # it died again meanwhile: the next check sees the new incarnation
                log.warning("smartbatch: rewiring %s failed (%s); trying again at the next check", kind, exc)
                self._incarnation[kind] = ""
                continue
            # A restarted hub knows no response id's owner: it is recovered once it has taken this driver's record
            # (below, or given again alone at the next checks until it does; ``_driver_owners``).
            (owed if kind.split("-", 1)[0] == "hub" else done).append(kind)
        done += self._share_owed(owe=owed)
        if any(kind.split("-", 1)[0] == "ingest" for kind in done):
            self._ingest_restarted()  # a request waiting through several restarts may be what crashes it
        self._readmit_open()
        self._count_recovered(done)

    def _count_recovered(self, kinds: list[str]) -> None:
        with self._recovered:
            for kind in kinds:
                self.restarts[kind] = self.restarts.get(kind, 0) + 1
            self._recovered.notify_all()

    def wait_recovered(self, kind: str, times: int = 1, timeout: float | None = None) -> bool:
        """Block until actor ``kind`` has been recovered from ``times`` restarts (for operators and tests)."""
        with self._recovered:
            return self._recovered.wait_for(lambda: self.restarts.get(kind, 0) >= times, timeout)

    def _fail_ids(self, uids: Sequence[str], error: str) -> None:
        with self._lock:
            self._drop_unsent(set(uids))
        self._fail_each(uids, error)

    def _await_handover(self) -> None:
        """Before the driver fails what is open (a stop elsewhere, an actor gone): let the result thread hand over
        every answer it holds or whose reply is ready, two turns of its loop (the one under way, and the next,
        which gets a reply that was ready but not yet got). Failed first, such an answer (billed) was dropped, its
        future claimed by the failure (``_resolve``), and its line asked again and paid twice (rvunsent85). Not in
        that thread itself (its turn is what is waited for), nor once the engine is turned off (``stop()`` joined
        the thread, which ended its turn); bounded, as a hung hub gives no answer."""
        puller = getattr(self, "_puller", None)
        if puller is None or puller is threading.current_thread() or not self._running:
            return
        with self._room:
            if self._pull_ended or self._pull_stalled or not puller.is_alive():
                return
            due, self._handover_wanted = self._pull_turns + 2, self._handover_wanted + 1
            try:
                self._room.wait_for(lambda: self._pull_turns >= due or self._pull_ended or self._pull_stalled,
                                    HANDOVER_WAIT_S)
            finally:
                self._handover_wanted -= 1

    def _held_in_turn(self) -> set[str]:
        """The ids whose answers the result thread holds (``Pulling._held_in_turn``); none without that thread."""
        return set()

    def _fail_open(self, error: str, provider: str | None = None) -> None:
        """Fail the open futures (of ``provider``'s requests alone, if given) with ``error``, once the result
        thread has handed over the answers it holds (``_await_handover``). Nothing of them open: no wait (a
        provider cut off is failed at every health check, and each waited two pull turns, its check thread held)."""
        def open_ids() -> list[str]:
            with self._lock:
                return [k for k, f in self._futs.items() if not f.done() and provider in (None, f._req.provider)]

        if not open_ids():
            return
        self._await_handover()
        # Past the wait, what the result thread holds in hand still goes to it (``_held_in_turn``): an answer, paid for.
        held = self._held_in_turn()
        ids = [k for k in open_ids() if k not in held]
        if ids:  # in the user's log too, not only in each result: a stop may end work they meant to wait for
            log.warning("%d open request(s) failed: %s", len(ids), error)
        self._fail_ids(ids, error)

    def _engine_stopped(self) -> bool:
        """Whether the engine was stopped elsewhere (``shutdown``, ``smartbatch stop``): this driver then ends,
        failing what it holds open and refusing new work, instead of waiting for actors that will not return."""
        from actors._peer import read_layout

        try:
            present = read_layout(self._h["engine"]) is not None
        except Exception:  # the KV store did not answer (a busy head): no news, not a stop
            return False
        if present:
            self._layout_seen, self._layout_missing = True, 0
            return False
        if not self._layout_seen:  # not published yet (this driver is still starting the engine)
            return False
        self._layout_missing += 1
        if self._layout_missing < DEAD_AFTER:  # read again before ending: a stop is final
            return False
        if self._running and self._gone is None:  # (the endpoint reads "was stopped" as a stop, not a failure:
            self._end_stopped(f"engine {self._h['engine']!r} was stopped")  # ``_endpoint_failure.STOPPED``)
        return True

    @property
    def gone(self) -> str | None:
        """Why this driver can take no more work, its engine stopped elsewhere (``smartbatch stop``) or lost; the
        open futures it failed then carry this as their error. None while the engine runs."""
        return self._gone

    def _end(self, why: str) -> None:
        """This driver can do nothing more: new submits raise ``EngineStopped`` with ``why``, open futures fail."""
        self._gone = why
        self._fail_open(why)

    def actor_names(self) -> dict[str, Any]:
        """This engine's actors by kind, as Ray names them (namespace ``smartbatch``)."""
        from actors.remote import actor_name

        return {kind: actor_name(self._h["engine"], kind) for kind in self._h["named"]}
