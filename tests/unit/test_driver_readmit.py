"""The driver's re-admission of requests whose call to ingest failed (engine/app/_driver_readmit.py), without Ray:
a fake ingest whose calls fail as Ray's do while it restarts, and a fake monotonic clock stepped as the driver's
check loop runs (``CHECK_EVERY_S``). A loaded rehearsal had Ray take tens of seconds to restart ingest, and the
driver spent its five tries in about a second: 270 requests failed "ingest failed 5 times"."""

from __future__ import annotations

import inspect
import threading
import types

import pytest

from engine.app._driver_lanes import IngestLanes
from engine.app._driver_pull import CHECK_EVERY_S
from engine.app._supervise import Supervised
from engine.core.request import Request


class Unavailable(Exception):
    """As ``ray.exceptions.ActorUnavailableError``: the actor is restarting, the call may or may not have run."""


class Died(Exception):
    """Any other failure of the call (the actor died for good, a bug in it)."""


class Ref:
    def __init__(self, error: Exception | None) -> None:
        self.error = error


class FakeRay:
    exceptions = types.SimpleNamespace(ActorUnavailableError=Unavailable)

    def wait(self, refs, num_returns, timeout):
        return list(refs), []  # every call returns at once (refused, or answered)

    def get(self, refs):
        for ref in refs if isinstance(refs, list) else [refs]:
            if ref.error is not None:
                raise ref.error


class Ingest:
    """Refuses every call with ``error`` until ``back_at`` on the clock; then takes each request (once)."""

    def __init__(self, clock: list[float], back_at: float, error: type[Exception] = Unavailable) -> None:
        self.clock, self.back_at, self.error = clock, back_at, error
        self.calls: list[tuple[float, list[str]]] = []  # (when, ids sent)
        self.taken: list[str] = []
        self.readmit = types.SimpleNamespace(remote=self._readmit)

    def _readmit(self, part, client, force):
        ids = [r.id for r in part]
        self.calls.append((self.clock[0], ids))
        if self.clock[0] < self.back_at:
            return Ref(self.error("The actor is temporarily unavailable: IOError: The actor is restarting."))
        self.taken += ids
        return Ref(None)


class Fut:
    def __init__(self, r: Request) -> None:
        self._req, self.error = r, None

    def done(self) -> bool:
        return self.error is not None


class Driver(IngestLanes, Supervised):
    def __init__(self, ingest: Ingest, restart_wait_s: float = 600.0) -> None:
        self._lock, self._buffer, self._micro_batch, self._client = threading.Lock(), [], 1000, "me"
        self._h, self._ray = {"ingests": [ingest]}, FakeRay()
        self._inflight_refs: dict = {}
        self._init_readmit()
        self.settings = types.SimpleNamespace(actor_restart_wait_s=restart_wait_s)
        self._init_lanes()
        self._futs: dict[str, Fut] = {}

    def _by_ingest(self, reqs):
        return [(self._h["ingests"][0], list(reqs))] if reqs else []

    def _fail_each(self, uids, error):
        for u in uids:
            self._futs[u].error = error

    def failed(self) -> dict[str, str]:
        return {f._req.id: f.error for f in self._futs.values() if f.error is not None}


def req(i: int) -> Request:
    return Request(id=f"r{i}", provider="openai", model="gpt-5-mini", prompt=f"p{i}", input_tokens=10,
                   output_tokens=5, arrival_s=0.0, deadline_s=3600.0)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [0.0]
    # The module that handles ingest's failed calls reads the real monotonic clock: this one instead.
    monkeypatch.setattr(inspect.getmodule(Supervised._submission_failed), "time",
                        types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def submitted(d: Driver, n: int) -> None:
    """``n`` requests whose submit to ingest failed as the CI rehearsal's did: ingest was restarting."""
    reqs = [req(k) for k in range(n)]
    d._futs = {r.uid: Fut(r) for r in reqs}
    d._inflight_refs[Ref(Unavailable("The actor is restarting."))] = ([r.uid for r in reqs], 0)


def run_checks(d: Driver, clock: list[float], until: float) -> None:
    """The driver's check loop, one turn every ``CHECK_EVERY_S`` of the fake clock."""
    while clock[0] < until:
        clock[0] = round(clock[0] + CHECK_EVERY_S, 6)
        d._check_ingest()


def test_requests_wait_for_a_restarting_ingest_and_are_served_once_it_answers(clock):
    """Ingest refuses every call as restarting for 40 s: the requests wait, re-admitted at a backoff from 0.1 s
    doubling to 5 s (not a call every check), and are each taken once when it answers. Before: failed after five
    quick tries, "ingest failed 5 times", in a quarter of a second."""
    ingest = Ingest(clock, back_at=40.0)
    d = Driver(ingest)
    submitted(d, 300)
    run_checks(d, clock, 60.0)
    assert d.failed() == {}
    assert sorted(ingest.taken) == sorted(f"r{k}" for k in range(300))  # each once
    when = [t for t, _ in ingest.calls]
    assert when[0] <= 0.25 and len(ingest.calls) <= 20  # the first try 0.1 s after the refusal
    assert all(b - a <= 5.0 + 2 * CHECK_EVERY_S for a, b in zip(when, when[1:]))  # the pause's cap
    assert when[-1] <= 45.0 + CHECK_EVERY_S  # served within the cap after ingest is back
    assert d._waited == {} and d._readmit_waits == []  # nothing left behind


def test_an_ingest_that_never_comes_back_fails_the_requests_in_bounded_time_saying_how_long_it_waited(clock):
    """A crash-looping ingest (Ray restarts it for ever): the requests fail after the longer of 120 s and
    ``actor_restart_wait_s``, the error naming the wait and the setting, not before."""
    ingest = Ingest(clock, back_at=float("inf"))
    d = Driver(ingest, restart_wait_s=0.0)  # 0: the health check waits for ever; the re-admission does not
    submitted(d, 3)
    run_checks(d, clock, 119.0)
    assert d.failed() == {}
    run_checks(d, clock, 126.0)
    errors = d.failed()
    assert sorted(errors) == ["r0", "r1", "r2"]
    assert all("restarting" in e and "120 s" in e and "actor_restart_wait_s" in e for e in errors.values())
    d2 = Driver(Ingest(clock, back_at=float("inf")), restart_wait_s=300.0)
    clock[0] = 0.0
    submitted(d2, 1)
    run_checks(d2, clock, 299.0)
    assert d2.failed() == {}
    run_checks(d2, clock, 306.0)
    assert "300 s" in d2.failed()["r0"]


def test_other_failures_still_fail_the_requests_after_five_tries(clock):
    """A failure that is not a restart (the actor dead for good, a bug) counts each try, as before."""
    ingest = Ingest(clock, back_at=float("inf"), error=Died)
    d = Driver(ingest)
    submitted(d, 2)
    d._inflight_refs = {Ref(Died("boom")): (list(d._futs), 0)}
    run_checks(d, clock, 2.0)
    errors = d.failed()
    assert sorted(errors) == ["r0", "r1"] and all(e.startswith("ingest failed 5 times") for e in errors.values())


def test_a_recovery_s_readmission_takes_the_waiting_requests_with_it_and_they_are_not_sent_twice(clock):
    """Once Ray has restarted ingest, the driver's recovery re-admits every open request: those waiting for their
    next try go with it, and their own try does not follow while that call is out (two re-admissions of one
    request at once could both be sent)."""
    ingest = Ingest(clock, back_at=0.3)
    d = Driver(ingest)
    submitted(d, 5)
    run_checks(d, clock, 0.3)  # refused as restarting, then waiting for their next try
    assert d._readmit_waits
    d._ray.wait = lambda refs, num_returns, timeout: ([], list(refs))  # the recovery's call stays out ...
    d._readmit_open()
    run_checks(d, clock, 10.0)
    recovery = [ids for t, ids in ingest.calls if t >= 0.3]
    assert recovery == [[f"r{k}" for k in range(5)]]  # ... and is the only one made meanwhile


def test_a_re_send_ray_refuses_to_make_waits_and_goes_again_instead_of_being_dropped(clock):
    """A waiting request's re-send that Ray refuses at ``.remote()`` itself (as the lanes' submit may be: Ray
    shutting down, say) is tried again later, and the check loop goes on. Before, its wait was taken off the list
    first and the error left the check loop (which has no guard: no health check after it): the requests were
    never sent again nor failed."""
    ingest = Ingest(clock, back_at=1.0)
    made = ingest._readmit
    refused = [1]

    def once_refused(part, client, force):
        if refused[0]:
            refused[0] -= 1
            raise RuntimeError("Ray refused the call")
        return made(part, client, force)

    ingest.readmit = types.SimpleNamespace(remote=once_refused)
    d = Driver(ingest)
    submitted(d, 3)
    run_checks(d, clock, 10.0)
    assert refused == [0] and d.failed() == {}
    assert sorted(ingest.taken) == ["r0", "r1", "r2"]


def test_a_request_failed_after_waiting_does_not_bring_its_old_wait_to_a_submit_of_it_again(clock):
    """A request that waited for a restarting ingest and then failed otherwise (five tries of another error) is
    submitted again much later, and ingest is restarting again: it waits afresh. Before, its first refusal stayed
    on record and the new one failed at once, "Ray was restarting it ... for 1000 s"."""
    ingest = Ingest(clock, back_at=float("inf"), error=Died)  # the refusals after the first: another error
    d = Driver(ingest)
    submitted(d, 1)
    run_checks(d, clock, 5.0)
    assert d.failed()["r0"].startswith("ingest failed 5 times")
    clock[0] = 1000.0
    again = req(0)
    d._futs = {again.uid: Fut(again)}
    d._inflight_refs[Ref(Unavailable("The actor is restarting."))] = ([again.uid], 0)
    d._check_ingest()
    assert d.failed() == {} and d._readmit_waits


def test_one_warning_for_a_restart_that_refuses_many_calls(clock, caplog):
    """Ingest restarting refuses the 20 calls of 2,000 open requests (micro-batches of 100) and their tries: one
    WARNING says so, not one per call (100,000 open requests at the default micro-batch are 100 calls). Before:
    20 WARNINGs."""
    ingest = Ingest(clock, back_at=3.0)
    d = Driver(ingest)
    reqs = [req(k) for k in range(2000)]
    d._futs = {r.uid: Fut(r) for r in reqs}
    for k in range(0, len(reqs), 100):
        d._inflight_refs[Ref(Unavailable("The actor is restarting."))] = ([r.uid for r in reqs[k:k + 100]], 0)
    with caplog.at_level("WARNING", logger="smartbatch"):
        run_checks(d, clock, 10.0)
    assert sorted(ingest.taken) == sorted(r.id for r in reqs) and d.failed() == {}
    assert sum("ingest is restarting" in r.getMessage() for r in caplog.records) == 1


def test_a_request_answered_while_its_re_send_was_out_keeps_no_wait(clock):
    """A waiting request is re-sent, answered meanwhile (the refused call had run after all), and the re-send
    fails otherwise: nothing is sent again, and its wait is not kept for a later submit of the same id."""
    ingest = Ingest(clock, back_at=float("inf"), error=Died)
    d = Driver(ingest)
    submitted(d, 1)
    run_checks(d, clock, 0.05)  # refused as restarting: waiting
    d._ray.wait = lambda refs, num_returns, timeout: ([], list(refs))  # the re-send stays out ...
    run_checks(d, clock, 0.3)
    assert len(ingest.calls) == 1 and d._waited
    next(iter(d._futs.values())).error = "answered"
    d._ray.wait = FakeRay().wait  # ... and returns, failed
    run_checks(d, clock, 1.0)
    assert len(ingest.calls) == 1 and d._waited == {}


def test_a_due_try_leaves_out_a_request_a_call_still_out_carries(clock):
    """A request waits for its next try while another call carrying it is out (a recovery's re-admission that
    went before the refusal it waits from was read): its try leaves it to that call, and it is taken once that
    call is refused and ingest is back. (A guard of the check's cheaper reading of what is out, not a defect.)"""
    ingest = Ingest(clock, back_at=2.0)
    d = Driver(ingest)
    submitted(d, 2)
    stuck = Ref(Unavailable("The actor is restarting."))
    d._inflight_refs[stuck] = ([list(d._futs)[1]], 0)  # r1's
    wait = FakeRay().wait
    d._ray.wait = lambda refs, num_returns, timeout: ([r for r in refs if r is not stuck], [stuck])
    run_checks(d, clock, 1.0)  # r1's tries are left to the call out; r0's go
    assert [ids for _, ids in ingest.calls if "r1" in ids] == [] and any("r0" in ids for _, ids in ingest.calls)
    d._ray.wait = wait  # the call out is refused in turn: r1 waits, and goes once ingest is back
    run_checks(d, clock, 10.0)
    assert sorted(ingest.taken) == ["r0", "r1"] and d.failed() == {}


def test_a_request_whose_call_crashes_ingest_fails_after_five_restarts_not_after_the_wait(clock, monkeypatch):
    """A request whose call kills ingest each time (out of memory, say): Ray fails a call out when the actor died
    with ``ActorUnavailableError`` too (Ray 2.60, a scratch run: "RpcError: RPC error: Socket closed"), as it
    refuses a call while the actor restarts. Each recovery of ingest (Ray restarted it; another actor's does not
    count) counts a restart for the requests still waiting, untaken; the fifth fails them, saying so, while a
    request taken after one restart is not counted again. Before: re-sent by every recovery, crashing ingest again, until the wait's bound, 600 s."""
    ingest = Ingest(clock, back_at=float("inf"))
    crash = ("The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14. The task "
             "may or may not have been executed on the actor.")

    def readmit(part, client, force):  # r0 crashes ingest; the others are taken
        ingest.calls.append((clock[0], [r.id for r in part]))
        if any(r.id == "r0" for r in part):
            return Ref(Unavailable(crash))
        ingest.taken.extend(r.id for r in part)
        return Ref(None)

    ingest.readmit = types.SimpleNamespace(remote=readmit)
    d = Driver(ingest)
    submitted(d, 2)
    d._micro_batch = 1  # (r0's calls alone)
    d._inflight_refs = {Ref(Unavailable(crash)): (list(d._futs), 0)}
    # The driver's recovery of a restarted actor, its rewiring stubbed: it counts an ingest's restart alone.
    monkeypatch.setattr("actors.remote.rewire", lambda *args, **kw: None)
    d._share_owed = lambda owe: []
    d._recovered, d.restarts, d.metrics_port = threading.Condition(), {}, None
    d.settings.journal = types.SimpleNamespace(recover_wait_s=60.0)
    for kind in ["hub", "hub", "hub", "hub", "hub", "ingest", "ingest", "ingest", "ingest"]:
        run_checks(d, clock, clock[0] + 1.0)  # Ray restarted ``kind``: the driver's recovery re-admits every
        d._recover_now([kind])  # open request
        assert d.failed() == {}
    run_checks(d, clock, clock[0] + 1.0)
    d._recover_now(["ingest"])
    errors = d.failed()
    assert list(errors) == ["r0"] and "restarted it 5 times" in errors["r0"] and ingest.taken.count("r1") >= 1
    assert d._waited == {} and d._died_with == {}
