"""A stop of the engine elsewhere, seen by the driver's supervisor (the check thread), while the result thread holds
an answer it pulled from the hub (billed): the answer must reach its future, not the stop's failure. The real driver
code over fake handles (``test_driver_lanes._engine``); the order forced with events, no Ray, no sleep."""

from __future__ import annotations

import threading

from engine.core.result import Result
from tests.unit.test_driver_callbacks import _deliver
from tests.unit.test_driver_lanes import _engine, req


def test_a_stop_seen_while_the_result_thread_holds_an_answer_lets_the_answer_reach_its_future(monkeypatch):
    """rvunsent85's reading: the supervisor's ``_end_stopped`` claimed the future (``_fail_open``) before the result
    thread handed over the answer it held, and ``_resolve`` dropped that answer (``if fut._claimed: return``): the
    line read "engine ... was stopped", and the next endpoint asked it again, paid twice. Forced here: the result
    thread holds the answer until the check thread has either failed the future or is waiting for the hand-over."""
    import actors._stop_cut
    from engine.app._driver_stop import ended_by_stop

    e = _engine(monkeypatch)
    monkeypatch.setattr(actors._stop_cut, "read_cut", lambda name: frozenset())
    e._layout_seen, e._layout_missing = True, 0
    fut = e.submit(req(1))
    e._flush()  # sent: at a provider, answered there before the actors went
    go_on = threading.Event()  # the check thread has failed the future, or waits for the result thread
    fut.add_done_callback(lambda _f: go_on.set())
    wait_for_puller = getattr(type(e), "_await_handover", None)
    if wait_for_puller is not None:
        def marked(self) -> None:
            go_on.set()
            wait_for_puller(self)

        monkeypatch.setattr(type(e), "_await_handover", marked)
    resolve, checker, ended = e._resolve, [], threading.Event()

    def end_stopped() -> None:
        e._end_stopped("engine 'fake' was stopped")
        ended.set()

    def held(f, res) -> None:
        if not checker:  # the answer is in hand: the supervisor sees the stop now
            checker.append(threading.Thread(target=end_stopped, name="smartbatch-check"))
            checker[0].start()
            assert go_on.wait(30)
        resolve(f, res)

    monkeypatch.setattr(e, "_resolve", held)
    _deliver(e, [Result(id="r1", status="ok", output="the answer", cost_usd=0.01)])
    assert ended.wait(30)
    checker[0].join(30)
    got = fut.result(0)
    assert (got.status, got.output) == ("ok", "the answer"), got
    assert not ended_by_stop(got, e.gone) and e.gone == "engine 'fake' was stopped"
    assert e._pending == 0


class _Shards:
    """Two hub shards as Ray shows them to the pull loop: both replies ready at once, the first shard's an error
    (killed by the stop), the second's a list of answers it gave before (billed). Later pulls answer nothing."""

    def __init__(self, answers: list[Result]) -> None:
        self.answers, self.calls = answers, 0
        self.pull = self

    def remote(self, *args):
        self.calls += 1
        return f"pull-{self.calls}"

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs), []

    def get(self, ref, timeout=None):
        if ref == "pull-1":
            raise RuntimeError("the hub's actor died")
        if ref == "pull-2":
            return self.answers
        return []


def test_a_hub_shard_lost_at_a_stop_leaves_the_answers_another_shard_gave_in_the_same_turn_to_their_futures(
        monkeypatch):
    """Two hub shards' replies ready in one turn: the first's a death (the stop killed it), the second's an answer.
    The pull loop handled the death first: its ``_hub_lost`` saw the stop and failed everything open, and ended the
    loop, so the other shard's reply, taken off its queue, was never read: the answer dropped, paid again."""
    import actors._peer
    import actors._stop_cut

    e = _engine(monkeypatch)
    monkeypatch.setattr(actors._stop_cut, "read_cut", lambda name: frozenset())
    monkeypatch.setattr(actors._peer, "read_layout", lambda name: None)  # the stop removed it
    e._layout_seen, e._layout_missing = True, 2  # the check thread has missed it twice already
    fut = e.submit(req(1))
    e._flush()
    shards = _Shards([Result(id="r1", status="ok", output="the answer", cost_usd=0.01)])
    e._ray = shards
    e._h["hubs"] = [shards, shards]
    e._h["named"] = {"hub": shards, "hub-1": shards}
    e._puller = threading.Thread(target=e._pull_loop)
    e._puller.start()
    e._puller.join(30)
    assert not e._puller.is_alive()
    got = fut.result(0)
    assert (got.status, got.output) == ("ok", "the answer"), got
    assert e.gone == "engine 'fake' was stopped"


class _DeadHub:
    """A hub shard dead for good: its pull raises; the pull loop's ping waiting for its restart blocks until
    ``back`` (the test's end), as Ray's would through ``HEALTH_TIMEOUT_S`` again and again for ``HUB_BACK_S``."""

    def __init__(self) -> None:
        self.pull = self.ping = self
        self.pinged, self.back, self.calls = threading.Event(), threading.Event(), 0

    def remote(self, *args):
        self.calls += 1
        return f"ref-{self.calls}"

    def wait(self, refs, num_returns=1, timeout=None):
        return list(refs), []

    def get(self, ref, timeout=None):
        if ref != "ref-1":  # the ping of ``_hub_lost``
            self.pinged.set()
            self.back.wait(60)
        raise RuntimeError("the hub's actor died")


def test_an_actor_death_seen_while_the_result_thread_waits_for_a_lost_hub_fails_what_is_open_without_waiting(
        monkeypatch):
    """rvclaim85's reading: the check thread's failure of what is open (an actor dead for good, here the hub
    itself) waited for two pull turns, and the pull loop, waiting for the lost hub in ``_hub_lost`` (up to
    ``HUB_BACK_S``, 60 s), began none: the failure came ``HANDOVER_WAIT_S`` (10 s) late, the check thread held
    that long. That turn's answers were handed over before ``_hub_lost``: nothing is left to wait for."""
    import actors._peer
    import engine.app._supervise as sup

    e = _engine(monkeypatch)
    monkeypatch.setattr(actors._peer, "read_layout", lambda name: {"engine": "fake"})  # not stopped
    monkeypatch.setattr(sup, "HANDOVER_WAIT_S", 600.0)  # the wait, if any, outlasts the assertion's
    e._incarnation = {"hub": "first"}
    fut = e.submit(req(1))
    e._flush()
    hub = _DeadHub()
    e._ray, e._h["hubs"], e._h["named"] = hub, [hub], {"hub": hub}
    e._puller = threading.Thread(target=e._pull_loop, daemon=True)
    e._puller.start()
    try:
        assert hub.pinged.wait(30)  # the pull loop waits for the hub's restart
        checker = threading.Thread(target=e._fail_open, args=("engine failure: actor(s) died: hub",), daemon=True)
        checker.start()
        checker.join(30)
        assert not checker.is_alive(), "the failure waited for a pull turn that cannot come"
        assert fut.result(0).error == "engine failure: actor(s) died: hub"
    finally:
        e._running = False
        hub.back.set()
        e._puller.join(30)


def test_a_provider_cut_off_with_nothing_of_it_open_is_failed_without_waiting_for_the_result_thread(monkeypatch):
    """A provider cut off is failed at every health check while it stays so (``_unstick``): with nothing of it
    open, each check still waited two turns of the pull loop for answers there could not be (rvclaim85)."""
    import engine.app._supervise as sup

    e = _engine(monkeypatch)
    monkeypatch.setattr(sup, "HANDOVER_WAIT_S", 600.0)
    other = e.submit(req(1))  # of another provider than the one cut off
    turn = threading.Event()  # the pull loop's turn under way, never ending here
    e._puller = threading.Thread(target=turn.wait, args=(60,), daemon=True)
    e._puller.start()
    try:
        checker = threading.Thread(target=e._fail_open, args=("provider 'nobody' is cut off", "nobody"), daemon=True)
        checker.start()
        checker.join(30)
        assert not checker.is_alive(), "the check thread waited for the result thread with nothing to fail"
        assert not other.done()
    finally:
        turn.set()
