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
