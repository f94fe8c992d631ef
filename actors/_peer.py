"""One way to talk to a peer actor, whether it is a Ray actor handle or a plain object in a unit test.

``await peer.call("m", x)`` waits for the answer; ``peer.send("m", x)`` does not (Ray: the call is queued and its
result dropped; plain object: a task on the running loop). Actor classes only ever see a ``Peer``, so they
run unchanged with or without Ray.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple

from actors._wire import pack_args
from engine.core._logkeys import get_logger

__all__ = ["Named", "Peer", "Warm", "as_peer", "ping_through_restart", "restarting", "warm_all"]

log = get_logger("smartbatch.peer")


class Named(NamedTuple):
    """A Ray actor by name, looked up at first use. Actors get their peers this way rather than as handles: a
    restarted actor is built again from its constructor's arguments, and names stay valid (and need nothing
    kept in the object store) where a handle passed as an argument is a reference Ray must keep alive."""

    name: str
    namespace: str


class Peer:
    __slots__ = ("_is_ray", "_named", "_target", "_tasks")

    def __init__(self, target: Any):
        self._named = target if isinstance(target, Named) else None
        self._target = None if self._named else target
        # A Ray actor handle's methods have .remote; plain objects' methods do not.
        self._is_ray = self._named is not None or type(target).__name__ == "ActorHandle"
        self._tasks: set[asyncio.Task] = set()

    def _resolve(self) -> Any:
        if self._target is None:
            import ray

            self._target = ray.get_actor(self._named.name, namespace=self._named.namespace)
        return self._target

    async def call(self, method: str, *args: Any) -> Any:
        fn = getattr(self._resolve(), method)
        if self._is_ray:
            return await fn.remote(*pack_args(args))
        out = fn(*args)
        return await out if inspect.isawaitable(out) else out

    def send(self, method: str, *args: Any) -> None:
        if self._is_ray:
            getattr(self._resolve(), method).remote(*pack_args(args))
            return
        task = asyncio.get_running_loop().create_task(self.call(method, *args))
        self._tasks.add(task)  # keep a reference until done, or the task may be collected mid-flight
        task.add_done_callback(self._tasks.discard)

    def deliver(self, method: str, *args: Any, held: Callable[[bool], None] | None = None) -> None:
        """``send``, asked again while the peer is dead or restarting (the call may or may not have run, so only
        for idempotent calls: a settlement, a charge). A message sent as the budget controller died was lost,
        and the spend it carried with it (a hunt: the ledger 10 % short of the bill after four restarts).
        ``held(True)``: the first try failed or was not answered within ``HELD_AFTER_S`` (a sender that may itself
        die keeps it somewhere that outlives it meanwhile); ``held(False)``: taken."""
        if not self._is_ray:
            self.send(method, *args)
            return
        try:  # the first try leaves now, ahead of what the caller sends next (its results, to the hub)
            first = getattr(self._resolve(), method).remote(*pack_args(args))
        except Exception:  # tried again below
            first = None
        task = asyncio.get_running_loop().create_task(self._deliver(method, args, held, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, method: str, args: tuple, held: Callable[[bool], None] | None = None,
                       first: Any = None) -> None:
        from ray.exceptions import RayActorError

        async def sent(ref: Any) -> Any:
            return await ref

        loop = asyncio.get_running_loop()
        end, wait, waited = loop.time() + DELIVER_WAIT_S, RESTART_POLL_S, held is None
        while True:
            call = asyncio.ensure_future(sent(first) if first is not None else self.call(method, *args))
            first = None
            if not waited:  # failed, or slow (Ray holds a call to an actor it restarts): kept by the sender meanwhile
                await asyncio.wait([call], timeout=HELD_AFTER_S)
                if not call.done() or call.exception() is not None:
                    held(True)
                    waited = True
            try:
                await call
                if held is not None:
                    held(False)
                return
            except Exception as exc:
                if not (restarting(exc) or isinstance(exc, RayActorError)) or loop.time() >= end:
                    log.error("%s not delivered: %s", method, type(exc).__name__)
                    return
            await asyncio.sleep(wait)
            wait = min(2 * wait, 5.0)

    async def delivered(self, timeout_s: float) -> bool:
        """Wait until what ``deliver`` (and, to a plain object, ``send``) has sent so far is taken, at most
        ``timeout_s`` (a peer that is restarting keeps a delivery open for longer); True when it is."""
        pending = list(self._tasks)
        if not pending:
            return True
        _, left = await asyncio.wait(pending, timeout=timeout_s)
        return not left

    @property
    def target(self) -> Any:
        return self._resolve()


def as_peer(x: Any) -> Peer | None:
    """Wrap an actor handle or a plain object (None stays None)."""
    return x if x is None or isinstance(x, Peer) else Peer(x)


# How long a start-up ping waits for a peer that Ray is restarting, and how often it asks again. Seen in a CI
# rehearsal: a worker died of a segfault in Ray's own metrics thread while its actor was being created; Ray
# restarted the actor, and the engine's start failed on a ping that had reached the dying worker.
RESTART_WAIT_S = 60.0
RESTART_POLL_S = 0.2
DELIVER_WAIT_S = 600.0  # how long ``Peer.deliver`` keeps asking a peer that is dead (Ray restarts it)
HELD_AFTER_S = 0.25  # a delivery not answered within this is said to be held (``Peer.deliver``'s ``held``)


def restarting(exc: BaseException) -> bool:
    """Whether ``exc`` says the actor called is being restarted by Ray (the call may or may not have run)."""
    try:
        from ray.exceptions import ActorUnavailableError
    except ImportError:  # no Ray: a plain object is never restarted
        return False
    return isinstance(exc, ActorUnavailableError)


def warm_all(actors: list) -> None:
    """Every actor pings its peers once (``Warm.warm``), each waiting out a peer that Ray restarts; a call of
    ours that reached an actor whose worker died is asked again the same way (``RESTART_WAIT_S``)."""
    import time

    import ray

    end = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            ray.get([a.warm.remote() for a in actors])
            return
        except Exception as exc:
            if not restarting(exc) or time.monotonic() >= end:
                raise
        time.sleep(RESTART_POLL_S)  # Ray queues calls to a restarting actor: this only spaces the retries


async def ping_through_restart(peer: Peer) -> Any:
    """``peer.ping()``, asked again while Ray restarts the peer, for at most ``RESTART_WAIT_S`` (a ping is
    idempotent, so one that may have run costs nothing)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + RESTART_WAIT_S
    while True:
        try:
            return await peer.call("ping")
        except Exception as exc:
            if not restarting(exc) or loop.time() >= end:
                raise
        await asyncio.sleep(RESTART_POLL_S)


class Warm:
    """Mixin: ``ping`` answers at once (with the actor's incarnation); ``warm`` pings every peer once, so the first real message does not pay
    for opening the connection between two actor processes (about a second on the first hop here)."""

    def _peers(self) -> list[Peer]:
        return [p for p in vars(self).values() if isinstance(p, Peer)] + [
            p for v in vars(self).values() if isinstance(v, (list, dict))
            for p in (v.values() if isinstance(v, dict) else v) if isinstance(p, Peer)]

    @property
    def incarnation(self) -> str:
        """A token drawn once per run of the actor (at its first use). Ray re-runs ``__init__`` when it restarts
        an actor, so a new token tells the supervisor that the actor came back without its memory."""
        tok = self.__dict__.get("_incarnation")
        if tok is None:
            tok = self.__dict__["_incarnation"] = secrets.token_hex(6)
        return tok

    async def ping(self) -> str:
        """This actor's incarnation (``incarnation``)."""
        return self.incarnation

    async def set_logging(self, level: str, actor: str, hub) -> None:
        """Ship this actor's ``smartbatch.*`` log records at ``level`` and up to the result hub ``hub`` (a
        ``Named``), from where the drivers relay them into their own logging (see ``actors.logship``)."""
        from actors.logship import ship_logs

        peer = as_peer(hub)
        ship_logs(level, actor, lambda records: peer.send("log", records))

    async def warm(self) -> int:
        peers = self._peers()
        for p in peers:
            await ping_through_restart(p)
        return len(peers)

    async def profile(self, action: str, top: int = 8) -> tuple[float, list[str]] | None:
        """Diagnostics: ``start`` profiles this actor's event loop (cProfile sees only the thread it runs in,
        so this must be an async method), ``stop`` returns (CPU seconds, top functions by own time)."""
        import cProfile
        import io
        import pstats

        if action == "start":
            self._profiler = cProfile.Profile()
            self._profiler.enable()
            return None
        self._profiler.disable()
        out = io.StringIO()
        st = pstats.Stats(self._profiler, stream=out)
        st.sort_stats("tottime").print_stats(top)
        lines = [ln.strip() for ln in out.getvalue().splitlines() if "(" in ln and ("/" in ln or "{" in ln)]
        return st.total_tt, lines[:top]


class ClockRef:
    """Stands in a constructor for the engine clock, which the engine makes only once every actor is up (and
    hands over with ``set_clock``). Ray restarts a dead actor with its constructor's arguments, so a restarted
    actor holds this again and reads the clock the engine published (``publish_clock``): it has its clock
    before its first call, not a second later when the driver rewires it (a call in between failed, and the
    work it carried was lost until the deadline sweep)."""

    __slots__ = ("engine",)

    def __init__(self, engine: str):
        self.engine = engine

    def __repr__(self) -> str:
        return f"ClockRef({self.engine!r})"


_CLOCK_NS = "smartbatch"


def publish_clock(engine: str, clock, base: float = 0.0) -> None:
    """Make the engine clock (and the budget's time base) readable by actors Ray restarts."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(f"{engine}:clock", pickle.dumps((clock, base)), overwrite=True,
                                 namespace=_CLOCK_NS)


def unpublish_clock(engine: str) -> None:
    """Remove what the engine published (its clock and its layout) and what its runs journaled in Ray's store (a
    Redis ledger's outbox, ``actors._kv_journal``): the engine is gone, nobody reads them. Its stop has ended
    (its mark, ``actors._stop_claim``)."""
    from ray.experimental import internal_kv

    from actors._kv_journal import drop_engine
    from actors._stop_claim import drop_marks

    unpublish_layout(engine, drop_engine, drop_marks,
                     lambda e: internal_kv._internal_kv_del(f"{e}:stopping", namespace=_CLOCK_NS))


def stopping(engine: str) -> bool:
    """Whether a stop of ``engine`` is under way (its mark, ``actors._stop_claim.take_stop``); False when Ray does
    not answer."""
    from ray.experimental import internal_kv

    try:
        return bool(internal_kv._internal_kv_exists(f"{engine}:stopping", namespace=_CLOCK_NS))
    except Exception:  # Ray is going down: nothing to wait for
        return False


def unpublish_layout(engine: str, *more) -> None:
    """Remove the engine's clock and layout (and run ``more``, each Ray failing alone): drivers see it gone. Its
    journals stay: the stop does this first, and a budget controller that dies in it reads its outbox (a memory
    ledger, its copy) back from them (removed with the clock at the stop's first step, the successor had nothing
    to give: the spend waiting for Redis was counted by no ledger)."""
    from ray.experimental import internal_kv

    for drop in (lambda: internal_kv._internal_kv_del(f"{engine}:clock", namespace=_CLOCK_NS),
                 lambda: internal_kv._internal_kv_del(f"{engine}:layout", namespace=_CLOCK_NS),
                 *(lambda f=f: f(engine) for f in more)):
        try:
            drop()
        except Exception:  # Ray is already down: nothing is left to clean
            pass


def publish_layout(engine: str, layout: dict) -> None:
    """What a driver needs to attach to a running engine (``Engine.connect``): its actors' kinds, settings,
    catalog and metrics address."""
    from ray.experimental import internal_kv

    from actors._stop_cut import drop_cut

    drop_cut(engine)  # an earlier stop's list of what it cut unsent names ids this engine's requests may reuse
    internal_kv._internal_kv_put(f"{engine}:layout", pickle.dumps(layout), overwrite=True, namespace=_CLOCK_NS)


def read_layout(engine: str) -> dict | None:
    """The layout ``engine`` published, or None when no such engine runs on this Ray cluster."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(f"{engine}:layout", namespace=_CLOCK_NS)
    return pickle.loads(raw) if raw else None


def running_engines() -> list[str]:
    """The names of the engines whose layout is published on this Ray cluster."""
    from ray.experimental import internal_kv

    keys = internal_kv._internal_kv_list("", namespace=_CLOCK_NS)
    return sorted(k.decode().rsplit(":", 1)[0] for k in keys if k.decode().endswith(":layout"))


def resolve_clock(clock) -> tuple[object | None, float | None]:
    """(clock, budget time base) for a constructor argument: a ``ClockRef`` reads the published clock (None
    before the engine published it, i.e. at the first start); anything else is the clock itself."""
    if not isinstance(clock, ClockRef):
        return clock, None
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(f"{clock.engine}:clock", namespace=_CLOCK_NS)
    except Exception:  # outside Ray (unit tests) or Ray not reachable: no clock yet
        return None, None
    return pickle.loads(raw) if raw else (None, None)


