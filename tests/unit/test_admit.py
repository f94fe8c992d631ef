"""A driver's admission (``engine.app._driver_admit``) when two submits of one (tenant, id) wait for room at once:
the wait lets the lock go, and a fault hunt found the second one queued again under a second future, sent twice,
never resolved and holding its room for good (with other content: billed once, answered to nobody). A stand-in
engine with the driver's admission state; no Ray."""

from __future__ import annotations

import collections
import threading

import pytest

from engine.app._driver_admit import Admitting, admission_lock
from engine.core.errors import RequestError
from engine.core.request import Request
from engine.core.result import Result


class _Room(threading.Condition):
    """The driver's condition, telling the test how many submits wait on it (an event, not a sleep)."""

    def __init__(self, lock):
        super().__init__(lock)
        self.waiting = 0
        self.changed = threading.Condition()

    def wait(self, timeout=None):
        with self.changed:
            self.waiting += 1
            self.changed.notify_all()
        try:
            return super().wait(timeout)
        finally:
            with self.changed:
                self.waiting -= 1


class Admit(Admitting):
    def __init__(self, max_pending: int):
        self.name, self._owner, self._running, self._gone, self._h = "t", True, True, None, {}
        self._futs, self._pending, self._max_pending = {}, 0, max_pending
        self._overload, self._submit_timeout_s = "block", 30.0
        self._lock = admission_lock()[0]  # as Engine.__init__
        self._room = _Room(self._lock)
        self._buffer, self._finished, self._idle, self._wake = [], collections.deque(), False, threading.Event()

    def submit(self, r: Request):
        with self._lock:
            return self._admit([r])[0][0]


def req(rid: str, prompt: str = "Name three rivers.") -> Request:
    return Request.model_validate({"id": rid, "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": prompt})


def two_submits_waiting_for_room(eng: Admit, first: Request, second: Request) -> list:
    filler = eng.submit(req("filler"))
    out: list = [None, None]

    def submit(k, r):
        try:
            out[k] = eng.submit(r)
        except RequestError as exc:
            out[k] = exc

    threads = [threading.Thread(target=submit, args=(k, r)) for k, r in enumerate((first, second))]
    for t in threads:
        t.start()
    with eng._room.changed:  # both wait for room before any is let in
        assert eng._room.changed.wait_for(lambda: eng._room.waiting == 2, timeout=10)
    eng._resolve(filler, Result(id="filler", tenant="default", status="ok"))
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return out


def test_two_submits_of_one_id_that_waited_for_room_get_one_future_and_queue_it_once():
    eng = Admit(max_pending=1)
    a, b = two_submits_waiting_for_room(eng, req("x"), req("x"))
    assert a is b  # the same future, as a repeated id always gets
    assert [r.id for r in eng._buffer] == ["filler", "x"] and eng._pending == 1
    eng._resolve(a, Result(id="x", tenant="default", status="ok"))
    assert a.result(timeout=0).status == "ok" and eng._pending == 0  # its room is free again


def test_a_second_submit_of_one_id_with_other_content_that_waited_for_room_is_refused_naming_the_id():
    eng = Admit(max_pending=1)
    out = two_submits_waiting_for_room(eng, req("x"), req("x", "Name three lakes."))
    (fut,) = [o for o in out if not isinstance(o, RequestError)]
    (err,) = [o for o in out if isinstance(o, RequestError)]
    assert err.field == "id" and "other content" in str(err)
    assert [r.id for r in eng._buffer] == ["filler", "x"] and eng._pending == 1
    assert eng._futs[fut._req.uid] is fut


@pytest.mark.parametrize("overload", ["block", "raise"])
def test_one_call_repeating_an_id_queues_it_once(overload):
    eng = Admit(max_pending=10)
    eng._overload = overload
    with eng._lock:
        futs, queued = eng._admit([req("x"), req("y"), req("x")])
    assert queued and futs[0] is futs[2] and futs[0] is not futs[1]
    assert [r.id for r in eng._buffer] == ["x", "y"] and eng._pending == 2


def test_a_result_is_seen_only_once_its_place_is_free_so_the_next_submit_finds_room():
    """CI of stop 67: a driver awaited one request's result, then submitted with ``overload="raise"`` and was
    refused, the finished request still holding its place (freed just after its result was set). A done-callback
    runs inside the setting of the result, so it sees what any caller woken by the result could see."""
    eng = Admit(max_pending=1)
    eng._overload = "raise"
    first = eng.submit(req("a"))
    seen: list = []
    first.add_done_callback(lambda f: seen.append((eng._pending, eng.submit(req("b")))))
    eng._resolve(first, Result(id="a", tenant="default", status="ok"))
    ((pending, nxt),) = seen
    assert pending == 0 and not nxt.done() and eng._pending == 1  # "b" took the freed place
    eng._resolve(first, Result(id="a", tenant="default", status="failed", error="late"))  # a second resolution
    assert eng._pending == 1 and first.result(timeout=0).status == "ok"  # neither counted nor set again


def test_two_threads_resolving_one_future_free_its_place_once():
    eng = Admit(max_pending=2)
    a, _b = eng.submit(req("a")), eng.submit(req("b"))
    go = threading.Barrier(2)

    def resolve():
        go.wait(10)
        eng._resolve(a, Result(id="a", tenant="default", status="ok"))

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert eng._pending == 1 and a.result(timeout=0).status == "ok"


def test_a_future_whose_retention_ends_while_its_result_is_being_set_is_still_forgotten():
    """A result's place is freed and its retention starts under the lock, and its future is set just after
    (``_resolve``). The check thread's ``_forget_finished`` looking in between found the future not done and dropped
    its entry without forgetting it: its id stayed taken for good (other content under it refused, ingest never
    told), and its future and result were held for the driver's life."""
    from engine.app._future import ResultFuture
    from engine.app.driver import Engine

    eng = Admit(max_pending=2)
    eng._retention_s = -1.0  # retention past at once, with no clock tick needed
    forgot: list = []
    eng._forget = lambda reqs: forgot.extend(r.uid for r in reqs)

    class ForgetBetween(ResultFuture):
        def set_result(self, result) -> None:
            Engine._forget_finished(eng)  # the check thread looks between the claim and the result
            super().set_result(result)

    r = req("a")
    fut = eng._futs[r.uid] = ForgetBetween(r, eng)
    eng._pending = 1
    eng._resolve(fut, Result(id="a", tenant="default", status="ok"))
    Engine._forget_finished(eng)  # its next look
    assert r.uid not in eng._futs and forgot == [r.uid] and fut.result(timeout=0).status == "ok"


def test_an_interrupt_between_the_claim_and_the_result_still_sets_it():
    """``_resolve`` claims a future under the lock and sets its result once the lock is let go. A Ctrl-C landing in
    between (``_give_kept`` resolves a rerun's kept answers in the submitting thread, ``stop()`` fails the open ones
    in the caller's) left it claimed and never set: every later resolution found it claimed and returned, so its
    ``result()`` hung for good and the check thread, waiting for it to be set before forgetting it, forgot nothing
    after it again. Here the interrupt lands as the lock wakes the waiting submits."""
    eng = Admit(max_pending=2)
    fut = eng.submit(req("a"))

    def interrupted():
        raise KeyboardInterrupt

    eng._room.notify_all = interrupted
    with pytest.raises(KeyboardInterrupt):
        eng._resolve(fut, Result(id="a", tenant="default", status="ok"))
    assert fut.done() and fut.result(timeout=0).status == "ok" and eng._pending == 0
