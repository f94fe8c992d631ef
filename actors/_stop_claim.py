"""One stop of an engine at a time, and a stop whose process died taken over.

A stop marks the engine ``<engine>:stopping`` in Ray's store until its last clean (``actors._peer``), so a
``serve`` and a start of the same name know a stop is under way. The mark is taken atomically here (Ray's put
without overwrite) and names its stopper: its Ray job, its pid and host, the layout it stops (the actors' kinds,
settings and ledger directory, removed from Ray's store at the stop's first step) and the file it keeps the
ledger in. Two stops at once (two ``smartbatch stop --name``, or one beside a ``serve``'s Ctrl-C) both went on
before: one killed the budget controller under the other's ``leave``, said so at ERROR ("whatever it held is
dropped"), and in one run of two no file was kept at all, the $2 waiting for Redis counted by no ledger; or the
second said that no engine of that name ran. Now the second waits for the first to end.

A stopper killed outright (``kill -9``) left the mark until Ray restarted: every later start of the name was
refused as "being stopped", and its surviving actors (the budget controller with what waited for Redis) ran on.
The GCS marks a driver's job dead as soon as its process goes (2 ms seen, from any machine), so a later stop or
start that finds the stopper's job dead takes the stop over, once: the first to mark the dead stop's token.
"""

from __future__ import annotations

import os
import pickle
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.core._logkeys import get_logger

__all__ = ["WAIT_POLL_S", "describe", "drop_marks", "kept_already", "note_kept", "read_stop", "release_stop",
           "stopper_gone", "take_stop"]

log = get_logger("smartbatch.engine")
_NS = "smartbatch"  # (``actors._peer``'s namespace of what an engine publishes)
WAIT_POLL_S = 0.2  # how often a stop waiting for another reads its mark: no event says it went


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _ray_up() -> bool:
    import ray

    return ray.is_initialized()


def _key(engine: str) -> str:
    return f"{engine}:stopping"


def _me(layout: dict | None) -> dict[str, Any]:
    import ray

    try:  # (not without Ray: asked then, it starts one)
        job = ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:
        job = None
    try:  # a stop inside an actor: its job is its creator's, dead once that driver exits (a detached actor's)
        actor = ray.get_runtime_context().get_actor_id() if job is not None else None
    except Exception:
        actor = None
    return {"token": secrets.token_hex(8), "job": job, "actor": actor, "pid": os.getpid(),
            "host": socket.gethostname(), "at": time.time(), "layout": layout, "kept": None}


def read_stop(engine: str) -> dict[str, Any] | None:
    """The record of the stop of ``engine`` under way, None when none is. A mark that names no stopper (an older
    version's ``b"1"``) reads as ``{}``, whose stopper is taken for alive."""
    raw = _kv()._internal_kv_get(_key(engine), namespace=_NS)
    if raw is None:
        return None
    try:
        rec = pickle.loads(raw)
    except Exception:
        return {}
    return rec if isinstance(rec, dict) else {}


def stopper_gone(rec: dict[str, Any]) -> bool:
    """Whether the process of the stop ``rec`` is dead: its Ray job says so (the GCS marks a driver's job dead when
    its process goes, from any machine). Unknown (no job named, no answer, a job the GCS forgot) is alive: a stop
    is never taken over while its stopper may be mid-way. A stopper in an actor is judged by its actor (dead, or
    restarted: another pid), not its job: a detached actor outlives the driver that made it, whose job the GCS
    marks dead (Ray 2.60: the actor ALIVE, its job ``IsDead``), and its live stop was taken over (two at once)."""
    job = rec.get("job")
    if not job:
        return False
    try:
        if rec.get("actor"):
            return _actor_gone(rec["actor"], rec.get("pid"))
        jobs = _jobs()
    except Exception:
        return False
    return any(j.get("JobID") == job and j.get("IsDead") for j in jobs)


def _actor_gone(actor: str, pid: Any) -> bool:
    """Whether the process of actor ``actor`` that ran a stop (``pid``) is gone: the actor dead or restarting, or
    alive in another process (restarted). One the GCS does not know is alive (unknown)."""
    from ray._private import state

    info = state.actors(actor_id=actor)
    if not info:
        return False
    return info.get("State") in ("DEAD", "RESTARTING") or (info.get("State") == "ALIVE" and info.get("Pid") != pid)


def _jobs() -> list[dict[str, Any]]:
    """The Ray jobs the GCS knows (``JobID``, ``IsDead``, ``DriverPid``)."""
    from ray._private import state

    return state.jobs()


def describe(rec: dict[str, Any]) -> str:
    """Who runs the stop ``rec``, for a message."""
    if not rec:
        return "another process"
    since = time.time() - float(rec.get("at") or time.time())
    return f"pid {rec.get('pid')} on {rec.get('host')}, for {since:.0f} s"


def take_stop(engine: str, layout: dict | None, wait_s: float = 0.0,
              waiting: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Mark ``engine`` as being stopped by this process, with ``layout`` (the engine's, None when it is gone), and
    return the mark's record: this process runs the stop. When another stop holds the mark, call ``waiting`` with
    its record once and wait up to ``wait_s`` for it to end: None once it has (the engine is stopped), or at
    once with ``wait_s`` 0. A stopper found dead is taken over: the record returned then carries its layout and
    ``taken_over`` (its own record). No Ray: a record all the same (nothing to share the stop with). Raises
    ``TimeoutError`` when the other stop is still under way after ``wait_s``."""
    kv, mine = _kv(), _me(layout)
    end, seen = time.monotonic() + wait_s, False
    while mine["job"] is not None:
        try:
            if not seen and not kv._internal_kv_put(_key(engine), pickle.dumps(mine), overwrite=False,
                                                    namespace=_NS):
                return mine
            rec = read_stop(engine)
        except Exception:  # Ray is going down: no other stop can be told apart
            return mine
        if rec is None:
            published = _published(engine) if seen else None
            if seen and published is None:  # the stop waited for has ended: the engine with it
                return None
            # It ended between the put and the read, or gave its mark up before its first kill (``release_stop``:
            # the engine runs on, its layout published): the mark is free again. Read as the end of a stop, the
            # engine was said stopped (exit 0) and an owner's ``stop()`` killed nothing.
            mine["layout"] = mine["layout"] or published
            seen = False
            continue
        if stopper_gone(rec) and _take_over(engine, mine, rec):
            return mine
        if not seen and waiting is not None:
            waiting(rec)
        seen = True
        if time.monotonic() >= end:
            if wait_s <= 0:
                return None
            raise TimeoutError(f"the stop of engine {engine!r} by {describe(rec)} has not ended within {wait_s:.0f} s")
        time.sleep(WAIT_POLL_S)
    return mine


def _published(engine: str) -> dict | None:
    """The layout ``engine`` publishes (its stop has not begun killing), None when none is or Ray does not answer."""
    from actors._peer import read_layout  # (it imports this module)

    try:
        return read_layout(engine)
    except Exception:  # Ray is going down: nothing left to stop
        return None


def _take_over(engine: str, mine: dict[str, Any], dead: dict[str, Any]) -> bool:
    """Take over the stop ``dead`` (its stopper's process is gone) if no other process has: the first to mark its
    token does, and writes its own record over the mark; the others see a live stopper and wait for it."""
    kv, token = _kv(), f"{_key(engine)}#{dead.get('token')}"
    if kv._internal_kv_put(token, b"1", overwrite=False, namespace=_NS):
        return False  # another process took it over
    if ((read_stop(engine) or {}).get("token")) != dead.get("token"):
        # Another took it over and finished it while this one read the jobs table (its token's mark gone with
        # its clean): marked again here, the name free or started anew, the dead stop ran twice, by its layout.
        kv._internal_kv_del(token, namespace=_NS)
        return False
    mine["layout"] = mine["layout"] or dead.get("layout")
    mine["kept"] = dead.get("kept")
    mine["taken_over"] = {k: v for k, v in dead.items() if k != "layout"}
    kv._internal_kv_put(_key(engine), pickle.dumps(mine), overwrite=True, namespace=_NS)
    log.warning("engine %s: its stop by %s died mid-way (its Ray job %s is dead); this process (pid %d) takes "
                "the stop over", engine, describe(dead), dead.get("job"), os.getpid())
    return True


def note_kept(engine: str, path: str) -> None:
    """Say in this process's mark of the stop of ``engine``, before the ledger is kept in ``path``, where it is: a
    stop that takes this one over finds it written and does not keep the same items twice."""
    try:
        rec = read_stop(engine) if _ray_up() else None
        if rec and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
            rec["kept"] = path
            _kv()._internal_kv_put(_key(engine), pickle.dumps(rec), overwrite=True, namespace=_NS)
    except Exception:  # Ray going down: no stop can take this one over
        pass


def kept_already(rec: dict[str, Any] | None) -> str | None:
    """The file a dead stopper kept the ledger in, when it was written whole (``os.replace``: there or not) and
    can be seen from here; None otherwise (the ledger is then kept again: each item counts once, by its marker)."""
    path = (rec or {}).get("kept")
    return path if path and Path(path).exists() else None


def release_stop(engine: str, claim: dict[str, Any]) -> None:
    """Give up the mark ``claim`` of a stop that stopped nothing (it failed before its first kill), if it is still
    this one's: left, the next stop would wait for a live stopper that is not stopping."""
    try:
        rec = read_stop(engine) if _ray_up() else None
        if rec and rec.get("token") == claim.get("token"):
            _kv()._internal_kv_del(_key(engine), namespace=_NS)
    except Exception:  # Ray is going down: nothing to give up
        pass


def drop_marks(engine: str) -> None:
    """Remove the marks of stops taken over (``<engine>:stopping#<token>``) with the stop's own, at its end."""
    kv = _kv()
    for key in kv._internal_kv_list(f"{_key(engine)}#", namespace=_NS):
        kv._internal_kv_del(key, namespace=_NS)
