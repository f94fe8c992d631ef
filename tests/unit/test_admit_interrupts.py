"""A Ctrl-C (a signal whose handler raises) that lands in a submit waiting for room (``engine.app._driver_admit``).
The real driver over fake handles (``test_admit_parts``); real signals, delivered to the main thread, where Python
runs handlers; no Ray."""

from __future__ import annotations

import signal
import threading

import pytest

from engine.core.result import Result

from .test_admit_parts import _Room


def _d(rid: str) -> dict:
    return {"id": rid, "model": "gpt-5.4-mini", "prompt": f"hi {rid}"}


def test_a_ctrl_c_that_lands_as_a_wait_for_room_takes_the_lock_back_leaves_the_lock_to_its_holder(monkeypatch):
    """Woken, a wait for room takes the engine's lock back (``Condition.wait``); where another thread holds it then
    (the result thread resolving, another submit), the wait blocks on it, and a signal there made the acquire raise
    without the lock (CPython interrupts a plain lock's acquire). The submit's ``with`` block then released the lock
    of the thread that held it: that thread ran on unguarded beside the others, and its own release raised
    ``RuntimeError`` (in the result thread, that thread's end: no result delivered after it). Seen with two Ctrl-Cs
    in a loop of ``submit_many`` (the second as the first is handled), or one as results stream in. The lock is
    taken back whatever lands now; the Ctrl-C reaches the caller once it is."""
    from tests.unit.test_driver_tour import _bulk_engine

    assert threading.current_thread() is threading.main_thread()  # (Python runs handlers in it alone)
    e = _bulk_engine(monkeypatch)
    e._max_pending = 1
    filler = e.submit(_d("filler"))
    e._room = room = _Room(e._lock)
    main, caught, errors = threading.get_ident(), threading.Event(), []

    def ctrl_c(*_) -> None:
        if not caught.is_set():
            raise KeyboardInterrupt

    def holder() -> None:
        with room.seen:  # the submit waits for room, the lock let go
            assert room.seen.wait_for(lambda: room.begun > 0, timeout=10)
        try:
            with e._lock:  # held as the submit, woken, waits to take it back
                room.notify_all()
                for _ in range(150):  # Ctrl-Cs until one lands there (a bound, if none can interrupt it)
                    signal.pthread_kill(main, signal.SIGUSR1)
                    if caught.wait(0.002):
                        break
        except RuntimeError as exc:  # its release, of a lock let go under it
            errors.append(exc)

    previous = signal.signal(signal.SIGUSR1, ctrl_c)
    t = threading.Thread(target=holder)
    try:
        t.start()
        with pytest.raises(KeyboardInterrupt):
            e.submit_many([_d("a"), _d("b")])
    finally:
        caught.set()
        t.join(10)
        signal.signal(signal.SIGUSR1, previous)
    assert not t.is_alive() and errors == [], errors
    assert e._lock.acquire(blocking=False)  # free, held by none
    e._lock.release()
    e._resolve(filler, Result(id="filler", tenant="default", status="ok"))  # (a result thread's resolve goes on)
    assert e._pending == 0 and filler.result(0).status == "ok"


class _CtrlCAfterUpdate(dict):
    """The driver's futures by id, whose next ``update`` is followed by a Ctrl-C: Python runs a signal's handler as a
    call returns, so one that landed during the update raises just after it."""

    armed = False

    def update(self, *args, **kw) -> None:
        super().update(*args, **kw)
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def test_a_ctrl_c_as_a_submit_registers_its_futures_leaves_a_call_waiting_for_room_to_take_them():
    """A call let in by parts learns, after each wait, which of its ids another submit queued meanwhile (its inbox,
    fed by ``_queue``). The inboxes were fed after the futures were registered: a Ctrl-C between (as the
    registration's call returned) left a waiting call blind to them, and it queued the same id again under a
    future of its own, which replaced the first in the driver: the id sent twice, and the first future never
    resolved nor freed its room (``_pending`` 1 for good)."""
    from engine.app._future import ResultFuture

    from .test_admit import Admit, req
    from .test_admit_parts import _by_parts, _resolve_open

    eng = Admit(max_pending=1)
    eng._futs = futs = _CtrlCAfterUpdate()
    filler = eng.submit(req("filler"))
    x = req("x")
    theirs: list = []

    def another_submit_interrupted() -> None:  # as the call waits: another thread's submit of "x", cut by a Ctrl-C
        if theirs:
            return
        theirs.append(ResultFuture(x, eng))
        futs.armed = True
        with pytest.raises(KeyboardInterrupt), eng._lock:
            eng._queue([x], {x.uid: theirs[0]})

    def submit_many():
        with eng._lock:
            return eng._admit([req("y"), x])[0]

    got, _ = _by_parts(eng, submit_many, at_wait=another_submit_interrupted)
    assert not isinstance(got, BaseException), got
    assert [r.id for r in eng._buffer].count("x") == 1, [r.id for r in eng._buffer]
    assert got[1] is theirs[0] and eng._futs[x.uid] is theirs[0]  # one future for "x", the first
    _resolve_open(eng)
    assert filler.done() and theirs[0].done() and eng._pending == 0, eng._pending
