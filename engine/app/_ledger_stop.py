"""A Redis budget ledger's outbox at an engine's stop, whoever stops it: its own driver (``Engine.stop``,
``shutdown``) or another process by its name (``Engine.stop_named``, ``smartbatch stop --name``). Both keep what
Redis has not taken in the same file, under the directory the engine's start resolved (``ledger_home``, published
in its layout), which the next engine on that ledger takes back (``actors._budget_kept``).

Only a driver's own stop kept it: ``stop_named`` killed the budget controller with what waited for Redis in it,
the spend of those settlements and charges counted by no ledger (a hard budget passable unseen).
"""

from __future__ import annotations

import time
from typing import Any

from engine.core._logkeys import get_logger

__all__ = ["keep_ledger", "keep_named", "ledger_home", "outlive_stop", "stop_claimed", "stop_left_s"]

log = get_logger("smartbatch.driver")


def ledger_home(settings) -> str | None:
    """Where the stops of an engine on ``settings`` keep what its Redis ledger has not taken (None: no Redis
    ledger), resolved by the process that starts it: a stop from another shell (``smartbatch stop --name``, with
    another ``$XDG_STATE_HOME``, working directory or home) kept it where the next ``serve`` of that engine, started
    as the first was, would not look."""
    if not settings.budgets.redis_url:
        return None
    from actors._budget_kept import kept_dir

    return str(kept_dir(settings).absolute())


def keep_ledger(ray: Any, engine: str, budget, dispatchers: list, settings, where: str | None = None
                ) -> dict[str, Any] | None:
    """Once ``dispatchers`` have cancelled what the stop cut short (``kill_engine``): have them say the ledger
    took what they settled, then keep what its Redis has not taken (``keep_left``, in ``where``). Returns what
    was left (None: nothing; no Redis ledger)."""
    from actors._budget_kept import keep_left
    from engine.app._driver_report import LAST_REPORT_S, _through_restarts

    if budget is None:
        return None
    try:
        _through_restarts(ray, lambda: [d.spend_told.remote() for d in dispatchers], time.monotonic() + LAST_REPORT_S)
    except Exception as exc:
        log.warning("engine %s: settlements not all told to the ledger at its stop (%s)", engine, type(exc).__name__)
    return keep_left(ray, budget, settings, engine, where)


def keep_named(ray: Any, engine: str, layout: dict) -> dict[str, Any] | None:
    """``keep_ledger`` for a stop by name: the actors found by their names, the settings and directory its layout
    (read before the stop removed it) published."""
    from actors.remote import NAMESPACE, actor_name

    def actor(kind: str):
        try:
            return ray.get_actor(actor_name(engine, kind), namespace=NAMESPACE)
        except ValueError:  # gone already: nothing to ask
            return None

    kinds = layout.get("kinds", [])
    dispatchers = [d for k in kinds if k.startswith("dispatcher-") and (d := actor(k)) is not None]
    settings = layout["settings"]
    return keep_ledger(ray, engine, actor("budget") if "budget" in kinds else None, dispatchers, settings,
                       layout.get("ledger_dir") or ledger_home(settings))


def stop_claimed(ray: Any, engine: str, claim: dict) -> int:
    """The stop of ``engine`` by name whose mark this process holds (``actors._stop_claim.take_stop``): its own,
    or one it took over from a stopper that died, with the layout that stopper read (the engine's is gone by
    then). Returns how many actors were stopped."""
    from actors.remote import kill_engine

    layout = claim.get("layout")
    keep = (lambda: keep_named(ray, engine, layout)) if layout else None
    return kill_engine(engine, at_ledger=keep, claim=claim)


def take_over_dead(ray: Any, engine: str) -> bool:
    """Finish the stop of ``engine`` whose stopper's process died mid-way (``kill -9``), unless a live process
    runs it: True once it is finished here (or no stop was under way)."""
    from actors._stop_claim import read_stop, stopper_gone, take_stop

    rec = read_stop(engine)
    if rec is None:
        return True
    if not stopper_gone(rec):
        return False
    claim = take_stop(engine, None)  # (another process may take it over first: then it is that one's)
    if claim is None:
        return read_stop(engine) is None
    stop_claimed(ray, engine, claim)
    return True


def stop_wait_s(layout: dict | None) -> float:
    """How long a stop by name waits for another stop of the same engine (``stop_left_s`` of its settings, as its
    layout says; a minute and a half without one)."""
    settings = (layout or {}).get("settings")
    return stop_left_s(settings) if settings is not None else 90.0


def stop_left_s(settings) -> float:
    """At most how long a stop of an engine on ``settings`` runs once it has removed the engine's layout: the
    dispatchers' cancel (asked again once after a restart), their settlements told, the ledger's ``leave`` (a
    Redis ledger; asked again after a restart), and the wait for the killed actors' death."""
    from actors._budget_kept import leave_call_s
    from actors._engine_stop import DEATH_WAIT_S
    from actors._stop_dispatchers import RESTART_AT_STOP_S, STOP_CALL_S
    from engine.app._driver_report import LAST_REPORT_S

    ledger = leave_call_s(settings) + RESTART_AT_STOP_S if settings.budgets.redis_url else 0.0
    return 2 * STOP_CALL_S + RESTART_AT_STOP_S + LAST_REPORT_S + ledger + DEATH_WAIT_S


def outlive_stop(engine: str, limit_s: float, leave) -> bool:
    """Wait until the stop of ``engine`` under way elsewhere (``smartbatch stop --name``: its layout gone) has
    ended (``actors._peer.stopping``), at most ``limit_s`` or until ``leave`` (a ``threading.Event``) is set: a
    ``serve`` that stops its own Ray waits for it. It stopped Ray as the layout went, while that stop waited for
    the ledger's Redis: the budget controller died with what waited for Redis, kept in no file, and the stop
    waited a minute for the dead GCS, then failed. A stop whose process died is taken over (``take_over_dead``).
    True once the stop has ended (or none was under way)."""
    import ray

    from actors._peer import RESTART_POLL_S, stopping

    end = time.monotonic() + limit_s
    while stopping(engine):
        if take_over_dead(ray, engine):  # its stopper killed outright: what it had not done is done here
            return True
        if leave.is_set() or time.monotonic() >= end:
            return False
        leave.wait(RESTART_POLL_S)  # the mark is a key in Ray's store: no event says it went
    return True
