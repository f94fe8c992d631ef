"""The dispatchers' part of the engine's stop (``actors._engine_stop.kill_engine``): each cancels its provider
batches under way; one whose process died in its cancel (Ray restarts it) is asked again until it answers or a
bound passes, and what none reached is taken up by the stopping process itself (``actors._stop_left``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import ray

from actors._cancel import CANCEL_CALL_S
from actors._dispatch_outbox import SPEND_WAIT_S
from actors._peer import RESTART_POLL_S, restarting
from actors._stop_left import Left
from engine.core._logkeys import get_logger

__all__ = ["RESTART_AT_STOP_S", "STOP_CALL_S"]

log = get_logger("smartbatch.engine")
STOP_CALL_S = CANCEL_CALL_S + 5.0 + SPEND_WAIT_S  # how long the stop waits for its dispatchers' cancels (real s)
RESTART_AT_STOP_S = 10.0  # and, past that, for Ray to restart a dispatcher that died in its cancel (2 s seen)


def _cancel_batches(engine: str, dispatchers: dict, clock=None, copy=None,
                    left: Callable[[str], Left] | None = None) -> None:
    """Have ``dispatchers`` (by name) cancel their provider batches under way, and say what that left running.
    One whose process died in its cancel, or just before (Ray restarts it), is asked again (``_stop_restarted``):
    taken for one another stop had killed, its batches ran on at the provider, billed, counted by no ledger."""
    args = (clock, [copy] if copy is not None else None)  # (the copy's reference, left unresolved: rarely read)
    refs = {d.stop_spending.remote(*args): name for name, d in dispatchers.items()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=STOP_CALL_S)
    answers, died = [], []
    for ref in ready:
        try:
            answers.append(ray.get(ref))
        except ray.exceptions.RayActorError:  # killed by another driver's stop, or died in this one: told apart
            died.append(refs[ref])
        except Exception as exc:
            log.warning("engine %s: %s could not cancel its batches at the stop (%s)", engine, refs[ref],
                        type(exc).__name__)
    if died:
        answers += _stop_restarted(engine, {name: dispatchers[name] for name in died}, args, left)
    cancelled = missed = 0
    for open_, left in (a[:2] for a in answers):  # (its videos under way it logs itself)
        cancelled, missed = cancelled + open_ - left, missed + left
    if cancelled:
        log.warning("engine %s stopped with %d provider batch(es) under way: cancelled; what they finish before "
                    "the cancel takes effect is billed and not read (their members' claims settled at their bounds: "
                    "possibly_billed)", engine, cancelled)
    if missed or len(ready) < len(refs):
        log.warning("engine %s stopped with %d provider batch(es) that no cancel reached (and %d dispatcher(s) "
                    "not answering): they may run on, billed", engine, missed, len(refs) - len(ready))


def _stop_restarted(engine: str, dispatchers: dict, args: tuple,
                    left: Callable[[str], Left] | None = None) -> list[tuple]:
    """Ask ``dispatchers``, whose answer to the stop was their death, to stop spending again, until each answers
    or ``RESTART_AT_STOP_S`` + ``STOP_CALL_S`` pass: one Ray restarts (``max_restarts``) takes the call once it is
    back, reads its journal and cancels what it names (``Recovery._recover_at_stop``); one that is dead for good
    (another driver's stop killed it: nothing left to cancel) says so to a ping. Their answers; for each left
    unreached, ``left(name)`` cancels its batches from this process and names those it could not (without it,
    the dispatcher is named at ERROR). A restart is a new process that imports the package and the provider's
    SDK (about 2 s of CPU): on a loaded machine it took 37 s and more, past this bound (stop 81)."""
    give_up = time.monotonic() + RESTART_AT_STOP_S + STOP_CALL_S
    asked = {d.stop_spending.remote(*args): name for name, d in dispatchers.items()}
    answers, unreached = [], []
    while asked:
        ready, _ = ray.wait(list(asked), num_returns=1, timeout=max(0.0, give_up - time.monotonic()))
        if not ready:
            break
        name = asked.pop(ready[0])
        try:
            answers.append(ray.get(ready[0]))
            continue
        except ray.exceptions.RayActorError as exc:
            if not restarting(exc) and _gone(dispatchers[name], give_up):
                continue
        except Exception as exc:
            log.warning("engine %s: %s, restarted in the stop, could not cancel its batches (%s)", engine, name,
                        type(exc).__name__)
            continue
        if time.monotonic() + RESTART_POLL_S >= give_up:
            unreached.append(name)
            continue
        time.sleep(RESTART_POLL_S)  # restarting: Ray holds the call until it is back (a second, seen)
        asked[dispatchers[name].stop_spending.remote(*args)] = name
    if left is not None:  # (it says what it did, each batch by its id)
        _left_at_once(engine, left, [*asked.values(), *unreached])
        return answers
    for name in [*asked.values(), *unreached]:
        log.error("engine %s: %s died in the stop's cancel and was not back within %.0f s: its provider batches "
                  "under way may run on at the provider, billed and counted by no ledger, and its claims hold "
                  "their room until reservation_ttl_s", engine, name, RESTART_AT_STOP_S + STOP_CALL_S)
    return answers


def _left_at_once(engine: str, left: Callable[[str], Left], names: list[str]) -> None:
    """``left(name)`` for each of ``names`` at once, each in a thread (each bounded by ``actors._stop_left``): one
    after another, N dispatchers not back held the stop N times that bound (a review of stop 81)."""
    def one(name: str) -> None:
        try:
            left(name)
        except Exception as exc:  # (``on_left``'s): the others go on
            log.error("engine %s: the stop's own cancel of %s's batches failed (%s: %s)", engine, name,
                      type(exc).__name__, str(exc)[:200])

    threads = [threading.Thread(target=one, args=(n,), name=f"smartbatch-stop-left-{n}", daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:  # (a Ctrl-C leaves the join at once; the kills follow in ``kill_engine``)
        t.join()


def _gone(d, give_up: float) -> bool:
    """Whether dispatcher ``d`` is dead for good (its ping says so at once), not restarting."""
    try:
        ray.get(d.ping.remote(), timeout=max(0.1, min(RESTART_AT_STOP_S, give_up - time.monotonic())))
    except ray.exceptions.RayActorError as exc:
        return not restarting(exc)
    except Exception:  # not answering yet: restarting
        pass
    return False
