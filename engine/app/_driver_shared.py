"""Shared engines: ``Engine.connect(name)`` attaches a driver to an engine another driver (or ``smartbatch
serve``) started, and ``Engine.stop_named`` / ``engine.shutdown()`` stop one for every driver (a mixin, so the
driver module stays the threads-and-futures core).

Every driver is a client of the engine's result hub: it claims the ids it submits and pulls its own results
(see ``actors.hub``). An engine started with ``detached=True``, and one a driver attached to, outlive that
driver: its ``stop()`` ends only its own session.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from engine.app._actor_errors import actor_errors, masked_actor_errors
from engine.core._logkeys import get_logger
from engine.core._stderrkeys import mask_process
from engine.core.errors import ConfigError

__all__ = ["MAX_PENDING", "SharedEngine", "check_answers", "check_not_stopping", "init_ray", "stale_engine"]

MAX_PENDING = 100_000  # the engine's default max_pending (Engine.start, Engine.connect)

log = get_logger("smartbatch")


def check_answers(address: str, flag: str = "address", timeout_s: float = 3.0) -> None:
    """Refuse at once a ``host:port`` where nothing listens: Ray would retry it for minutes, deaf to SIGTERM (the
    address of a serve that has exited since, or a typo). ``flag``: how the message names the setting."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray resolves these itself, and says so when nothing runs
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"{flag} {address}: no Ray cluster answers there ({exc}); give the address that "
                          "smartbatch serve printed while it runs, or start Ray with `ray start --head`") from None


def init_ray(address: str, flag: str = "address") -> bool:
    """Attach to the Ray cluster at ``address`` (``local``: start one) unless this process already is; True if
    this call did. ``flag``: how the message names the setting (a driver script gave ``address=``, no flag)."""
    import ray

    if ray.is_initialized():
        _same_ray_or_refuse(address, flag)
        return False
    check_answers(address, flag)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, OSError, RuntimeError) as exc:  # "bad address", "http://x": Ray's words
        raise ConfigError(f"{flag} {address}: no Ray cluster answers there ({exc}); give the address that "
                          "smartbatch serve printed, or start Ray with `ray start --head`") from None
    return True


def _same_ray_or_refuse(address: str, flag: str) -> None:
    """In a process already attached to Ray, refuse an explicit ``host:port`` of another cluster: it was ignored,
    and the engine ran on the Ray the process had, not the one asked for. ``auto``/``local`` (the defaults) and a
    Ray Client address take the process's Ray, as before."""
    import socket

    import ray

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    try:
        current = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a client-mode or dying Ray: nothing to compare with
        return
    cur_host, _, cur_port = current.rpartition(":")
    # An IPv6 address is written in brackets ("[::1]:6379"), and a host name in any case
    host, cur_host = host.strip("[]").lower(), cur_host.strip("[]").lower()
    local = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname().lower(), cur_host}
    if sep and port == cur_port and (host in local or _addresses(host) & (_addresses(cur_host) | {cur_host})):
        return  # (a name of the cluster's head, e.g. a Kubernetes service's, was refused as another cluster's)
    raise ConfigError(f"{flag} {address}: this process is already attached to the Ray cluster at {current}; "
                      f"drop {flag} to use that one, or give it from a process that has not called ray.init()")


def _addresses(host: str) -> set[str]:
    """The IP addresses ``host`` names (a name resolved, an address itself); none when it resolves to nothing."""
    import socket

    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return set()


def _attach(name: str, address: str, flag: str) -> bool:
    """``init_ray`` at the engine ``name``'s cluster (``_where``). Where ``auto`` found no serve of that name on this
    machine and no Ray, say that, naming the engine: Ray's "Could not find any running Ray instance" read as a fault
    of Ray's, under an address the user never typed (a new user's tour of `status` and `budget`)."""
    where = _where(name, address)
    try:
        return init_ray(where, flag)
    except ConfigError as exc:
        # Only where Ray found none: a Ray it found and could not join (another version, a RAY_ADDRESS cluster
        # that does not answer) was said to be no Ray at all, its reason dropped.
        if where != "auto" or "Could not find any running Ray instance" not in str(exc):
            raise
        raise ConfigError(f"no engine named {name!r} runs on this machine (no `smartbatch serve --name {name}` here, "
                          f"and no Ray cluster at {flag} auto): start it with `smartbatch serve --name {name}`, or "
                          f"give {flag} the address its serve printed on another machine") from None


def _where(name: str, address: str) -> str:
    """``address``, except that ``auto`` (Ray's guess: the latest ``ray start`` cluster, else any Ray of this
    machine) becomes the address a ``smartbatch serve --name NAME`` running here published: each serve starts
    a Ray of its own, which ``auto`` misses as soon as another Ray runs on the machine."""
    import os

    import ray

    if address != "auto" or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return address
    from engine.app._serve_claim import served_address

    return served_address(name) or address


def stale_engine(name: str) -> bool:
    """Whether the engine ``name`` that Ray's KV store names has no actor left (its driver died without stopping
    it): its layout is then removed, and the name is free again. An engine with some actors alive is running
    (Ray may be restarting the others), and is left alone."""
    import ray

    from actors._peer import read_layout
    from actors.remote import NAMESPACE, actor_name, kill_engine

    for kind in (read_layout(name) or {"kinds": []})["kinds"]:
        try:
            ray.get_actor(actor_name(name, kind), namespace=NAMESPACE)
            return False
        except ValueError:  # this one is gone
            continue
    kill_engine(name)
    return True


def check_not_stopping(name: str) -> None:
    """Refuse to start an engine named ``name`` while the actors of one of that name still run with its layout
    gone: a stop of it is under way (it removes the layout first, then keeps its budget ledger, up to
    ``journal.ledger_wait_s`` for Redis and more), or one was cut short. Ray refused the new budget controller's
    name after the start had made its hub, which nothing stopped: every later start of the name failed on it. A
    stop whose process died mid-way (``kill -9``) is finished here first (``take_over_dead``): it blocked the name
    until Ray restarted."""
    import ray

    from actors._peer import stopping
    from actors._stop_claim import describe, read_stop
    from actors.remote import NAMESPACE, actor_name
    from engine.app._ledger_stop import take_over_dead

    if stopping(name):
        take_over_dead(ray, name)  # its stopper died mid-way (kill -9): finished here, its actors gone
    for kind in ("budget", "hub"):
        try:
            ray.get_actor(actor_name(name, kind), namespace=NAMESPACE)
        except ValueError:  # gone
            continue
        if stopping(name):
            raise ConfigError(f"name={name!r}: an engine of that name is being stopped by "
                              f"{describe(read_stop(name) or {})} (its actors still run: the stop keeps its budget "
                              f"ledger first); start it again once that stop has ended (smartbatch stop --name "
                              f"{name} waits for it), or pick another name")
        raise ConfigError(f"name={name!r}: actors of an engine of that name still run on this Ray cluster with no "
                          f"layout (actor {actor_name(name, kind)!r}: an engine of that name starting, or one whose "
                          "stop was cut short); try again in a few seconds, else restart the Ray cluster or pick "
                          "another name")


class SharedEngine:
    """Mixed into ``Engine``."""

    # Where a stop keeps what a Redis ledger has not taken, as the engine's start resolved it (``ledger_home``):
    # set by ``_publish_layout`` and ``connect``; None (resolved by the stop) before either ran.
    _ledger_dir: str | None = None

    @classmethod
    def connect(cls, name: str, *, address: str = "auto", micro_batch: int = 1000, flush_ms: float = 2.0,
                max_pending: int = 100_000, overload: str = "block", submit_timeout_s: float = 60.0,
                retention_s: float = 3600.0, flag: str = "address") -> Any:
        """Attach this driver to the running engine ``name`` (started by ``Engine.start(name=...)`` or
        ``smartbatch serve --name``) on the Ray cluster at ``address``. The engine's cache, budgets and
        idempotency are shared with every other driver: the same (tenant, id) from two drivers is one request,
        whose result both get. ``stop()`` ends this driver's session; the engine runs on. ``flag``: how an error
        names ``address`` (a command line passes its ``--address``)."""
        import ray

        from actors._peer import running_engines
        from actors.remote import attach_actors
        from engine.app._serve_claim import served_elsewhere

        mask_process()  # first: Ray's lines of the attach may quote a key (``Engine.__init__``)
        started = _attach(name, address, flag)
        got = attach_actors(name)
        if got is None or got[0]["clock"] is None:
            others = running_engines()
            if started and not cls._running_engines:
                ray.shutdown()
            raise ConfigError(f"no engine named {name!r} runs on this Ray cluster (running: "
                              f"{', '.join(others) or 'none'}); start one with `smartbatch serve --name {name}` "
                              f"or Engine.start(name={name!r}, detached=True){served_elsewhere(name, address, flag)}")
        handles, layout = got
        try:
            with actor_errors(ray, name, "Engine.connect()"):  # its claim at every hub shard
                eng = cls(handles=handles, clock=handles["clock"], settings=layout["settings"],
                          catalog=layout["catalog"], started_ray=started, micro_batch=micro_batch, flush_ms=flush_ms,
                          max_pending=max_pending, overload=overload, submit_timeout_s=submit_timeout_s,
                          retention_s=retention_s, owner=False, attached=True)
        except BaseException:  # e.g. an actor died just now: leave this process as it was
            if started and not cls._running_engines:
                ray.shutdown()
            raise
        eng._ledger_dir = layout.get("ledger_dir")
        eng.metrics_url = layout.get("metrics_url")
        eng.metrics_port = layout.get("metrics_port")
        eng.metrics_urls = layout.get("metrics_urls") or ([eng.metrics_url] if eng.metrics_url else [])
        log.info("smartbatch: attached to engine %r (metrics at %s)", name, eng.metrics_url or "not served")
        return eng

    @staticmethod
    def stop_named(name: str, *, address: str = "auto", drain_s: float = 0.0,
                   draining: Callable[[], None] | None = None, flag: str = "address",
                   waiting: Callable[[dict], None] | None = None) -> int:
        """Stop the running engine ``name`` for every driver (their open futures fail, naming the stop).
        Returns how many actors were stopped; raises ``ConfigError`` when no such engine runs. ``drain_s``: when
        provider batches or calls are under way, first cancel the engine's work and wait up to that long for them
        to end and their answers to reach the drivers (``wind_down``; ``draining`` is called as it starts, and a
        KeyboardInterrupt ends the wait): stopped at once, what they finished is billed and unread. ``flag``: as
        ``connect`` takes it. A stop of ``name`` already under way (another process's) is waited for, ``waiting``
        told first with its record (``actors._stop_claim``): 0 once it has ended; one whose process died is taken
        over and finished here."""
        import ray

        from actors._peer import read_layout, running_engines
        from actors._stop_claim import describe, read_stop, release_stop, take_stop
        from actors.remote import attach_actors, cancel_work, settle
        from engine.app._ledger_stop import stop_claimed, stop_wait_s
        from engine.app._serve_claim import served_elsewhere

        mask_process()  # first, as ``connect``'s
        started = _attach(name, address, flag)
        try:
            with actor_errors(ray, name, "Engine.stop_named()"):  # its drain and its stop
                layout, under_way = read_layout(name), read_stop(name)
                if layout is None and under_way is None:
                    raise ConfigError(f"no engine named {name!r} runs on this Ray cluster (running: "
                                      f"{', '.join(running_engines()) or 'none'}){served_elsewhere(name, address, flag)}")
                # Before the drain: a second stop waits for the first rather than drain, kill and keep beside it.
                try:
                    claim = take_stop(name, layout, stop_wait_s(layout or (under_way or {}).get("layout")) + drain_s,
                                      waiting)
                except TimeoutError as exc:
                    raise ConfigError(f"name={name!r}: {exc}; it is still under way (smartbatch stop --name {name} "
                                      "again waits for it)") from None
                if claim is None:
                    return 0
                if claim.get("taken_over"):
                    log.warning("engine %s: finishing the stop by %s, which died mid-way", name,
                                describe(claim["taken_over"]))
                try:
                    attached = attach_actors(name) if drain_s > 0 and layout is not None else None
                    if attached is not None and settle(attached[0], 0.0):
                        if draining is not None:
                            draining()
                        try:
                            cancel_work(attached[0], 60.0)
                            settle(attached[0], drain_s)
                        except KeyboardInterrupt:  # leave now: the stop below cancels what is still under way
                            pass
                except BaseException:  # nothing stopped yet: the engine runs on, and so may the next stop of it
                    release_stop(name, claim)
                    raise
                # What its ledger's Redis has not taken is kept as the engine's own driver's stop keeps it: killed
                # with the budget controller, it was kept in no file, its spend counted by no ledger.
                return stop_claimed(ray, name, claim)
        finally:
            if started:
                ray.shutdown()

    @staticmethod
    def running(*, address: str = "auto") -> list[str]:
        """The names of the engines running on the Ray cluster at ``address``."""
        from actors._peer import running_engines

        init_ray(address)
        return running_engines()

    def _stop_wait_s(self) -> float:
        """How long this driver's stop of its engine waits for a stop of it by name already under way."""
        from engine.app._ledger_stop import stop_left_s

        return stop_left_s(self.settings)

    @property
    def name(self) -> str:
        """The engine's name: what ``Engine.connect`` takes, and the prefix of its actors' Ray names."""
        return self._h["engine"]

    @masked_actor_errors
    def shutdown(self) -> None:
        """Stop this driver and the engine itself, for every driver attached to it."""
        self._owner = True  # stop() then stops the actors, as for an engine this driver started and owns
        self.stop()

    @masked_actor_errors
    def wind_down(self, timeout_s: float, interrupted=None) -> int:
        """What comes before ``shutdown()`` of an engine with provider batches under way: cancel its work for
        every driver attached to it (``cancel``), and wait up to ``timeout_s`` for those batches to end and what
        they finished to reach the drivers (``wait_cancelled``, which returns what was left)."""
        self._owner = True  # as for shutdown(): the engine's work stops for every driver
        self.cancel(max(1.0, min(60.0, timeout_s)))  # (its own waits, up to 60 s twice, within a shorter limit)
        return self.wait_cancelled(timeout_s, interrupted)

    def _stop_error(self) -> str:
        """What a future still open at the stop says. After a drain whose cancel every provider batch and call
        took, and whose answers all came in, what is open was never sent (its cancel's answer was on its way):
        it was told "engine stopped before the request finished" as if it might have run (a helper's hunt)."""
        if not self._owner:
            return (f"this driver left engine {self.name!r} before the request finished; it still runs there: "
                    "submit the same tenant and id (from any driver) for its result")
        if getattr(self, "_drained", False):
            return ("cancelled: the engine stopped (stop(drain_s=...)) after cancelling its work and waiting for "
                    "what was under way; this request was never sent, and is billed nothing")
        return "engine stopped before the request finished (drain() first waits)"

    def _drain_on_exit(self, exc_type: type | None) -> float:
        """How long leaving a ``with`` block waits (``stop(drain_s=...)``): ``settings.stop_drain_s`` when the
        script's error or Ctrl-C left it, with work possibly under way; stopped at once, the members its cancelled
        provider batches finished were billed, never read, nor counted in the report. A block left normally (the
        script chose not to ``drain()``) and a SIGTERM (``Terminated``, or Ray's handler's SystemExit: a kill
        follows, and Ray's own handler aborts the process seconds later) do not wait."""
        from engine.app._ray_stop import Terminated

        if exc_type is None or not issubclass(exc_type, (Exception, KeyboardInterrupt)):
            return 0.0
        return 0.0 if issubclass(exc_type, Terminated) else self.settings.stop_drain_s

    def _drain_before_stop(self, limit_s: float) -> int:
        """``stop(drain_s=...)``'s first step: for an engine this driver started, with provider batches or calls
        under way, cancel its work and wait up to about ``limit_s`` for them to end and their answers to reach this
        driver's futures and report. Returns what was left (0: nothing; -1: cut short). A KeyboardInterrupt (a
        second Ctrl-C) anywhere in it ends it, and so does any error: the stop that follows must run."""
        if not (self._owner and self._running) or self._gone is not None or limit_s <= 0:
            return 0  # (an engine gone has failed every future already: nothing would be answered)
        if threading.current_thread() is self._puller:  # the thread that delivers the answers it would wait for
            return 0
        try:
            if not self.wait_cancelled(0.0):
                return 0
            # A video being made has no cancel: it is billed when it completes, so the wait is for its address
            # (a helper's tour: a Ctrl-C mid-poll was told of provider batches, and there were none).
            log.warning("stopping engine %r with work under way: its work is cancelled, and the stop waits up to %g "
                        "s for its provider batches to take the cancel and its calls under way to end (a video "
                        "being made has no cancel and is billed when it completes), so what they finished (billed) "
                        "is answered (a batch's cancel takes up to 10 minutes at OpenAI and Anthropic, a video "
                        "minutes; Ctrl-C leaves now, what they finished then billed and not read)", self.name, limit_s)
            left = self.wind_down(limit_s, getattr(self, "_drain_cut", None))  # (a Ctrl-C while waiting for it)
            self._drained = left == 0
            if left:
                log.warning("engine %r stops before its provider batches and calls under way have ended: what they "
                            "finished is billed and not read", self.name)
            return left
        except KeyboardInterrupt:  # leave now: the stop cancels what is still under way
            return -1
        except Exception as exc:  # e.g. an actor gone: the stop must still run, and the caller's error stay
            log.warning("engine %r: the drain failed (%s: %s)", self.name, type(exc).__name__, str(exc)[:200])
            return -1

    def _publish_layout(self, policy: str, detached: bool) -> None:
        from actors._peer import publish_layout
        from engine.app._ledger_stop import ledger_home

        self._ledger_dir = ledger_home(self.settings)
        publish_layout(self._h["engine"], {"ledger_dir": self._ledger_dir,
            "kinds": list(self._h["named"]), "settings": self.settings, "catalog": self.catalog, "policy": policy,
            "detached": detached, "metrics_url": self.metrics_url, "metrics_port": self.metrics_port,
            "metrics_urls": self.metrics_urls, "journal": self._h.get("journal"),  # (these two: ``_stop_left``)
            "journal_in_memory": self._h.get("journal_in_memory", False)})
