"""A ``stop()`` that a done-callback makes in the result thread (a script that stops its engine at its first failure,
or after N results): the answers that thread's turn of the pull loop holds, paid for, reach their futures, each once,
as they do for a stop from another thread (which joins that thread). The real driver code over fake handles
(``test_driver_lanes._engine``); no Ray, no sleep (stop 86, ``cb86``)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.core.errors import ConfigError
from engine.core.result import Result
from tests.unit.test_driver_callbacks import _deliver
from tests.unit.test_driver_lanes import _engine, req


def _answer(k: int, status: str = "ok") -> Result:
    return Result(id=f"r{k}", status=status, output=f"answer {k}" if status == "ok" else None,
                  error=None if status == "ok" else "the provider refused it", cost_usd=0.01)


def _stoppable(monkeypatch, n: int):
    """An engine (as ``Engine.__init__`` leaves it for a stop) with ``n`` requests sent, and a log of each future's
    resolutions (a future set twice would raise; one set never stays open)."""
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None
    futs = [e.submit(req(k)) for k in range(1, n + 1)]
    e._flush()  # sent: at a provider, answered there
    seen: list[str] = []
    for f in futs:
        f.add_done_callback(lambda f: seen.append(f.request_id))
    return e, futs, seen


def _read(futs) -> list[tuple]:
    return [(f.result(0).status, f.result(0).output) for f in futs]


@pytest.mark.parametrize("when", ["at its first failure", "after 2 results"])
def test_a_stop_a_done_callback_makes_in_the_result_thread_lets_the_rest_of_that_turns_answers_reach_their_futures(
        monkeypatch, when):
    """One pull's reply holds four answers; the callback of the first failure (or of the second result) stops the
    engine in the result thread. The stop failed what was open, the rest of the turn among it, and the loop then
    dropped those answers (``_resolve``: claimed): paid for, read "engine stopped before the request finished"."""
    e, futs, seen = _stoppable(monkeypatch, 4)
    results = [_answer(1), _answer(2, "failed"), _answer(3), _answer(4)]
    done: list[str] = []

    def stop_when(f) -> None:
        done.append(f.request_id)
        if (f.result(0).status == "failed") if when == "at its first failure" else len(done) == 2:
            e.stop(timeout_s=0.5)

    for f in futs:
        f.add_done_callback(stop_when)
    _deliver(e, results)
    assert not e._running
    assert _read(futs) == [(r.status, r.output) for r in results]
    assert sorted(seen) == sorted(f.request_id for f in futs)  # each resolved once
    assert e._pending == 0


class _TwoShards:
    """Two hub shards as Ray shows them to the pull loop: both replies ready in one turn, each with answers."""

    def __init__(self, eng, first: list[Result], second: list[Result]) -> None:
        self.eng, self.replies, self.calls = eng, {"pull-1": first, "pull-2": second}, 0
        self.pull = self

    def remote(self, *args):
        self.calls += 1
        return f"pull-{self.calls}"

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs), []

    def get(self, ref, timeout=None):
        if ref not in self.replies:  # a later turn: nothing more (the test's engine stopped by then)
            self.eng._running = False
            return []
        return self.replies.pop(ref)


def test_a_stop_a_done_callback_makes_in_the_result_thread_delivers_the_other_shards_replies_of_that_turn(
        monkeypatch):
    """With two hub shards, the turn's second reply, taken off its shard's queue, was read only after the callback's
    stop had failed its futures: its answers dropped. A stop from another thread lets the turn end first."""
    e, futs, seen = _stoppable(monkeypatch, 3)
    futs[0].add_done_callback(lambda f: e.stop(timeout_s=0.5))
    shards = _TwoShards(e, [_answer(1)], [_answer(2), _answer(3)])
    e._ray, e._h["hubs"] = shards, [shards, shards]
    e._puller = threading.Thread(target=e._pull_loop)
    e._puller.start()
    e._puller.join(30)
    assert not e._puller.is_alive()
    assert _read(futs) == [("ok", "answer 1"), ("ok", "answer 2"), ("ok", "answer 3")]
    assert sorted(seen) == ["r1", "r2", "r3"]


def test_stop_and_drain_from_callbacks_run_by_a_stop_in_the_result_thread_neither_hang_nor_fail_twice(monkeypatch):
    """Callbacks run by that stop: an answer of the turn it delivers, and a request it fails (no answer came), each
    call ``stop()`` and ``drain()`` again. The stop returns at once (its own thread); ``drain()`` with a request
    still open is refused (that thread delivers it) and answers 0 once none is; every future ends once."""
    e, futs, seen = _stoppable(monkeypatch, 3)
    got: dict[str, list] = {"r2": [], "r3": []}

    def again(f) -> None:
        for call in (lambda: e.stop(timeout_s=0.5), lambda: e.drain(timeout_s=5)):
            try:
                got[f.request_id].append(call())
            except Exception as exc:  # noqa: BLE001 - the test reads what each raised
                got[f.request_id].append(exc)

    futs[0].add_done_callback(lambda f: e.stop(timeout_s=0.5))
    futs[1].add_done_callback(again)
    futs[2].add_done_callback(again)
    _deliver(e, [_answer(1), _answer(2)])  # no answer for the third: the stop fails it
    assert _read(futs)[:2] == [("ok", "answer 1"), ("ok", "answer 2")]
    assert futs[2].result(0).status == "failed"
    assert got["r2"][0] is None and isinstance(got["r2"][1], ConfigError), got
    assert got["r3"] == [None, 0], got
    assert sorted(seen) == ["r1", "r2", "r3"] and e._pending == 0


def test_a_stop_from_a_coroutine_at_its_first_result_lets_the_turns_other_answers_reach_their_awaiters(monkeypatch):
    """asyncio: ``as_completed`` over ``asubmit_futures``' futures, and ``stop()`` in the coroutine at the first
    result. The stop runs in the event loop's thread, not the result thread: it joins that thread, whose turn ends
    first; the other answers reach the futures (awaited after the stop, as ``asubmit`` would)."""
    e = _engine(monkeypatch)
    e._cut_short, e._last_report = False, None
    hub_gave = threading.Event()

    class _Hub:
        pull = None

        def remote(self, *args):
            return "pull"

        def get(self, ref):
            if not hub_gave.is_set():
                hub_gave.set()
                return [_answer(1), _answer(2), _answer(3)]
            e._running = False
            return []

    hub = _Hub()
    hub.pull = hub
    e._h["hubs"], e._ray = [hub], hub

    async def script() -> list:
        futs = await e.asubmit_futures([req(k) for k in (1, 2, 3)])
        e._puller = threading.Thread(target=e._pull_loop)
        e._puller.start()
        async for _first in e.as_completed(futs):
            e.stop(timeout_s=5)
            break
        return [await asyncio.wrap_future(f) for f in futs]

    got = asyncio.run(script())
    e._puller.join(30)
    assert [(r.status, r.output) for r in got] == [("ok", "answer 1"), ("ok", "answer 2"), ("ok", "answer 3")]


def test_a_stop_elsewhere_failing_what_is_open_past_the_hand_over_wait_leaves_the_answers_in_hand_to_their_futures(
        monkeypatch):
    """The supervisor sees the engine stopped elsewhere while the result thread's turn is slow (a done-callback that
    writes each answer to a slow database): past ``HANDOVER_WAIT_S`` (10 s; 0 here, the bound already spent) it
    failed what was open, the answers that turn held among it, and the turn then dropped them (claimed): paid for,
    read "engine 'fake' was stopped". The one open request with no answer in hand still fails at once."""
    import actors._stop_cut
    import engine.app._supervise as sup
    from engine.app._driver_stop import ended_by_stop

    e, futs, seen = _stoppable(monkeypatch, 3)
    monkeypatch.setattr(actors._stop_cut, "read_cut", lambda name: frozenset())
    monkeypatch.setattr(sup, "HANDOVER_WAIT_S", 0.0)
    failed = threading.Event()  # the check thread's failure has run

    def end_stopped() -> None:
        try:
            e._end_stopped("engine 'fake' was stopped")
        finally:
            failed.set()

    def slow_write(_f) -> None:  # held until the supervisor has failed what is open
        threading.Thread(target=end_stopped).start()
        assert failed.wait(30)

    futs[0].add_done_callback(slow_write)
    _deliver(e, [_answer(1), _answer(2)])  # the third's answer never came: the stop cut it
    assert _read(futs)[:2] == [("ok", "answer 1"), ("ok", "answer 2")]
    assert ended_by_stop(futs[2].result(0), e.gone) and e.gone == "engine 'fake' was stopped"
    assert sorted(seen) == ["r1", "r2", "r3"] and e._pending == 0


def test_a_failure_the_check_thread_makes_while_a_callbacks_stop_joins_it_leaves_the_turns_answers_to_that_stop(
        monkeypatch):
    """The check thread fails what is open (a stop elsewhere seen) and waits out ``HANDOVER_WAIT_S`` for the result
    thread's slow turn; meanwhile a done-callback of that turn stops the engine in the result thread. The stop joins
    the check thread before it resolves the rest of its turn (``_deliver_turn``), and the check thread, its wait over
    and the engine turned off, took the answers in hand for its own: failed "engine 'fake' was stopped", paid for,
    and dropped when the stop delivered them (a review of stop 86, ``rvcb86``). The request with no answer fails."""
    import actors._stop_cut
    from engine.app._driver_stop import ended_by_stop

    e, futs, seen = _stoppable(monkeypatch, 4)
    monkeypatch.setattr(actors._stop_cut, "read_cut", lambda name: frozenset())
    e._wake.clear()
    # Its bound passes as the callback's stop turns the engine off (and wakes the driver's threads).
    monkeypatch.setattr(e, "_await_handover", lambda: e._wake.wait(30))
    e._checker = threading.Thread(target=e._end_stopped, args=("engine 'fake' was stopped",))
    e._checker.start()
    futs[0].add_done_callback(lambda f: e.stop(timeout_s=30))
    _deliver(e, [_answer(1), _answer(2), _answer(3)])  # the fourth's answer never came
    assert not e._checker.is_alive()
    assert _read(futs)[:3] == [("ok", "answer 1"), ("ok", "answer 2"), ("ok", "answer 3")]
    assert ended_by_stop(futs[3].result(0), e.gone) and e.gone == "engine 'fake' was stopped"
    assert sorted(seen) == ["r1", "r2", "r3", "r4"] and e._pending == 0


def test_answers_in_the_turn_of_a_result_thread_whose_loop_has_ended_are_failed_not_left_to_it(monkeypatch):
    """The result thread's loop ended mid-turn (an error in it: here the second answer's resolution raises) while
    the thread itself had not yet ended (``_pull_ended`` set, ``is_alive()`` still true): a failure of the
    supervisor's then left the turn's answers to a loop that would resolve nothing more, open until ``stop()`` (a
    review of stop 86, ``rvcb86``). The thread is held alive past its loop by the test, as it is for a moment."""
    e, futs, seen = _stoppable(monkeypatch, 3)
    real = e._resolve
    calls = {"n": 0}

    def resolve(fut, res) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the loop's error")
        real(fut, res)

    monkeypatch.setattr(e, "_resolve", resolve)
    ended, leave = threading.Event(), threading.Event()

    def thread() -> None:
        try:
            e._pull_loop()
        except RuntimeError:
            pass
        ended.set()
        leave.wait(30)  # alive past its loop's end

    hub = _TwoShards(e, [_answer(1), _answer(2), _answer(3)], [])
    e._ray, e._h["hubs"] = hub, [hub]
    e._puller = threading.Thread(target=thread)
    e._puller.start()
    try:
        assert ended.wait(30) and e._pull_ended and e._puller.is_alive()
        monkeypatch.setattr(e, "_resolve", real)
        e._end("engine failure: actor 'hub' died")
        assert [f.done() for f in futs] == [True, True, True]
    finally:
        leave.set()
        e._puller.join(30)
    assert futs[0].result(0).output == "answer 1" and futs[1].result(0).status == "failed"


class _LaterPulls:
    """A hub shard whose pulls answer ``replies`` one at a time, then nothing until the engine's stop wakes it."""

    def __init__(self, eng, replies: list[list[Result]]) -> None:
        self.eng, self.replies, self.pull = eng, list(replies), self

    def remote(self, *args):
        return "pull"

    def get(self, ref):
        if self.replies:
            return self.replies.pop(0)
        self.eng._wake.wait(0.05)  # (no answer more: the loop waits as Ray's pull would, until the stop)
        return []


def test_a_drained_stop_a_done_callback_makes_in_the_result_thread_lets_the_calls_under_way_answer(monkeypatch):
    """A script stops its own engine after its first result with ``stop(drain_s=...)``, in the callback, while two
    calls are under way (billed when they end). The drain waits for answers the result thread delivers, so there it
    was skipped at once: the two failed "engine stopped before the request finished (drain() first waits)", paid and
    unread (a new user's tour, stop 86: at the emulator, 8 requests failed so, $0.0059 of $0.0311 billed unread).
    Now the stop drains from a thread of its own and both are answered, each once; the script's own stop() made
    meanwhile waits for that one."""
    import concurrent.futures

    e, futs, seen = _stoppable(monkeypatch, 3)
    under_way = futs[1:]
    waited: list[int] = []
    monkeypatch.setattr(e, "wait_cancelled", lambda timeout_s, interrupted=None: sum(not f.done() for f in under_way))

    def wind_down(timeout_s, interrupted=None) -> int:  # the calls under way end, and their answers come in
        _, left = concurrent.futures.wait(under_way, timeout=10)
        waited.append(len(left))
        return len(left)

    monkeypatch.setattr(e, "wind_down", wind_down)
    stopped: list[str] = []

    def stop_after_first(f) -> None:
        if not stopped:
            stopped.append(f.request_id)
            e.stop(timeout_s=5.0, drain_s=30.0)
            asked.set()

    asked = threading.Event()
    futs[0].add_done_callback(stop_after_first)
    hub = _LaterPulls(e, [[_answer(1)], [_answer(2), _answer(3)]])
    e._h["hubs"], e._ray = [hub], hub
    e._puller = threading.Thread(target=e._pull_loop)
    e._puller.start()
    assert asked.wait(30)
    e.stop(timeout_s=5.0)  # the script's own stop once told (the with block's exit): it waits for the drained one
    assert e._stopping.is_set()
    e._puller.join(30)
    assert not e._puller.is_alive()
    assert _read(futs) == [("ok", "answer 1"), ("ok", "answer 2"), ("ok", "answer 3")]
    assert stopped == ["r1"] and waited == [0]
    assert sorted(seen) == ["r1", "r2", "r3"]  # each resolved once
    assert not e._running and e._pending == 0


def _drained_from_a_callback(monkeypatch, daemon: bool, answer: bool):
    """An engine whose first answer's callback stops it with ``stop(drain_s=30)`` in the result thread (``daemon`` as
    ``Engine.__init__`` makes it), two calls still under way whose answers come in once the drain waits if
    ``answer``; the drain's wait ends then, at its ``interrupted`` event, or at ``release`` (the test's end)."""
    e, futs, _ = _stoppable(monkeypatch, 3)
    answers, release, asked = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(e, "wait_cancelled", lambda timeout_s, interrupted=None: sum(not f.done() for f in futs[1:]))

    def wind_down(timeout_s, interrupted=None) -> int:
        answers.set()
        while not (release.is_set() or (interrupted is not None and interrupted.is_set())):
            if all(f.done() for f in futs[1:]):
                return 0
            release.wait(0.01)
        return sum(not f.done() for f in futs[1:])

    monkeypatch.setattr(e, "wind_down", wind_down)
    futs[0].add_done_callback(lambda f: (e.stop(timeout_s=5.0, drain_s=30.0), asked.set()))

    class Hub:
        pull = property(lambda self: self)

        def remote(self, *args):
            return "pull"

        def get(self, ref):
            if not asked.is_set():
                return [_answer(1)]
            e._wake.wait(0.05)
            return [_answer(2), _answer(3)] if answer and answers.is_set() and not futs[1].done() else []

    e._h["hubs"], e._ray = [Hub()], Hub()
    e._puller = threading.Thread(target=e._pull_loop, name="smartbatch-pull", daemon=daemon)
    e._puller.start()
    assert asked.wait(30)
    return e, futs, release


def test_a_drained_stop_a_done_callback_makes_is_no_daemon_so_the_process_leaving_waits_for_its_answers(monkeypatch):
    """The result thread is a daemon (``Engine.__init__``), and a thread inherits that: the drained stop's thread
    was one too, so a script that left once its callback had stopped the engine (the stop returns at once) had its
    drain and the rest of the stop cut by the interpreter's exit (scratch, ``/tmp/rvtour86/daemon.py``: at exit the
    stop not ended, the two calls under way ``open``, the actors never stopped). Now the exit waits for it."""
    e, futs, release = _drained_from_a_callback(monkeypatch, daemon=True, answer=True)
    try:
        assert not e._stopper.daemon  # what the interpreter's exit (``threading._shutdown``) joins
        e._stopper.join(30)
        assert _read(futs) == [("ok", "answer 1"), ("ok", "answer 2"), ("ok", "answer 3")]
    finally:
        release.set()
        e._stopper.join(30)
        e._puller.join(30)


class _CtrlCInTheWait:
    """``Engine._stopping`` as a Ctrl-C finds it: its first ``wait()`` raises ``KeyboardInterrupt``."""

    def __init__(self, real: threading.Event) -> None:
        self.real, self.hit = real, False
        self.set, self.is_set = real.set, real.is_set

    def wait(self, timeout=None):
        if not self.hit:
            self.hit = True
            raise KeyboardInterrupt
        return self.real.wait(timeout)


def test_a_ctrl_c_while_a_stop_waits_for_a_callbacks_drained_stop_cuts_the_drain_and_stops_the_engine(monkeypatch):
    """The ``with`` block's exit (or the script's stop()) waits for the drained stop a callback made; a Ctrl-C there
    raised at once, the drain running on for up to ``drain_s`` ("Ctrl-C leaves now" not so), the process then
    leaving mid-stop: the actors not stopped, the futures open. Now it ends the drain as a Ctrl-C in a drain's own
    thread does, and is raised once the stop has ended, every future resolved once."""
    e, futs, release = _drained_from_a_callback(monkeypatch, daemon=False, answer=False)
    seen: list[str] = []
    for f in futs[1:]:
        f.add_done_callback(lambda f: seen.append(f.request_id))
    e._stopping = _CtrlCInTheWait(e._stopping)
    try:
        with pytest.raises(KeyboardInterrupt):
            e.stop()
        assert e._stopping.is_set() and not e._running and not release.is_set()
        assert [f.result(0).status for f in futs] == ["ok", "failed", "failed"] and sorted(seen) == ["r2", "r3"]
    finally:
        release.set()
        e._stopper.join(30)
        e._puller.join(30)


def test_an_actors_error_in_a_callbacks_drained_stop_reaches_no_hook_with_its_key(monkeypatch, caplog):
    """The drained stop's thread runs outside ``stop()``'s ``masked_actor_errors``: an actor's ``RayTaskError`` in
    it (its words the actor's traceback, a provider's key among them) went whole to ``threading.excepthook``, which
    prints it to stderr (a review, ``rvtour86``). Now it is logged masked, as ``stop()`` raises it elsewhere."""
    import ray.exceptions

    from tests.unit.test_actor_error_keys import KEY, LEAK, _ray_error

    hooked: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: hooked.append(args.exc_value))
    e, futs, release = _drained_from_a_callback(monkeypatch, daemon=False, answer=False)
    e._ray.exceptions = ray.exceptions

    def flush() -> None:
        raise _ray_error(LEAK, "ingest")

    monkeypatch.setattr(e, "_flush", flush)
    release.set()  # (the drain ends: the stop goes on to its flush)
    e._stopper.join(30)
    e._puller.join(30)
    assert e._stopping.is_set() and not e._running
    assert [x for x in hooked if KEY in str(x)] == [] and KEY not in caplog.text
    assert "the stop failed" in caplog.text
