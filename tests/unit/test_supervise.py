"""The driver's watch for hung actors (engine/app/_supervise.py ``_watch_silence``), without Ray: a fake Ray and a
fake monotonic clock. A hung actor is killed after ``actor_hang_s``; a busy one that answers every health check
late is not; only the driver that started the engine kills; nothing is killed once it stops."""

from __future__ import annotations

import threading
import types

import pytest

from engine.app import _supervise
from engine.app._supervise import HEALTH_TIMEOUT_S, Supervised


class FakeRay:
    """Refs are ``Ping`` objects whose answer arrives at ``answer_at`` on the fake clock (never: inf)."""

    def __init__(self, clock):
        self.clock, self.killed = clock, []

    def wait(self, refs, num_returns, timeout):
        return [r for r in refs if r.answer_at <= self.clock[0]], []

    def kill(self, actor, no_restart=False):
        assert no_restart is False  # Ray must restart it
        self.killed.append(actor)


class Ping:
    def __init__(self, answer_at: float):
        self.answer_at = answer_at


@pytest.fixture
def watched(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(_supervise, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    s = Supervised.__new__(Supervised)
    s._silent, s.hung, s._starter, s._running = {}, {}, True, True
    s._ray, s._h = FakeRay(clock), {"named": {"ingest": "ingest-handle"}}
    s.settings = types.SimpleNamespace(actor_hang_s=30.0)
    return s, clock


def checks(s, clock, delay: float, n: int = 40) -> None:
    """``n`` health checks a second apart (after each one's 2 s wait); the actor answers each ``delay`` s late."""
    for _ in range(n):
        asked = clock[0]
        ping = Ping(asked + delay)
        clock[0] += HEALTH_TIMEOUT_S
        s._watch_silence({ping: "ingest"}, s._ray.wait([ping], 1, HEALTH_TIMEOUT_S)[0], asked)
        clock[0] += 1.0


def test_an_actor_that_answers_nothing_is_killed_once_after_the_hang_time(watched):
    s, clock = watched
    checks(s, clock, float("inf"), n=10)  # 29 s of silence by the last one's end
    assert s._ray.killed == []
    checks(s, clock, float("inf"), n=1)
    assert s._ray.killed == ["ingest-handle"] and s.hung == {"ingest": 1}
    checks(s, clock, float("inf"), n=5)  # silence counts afresh from the first ping after the kill
    assert s.hung == {"ingest": 1}


def test_a_busy_actor_that_answers_every_check_late_is_not_killed(watched):
    """Each answer comes 3 s after its ping, after the check stopped waiting (2 s): alive, however long."""
    s, clock = watched
    checks(s, clock, 3.0, n=60)
    assert s._ray.killed == [] and s.hung == {}


@pytest.mark.parametrize("starter,running", [(False, True), (True, False)])
def test_only_the_starting_driver_kills_and_not_while_it_stops(watched, starter, running):
    s, clock = watched
    s._starter, s._running = starter, running
    checks(s, clock, float("inf"), n=40)
    assert s._ray.killed == []


class _Unavailable(Exception):
    pass


class RestartingRay:
    """Every ping answers at once; the dispatcher's raises "unavailable" (Ray restarting it) while ``placed`` is
    false (no node offers ``provider:openai`` then, as after the loss of the only node that did), or "died" while
    ``died``. Placed again, it answers a new incarnation's token."""

    exceptions = types.SimpleNamespace(ActorUnavailableError=_Unavailable)

    def __init__(self):
        self.placed, self.died = False, False

    def wait(self, refs, num_returns, timeout):
        return list(refs), []

    def get(self, ref):
        if ref == "dispatcher-openai" and self.died:
            raise RuntimeError("ActorDiedError: the actor died unexpectedly")
        if ref == "dispatcher-openai" and not self.placed:
            raise _Unavailable("The actor is temporarily unavailable: restarting")
        return f"token-{ref}" + ("-2" if ref == "dispatcher-openai" else "")

    def cluster_resources(self):
        return {"CPU": 2.0} | ({"provider:openai": 1.0} if self.placed else {})


class _Handle:
    def __init__(self, kind):
        self.ping = types.SimpleNamespace(remote=lambda: kind)


class _Fut:
    def __init__(self, provider):
        self._req, self.result = types.SimpleNamespace(provider=provider), None

    def done(self):
        return self.result is not None


@pytest.fixture
def restarting(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(_supervise, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    s = Supervised.__new__(Supervised)
    kinds = ["ingest", "dispatcher-openai"]
    s._ray, s._h = RestartingRay(), {"named": {k: _Handle(k) for k in kinds}}
    s._incarnation = {k: f"token-{k}" for k in kinds}
    s._misses, s._restarting, s._gone, s._lock = {}, {}, None, threading.Lock()
    s.settings = types.SimpleNamespace(actor_restart_wait_s=600.0)
    s._futs = {"o1": _Fut("openai"), "g1": _Fut("google")}
    failed: dict[str, str] = {}

    def fail_ids(ids, error):
        for u in ids:
            failed[u] = s._futs[u].result = error

    s._engine_stopped, s._fail_ids = (lambda: False), fail_ids
    s._fail_open = types.MethodType(Supervised._fail_open, s)
    s._watch_silence = s._sweep = s._relay_logs = s._retry_owed = lambda *a: None  # (``SharedOwners``)
    recovered = threading.Event()
    s._recover = lambda kinds: recovered.set()
    return s, clock, failed, recovered


def health_checks(s, clock, times):
    for t in times:
        clock[0] = t
        s._health()


def test_a_dispatcher_ray_cannot_restart_fails_its_providers_requests_with_the_reason_after_the_wait(restarting):
    """Losing the only node that offered ``provider:openai`` left its dispatcher restarting for ever, and every
    request it would serve open for good, new ones too (a helper's hunt on a cluster). Past
    ``actor_restart_wait_s`` its provider's requests fail, naming the dispatcher and the resource no node offers;
    another provider's work goes on (a review: failing it all, at every check, failed healthy work); an openai
    request that comes later fails at the next check; placed again, the dispatcher is recovered."""
    s, clock, failed, recovered = restarting
    health_checks(s, clock, [float(t) for t in range(0, 600)])
    assert failed == {}
    health_checks(s, clock, [601.0])
    assert list(failed) == ["o1"] and "'provider:openai'" in failed["o1"] and "actor_restart_wait_s=600" in failed["o1"]
    s._futs["o2"] = _Fut("openai")
    health_checks(s, clock, [602.0])
    assert sorted(failed) == ["o1", "o2"] and not s._futs["g1"].done() and s._gone is None
    s._ray.placed = True
    health_checks(s, clock, [603.0])
    assert recovered.wait(10) and s._restarting == {}


def test_a_restart_seen_again_after_checks_that_did_not_see_it_waits_afresh(restarting):
    """The wait counts one restart, check after check: an actor seen restarting at 0 s, back (or silent) until
    700 s, then restarting again is not past its wait at once (a review: a stale start failed all work)."""
    s, clock, failed, _ = restarting
    health_checks(s, clock, [0.0, 1.0])
    s._restarting["dispatcher-openai"] = (0.0, 1.0)  # as if the checks since had not seen it (answered late)
    health_checks(s, clock, [700.0, 701.0, 1000.0])
    assert failed == {}


def test_an_actor_that_died_after_restarting_fails_the_work_as_dead_not_as_stuck(restarting):
    s, clock, failed, _ = restarting
    health_checks(s, clock, [0.0, 1.0])
    s._ray.died = True
    health_checks(s, clock, [2.0, 3.0, 4.0])
    assert failed and all("died: dispatcher-openai" in e and "restart" not in e for e in failed.values())
