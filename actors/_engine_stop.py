"""The engine's stop: every actor killed, the dispatchers last (they cancel the provider batches under way and
settle what the stop cut short), the budget controller after them (``actors.remote`` re-exports ``kill_engine``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import ray

from actors._cancel import CANCEL_CALL_S
from actors._dispatch_outbox import SPEND_WAIT_S
from actors._peer import read_layout, unpublish_clock

__all__ = ["kill_engine"]

log = logging.getLogger("smartbatch.engine")
DEATH_WAIT_S = 2.0  # how long a stop waits for its killed actors to be dead before it cleans Ray's store again


def kill_engine(engine: str, handles: list | None = None, dispatchers: Iterable | None = None, budget=None,
                at_ledger: Callable[[], None] | None = None) -> int:
    """Stop every actor of engine ``engine`` (the given handles, else those its layout names) and remove what it
    published. Returns how many actors were stopped. Its dispatchers (``dispatchers``, else those of the layout)
    go last: once the others are gone (so no driver takes what they publish for an answer), they cancel the
    provider batches under way (``CANCEL_CALL_S`` for the cancels to go out). Killed with the engine, a batch ran
    on at the provider and was billed in full for results nobody would read. The budget controller (``budget``,
    else the layout's) goes with them, after: the dispatchers settle there what the stop cut short (possibly
    billed, at its bound), then ``at_ledger`` runs (the driver keeps what its Redis has not taken). Killed with
    the others, it took none of those settlements: their spend was counted by no ledger, and their claims held
    their room until ``reservation_ttl_s``."""
    if handles is None:
        from actors.remote import NAMESPACE, actor_name  # (it imports this module)

        layout = read_layout(engine) or {"kinds": []}
        handles, dispatchers = [], []
        for kind in layout["kinds"]:
            try:
                h = ray.get_actor(actor_name(engine, kind), namespace=NAMESPACE)
            except ValueError:  # already gone
                continue
            handles.append(h)
            if kind.startswith("dispatcher-"):
                dispatchers.append(h)
            elif kind == "budget":
                budget = h
    unpublish_clock(engine)  # first: drivers attached to it see it gone rather than a half-stopped engine
    last = list(dispatchers or ())
    ledger = [budget] if budget is not None else []
    rest = [h for h in handles if h not in last and h not in ledger]
    n = _kill(rest)
    try:
        for step, what in ((lambda: _cancel_batches(engine, last), "cancel"), (at_ledger, "keeping of its ledger")):
            try:  # each on its own: a failed cancel skipped the ledger's keeping (kept in no file, a review)
                if step is not None:
                    step()
            except Exception as exc:  # the actors go all the same (and on a Ctrl-C, below)
                log.error("engine %s: the stop's %s failed (%s: %s)", engine, what, type(exc).__name__,
                          str(exc)[:200])
    finally:  # (a Ctrl-C too: it left before the second clean, and the ledger's copy stayed in Ray's store)
        n += _kill(ledger) + _kill(last)
        _clean_once_dead(engine, [*rest, *ledger])
    return n


def _clean_once_dead(engine: str, killed: list) -> None:
    """Remove what ``engine`` published again once ``killed`` are dead (a kill lands later): the budget
    controller's copy of its ledger, written after the first clean, outlived the engine in Ray's store."""
    try:
        if killed:
            ray.wait([h.ping.remote() for h in killed], num_returns=len(killed), timeout=DEATH_WAIT_S)
    except Exception:  # Ray is going down: nothing is left to clean
        pass
    unpublish_clock(engine)


def _kill(handles: list) -> int:
    n = 0
    for h in handles:
        try:
            ray.kill(h, no_restart=True)
            n += 1
        except Exception:  # already gone: nothing to stop
            pass
    return n


def _cancel_batches(engine: str, dispatchers: list) -> None:
    """Have ``dispatchers`` cancel their provider batches under way, and say what that left running."""
    refs = [d.stop_spending.remote() for d in dispatchers]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_CALL_S + 5.0 + SPEND_WAIT_S)
    cancelled = missed = 0
    for ref in ready:
        try:
            open_, left = ray.get(ref)[:2]  # (its videos under way it logs itself)
        except ray.exceptions.RayActorError:  # stopped already (by another driver's stop): nothing to cancel
            continue
        except Exception as exc:
            log.warning("engine %s: a dispatcher could not cancel its batches at the stop (%s)", engine,
                        type(exc).__name__)
            continue
        cancelled, missed = cancelled + open_ - left, missed + left
    if cancelled:
        log.warning("engine %s stopped with %d provider batch(es) under way: cancelled; what they finish before "
                    "the cancel takes effect is billed and not read (their members' claims settled at their bounds: "
                    "possibly_billed)", engine, cancelled)
    if missed or len(ready) < len(refs):
        log.warning("engine %s stopped with %d provider batch(es) that no cancel reached (and %d dispatcher(s) "
                    "not answering): they may run on, billed", engine, missed, len(refs) - len(ready))
