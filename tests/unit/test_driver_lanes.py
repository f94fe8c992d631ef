"""The driver's lanes to ingest (engine.app._driver_lanes): a group commit per ingest shard. Driven with fake
actor handles whose calls return when the test says so; no Ray."""

from __future__ import annotations

import concurrent.futures
import pickle
import threading

import pytest

from engine.app import _driver_lanes
from engine.app._driver_lanes import MAX_OUT, URGENT_EXTRA, IngestLanes
from engine.core.request import Request


class _Ref:
    def __init__(self) -> None:
        self.fut: concurrent.futures.Future = concurrent.futures.Future()

    def future(self) -> concurrent.futures.Future:
        return self.fut


class _Submit:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int], _Ref]] = []
        self.refuse = 0  # this many next calls raise, as Ray does when it cannot make one

    def remote(self, reqs, client, rows):
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("Ray is not running")
        ref = _Ref()
        reqs = pickle.loads(pickle.dumps(reqs))  # what an actor gets: the driver sends columns (actors._wire)
        self.calls.append(([r.id for r in reqs], rows, ref))
        return ref


class _Ingest:
    def __init__(self) -> None:
        self.submit = _Submit()


class _Driver(IngestLanes):
    def __init__(self, shards: int = 1, micro_batch: int = 1000) -> None:
        self._lock = threading.Lock()
        self._buffer: list[Request] = []
        self._next_row = 0
        self._micro_batch = micro_batch
        self._h = {"ingests": [_Ingest() for _ in range(shards)]}
        self._client = "me"
        self._inflight_refs: dict = {}
        self._wake = threading.Event()
        self._init_lanes()

    def submit(self, *reqs: Request) -> None:
        self._buffer.extend(reqs)
        self._flush()

    @property
    def calls(self):
        return self._h["ingests"][0].submit.calls


def req(i: int, priority: str = "normal", model: str = "gpt-5-mini") -> Request:
    return Request(id=f"r{i}", provider="openai", model=model, prompt=f"p{i}", input_tokens=10, output_tokens=5,
                   priority=priority, arrival_s=0.0, deadline_s=3600.0)


def test_an_idle_lane_sends_at_once_and_a_busy_one_merges_what_waits_in_order():
    d = _Driver()
    for k in range(MAX_OUT):
        d.submit(req(k))
    assert [ids for ids, _, _ in d.calls] == [[f"r{k}"] for k in range(MAX_OUT)]  # idle: no added latency
    d.submit(req(10), req(11))
    d.submit(req(12))
    assert len(d.calls) == MAX_OUT  # the lane is full: these wait
    assert d._lane_uids() == {req(k).uid for k in (10, 11, 12)}  # and count as submitted, not sent
    d.calls[0][2].fut.set_result(3)  # one call returns ...
    d._lanes_turn()
    ids, rows, _ = d.calls[-1]
    assert ids == ["r10", "r11", "r12"]  # ... and what waited leaves in one call, in submission order
    assert rows == [MAX_OUT, MAX_OUT + 1, MAX_OUT + 2]  # with the draw rows they were numbered with
    assert d._lane_uids() == set()
    assert all(ref in d._inflight_refs for _, _, ref in d.calls)  # each call is watched for failure


def test_an_urgent_request_does_not_wait_behind_bulk_but_a_stream_of_them_is_batched():
    d = _Driver()
    for k in range(MAX_OUT):
        d.submit(req(k))
    d.submit(req(5))
    d.submit(req(6, priority="urgent"))
    # It leaves at once, and with it what waited before it (order kept).
    assert d.calls[-1][0] == ["r5", "r6"]
    for k in range(7, 7 + URGENT_EXTRA - 1):
        d.submit(req(k, priority="urgent"))
    assert len(d.calls) == MAX_OUT + URGENT_EXTRA
    d.submit(req(20, priority="urgent"))
    d.submit(req(21, priority="urgent"))
    assert len(d.calls) == MAX_OUT + URGENT_EXTRA  # the lane's urgent room is full too: these wait ...
    d.calls[-1][2].fut.set_result(1)
    d._lanes_turn()
    assert d.calls[-1][0] == ["r20", "r21"]  # ... and leave together


def test_a_merged_call_stays_within_a_micro_batch():
    d = _Driver(micro_batch=3)
    for k in range(MAX_OUT):
        d.submit(req(k))
    for k in range(10, 15):
        d.submit(req(k))
    d.calls[0][2].fut.set_result(1)
    d.calls[1][2].fut.set_result(1)
    d._lanes_turn()
    assert [ids for ids, _, _ in d.calls[MAX_OUT:]] == [["r10", "r11", "r12"], ["r13", "r14"]]


def test_a_lane_whose_calls_hang_sends_anyway_after_the_stall_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(_driver_lanes.time, "monotonic", lambda: now[0])
    d = _Driver()
    for k in range(MAX_OUT + 1):
        d.submit(req(k))
    d._lanes_turn()
    assert len(d.calls) == MAX_OUT
    now[0] += _driver_lanes.STALL_S + 0.01
    d._lanes_turn()
    assert d.calls[-1][0] == [f"r{MAX_OUT}"]


def test_a_failed_call_frees_its_lane_too():
    d = _Driver()
    for k in range(MAX_OUT + 1):
        d.submit(req(k))
    d.calls[0][2].fut.set_exception(RuntimeError("ingest died"))
    d._lanes_turn()
    assert d.calls[-1][0] == [f"r{MAX_OUT}"]


def test_stop_sends_everything_that_waits():
    d = _Driver()
    for k in range(MAX_OUT + 2):
        d.submit(req(k))
    d._lanes_turn(force=True)
    assert sorted(i for ids, _, _ in d.calls for i in ids) == sorted(f"r{k}" for k in range(MAX_OUT + 2))


def test_each_shard_has_its_own_lane():
    from actors._shards import class_shard

    d = _Driver(shards=2)
    models = ["gpt-5-mini", "gpt-5", "gpt-4o-mini"]
    by_shard: dict[int, list[str]] = {}
    for m in models:
        by_shard.setdefault(class_shard(req(0, model=m), 2), []).append(m)
    if len(by_shard) < 2:
        pytest.skip("these models fall in one shard")
    a, b = by_shard[0][0], by_shard[1][0]
    for k in range(MAX_OUT):
        d.submit(req(k, model=a))
    d.submit(req(50, model=b))  # shard 0 is full; shard 1 is not
    assert [ids for ids, _, _ in d._h["ingests"][1].submit.calls] == [["r50"]]


def test_threads_flushing_at_once_keep_the_submission_order_of_the_draw_rows():
    d = _Driver(micro_batch=4)
    start = threading.Barrier(4)

    def submit_from_a_thread(t: int) -> None:
        start.wait()
        for k in range(150):
            with d._lock:  # as Engine._admit queues a request
                d._buffer.append(req(1000 * t + k))
            d._flush()

    threads = [threading.Thread(target=submit_from_a_thread, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    d._lanes_turn(force=True)
    rows = [row for _, rws, _ in d.calls for row in rws]
    assert rows == list(range(600))  # each row sent once, in the order the rows were numbered


def test_a_call_ray_refuses_loses_nothing_its_requests_wait_for_the_next_turn():
    d = _Driver()
    d._h["ingests"][0].submit.refuse = 2
    d.submit(req(1), req(2))
    assert d.calls == [] and d._lane_uids() == {req(1).uid, req(2).uid}
    d._lanes_turn()  # refused again
    d.submit(req(3))  # this turn is made
    assert [ids for ids, _, _ in d.calls] == [["r1", "r2", "r3"]] and d._lane_uids() == set()


def test_a_full_readmission_leaves_out_what_waits_in_a_lane():
    """After a restart the driver re-admits every unfinished request, except those not sent yet: a request
    waiting in a lane leaves with its lane, so it must not also be re-admitted (it could be generated twice)."""
    from engine.app._driver_admit import Admitting
    from engine.app._supervise import Supervised

    class _Fut:
        def __init__(self, r: Request) -> None:
            self._req = r

        def done(self) -> bool:
            return False

    class _Readmit:
        def __init__(self) -> None:
            self.sent: list[str] = []

        def remote(self, part, client, force):
            self.sent += [r.id for r in part]
            return _Ref()

    class _Both(_Driver, Supervised, Admitting):  # (Admitting: the failing loop, ``_fail_each``)
        def _by_ingest(self, reqs):
            return [(self._h["ingests"][0], list(reqs))] if reqs else []

    d = _Both()
    d._h["ingests"][0].readmit = _Readmit()
    d._init_readmit()
    reqs = [req(k) for k in range(MAX_OUT + 2)]
    d._futs = {r.uid: _Fut(r) for r in reqs}
    for r in reqs:
        d.submit(r)  # MAX_OUT calls out, two wait in the lane
    d._readmit_open()
    waiting = {f"r{k}" for k in range(MAX_OUT, MAX_OUT + 2)}
    assert d._lane_uids() == {req(k).uid for k in range(MAX_OUT, MAX_OUT + 2)}
    assert not waiting & set(d._h["ingests"][0].readmit.sent)

    # The deadline sweep, long past every deadline, leaves them out too: they are not lost, only not sent yet.
    class _Late:
        speedup = 1.0

        def now(self) -> float:
            return 10 * 86400.0

    d._h["ingests"][0].readmit.sent.clear()
    d.clock, d._next_sweep, d._recovering, d._sweeps, d.swept = _Late(), 0.0, threading.Lock(), {}, 0
    d._sweep()
    assert set(d._h["ingests"][0].readmit.sent) == {"r0", "r1"}  # the calls out, which ingest may have lost


def test_requests_failed_while_waiting_are_never_sent():
    """An actor gone for good fails every open future (``_fail_open``): what still waits in the buffer or a lane
    must then never reach ingest, or it would be generated and paid behind a result that says it failed."""
    from engine.app._driver_admit import Admitting
    from engine.app._supervise import Supervised

    class _Fut:
        def __init__(self, r: Request) -> None:
            self._req, self.request_id, self.tenant, self.result = r, r.id, r.tenant, None

        def done(self) -> bool:
            return self.result is not None

    class _Both(_Driver, Supervised, Admitting):  # (Admitting: the failing loop, ``_fail_each``)
        def _resolve(self, fut, res) -> None:
            fut.result = res

    d = _Both()
    reqs = [req(k, priority="urgent" if k % 2 else "normal") for k in range(MAX_OUT + 3)]
    d._futs = {r.uid: _Fut(r) for r in reqs}
    for r in reqs:
        d.submit(r)  # MAX_OUT calls out; with the urgent room, the rest leaves or waits
    late = req(50)
    d._futs[late.uid] = _Fut(late)
    d._buffer.append(late)  # buffered, not flushed yet
    waiting = d._lane_uids() | {late.uid}
    assert len(waiting) >= 2
    d._fail_open("engine failure: actor(s) died: dispatcher-openai")
    assert all(d._futs[u].result.status == "failed" for u in waiting)
    assert not d._lane_uids() and not d._buffer
    assert all(lane.urgent == 0 for lane in d._lanes.values())
    sent = len(d.calls)
    for _, _, ref in list(d.calls):
        ref.fut.set_result(1)
    d._lanes_turn(force=True)
    d._flush()
    assert len(d.calls) == sent  # nothing more left for ingest


def test_the_urgent_count_follows_the_parts_that_wait():
    """The lane counts its waiting urgent requests instead of scanning them at every drain; the count must stay
    the number there is through queueing, merging, sending and dropping."""
    import random

    rng = random.Random(7)
    d = _Driver(micro_batch=3)
    k = 0
    for step in range(300):
        move = rng.random()
        if move < 0.5:
            n = rng.randint(1, 5)
            d.submit(*[req(k + j, priority=rng.choice(["urgent", "normal", "background"])) for j in range(n)])
            k += n
        elif move < 0.85:
            out = [ref for _, _, ref in d.calls if not ref.fut.done()]
            if out:
                rng.choice(out).fut.set_result(1)
                d._lanes_turn()
        else:
            with d._lock:
                d._drop_unsent({u for u in d._lane_uids() if rng.random() < 0.3})
        lane = d._lanes[0]
        assert lane.urgent == sum(r.priority == "urgent" for reqs, _ in lane.waiting for r in reqs), step


def test_a_slow_ingest_still_gets_merged_calls_not_everything_at_once(monkeypatch):
    """A call out past the stall time frees its place, one for one: what waits then leaves in merged calls, two
    at a time, not as a flood of calls at every turn (the group commit matters most when ingest is slow)."""
    now = [100.0]
    monkeypatch.setattr(_driver_lanes.time, "monotonic", lambda: now[0])
    d = _Driver(micro_batch=2)
    d.submit(*[req(k) for k in range(2 * (MAX_OUT + 6))])
    assert len(d.calls) == MAX_OUT
    now[0] += _driver_lanes.STALL_S + 0.01
    d._lanes_turn()
    d._lanes_turn()
    assert len(d.calls) == 2 * MAX_OUT  # the stale ones' places, once; the turn after sends nothing more
    assert all(len(ids) == 2 for ids, _, _ in d.calls)
    now[0] += _driver_lanes.STALL_S + 0.01
    d._lanes_turn()
    assert len(d.calls) == 3 * MAX_OUT


def test_an_urgent_request_ray_refused_is_tried_at_the_next_turn():
    d = _Driver()
    for k in range(MAX_OUT):
        d.submit(req(k))
    d._h["ingests"][0].submit.refuse = 1
    d.submit(req(9, priority="urgent"))  # the urgent room is there, but Ray refuses this call
    assert len(d.calls) == MAX_OUT
    d._lanes_turn()  # no call returned and nothing is stale: it goes anyway, in the urgent room
    assert d.calls[-1][0] == ["r9"]


# -- stop(): with the real Engine over fake handles (no Ray) ---------------------------------------------------

class _Actor:
    def __init__(self, log: list) -> None:
        for name in ("submit", "readmit", "forget", "leave"):
            setattr(self, name, _Logged(name, log))


class _Logged:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def remote(self, *args):
        ref = _Ref()
        self.log.append((self.name, args, ref))
        return ref


def _engine(monkeypatch, owner: bool = True):
    """An ``Engine`` object without Ray: the real driver code over fake handles, its threads not started."""
    import collections

    import actors.remote
    from engine.app.driver import Engine

    monkeypatch.setattr(actors.remote, "kill_engine", lambda *a, **kw: None)
    from engine.core.catalog import default_catalog

    e = object.__new__(Engine)
    e.log = []
    from engine.core.clock import ManualClock
    from engine.core.response_owners import ResponseOwners
    from engine.core.settings import Settings

    e._ray, e.catalog, e.settings, e.clock = None, default_catalog(), Settings(), ManualClock(0.0)
    e._h = {"ingests": [_Actor(e.log)], "hubs": [_Actor(e.log)], "engine": "fake", "all": [], "dispatchers": {}}
    e._owner, e._client, e._next_row, e._micro_batch, e._flush_s = owner, "me", 0, 1000, 0.002
    from engine.app._driver_admit import admission_lock

    e._lock, e._room = admission_lock()  # as Engine.__init__
    e._max_pending, e._overload, e._submit_timeout_s, e._retention_s = 100_000, "block", 60.0, 3600.0
    e._pending, e._finished, e._futs, e._buffer, e._inflight_refs = 0, collections.deque(), {}, [], {}
    e._forgetting = []
    e._running, e._gone, e._started_ray = True, None, False
    e._init_readmit()
    e.responses = ResponseOwners()
    e._init_lanes()
    e._wake = threading.Event()
    e._flusher = e._puller = e._checker = threading.Thread(target=lambda: None)
    e._flusher.start()
    e._flusher.join()
    return e


def _sent(e) -> list[str]:
    return [r.id for name, args, _ in e.log if name == "submit" for r in args[0]]


def test_stop_from_a_result_callback_stops_the_engine_and_fails_what_is_open(monkeypatch):
    """Callbacks run in the thread that delivers results; a stop() there must not try to join that thread
    (it raised half-way, leaving the other futures open for good)."""
    from engine.core.result import Result

    e = _engine(monkeypatch)
    a, b = e.submit(req(1)), e.submit(req(2))
    errors: list[BaseException] = []

    def on_done(_f) -> None:
        try:
            e.stop(timeout_s=0.5)
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever stop() raised
            errors.append(exc)

    a.add_done_callback(on_done)
    e._puller = threading.Thread(target=lambda: e._resolve(a, Result(id="r1", status="ok")))
    e._puller.start()
    e._puller.join()
    assert errors == [] and not e._running
    assert b.done() and b.result(0).status == "failed"


def test_a_submit_racing_stop_is_refused_or_sent_never_left_behind(monkeypatch):
    """A submit from another thread while stop() runs: either it is refused (EngineStopped), or it was
    accepted before and stop() sends it. Never accepted and then left in a lane."""
    from engine.core.errors import EngineStopped

    e = _engine(monkeypatch, owner=False)
    for k in range(MAX_OUT):
        e.submit(req(k))
        e._flush()  # two calls out that do not return: the lane is full
    outcome: list = []
    real_turn = e._lanes_turn

    def turn_then_submit(force: bool = False) -> None:
        real_turn(force)
        if force:  # another thread submits right after stop's last turn

            def late() -> None:
                try:
                    outcome.append(e.submit(req(50)))
                except EngineStopped as exc:
                    outcome.append(exc)

            t = threading.Thread(target=late)
            t.start()
            t.join()

    e._lanes_turn = turn_then_submit
    e.stop(timeout_s=0.5)
    assert len(outcome) == 1
    assert isinstance(outcome[0], EngineStopped) or "r50" in _sent(e)
    assert not e._lane_uids()


def test_a_future_cannot_be_cancelled_and_so_its_result_always_frees_its_place(monkeypatch):
    """A ``ResultFuture`` cancelled while its request ran (``wait(..., timeout)`` then ``cancel()`` on what is not
    done, a common pattern) never took its result, so its place under ``max_pending`` was never freed: after
    ``max_pending`` of them every ``submit`` was refused for good. Its request cannot be called back, so
    ``cancel()`` says so (False, as for a running call) and the result comes as for any other."""
    from engine.core.errors import Overloaded
    from engine.core.result import Result

    e = _engine(monkeypatch)
    e._max_pending, e._overload = 1, "raise"
    fut = e.submit(req(1))
    assert fut.cancel() is False and not fut.cancelled()
    with pytest.raises(Overloaded):
        e.submit(req(2))
    e._resolve(fut, Result(id=fut.request_id, status="ok"))  # what the pull thread does when it comes
    assert fut.result(timeout=0).status == "ok" and e._pending == 0
    assert e.submit(req(2)).request_id == req(2).id


def test_a_result_and_a_failure_of_one_request_from_two_threads_resolve_it_once(monkeypatch):
    """The pull thread delivers a result while the supervising thread fails the same id (an actor died): both
    read "not done", and the second ``set_result`` raised ``InvalidStateError``, which ended the pull thread,
    after which no result reached any future. Now the first to claim it under the lock sets it, once."""
    from engine.app._future import ResultFuture
    from engine.core.result import Result

    e = _engine(monkeypatch)

    class ResolvedBetween(ResultFuture):
        """The other thread resolves it just as this one sets its result (the interleaving)."""

        def set_result(self, result) -> None:
            if result.status == "ok":
                e._resolve(self, Result(id=self.request_id, status="failed", error="the other thread"))
            super().set_result(result)

    r = req(1)
    fut = ResolvedBetween(r, e)
    e._futs[r.uid], e._pending = fut, 1
    e._resolve(fut, Result(id=r.id, status="ok"))  # raised InvalidStateError
    assert fut.result(timeout=0).status == "ok" and e._pending == 0  # set once, its place freed once


def test_the_open_requests_are_claimed_again_when_a_pulls_reply_is_lost_and_the_hub_did_not_restart(monkeypatch):
    """A pull's reply is lost (Ray raises for a call to a live actor on another node, after the hub took the
    results off this driver's queue), and the hub answers its ping with the same token: it did not restart. The
    results it sent are claimed again, through the re-admission of the open requests; before, nothing asked for
    them, and their futures waited for the sweep, past their deadlines."""
    e = _engine(monkeypatch)
    fut = e.submit(req(1))
    readmitted: list = []
    e._readmit_open = lambda uids=None, tries=0, force=False: readmitted.append(uids)

    class Ref:
        def __init__(self, value=None, lost=False) -> None:
            self.value, self.lost = value, lost

    class FakeRay:
        def get(self, ref, timeout=None):
            if ref.lost:
                raise ConnectionError("the reply of a call to a live actor was lost")
            return ref.value

    pulls: list[Ref] = []

    class Hub:
        class pull:
            @staticmethod
            def remote(wait, client):
                pulls.append(Ref([], lost=not pulls))  # the first pull's reply is lost
                if len(pulls) >= 3:
                    e._running = False
                return pulls[-1]

        class ping:
            @staticmethod
            def remote():
                return Ref("the same hub")

    e._ray, e._h = FakeRay(), {**e._h, "hubs": [Hub()], "named": {"hub": Hub()}}
    e._incarnation, e._engine_stopped = {"hub": "the same hub"}, lambda: False
    e._recover = lambda kinds: pytest.fail(f"no hub restarted, yet {kinds} were recovered")
    e._pull_loop()
    assert readmitted == [None] and not fut.done()  # every open request claimed again, once


def test_a_bad_request_of_submit_many_is_named_by_its_place_when_it_has_no_id(monkeypatch):
    """One of many requests has no usable id: the error named neither it nor its place ("request: field 'id'"),
    so a user could not find it among a thousand. Nothing is queued."""
    from engine.core.catalog import default_catalog
    from engine.core.clock import ManualClock
    from engine.core.errors import RequestError
    from engine.core.request import validation_context

    e = _engine(monkeypatch)
    e._ctx, e.clock = validation_context(default_catalog()), ManualClock(0.0)
    good = [{"id": f"r{k}", "model": "gpt-5-mini", "prompt": "hi"} for k in range(5)]
    with pytest.raises(RequestError) as exc:
        e.submit_many([*good[:3], {"model": "gpt-5-mini", "prompt": "hi"}, *good[3:]])
    assert exc.value.position == 3 and exc.value.field == "id" and "at 3 of the requests given" in str(exc.value)
    assert "add it to the request" in str(exc.value)  # a request of the Python API, not a trace's line
    assert e._pending == 0 and not e._futs


def test_a_request_object_of_a_model_the_engines_catalog_lacks_is_refused_naming_model(monkeypatch):
    """A ``Request`` made elsewhere (validated against the default catalog) for a provider this engine's catalog
    does not have was queued unchecked, and failed in a grouper as "policy error: 'anthropic'"."""
    from engine.core.catalog import default_catalog
    from engine.core.errors import RequestError
    from engine.core.request import validation_context

    cat = default_catalog()
    e = _engine(monkeypatch)
    e.catalog = cat.model_copy(update={"providers": {"openai": cat.providers["openai"]}})
    made = [Request.model_validate({"id": f"m{k}", "arrival_s": 0.0, "model": model, "prompt": "hi"},
                                   context=validation_context(cat))
            for k, model in enumerate(["gpt-5-mini", "claude-haiku-4-5"])]
    with pytest.raises(RequestError) as exc:
        e.submit_many(made)
    assert (exc.value.field, exc.value.position, exc.value.request_id) == ("model", 1, "m1")
    assert "anthropic/claude-haiku-4-5 is not in this engine's catalog" in str(exc.value) and not e._futs
    assert e.submit(made[0]).request_id == "m0"


@pytest.fixture
def default_sigint():
    """Ctrl-C as Python has it by default, whatever an earlier test of this worker set; restored after."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("a real SIGINT reaches only the main thread, and this test does not run in it")
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT,))
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def test_a_ctrl_c_while_a_flush_queues_its_parts_loses_none_of_them(monkeypatch, default_sigint):
    """A Ctrl-C between taking the buffer and queuing its parts dropped the parts not yet queued: accepted, and
    never sent (a helper's hunt). The buffer is now taken once every part is queued: a real SIGINT during the
    first part's queuing leaves the rest to the next flush."""
    import os
    import signal

    d = _Driver(micro_batch=2)
    kills = []

    def queue_then_interrupt(self, part):
        self.waiting.append(part)
        if not kills:
            kills.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, here

    monkeypatch.setattr(_driver_lanes._Lane, "queue", queue_then_interrupt)
    d._buffer.extend(req(k) for k in range(6))
    with pytest.raises(KeyboardInterrupt):
        d._flush()
    assert kills and len(d._buffer) == 6  # left for the next flush
    d._flush()  # the flush thread's next turn
    assert not d._buffer
    sent = [i for ids, _, _ in d.calls for i in ids]
    waiting = [r.id for lane in d._lanes.values() for reqs, _ in lane.waiting for r in reqs]
    assert set(sent + waiting) == {f"r{k}" for k in range(6)}  # every request on its way (r0, r1 twice: ingest
    # takes a request it has seen once)


@pytest.mark.parametrize("where", ["buffering", "registering"])
def test_a_ctrl_c_while_a_submit_admits_never_leaves_a_future_nobody_sends(default_sigint, where):
    """A Ctrl-C between registering a submit's futures and buffering its requests left futures that nobody
    sends; submitted again, the same ids got those futures back (a helper's hunt: answered by the sweep, a
    minute past their deadlines). The requests are now buffered first: a Ctrl-C at either step leaves every
    registered future's request buffered, and the same ids submitted again are sent."""
    import os
    import signal

    from engine.app._driver_admit import Admitting

    kills: list[int] = []

    def interrupt():
        if not kills:
            kills.append(1)
            os.kill(os.getpid(), signal.SIGINT)

    class Buffer(list):
        def extend(self, items):
            super().extend(items)
            if where == "buffering":
                interrupt()

    class Futs(dict):
        def update(self, *a, **kw):
            super().update(*a, **kw)
            if where == "registering":
                interrupt()

        def __setitem__(self, k, v):  # (registered one by one, as the driver once did)
            super().__setitem__(k, v)
            if where == "registering":
                interrupt()

    class Admit(Admitting):
        def __init__(self):
            self._running, self._gone, self._h, self._owner, self.name = True, None, {}, True, "t"
            self._futs, self._pending, self._max_pending = Futs(), 0, 1000
            self._submit_timeout_s, self._overload = 1.0, "wait"
            self._room, self._wake, self._idle = threading.Condition(), threading.Event(), False
            self._buffer: list[Request] = Buffer()

    a = Admit()
    reqs = [req(k) for k in range(5)]
    with pytest.raises(KeyboardInterrupt):
        a._admit(reqs)
    assert kills and {r.uid for r in a._buffer} == {r.uid for r in reqs}  # on their way, whatever came after
    assert set(a._futs) <= {r.uid for r in a._buffer}
    futs, _ = a._admit(reqs)  # submitted again
    assert {f._req.uid for f in futs} == set(a._futs) == {r.uid for r in reqs} and a._pending >= 5
