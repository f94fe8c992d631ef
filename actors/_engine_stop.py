"""The engine's stop: every actor killed, the dispatchers last (they cancel the provider batches under way and
settle what the stop cut short), the budget controller after them (``actors.remote`` re-exports ``kill_engine``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

import ray

from actors._dispatch_outbox import SPEND_WAIT_S
from actors._peer import (
    ClockRef,
    read_layout,
    resolve_clock,
    unpublish_clock,
    unpublish_layout,
)
from actors._stop_claim import describe, kept_already, release_stop, take_stop
from actors._stop_cut import cut_unsent
from actors._stop_dispatchers import _cancel_batches
from actors._stop_left import Left, cancel_left
from engine.core._logkeys import get_logger
from engine.core.errors import SmartbatchError

__all__ = ["kill_engine"]

log = get_logger("smartbatch.engine")
DEATH_WAIT_S = 2.0  # how long a stop waits for its killed actors to be dead before it cleans Ray's store again
DEATH_POLL_S = 0.02  # how often it reads the GCS for one whose ping was answered (its kill not landed yet)
GCS_ANSWER_S = 0.5  # and past that bound, how long its last reads get (about 1 ms an actor on a quiet machine)
JOURNAL_COPY_S = 2.0  # how long it waits for the hub's copy of its journal (``_journal_copy``)


def kill_engine(engine: str, handles: list | None = None, dispatchers: Mapping | Iterable | None = None,
                budget=None, at_ledger: Callable[[], None] | None = None, *, claim: dict | None = None,
                wait_s: float = 0.0, waiting: Callable[[dict], None] | None = None,
                on_left: Callable[[str, Left], None] | None = None) -> int:
    """Stop every actor of engine ``engine`` (the given handles, else those its layout names) and remove what it
    published. Returns how many actors were stopped. Its dispatchers (``dispatchers``, else those of the layout)
    go last: once the others are gone (so no driver takes what they publish for an answer), they cancel the
    provider batches under way (``CANCEL_CALL_S`` for the cancels to go out). Killed with the engine, a batch ran
    on at the provider and was billed in full for results nobody would read. The budget controller (``budget``,
    else the layout's) goes with them, after: the dispatchers settle there what the stop cut short (possibly
    billed, at its bound), then ``at_ledger`` runs (the driver keeps what its Redis has not taken). Killed with
    the others, it took none of those settlements: their spend was counted by no ledger, and their claims held
    their room until ``reservation_ttl_s``. ``dispatchers`` by provider (a mapping) names them in the log. One
    whose process dies in its cancel, or just before, is asked again once Ray has restarted it
    (``_stop_restarted``), with the engine's clock and a copy of the hub's journal, read here before the stop
    removes them; one not back in time has its batches cancelled by this process (``actors._stop_left``), and
    ``on_left(name, Left)`` is told what that did.

    One stop at a time (``actors._stop_claim``): ``claim``, this process's mark of the stop (``take_stop``), else
    taken here; while another stop holds it, ``waiting`` is told and the stop waits up to ``wait_s`` for it, then
    returns 0 (that stop stops the engine). One whose stopper died is taken over, with the layout it stopped; the
    ledger it kept already (its file written whole) is not kept again."""
    if claim is None:
        try:
            layout = read_layout(engine)
        except Exception:  # no Ray answering: nothing to share the stop with
            layout = None
        said = waiting or (lambda rec: log.warning("engine %s: a stop of it is already under way (%s); %s", engine,
                                                   describe(rec), "waiting for it to end" if wait_s > 0 else
                                                   "the engine is left to it"))
        try:
            claim = take_stop(engine, layout, wait_s, said)
        except TimeoutError as exc:  # that stop goes on: killing its actors under it was the race
            log.warning("engine %s: not stopped here: %s", engine, exc)
            return 0
        if claim is None:
            return 0
    if claim.get("taken_over") and (kept := kept_already(claim)) is not None:
        log.warning("engine %s: the stop taken over had kept its ledger's leftovers in %s; not kept again", engine,
                    kept)
        at_ledger = None
    if handles is None:
        try:
            handles, dispatchers, budget = _by_layout(engine, claim.get("layout") or {"kinds": []})
        except BaseException:  # nothing stopped: its mark left, this live process blocked the name (and itself)
            if not claim.get("taken_over"):  # (a dead one's: kept, its layout is what finds its actors)
                release_stop(engine, claim)
            raise
    last = _named_dispatchers(dispatchers)
    ledger = [budget] if budget is not None else []
    rest = [h for h in handles if h not in last.values() and h not in ledger]
    n = None
    try:  # a Ctrl-C from here still kills them all: in the journal's copy's wait (before it), it left every one running
        # What a dispatcher Ray restarts in the stop needs, read before the stop removes it (``_stop_restarted``).
        clock = resolve_clock(ClockRef(engine))[0]
        copy = _journal_copy(engine) if last else None
        # Before the layout goes: what the groupers held, never sent, named for the drivers that see it gone, so
        # they can tell it from what the stop cuts under way, possibly billed (``actors._stop_cut``).
        _cut_unsent(engine, claim.get("layout"))
        # First: drivers attached to it see it gone rather than a half-stopped engine. Its journals in Ray's store
        # stay until the controller is dead (``_clean_once_dead``): one that dies in the stop reads them back. A
        # ``serve`` that sees it gone waits for the stop's end (the claim's mark) before it stops its Ray.
        unpublish_layout(engine)
        n = _kill(rest)
        left = _left_of(engine, claim.get("layout"), copy, budget, on_left, last)
        for step, what in ((lambda: _cancel_batches(engine, last, clock, copy, left), "cancel"),
                           (at_ledger, "keeping of its ledger")):
            try:  # each on its own: a failed cancel skipped the ledger's keeping (kept in no file, a review)
                if step is not None:
                    step()
            except Exception as exc:  # the actors go all the same (and on a Ctrl-C, below)
                log.error("engine %s: the stop's %s failed (%s: %s)", engine, what, type(exc).__name__,
                          str(exc)[:200])
    finally:  # (a Ctrl-C too: it left before the second clean, and the ledger's copy stayed in Ray's store)
        try:  # one call: a second Ctrl-C in the controller's kill skipped the dispatchers' (``_kill``)
            n = (n or 0) + _kill([*(rest if n is None else ()), *ledger, *last.values()])
        finally:
            _clean_once_dead(engine, [*rest, *ledger, *last.values()])
    return n


def _cut_unsent(engine: str, layout: dict | None) -> None:
    """Have the groupers and dispatchers of ``engine`` (by the kinds ``layout`` names, else the published one's) end
    what they hold unsent and publish what was never sent (``cut_unsent``). Any failure names nothing: those stay
    "may have been billed"."""
    from actors.remote import NAMESPACE, actor_name  # (it imports this module)

    try:
        kinds = (layout or read_layout(engine) or {}).get("kinds", [])
        found: dict[str, list] = {"grouper-": [], "dispatcher-": []}
        for kind in kinds:
            if (at := next((k for k in found if kind.startswith(k)), None)) is not None:
                try:
                    found[at].append(ray.get_actor(actor_name(engine, kind), namespace=NAMESPACE))
                except ValueError:  # already gone
                    pass
        cut_unsent(engine, found["grouper-"], dispatchers=found["dispatcher-"])
    except SmartbatchError as exc:  # its mark or list not written: which key, which Ray, the fix (ours to show)
        log.warning("%s", exc)
    except Exception as exc:  # no Ray answering: nothing known for sure
        log.warning("engine %s: the stop could not say what it cut unsent (%s)", engine, type(exc).__name__)


def _by_layout(engine: str, layout: dict) -> tuple[list, dict, object]:
    """The actors of ``engine`` still alive, found by the kinds ``layout`` names: all, the dispatchers by kind, and
    the budget controller (None: gone)."""
    from actors.remote import NAMESPACE, actor_name  # (it imports this module)

    handles, dispatchers, budget = [], {}, None
    for kind in layout["kinds"]:
        try:
            h = ray.get_actor(actor_name(engine, kind), namespace=NAMESPACE)
        except ValueError:  # already gone
            continue
        handles.append(h)
        if kind.startswith("dispatcher-"):
            dispatchers[kind] = h
        elif kind == "budget":
            budget = h
    return handles, dispatchers, budget


def _clean_once_dead(engine: str, killed: list) -> None:
    """Remove what ``engine`` published again once ``killed`` are dead (a kill lands later): the budget
    controller's copy of its ledger, written after the first clean, outlived the engine in Ray's store."""
    try:
        _wait_dead(engine, killed)
    finally:  # (a Ctrl-C in the wait: cleaned all the same)
        unpublish_clock(engine)


def _wait_dead(engine: str, killed: list) -> None:
    """Wait up to ``DEATH_WAIT_S`` for Ray's GCS to say each of ``killed`` is dead. A ping answered is no death:
    ``ray.kill`` sends the kill to the GCS and returns, and a ping sent after it can be answered by the actor
    before the kill lands (1 of 75 pings on a quiet machine; the dispatchers, killed last, were not waited for at
    all). One still alive at the bound (a kill Ray refused, taken for "already gone") is killed again and named.
    The GCS's reads run beside the stop (``_dead_by``): one waits for a stalled GCS with no bound of its own."""
    if not killed:
        return
    end = time.monotonic() + DEATH_WAIT_S
    try:  # the pings fail as the deaths land: no poll where the kills are quick
        ray.wait([h.ping.remote() for h in killed], num_returns=len(killed), timeout=DEATH_WAIT_S)
    except Exception:  # Ray is going down: nothing is left to wait for
        return
    left = _dead_by(killed, end)
    if left is None:
        log.warning("engine %s: Ray's GCS did not answer within %.0f s: the deaths of the %d actor(s) the stop killed "
                    "are unconfirmed", engine, DEATH_WAIT_S, len(killed))
    elif left:
        _kill(left)
        log.warning("engine %s: %d actor(s) still alive %.0f s after the stop killed them, killed again: %s",
                    engine, len(left), DEATH_WAIT_S, ", ".join(_actor_id(h) for h in left))


def _dead_by(killed: list, end: float) -> list | None:
    """Those of ``killed`` Ray's GCS has not said dead by ``end`` (monotonic); None if it did not answer by then.
    Read in a thread of its own, waited for until ``end``: a read of the actor table waits for a stalled GCS
    with no bound (Ray 2.60, the GCS stopped: 75 s, as long as the stall, where ``ray.kill`` returned at once), and
    in it the stop hung past ``DEATH_WAIT_S``, deaf to a Ctrl-C (a review of stop 80)."""
    box: dict = {}

    def read() -> None:
        try:
            left = [h for h in killed if _alive(h)]
            while left and time.monotonic() < end:
                time.sleep(DEATH_POLL_S)  # (the GCS publishes a death to Ray's own subscribers alone)
                left = [h for h in left if _alive(h)]
            box["left"] = left
        except Exception:  # Ray is going down (or a client's, which cannot read it): nothing is left to wait for
            box["left"] = []

    reader = threading.Thread(target=read, name="smartbatch-stop-deaths", daemon=True)
    reader.start()
    reader.join(max(0.0, end - time.monotonic()) + GCS_ANSWER_S)  # (a Ctrl-C leaves the join at once)
    return box.get("left")


def _alive(h) -> bool:
    """Whether Ray's GCS has actor ``h`` in any state but dead (False for a stand-in of a unit test, or no Ray)."""
    actor_id = getattr(h, "_actor_id", None)
    if actor_id is None or not ray.is_initialized():
        return False
    from ray._private import state

    return state.actors(actor_id=actor_id.hex()).get("State", "DEAD") != "DEAD"


def _kill(handles: list) -> int:
    """Kill each of ``handles``; how many kills Ray took. A Ctrl-C in one (its kill asked again: it may land before
    Ray's call) is raised once every other is asked: it left the handles after it running (a second Ctrl-C in the
    budget controller's kill, the dispatchers never killed: their batches under way ran on, billed)."""
    n, interrupted = 0, None
    for h in handles:
        try:
            ray.kill(h, no_restart=True)
            n += 1
        except Exception:  # already gone: nothing to stop
            pass
        except BaseException as exc:
            interrupted = interrupted or exc
            try:  # asked again: one that lands in ray.kill's Python before Ray's call left it unasked (a second
                ray.kill(h, no_restart=True)  # kill of a dead actor is nothing; a review of stop 80)
            except BaseException:  # gone, or a Ctrl-C more: the death wait asks once more at its bound
                pass
    if interrupted is not None:
        raise interrupted
    return n


def _named_dispatchers(dispatchers: Mapping | Iterable | None) -> dict:
    """The dispatchers by the names the stop's log gives them: a mapping's keys (a driver's handles, by provider),
    else their actor ids."""
    if isinstance(dispatchers, Mapping):
        return {str(k) if str(k).startswith("dispatcher-") else f"dispatcher-{k}": d for k, d in dispatchers.items()}
    return {f"dispatcher {_actor_id(d)}": d for d in dispatchers or ()}


def _actor_id(h) -> str:
    try:
        return h._actor_id.hex()[:12]
    except AttributeError:  # (a stand-in of a unit test)
        return repr(h)


def _journal_copy(engine: str):
    """A reference to the records of hub shard 0's memory journal, taken before the stop kills the hub (empty
    where the journal is kept in Redis or under ``journal.dir``): a dispatcher Ray restarts in the stop reads its
    open batches there (``Recovery._recover_at_stop``). The reference is this driver's, so the copy outlives the
    hub; a dispatcher that was not restarted never reads it. None when the hub does not answer in time."""
    from actors.remote import NAMESPACE, actor_name  # (it imports this module)

    try:
        ref = ray.get_actor(actor_name(engine, "hub"), namespace=NAMESPACE).journal_copy.remote()
        ready, _ = ray.wait([ref], timeout=JOURNAL_COPY_S)
    except Exception:  # no hub (gone already), or no Ray: nothing to copy
        return None
    return ref if ready else None


def _left_of(engine: str, layout: dict | None, copy, budget, on_left: Callable[[str, Left], None] | None,
             dispatchers: dict | None = None) -> Callable[[str], Left]:
    """What the stop does for a dispatcher Ray did not bring back in time (``actors._stop_left``): its claims
    settled with ``budget``, which the stop keeps alive until the dispatchers are done; each (``dispatchers``, by
    name) killed for good once that has read what it will cancel (``cancel_left``'s ``going``)."""
    def settle(items: list) -> bool:
        if budget is None:
            return False
        ref = budget.settle_many.remote(items)
        ready, _ = ray.wait([ref], timeout=SPEND_WAIT_S)
        if ready:
            ray.get(ready[0])
        return bool(ready)

    def left(name: str) -> Left:
        d = (dispatchers or {}).get(name)
        out = cancel_left(engine, name, layout, copy, settle, (layout or {}).get("journal"),
                          None if d is None else lambda: _kill([d]))
        if on_left is not None:
            on_left(name, out)
        return out

    return left
