"""A driver script's callbacks, stops and bulk calls, as a demanding user writes them (a helper's hunt of the driver
API, stop 77): a done-callback runs in the thread that delivers every result, so whatever it does there must
neither end that thread nor wait for it; a second ``stop()`` returns once the engine has stopped; a bulk call given
one request alone says so. The real driver code over fake handles (``test_driver_lanes._engine``); no Ray."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from engine.core.errors import ConfigError, Overloaded, RequestError
from engine.core.result import Result
from tests.unit.test_driver_lanes import _engine, _sent, req


class _Hub:
    """One hub shard whose first pull answers ``results`` and whose second ends the loop (the engine stops)."""

    def __init__(self, eng, results: list[Result]) -> None:
        self.eng, self.results, self.pull = eng, results, self

    def remote(self, *args):
        return "pull"

    def get(self, ref):
        if self.results:
            got, self.results = self.results, []
            return got
        self.eng._running = False
        return []


def _deliver(e, results: list[Result]) -> None:
    """Run the driver's own pull loop, in a thread of its own (``_puller``), over one pull of ``results``."""
    hub = _Hub(e, results)
    e._h["hubs"], e._ray = [hub], hub
    e._puller = threading.Thread(target=e._pull_loop)
    e._puller.start()
    e._puller.join(30)
    assert not e._puller.is_alive()


def test_a_done_callback_that_exits_leaves_the_result_thread_delivering_and_the_futures_other_callbacks_run(monkeypatch):
    """``sys.exit()`` in a callback (a script that ends the job at its first failure) ran in the result thread: it
    ended that thread, so every later result waited for good (the engine re-admitted them past their deadlines and
    nobody pulled), and the future's other callbacks (an ``asubmit`` awaiting it) never ran."""
    import sys

    e = _engine(monkeypatch)
    a, b = e.submit(req(1)), e.submit(req(2))
    seen: list[str] = []
    a.add_done_callback(lambda f: sys.exit(1))
    a.add_done_callback(lambda f: seen.append(f.result().id))
    _deliver(e, [Result(id="r1", status="ok"), Result(id="r2", status="ok")])
    assert seen == ["r1"]
    assert b.done() and b.result(0).id == "r2"
    assert e._pending == 0


def test_a_done_callback_that_waits_for_what_the_result_thread_delivers_is_refused_at_once(monkeypatch):
    """A callback chaining requests (``submit`` the next, then ``result()``), or one that calls ``drain()``, waited in
    the only thread that could deliver what it waited for: every result held for its timeout, or for good without
    one. A submit there that finds the engine full waited ``submit_timeout_s`` the same way. Each now raises at once,
    saying why; the callback's own request and the others are delivered."""
    e = _engine(monkeypatch)
    e._max_pending, e._submit_timeout_s = 2, 5.0
    a, b = e.submit(req(1)), e.submit(req(2))
    got: dict[str, object] = {}

    def chain(f) -> None:
        nxt = e.submit(req(3))  # the room a's result freed
        for what, call in (("result", lambda: nxt.result(timeout=5)), ("drain", lambda: e.drain(timeout_s=5)),
                           ("submit", lambda: e.submit(req(4)))):
            try:
                got[what] = call()
            except Exception as exc:  # noqa: BLE001 - the test reads what each raised
                got[what] = exc

    a.add_done_callback(chain)
    _deliver(e, [Result(id="r1", status="ok"), Result(id="r2", status="ok")])
    assert isinstance(got["result"], ConfigError) and "delivers results" in str(got["result"]), got
    assert isinstance(got["drain"], ConfigError) and "delivers results" in str(got["drain"]), got
    assert isinstance(got["submit"], Overloaded) and "done-callback" in str(got["submit"]), got
    assert b.done() and b.result(0).status == "ok"
    # From another thread the same wait is a wait, as ever.
    with pytest.raises(concurrent.futures.TimeoutError):
        e._futs[req(3).uid].result(timeout=0.01)


def test_a_stop_whose_failing_of_one_request_runs_a_callback_waiting_for_another_ends(monkeypatch):
    """``stop()`` fails what is open one request at a time, each one's callbacks in the stopping thread: a callback
    of one that waited for another's ``result()`` (an "after a, read b" script) waited for what only that same loop
    would fail next, and the stop hung for good. The wait is refused there as in the result thread."""
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    a, b = e.submit(req(1)), e.submit(req(2))
    got: list = []

    def read_b(_f) -> None:
        try:
            got.append(b.result(timeout=5))
        except Exception as exc:  # noqa: BLE001 - the test reads what result() raised
            got.append(exc)

    a.add_done_callback(read_b)
    stopping = threading.Thread(target=e.stop, daemon=True)
    stopping.start()
    stopping.join(30)
    assert not stopping.is_alive()
    assert len(got) == 1 and isinstance(got[0], ConfigError) and "stop() failing what is open" in str(got[0])
    assert b.done() and b.result(0).status == "failed"


def test_a_second_stop_from_another_thread_returns_once_the_engine_has_stopped(monkeypatch):
    """Two threads stop the engine (a watchdog and the ``with`` block's exit, a signal handler's thread): the
    second returned at once, while the first was still keeping the report and stopping the actors, and its
    ``report()`` said the report "could not be read then"."""
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    keeping, gate = threading.Event(), threading.Event()

    def keep_last_report() -> None:  # the first stop reads the report the engine keeps ...
        keeping.set()
        assert gate.wait(30)
        e._last_report = {"kept": True}

    monkeypatch.setattr(e, "_keep_last_report", keep_last_report)
    first = threading.Thread(target=e.stop)
    first.start()
    assert keeping.wait(30)  # ... and is in it
    second_done, second_saw = threading.Event(), []

    def second() -> None:
        e.stop()
        try:
            second_saw.append(e.report())
        except Exception as exc:  # noqa: BLE001 - the test reads what report() raised
            second_saw.append(exc)
        second_done.set()

    t = threading.Thread(target=second)
    t.start()
    returned_early = second_done.wait(0.3)  # a bound on a call that, fixed, must not return yet
    gate.set()
    first.join(30)
    t.join(30)
    assert not returned_early, second_saw
    assert second_saw == [{"kept": True}]


@pytest.mark.parametrize("given, said", [({"id": "one", "model": "gpt-5.4-mini", "prompt": "hi"}, "got one request"),
                                         ("abc", "got a str"), (None, "got a NoneType")])
def test_a_bulk_call_given_one_request_alone_or_no_iterable_is_refused_naming_requests(monkeypatch, given, said):
    """``submit_many(one_dict)`` read the dict as its keys: "a request is a dict (or a Request), got str", for the
    dict the user gave, and with ``on_invalid="reject"`` three rejected results (#0, #1, #2) and no error at all;
    ``submit_many(None)`` raised a bare TypeError. Refused whole now, nothing queued, in every bulk call."""
    from tests.unit.test_driver_tour import _bulk_engine

    e = _bulk_engine(monkeypatch)
    calls = [lambda: e.submit_many(given), lambda: e.submit_many(given, on_invalid="reject"),
             lambda: e.replay(given), lambda: asyncio.run(e.asubmit_many(given, on_invalid="reject")),
             lambda: asyncio.run(e.asubmit_futures(given))]
    for call in calls:
        with pytest.raises(RequestError, match=f"field 'requests': .*takes an iterable of requests.*{said}") as exc:
            call()
        assert exc.value.field == "requests"
    assert e._futs == {} and e._buffer == []
    with pytest.raises(RequestError, match="got list; several requests go to submit_many"):
        e.submit([{"id": "one", "model": "gpt-5.4-mini", "prompt": "hi"}])


def test_as_completed_wakes_for_an_awaitable_of_another_event_loop():
    """``as_completed`` takes any awaitable: one of another event loop (a task made in another thread's loop) was
    given a plain ``put_nowait`` callback, which ran in that loop's thread and woke nothing here, so this loop slept
    on until a timer of its own fired (the whole ``timeout``), and for good without one. Two loops, each in a
    thread of its own, and no timer: the answer arrives as soon as the other loop's future has it."""
    from engine.app._driver_async import AsyncSubmit

    loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
    threads = [threading.Thread(target=lp.run_forever, daemon=True) for lp in loops]
    for t in threads:
        t.start()
    other, mine = loops

    async def make_future():
        return other.create_future()

    async def collect(fut):
        step = asyncio.ensure_future(AsyncSubmit().as_completed([fut]).__anext__())
        await asyncio.sleep(0)  # the generator has its callback on fut and waits for it (no timer here)
        other.call_soon_threadsafe(fut.set_result, "answered")
        return await step

    try:
        fut = asyncio.run_coroutine_threadsafe(make_future(), other).result(5)
        assert asyncio.run_coroutine_threadsafe(collect(fut), mine).result(5) == "answered"
    finally:
        for lp, t in zip(loops, threads):
            lp.call_soon_threadsafe(lp.stop)
            t.join(5)
            lp.close()


def test_an_asubmit_cancelled_while_it_waits_for_room_leaves_at_once_its_request_not_queued(monkeypatch):
    """``asubmit`` on a full engine waits for room in a worker thread. Its task cancelled there (``wait_for``'s
    timeout, Ctrl-C in ``asyncio.run``), that thread waited on: ``asyncio.run`` joins it, so Ctrl-C reached the script
    only ``submit_timeout_s`` later (60 s by default), and when room freed meanwhile the request was queued after
    its caller had been told it was not (a new id for it then paid twice). The wait ends with the cancel now."""
    from tests.unit.test_driver_tour import _bulk_engine

    e = _bulk_engine(monkeypatch)
    e._max_pending, e._submit_timeout_s = 1, 30.0
    (first,) = e.submit_many([{"id": "hold", "model": "gpt-5.4-mini", "prompt": "holds the one place"}])

    async def go():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(e.asubmit({"id": "next", "model": "gpt-5.4-mini", "prompt": "waits"}), 0.05)
        e._resolve(first, Result(id="hold", status="ok"))  # room, once the caller has stopped waiting

    asyncio.run(go())  # (ends once its worker thread has: it joins them)
    assert [f._req.id for f in e._futs.values()] == ["hold"] and e._pending == 0
    (again,) = e.submit_many([{"id": "next", "model": "gpt-5.4-mini", "prompt": "waits"}])  # sent when asked again
    assert not again.done() and e._pending == 1


@pytest.mark.parametrize("owner", [True, False])
def test_a_stop_sends_nothing_its_engine_had_not_sent_yet_unless_the_engine_runs_on(monkeypatch, owner):
    """``stop()`` right after submits: what the driver had not sent yet (buffered, or waiting in a lane behind calls
    out) was flushed as the engine's actors went, sent and billed behind a result that said it failed (at the
    emulator: 20 buffered, 20 billed, 12 answered "failed"). An engine this driver started sends none of it now,
    each failed saying it was never sent; a driver of a shared engine still sends it, to run on there."""
    from engine.app._driver_stop import NEVER_SENT
    from tests.unit.test_driver_lanes import MAX_OUT, _sent

    e = _engine(monkeypatch, owner=owner)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    out = []
    for k in range(MAX_OUT):
        out.append(e.submit(req(k)))
        e._flush()  # calls out that do not return: the lane is full
    waiting = [e.submit(req(k)) for k in range(10, 13)]
    e._flush()  # waiting in the lane
    buffered = [e.submit(req(k)) for k in range(20, 23)]  # in the buffer
    sent = _sent(e)
    assert sent == [f"r{k}" for k in range(MAX_OUT)]
    e.stop(timeout_s=0.5)
    later = [r for r in _sent(e) if r not in sent]
    if owner:
        assert later == []
        assert {f.result(0).error for f in waiting + buffered} == {NEVER_SENT}
        assert {f.result(0).error for f in out} == {e._stop_error()}  # (under way: it may have run)
    else:
        assert later == ["r10", "r11", "r12", "r20", "r21", "r22"]
        assert all("still runs there" in f.result(0).error for f in out + waiting + buffered)


def _on_signal(handler):
    """``handler`` for SIGUSR1 (the previous one given back by the caller): the test's thread is the main thread,
    where Python runs handlers, between two bytecodes of whatever it runs then."""
    import signal

    return signal.signal(signal.SIGUSR1, lambda *_: handler())


def test_a_stop_from_a_signal_handler_that_interrupted_a_submit_raises_rather_than_hang(monkeypatch):
    """A signal handler runs in the main thread between two of its bytecodes, possibly inside a submit that holds
    the engine's lock: its ``stop()`` waited for that lock for good (a SIGALRM handler's stop() in a loop of
    ``submit_many`` hung 6 runs of 15). Bounded now, it raises, saying why and what to do instead, and nothing has
    changed; the stop that follows (the ``with`` block's exit) stops the engine. A real signal, raised inside the
    admission (as its future is made, under the lock)."""
    import signal

    from engine.app import _driver_admit, _driver_stop

    monkeypatch.setattr(_driver_stop, "STOP_LOCK_WAIT_S", 0.05)
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    fut = e.submit(req(1))

    class Interrupted(_driver_admit.ResultFuture):
        def __init__(self, *args) -> None:
            signal.raise_signal(signal.SIGUSR1)
            super().__init__(*args)

    monkeypatch.setattr(_driver_admit, "ResultFuture", Interrupted)
    previous = _on_signal(e.stop)
    try:
        with pytest.raises(ConfigError, match="signal handler.*KeyboardInterrupt"):
            e.submit(req(2))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert e._running and not fut.done()  # nothing changed: the refused stop did not half-stop the engine
    assert req(2).uid not in e._futs
    e.stop()
    assert not e._running and fut.result(0).status == "failed"


def test_a_stop_from_a_signal_handler_inside_the_stop_itself_returns_and_the_stop_ends(monkeypatch):
    """A SIGTERM handler's ``stop()`` landing while the thread's own stop (the ``with`` block's) holds the engine's
    lock: it waited ``STOP_LOCK_WAIT_S`` for a lock its own thread held, then raised, and the error unwound the stop
    half done: the engine marked stopped, the open futures left open for good, the actors not stopped. It returns at
    once now, and the stop goes on."""
    import signal

    from engine.app import _driver_stop

    monkeypatch.setattr(_driver_stop, "STOP_LOCK_WAIT_S", 0.05)
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    futs = [e.submit(req(k)) for k in range(3)]
    drop_unsent, landed = e._drop_unsent, []

    def drop_unsent_signalled(uids) -> None:  # under the lock, in the stop
        if not landed:
            landed.append(True)
            signal.raise_signal(signal.SIGUSR1)
        drop_unsent(uids)

    monkeypatch.setattr(e, "_drop_unsent", drop_unsent_signalled)
    previous = _on_signal(e.stop)
    try:
        e.stop()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert landed and not e._running
    assert [f.result(0).error for f in futs] == [_driver_stop.NEVER_SENT] * 3


@pytest.mark.parametrize("stopper", ["watchdog", "main"])
def test_a_stop_waits_for_a_long_submit_of_another_thread_rather_than_raise(monkeypatch, stopper):
    """A ``submit_many`` of 600,000 requests holds the engine's lock 12 s (about 20 us a request): a watchdog thread's
    ``stop()`` meanwhile (or the main thread's, a producer thread submitting) gave up after ``STOP_LOCK_WAIT_S`` with
    a ConfigError about signal handlers, and the engine ran on. The bound is for a handler's stop() inside the
    engine's own code in the main thread alone; any other stop waits for the lock, as before. (No wait at all here:
    a stop that gives up does so at once.)"""
    from engine.app import _driver_stop

    monkeypatch.setattr(_driver_stop, "STOP_LOCK_WAIT_S", 0.0)
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    fut = e.submit(req(1))
    holding, done, got = threading.Event(), threading.Event(), []

    def stop() -> None:
        try:
            e.stop()
            got.append("stopped")
        except Exception as exc:  # noqa: BLE001 - the test reads what stop() raised
            got.append(exc)
        done.set()

    def submitting() -> None:  # the long admission: the lock held until the stop has ended, or 0.3 s
        with e._lock:
            holding.set()
            done.wait(0.3)

    if stopper == "watchdog":
        t = threading.Thread(target=stop)
        with e._lock:  # the main thread's long submit_many
            t.start()
            done.wait(0.3)  # a bound on a call that, fixed, must not return yet
        t.join(30)
    else:
        t = threading.Thread(target=submitting)
        t.start()
        assert holding.wait(30)
        stop()
        t.join(30)
    assert got == ["stopped"], got
    assert not e._running and fut.result(0).status == "failed"


def test_a_done_callback_may_look_at_another_result_without_waiting(monkeypatch):
    """A callback that joins two requests looks at the other one without waiting, ``result(timeout=0)`` (or
    ``exception(timeout=0)``) in a ``try`` for its ``TimeoutError``, or counts what is open with ``drain(0)``: none of
    them waits, so none holds the thread that delivers results. They raised ``ConfigError`` there (the refusal of a
    wait that could never end, given to a look that does not wait); they answer as anywhere else."""
    e = _engine(monkeypatch)
    a, b = e.submit(req(1)), e.submit(req(2))
    got: dict[str, object] = {}

    def join(_f) -> None:
        for what, call in (("result", lambda: b.result(timeout=0)), ("exception", lambda: b.exception(timeout=0)),
                           ("drain", lambda: e.drain(timeout_s=0))):
            try:
                got[what] = call()
            except Exception as exc:  # noqa: BLE001 - the test reads what each raised
                got[what] = exc

    a.add_done_callback(join)
    _deliver(e, [Result(id="r1", status="ok"), Result(id="r2", status="ok")])
    assert isinstance(got["result"], concurrent.futures.TimeoutError), got
    assert isinstance(got["exception"], concurrent.futures.TimeoutError), got
    assert got["drain"] == 1, got  # b, open when a's callback ran
    assert b.done() and b.result(0).status == "ok"


@pytest.mark.parametrize("at", ["joining the threads", "the last flush", "failing the open futures"])
def test_a_ctrl_c_anywhere_in_the_stop_before_its_kill_still_kills_the_actors(monkeypatch, at):
    """Only a Ctrl-C in the report's read reached the stop's kill (its ``finally``): one in the joins of the
    driver's threads (up to ``timeout_s`` each), the last flush or the failing of the open futures left every actor
    running, and the next ``stop()`` returned at once (a provider batch under way ran on, billed and never read)."""
    import actors.remote

    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    killed = []
    monkeypatch.setattr(actors.remote, "kill_engine", lambda engine, *a, **kw: killed.append(engine))
    e.submit(req(1))

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    if at == "joining the threads":
        e._flusher = e._puller = e._checker = type("Thread", (), {"join": ctrl_c})()
    elif at == "the last flush":
        monkeypatch.setattr(e, "_flush", ctrl_c)
    else:
        monkeypatch.setattr(e, "_fail_open", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        e.stop()
    assert killed == ["fake"]
    e.stop()  # stopped already: returns at once
    assert killed == ["fake"] and not e._running


@pytest.mark.parametrize("at", ["joining the threads", "the last flush"])
def test_a_ctrl_c_in_the_stop_before_its_futures_fail_still_resolves_every_open_one(monkeypatch, at):
    """A Ctrl-C in the stop's joins or its last flush left before the open futures were failed: the actors were
    killed (its ``finally``), and the next ``stop()`` returned at once, so nothing ever resolved them. A thread
    waiting on one (``result()`` with no timeout) hung for good, and so did the process at its exit (Python joins
    its threads), the user's Ctrl-C answered by a hang."""
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    sent, unsent = e.submit(req(1)), None
    e._flush()
    unsent = e.submit(req(2))  # buffered: never sent

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    if at == "joining the threads":
        e._flusher = e._puller = e._checker = type("Thread", (), {"join": ctrl_c})()
    else:
        monkeypatch.setattr(e, "_flush", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        e.stop()
    e.stop()  # stopped already: returns at once
    assert sent.done() and unsent.done(), (sent.done(), unsent.done())
    assert sent.result(0).status == unsent.result(0).status == "failed"
    assert "never sent" in unsent.result(0).error and "engine stopped" in sent.result(0).error


@pytest.mark.parametrize("at", ["taking what was not sent", "waking the threads"])
def test_a_ctrl_c_as_the_stop_turns_the_engine_off_still_kills_the_actors_and_fails_what_is_open(monkeypatch, at):
    """The stop's first steps, before its ``try``: taking what was not sent out of the buffer and the lanes (a
    pass over every request waiting, under the engine's lock) and waking the driver's threads. A Ctrl-C there left
    the engine turned off (``_running`` False, submits refused) with every actor running and every future open;
    the next ``stop()`` returned at once. Now what was not sent is taken again, the stop runs through, and the
    Ctrl-C is raised at its end."""
    import actors.remote

    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    killed = []
    monkeypatch.setattr(actors.remote, "kill_engine", lambda engine, *a, **kw: killed.append(engine))
    sent = e.submit(req(1))
    e._flush()
    unsent = e.submit(req(2))  # buffered: never sent
    if at == "taking what was not sent":
        lane_uids, calls = e._lane_uids, []

        def ctrl_c_once():
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return lane_uids()

        monkeypatch.setattr(e, "_lane_uids", ctrl_c_once)
    else:
        def ctrl_c():
            raise KeyboardInterrupt

        e._wake = type("Event", (), {"set": staticmethod(ctrl_c)})()
    with pytest.raises(KeyboardInterrupt):
        e.stop()
    e.stop()  # stopped already: returns at once
    assert killed == ["fake"] and not e._running
    assert (sent.result(0).status, unsent.result(0).status) == ("failed", "failed")
    assert "never sent" in unsent.result(0).error and "engine stopped" in sent.result(0).error
    assert e._buffer == [] and _sent(e) == ["r1"]  # r2 never sent: the flush after the stop sends nothing
