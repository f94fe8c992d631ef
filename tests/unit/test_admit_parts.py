"""A call larger than the room under ``max_pending`` (``engine.app._driver_admit``): with ``overload="block"`` it is
let in by parts, each as room frees, and ``max_pending`` bounds what is unfinished whatever a call's size; with
``overload="raise"`` it is admitted whole or not at all. Before, a ``submit_many`` of more requests than
``max_pending`` was admitted whole once nothing else was unfinished: a job of a million requests held them all at
once, its bound no bound. A stand-in engine with the driver's admission state (``test_admit``), and the real driver
over fake handles (``test_driver_lanes._engine``); no Ray."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from engine.core.errors import ConfigError, EngineStopped, Overloaded
from engine.core.result import Result

from .test_admit import Admit, req


class _Room(threading.Condition):
    """The driver's condition, counting the waits for room begun (the test waits on that count, never a sleep)."""

    def __init__(self, lock) -> None:
        super().__init__(lock)
        self.begun, self.seen = 0, threading.Condition()

    def wait(self, timeout=None):
        with self.seen:
            self.begun += 1
            self.seen.notify_all()
        return super().wait(timeout)


def _resolve_open(eng) -> None:
    with eng._lock:
        open_ = [f for f in eng._futs.values() if not f.done()]
    for f in open_:
        eng._resolve(f, Result(id=f.request_id, tenant=f.tenant, status="ok", output=f"for {f.request_id}"))


def _by_parts(eng, call: Callable[[], object], sent: Callable[[], set[str]] | None = None,
              timeout_s: float = 10.0, at_wait: Callable[[], None] = lambda: None) -> tuple[object, int]:
    """Run ``call`` in a thread of its own; each time it waits for room, ``at_wait()`` and answer every open
    request (once what it let in has reached ingest, when ``sent`` gives the ids sent). Returns what ``call``
    returned or raised, and the most requests seen unfinished, the call's own end included."""
    eng._room = room = _Room(eng._lock)
    out: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            out["got"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["got"] = exc
        finally:
            done.set()
            with room.seen:
                room.seen.notify_all()

    t = threading.Thread(target=run)
    t.start()
    peak, waits = 0, 0
    while True:
        with room.seen:
            assert room.seen.wait_for(lambda: room.begun > waits or done.is_set(), timeout=timeout_s)
            waits = room.begun
        with eng._lock:  # (taken once the call's wait has let it go)
            peak = max(peak, eng._pending)
            queued = {r.id for r in eng._buffer} | {f.request_id for f in eng._futs.values()}
        if done.is_set():
            break
        if sent is not None:  # a part let in is sent while the call waits: no result could come otherwise
            assert _until(lambda: queued <= sent()), (queued, sent())
        at_wait()
        _resolve_open(eng)
    t.join(10)
    assert not t.is_alive()
    return out["got"], peak


def _until(ok: Callable[[], bool]) -> bool:
    """``ok()`` within 10 s, looked at each time the flush thread's fake ingest is called (``_Ingest``)."""
    with _Ingest.called:
        return _Ingest.called.wait_for(ok, timeout=10)


def test_a_call_larger_than_max_pending_is_let_in_by_parts_each_sent_as_the_call_waits(monkeypatch):
    from tests.unit.test_driver_tour import _bulk_engine

    e = _bulk_engine(monkeypatch)
    e._max_pending = 3
    flusher = _with_flusher(e)
    try:
        dicts = [{"id": f"r{k}", "model": "gpt-5.4-mini", "prompt": f"hi {k}"} for k in range(8)]
        futs, peak = _by_parts(e, lambda: e.submit_many(dicts), sent=lambda: set(_sent_ids(e)))
    finally:
        flusher()
    assert peak <= 3, f"{peak} requests unfinished at once under max_pending=3"
    assert [f.request_id for f in futs] == [d["id"] for d in dicts] and len(set(map(id, futs))) == 8
    assert _sent_ids(e) == [d["id"] for d in dicts]  # each sent once, in the order given
    _resolve_open(e)
    assert [f.result(0).output for f in futs] == [f"for r{k}" for k in range(8)] and e._pending == 0


def test_an_asyncio_call_larger_than_max_pending_is_let_in_by_parts_too(monkeypatch):
    from tests.unit.test_driver_tour import _bulk_engine

    e = _bulk_engine(monkeypatch)
    e._max_pending = 2
    dicts = [{"id": f"a{k}", "model": "gpt-5.4-mini", "prompt": f"hi {k}"} for k in range(5)]
    futs, peak = _by_parts(e, lambda: asyncio.run(e.asubmit_futures(dicts)))
    assert peak <= 2 and [f.request_id for f in futs] == [d["id"] for d in dicts]
    assert sorted(_sent_ids(e)) == sorted(d["id"] for d in dicts)


def test_a_call_that_waits_in_vain_says_how_many_it_queued_and_the_same_call_again_goes_on():
    eng = Admit(max_pending=2)
    eng._submit_timeout_s = 0.2  # no room frees: the wait ends on this bound
    reqs = [req(f"r{k}") for k in range(5)]

    def submit_many():
        with eng._lock:
            return eng._admit(reqs)[0]

    with pytest.raises(Overloaded) as err:
        submit_many()
    assert err.value.admitted == 2 and "2 of this call's 5 new requests were queued" in str(err.value)
    assert "Submit the same requests again" in str(err.value)
    first = [eng._futs[r.uid] for r in reqs[:2]]  # the part let in keeps its futures, and runs on
    assert err.value.futures == first
    assert [r.id for r in eng._buffer] == ["r0", "r1"] and eng._pending == 2
    eng._submit_timeout_s = 10.0
    futs, peak = _by_parts(eng, submit_many)
    assert futs[:2] == first and peak <= 2
    assert [r.id for r in eng._buffer] == [r.id for r in reqs]  # none queued twice


def test_with_overload_raise_a_call_larger_than_max_pending_is_refused_whole_naming_it_and_a_smaller_one_goes():
    eng = Admit(max_pending=3)
    eng._overload = "raise"
    with pytest.raises(ConfigError) as err, eng._lock:
        eng._admit([req(f"r{k}") for k in range(4)])
    assert "max_pending=3" in str(err.value) and "overload='block'" in str(err.value)
    assert eng._buffer == [] and eng._pending == 0 and eng._futs == {}  # nothing queued, nothing held
    with eng._lock:
        eng._admit([req(f"r{k}") for k in range(3)])
    with pytest.raises(Overloaded) as full, eng._lock:  # room for none: refused whole, as before
        eng._admit([req("x"), req("y")])
    assert full.value.admitted == 0 and [r.id for r in eng._buffer] == ["r0", "r1", "r2"]


def test_a_done_callback_call_larger_than_the_room_is_refused_whole_at_once():
    """The result thread cannot wait for the room it frees: a callback's call that does not fit is refused whole
    (before, one larger than max_pending was admitted whole when the callback's own result had freed the last
    place)."""
    eng = Admit(max_pending=2)
    eng._puller = threading.current_thread()  # the thread that delivers results runs the callback
    first = eng.submit(req("first"))
    got: list = []

    def chain(_f) -> None:
        for ids in (["a", "b", "c"], ["a", "b"]):
            try:
                with eng._lock:
                    got.append([f.request_id for f in eng._admit([req(i) for i in ids])[0]])
            except Overloaded as exc:
                got.append(exc)

    first.add_done_callback(chain)
    eng._resolve(first, Result(id="first", tenant="default", status="ok"))
    assert isinstance(got[0], Overloaded) and "done-callback" in str(got[0]) and got[0].admitted == 0
    assert got[1] == ["a", "b"] and [r.id for r in eng._buffer] == ["first", "a", "b"] and eng._pending == 2


# -- the real driver's flush thread and fake ingest ---------------------------------------------------------------

class _Ingest:
    called = threading.Condition()

    def __init__(self, log: list) -> None:
        self.log, self.submit = log, self

    def remote(self, reqs, client, rows):
        import concurrent.futures
        import pickle

        from tests.unit.test_driver_lanes import _Ref

        reqs = pickle.loads(pickle.dumps(reqs))  # what an actor gets: the driver sends columns (actors._wire)
        ref = _Ref()
        ref.fut = concurrent.futures.Future()
        ref.fut.set_result(len(reqs))  # returned at once: the lane sends its next part
        with _Ingest.called:
            self.log.append(("submit", (reqs, client, rows), ref))
            _Ingest.called.notify_all()
        return ref


def _sent_ids(e) -> list[str]:
    from tests.unit.test_driver_lanes import _sent

    with _Ingest.called:
        return _sent(e)


def _with_flusher(e) -> Callable[[], None]:
    """Run the driver's own flush thread over a fake ingest that answers at once; returns its stop."""
    e._h["ingests"] = [_Ingest(e.log)]
    t = threading.Thread(target=e._flush_loop, daemon=True)
    t.start()

    def stop() -> None:
        e._running = False
        e._wake.set()
        t.join(10)

    return stop


def test_a_batch_create_whose_lines_waited_in_vain_for_room_withdraws_the_parts_let_in():
    """The endpoint's batch create hands its lines to one ``submit_many``: let in by parts, a create that then
    waits in vain fails (a 429), and the lines of its first parts, running on, would be billed for a batch
    nobody has. They are withdrawn: those not sent yet end at no cost."""
    import openai

    from engine.app._driver_admit import _timed_out
    from engine.app.endpoint import make_app
    from tests.unit.test_endpoint import CAT, FakeEngine, batch_line, serving, upload

    class PartlyIn(FakeEngine):
        def submit_many(self, ds):
            futs = super().submit_many(ds[:2])  # the first part let in, then no room for the rest
            raise _timed_out(futs, 3, 100_000, 100_000, 60.0)  # the driver's own words

    eng = PartlyIn()
    try:
        with serving(make_app(eng, catalog=CAT)) as url, \
                openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
            f = upload(client, [batch_line("a-queued", "one"), batch_line("b-queued", "two"), batch_line("c", "3")])
            with pytest.raises(openai.RateLimitError) as refused:
                client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            assert client.batches.list().data == []
    finally:
        eng.release()
    assert [i.rsplit("/", 1)[1] for i in eng.withdrawn] == ["a-queued", "b-queued"]
    assert eng._held == []  # both ended withdrawn: nothing runs on for the failed create
    # What the client reads says so: the driver's "run on ... submit the same requests again" was false here (the
    # lines were withdrawn, and a create again is a new batch, its lines new requests).
    said = refused.value.message
    assert "2 of the batch's 3 lines" in said and "withdrawn" in said and "max_pending=100,000" in said, said
    assert "run on" not in said and "same requests again" not in said, said


def test_a_replay_interrupted_as_it_waits_for_room_keeps_the_futures_of_the_parts_it_let_in(monkeypatch):
    """``replay(into=...)`` hands the caller every future sent, so a Ctrl-C keeps what was paid for (``smartbatch
    run`` writes them to results.partial.jsonl). A burst larger than the room is let in by parts: a Ctrl-C as it
    waited for room for the next part left the parts let in out of ``into``, sent (and billed) with their results
    never written, and the run's count of requests sent short of them."""
    from tests.unit.test_driver_tour import _bulk_engine

    class _CtrlC(threading.Condition):
        def wait(self, timeout=None):  # the Ctrl-C lands as the call waits for room (the lock taken back)
            raise KeyboardInterrupt

    e = _bulk_engine(monkeypatch)
    e._max_pending, e._room = 2, _CtrlC(e._lock)
    earlier = e.submit({"id": "earlier", "model": "gpt-5.4-mini", "prompt": "hi"})
    dicts = [{"id": f"r{k}", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": f"hi {k}"} for k in range(5)]
    into: list = [earlier]  # (a future of the caller's own stays once)
    e._resolve(earlier, Result(id="earlier", tenant="default", status="ok"))
    with pytest.raises(KeyboardInterrupt):
        e.replay(dicts, into=into)
    assert [f.request_id for f in into] == ["earlier", "r0", "r1"], [f.request_id for f in into]
    assert all(e._futs[f._req.uid] is f for f in into[1:]) and e._pending == 2  # the two let in, sent


def test_a_call_waiting_for_room_for_its_next_part_when_the_engine_is_cancelled_queues_no_more():
    """``Engine.cancel()`` ends every open request (failed, billed nothing), which frees their room: a call let in
    by parts that waited for it queued its next parts into the cancelled engine, and returned as if accepted,
    every one of them to end failed "cancelled", where a call begun after the cancel is refused (EngineStopped)."""
    eng = Admit(max_pending=2)
    reqs = [req(f"r{k}") for k in range(5)]

    def submit_many():
        with eng._lock:
            return eng._admit(reqs)[0]

    def cancel() -> None:
        eng._h["cancelled"] = True  # (the open requests it ends: answered below, as at every wait)

    got, _ = _by_parts(eng, submit_many, at_wait=cancel)
    assert isinstance(got, EngineStopped) and "cancelled" in str(got), got
    assert "2 of its requests" in str(got), got  # the part let in before, ended by the cancel
    assert [r.id for r in eng._buffer] == ["r0", "r1"] and eng._pending == 0  # nothing queued after the cancel


def test_an_overloaded_that_carries_the_futures_of_its_parts_pickles_as_a_ray_task_raises_it():
    """Raised in a Ray task (a driver there, ``Engine.connect``), an exception is pickled to the caller. The
    futures a call let in by parts carried (a lock each) could not be: the caller got no ``Overloaded`` at all
    (Ray's UnserializableException, as for ``RequestError`` before stop 78). The count crosses; the futures stay
    with the driver that holds them (the same requests again there give them back)."""
    import pickle

    eng = Admit(max_pending=2)
    eng._submit_timeout_s = 0.05  # no room frees: the wait ends on this bound
    with pytest.raises(Overloaded) as err, eng._lock:
        eng._admit([req(f"r{k}") for k in range(3)])
    got = pickle.loads(pickle.dumps(err.value))
    assert type(got) is Overloaded and str(got) == str(err.value) and got.admitted == 2 and got.futures == []


class _Looks(dict):
    """The driver's futures by id, counting the looks up ``get`` makes."""

    looks = 0

    def get(self, key, default=None):
        self.looks += 1
        return super().get(key, default)


def test_a_call_let_in_by_parts_beside_other_submits_looks_up_each_request_a_bounded_number_of_times():
    """Each wait of a call let in by parts, when another submit had queued meanwhile, looked up every request of its
    rest, under the lock: a call of n requests let in by k parts cost about n*k/2 looks, quadratic (two callers of
    100,000 each under max_pending=1,000 held the lock 23.5 s of 30 s in those looks, one alone 4 s in all), every
    result delivery and submit waiting behind it. Now a wait looks only at what was queued meanwhile. An id of the
    call that another submit queued meanwhile is still taken with its future, not queued twice."""
    from engine.app._future import ResultFuture

    eng = Admit(max_pending=10)
    eng._futs = looks = _Looks()
    reqs = [req(f"r{k}") for k in range(2000)]
    rounds = [0]

    def another_submit() -> None:  # as the call waits: another call queues one request (the call's last, once)
        with eng._lock:
            o = reqs[-1] if rounds[0] == 0 else req(f"other{rounds[0]}")
            eng._queue([o], {o.uid: ResultFuture(o, eng)})
            rounds[0] += 1

    def submit_many():
        with eng._lock:
            return eng._admit(reqs)[0]

    before = looks.looks
    futs, peak = _by_parts(eng, submit_many, at_wait=another_submit)
    assert rounds[0] > 100 and peak <= 11  # (the other call's one beside the call's ten)
    assert [f.request_id for f in futs] == [r.id for r in reqs] and futs[-1] is eng._futs[reqs[-1].uid]
    assert sorted(r.id for r in eng._buffer if r.id.startswith("r")) == sorted(r.id for r in reqs)  # each once
    assert looks.looks - before <= 3 * len(reqs), f"{looks.looks - before:,} looks up for {len(reqs):,} requests"


def test_a_replay_whose_burst_is_refused_for_an_id_taken_meanwhile_hands_out_no_future_of_the_other_request(
        monkeypatch):
    """``replay(into=...)`` hands the caller the futures its interrupted burst let in, found by id: a burst refused
    because another submit took one of its ids with other content after the replay began (``RequestError``, nothing
    of the burst queued) handed out that other request's future as the burst's own, and ``smartbatch run`` would
    have written another request's answer under this line (the property test of concurrent calls found it)."""
    from engine.core.errors import RequestError
    from tests.unit.test_driver_tour import _bulk_engine

    e = _bulk_engine(monkeypatch)
    dicts = [{"id": "a", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "hi"},
             {"id": "x", "arrival_s": 1.0, "model": "gpt-5.4-mini", "prompt": "mine"}]
    others: list = []

    def between(_n) -> None:  # after the first burst: another submit takes "x" with other content, then x is due
        others.append(e.submit({"id": "x", "model": "gpt-5.4-mini", "prompt": "theirs"}))
        e.clock.advance(1.0)

    into: list = []
    with pytest.raises(RequestError, match="other content"):
        e.replay(dicts, into=into, on_submit=between)
    assert [f._req.prompt for f in into] == ["hi"], [f._req.prompt for f in into]
    assert others[0] not in into


def test_an_id_of_a_part_let_in_freed_and_queued_again_as_the_call_waits_is_not_taken_for_its_rest():
    """A part's request refused for its id (``ID_TAKEN``: another driver's, with other content) is freed, and the id
    may be queued again by another submit before the refusal's thread has set the first future's result. The waiting
    call read that id in what others queued meanwhile and counted it as taken from its rest, where it was not: its
    rest counted one short, it let in one more than the room, and ``max_pending`` was passed (3 under 2 here)."""
    from engine.core.result import ID_TAKEN

    from .test_admit import Admit, req

    eng = Admit(max_pending=2)
    eng._room = room = _Room(eng._lock)
    reqs = [req(i) for i in "abcd"]
    done = threading.Event()

    def call() -> None:
        try:
            with eng._lock:
                eng._admit(reqs)
        finally:
            done.set()
            with room.seen:
                room.seen.notify_all()

    t = threading.Thread(target=call)
    t.start()
    with room.seen:  # "a" and "b" let in; the call waits
        assert room.seen.wait_for(lambda: room.begun > 0 or done.is_set(), timeout=10)
    first, later = eng._futs[reqs[0].uid], []
    first.set_result = later.append  # set by the refusal's thread once it goes on
    with eng._lock:  # the waiting call takes it back after both
        eng._resolve(first, Result(id="a", tenant="default", status="rejected", reason=ID_TAKEN))
        eng.submit(reqs[0])  # another submit of "a", free again
    peak, waits = 0, 1
    while True:
        with room.seen:
            assert room.seen.wait_for(lambda: room.begun > waits or done.is_set(), timeout=10)
            waits = room.begun
        with eng._lock:
            peak = max(peak, eng._pending)
            open_ = [f for f in eng._futs.values() if not f.done()]
        if done.is_set():
            break
        eng._resolve(open_[0], Result(id=open_[0].request_id, tenant="default", status="ok"))  # one place frees
    t.join(10)
    assert peak <= 2, f"{peak} unfinished under max_pending=2"
    assert sorted(r.id for r in eng._buffer) == ["a", "a", "b", "c", "d"]  # "a" again by the other submit alone


def test_a_call_refused_for_an_id_another_submit_took_as_it_waited_says_what_its_parts_let_in():
    """A ``RequestError`` says nothing was queued, and ``submit_many``'s raises before any is: but the id of a call's
    rest that another submit takes with other content while the call waits for room is found only then, its first
    parts let in and running. The refusal said only "already submitted ... with other content", and its caller took
    the call for refused whole; it says now how many were let in, and how to get their futures (none sent twice)."""
    from engine.app._future import ResultFuture
    from engine.core.errors import RequestError

    from .test_admit import Admit, req

    eng = Admit(max_pending=2)
    reqs = [req(f"r{k}") for k in range(5)]

    def another_submit() -> None:  # as the call waits: "r4" with other content, once
        if not any(r.id == "r4" for r in eng._buffer):
            o = req("r4", "Name three lakes.")
            with eng._lock:
                eng._queue([o], {o.uid: ResultFuture(o, eng)})

    def submit_many():
        with eng._lock:
            return eng._admit(reqs)[0]

    got, _ = _by_parts(eng, submit_many, at_wait=another_submit)
    assert isinstance(got, RequestError) and got.code == "id_taken", got
    assert "2 of this call's requests were let in" in str(got) and "without" in str(got), str(got)
    assert [r.id for r in eng._buffer] == ["r0", "r1", "r4"]  # the two let in run on



class _Started(Exception):
    """``Engine.start`` was called: ``run_live`` stops there, its arguments kept (``_start_caught``)."""


def _start_caught(monkeypatch) -> tuple[dict, type[_Started]]:
    """``Engine.start`` replaced by one that keeps its keyword arguments in the dict returned and raises
    ``_Started``: what ``run_live`` starts its engine with, no Ray."""
    import engine.app.driver as driver_mod

    got: dict = {}

    def started(cls, *a, **k):
        got.update(k)
        raise _Started

    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(started))
    return got, _Started

def test_a_replay_of_a_trace_whose_one_instant_holds_more_than_the_room_starts_its_engine_with_room_for_it(monkeypatch):
    """``smartbatch run`` (``run_live``) starts its engine with room for the whole trace, and so for its largest
    burst of one instant (a batch file made a trace: every line at 0). Let in by parts, that burst's requests ride
    batch windows and free their places only as batches end: the parts past the first waited in vain and the run
    failed ``Overloaded``, where before stop 78 the burst went in whole (a docs audit, stop 78). Room for that burst
    alone was not enough (the test below)."""
    import engine.app.live as live

    got, Started = _start_caught(monkeypatch)
    monkeypatch.setattr(live, "MAX_PENDING", 2, raising=False)  # the default, scaled to a trace of 3 at one instant
    trace = [req("a"), req("b"), req("c"), req("d").model_copy(update={"arrival_s": 5.0})]
    with pytest.raises(Started):
        live.run_live(trace, trace_name="burst")
    assert got.get("max_pending") == 4
    got.clear()
    monkeypatch.setattr(live, "MAX_PENDING", 5, raising=False)
    with pytest.raises(Started):  # a trace within the default keeps it
        live.run_live(trace, trace_name="t")
    assert got.get("max_pending") == 5


def test_a_replay_whose_first_look_takes_arrivals_of_several_instants_finds_room_for_them(monkeypatch):
    """The replay sends at each look every request whose arrival the engine clock has passed: the first look comes
    once the engine is up, a speed-up's seconds past the first arrival, and each later one after the part before
    was sent, so one look takes arrivals of several instants. ``smartbatch run`` gave its engine room for the
    largest burst of one instant: a look of more went in by parts, and, its requests riding batch windows, the
    parts past the first waited in vain (Overloaded), as the burst of one instant did (a review, stop 78)."""
    import engine.app.live as live
    from tests.unit.test_driver_tour import _bulk_engine

    got, Started = _start_caught(monkeypatch)
    class _NoRoom(threading.Condition):
        def wait(self, timeout=None):  # its batches end long after: no room frees within submit_timeout_s
            raise Overloaded("waited in vain for room")

    monkeypatch.setattr(live, "MAX_PENDING", 2, raising=False)  # the default, scaled to a trace of 3
    trace = [req("a"), req("b"), req("c").model_copy(update={"arrival_s": 0.5})]
    with pytest.raises(Started):
        live.run_live(trace, trace_name="two instants")
    e = _bulk_engine(monkeypatch)
    e._max_pending, e._room = got["max_pending"], _NoRoom(e._lock)
    e.clock.advance(1.0)  # the replay's first look: the engine took its start's time to come up
    futs = e.replay(trace)
    assert [f.request_id for f in futs] == ["a", "b", "c"] and e._pending == 3


def test_a_call_let_in_by_parts_when_the_engine_stops_is_a_final_502_at_the_endpoint_not_a_retry():
    """A review of 3d53eb4: a call of n choices let in by parts, waiting for room for the next when the engine
    stopped, was refused with ``EngineStopped``, which the endpoint answers with the retryable 503 of a call never
    sent; but its parts let in were sent, and may have been billed, and the SDK's retry (a new request) paid them
    again. The refusal says how many were let in, and the endpoint's answer is then final."""
    from engine.app._endpoint_wire import ApiError, engine_call

    eng = Admit(max_pending=2)
    reqs = [req(f"r{k}") for k in range(5)]

    def submit_many():
        with eng._lock:
            return eng._admit(reqs)[0]

    def stop() -> None:
        eng._gone = "engine 't' was stopped"

    got, _ = _by_parts(eng, submit_many, at_wait=stop)
    assert isinstance(got, EngineStopped) and got.admitted == 2, got

    async def refused():
        raise got

    with pytest.raises(ApiError) as answered:
        asyncio.run(engine_call(refused(), lambda field: field))
    assert answered.value.status == 502 and answered.value.headers == {"x-should-retry": "false"}
    assert "2 of the call's requests were let in" in answered.value.message, answered.value.message
    # Nothing let in: a stop is the retryable 503 it was (the call was never sent).
    with pytest.raises(ApiError) as answered:
        asyncio.run(engine_call(refused_now(), lambda field: field))
    assert answered.value.status == 503 and answered.value.code == "engine_stopped"


async def refused_now():
    raise EngineStopped("engine 't' was stopped")
