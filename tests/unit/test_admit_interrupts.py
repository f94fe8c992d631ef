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

