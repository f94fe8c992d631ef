"""An actor's error as each public driver call that waits on an actor raises it (keys84). Ray hands the caller its
``RayTaskError``, whose words are the actor's traceback and its exception's: a provider's or a library's words may
quote a key there, and the caller's own logger, which the project does not mask, printed them whole. Stop 83 masked
the budget calls; every other call raised Ray's error as Ray made it. No Ray: the driver's code is driven with
stand-in actors whose calls raise Ray's own ``RayTaskError`` (made without a cluster), as ``ray.get`` gives it."""

from __future__ import annotations

from typing import Any

import pytest
import ray.exceptions

from engine.core.errors import ConfigError, SmartbatchError

KEY = "sk-proj-" + "NEVERSHOWN0123456789abcdef"  # a key's shape, what a provider's error quotes (split: no real-key scan flags the fake)
PASSWORD = "REDIS-NEVERSHOWN-5"
LEAK = RuntimeError(f"upstream said Authorization: Bearer {KEY} at redis://:{PASSWORD}@10.0.0.9/0")


def _ray_error(cause: BaseException, where: str) -> BaseException:
    """Ray's error of ``cause`` raised in actor method ``where``, as the driver's ``ray.get`` raises it."""
    tb = (f"Traceback (most recent call last):\n  File \"actors/x.py\", line 3, in {where}\n"
          f"{type(cause).__name__}: {cause}")
    return ray.exceptions.RayTaskError(where, tb, cause).as_instanceof_cause()


class _Method:
    def __init__(self, name: str) -> None:
        self.name = name

    def remote(self, *args: Any) -> str:
        return self.name  # the "ref": which method was asked


class _Actor:
    """Every method's call is a ref naming it; ``_Ray.get`` of one raises the error given for it."""

    def __getattr__(self, name: str) -> _Method:
        return _Method(name)


class _Ray:
    exceptions = ray.exceptions

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        first = refs[0] if isinstance(refs, list) else refs
        raise _ray_error(self.cause, f"Actor.{first}")


def _driver(cause: BaseException) -> Any:
    """An ``Engine`` without ``__init__``: the state its public calls read, its actors stand-ins."""
    from engine.app.driver import Engine

    eng = Engine.__new__(Engine)
    actor = _Actor()
    eng._ray, eng._running, eng._owner = _Ray(cause), True, True
    eng._h = {"engine": "prod", "hubs": [actor], "ingests": [actor], "groupers": [actor],
              "dispatchers": {"openai": actor}, "budget": actor, "caches": [], "named": {}}
    eng._kept, eng._flush, eng._client = None, lambda: None, "me"
    return eng


def _cancel_requests(eng: Any) -> Any:
    from engine.app._future import ResultFuture
    from engine.core.request import Request

    req = Request(id="r1", model="gpt-5-mini", input_tokens=10, output_tokens=5, arrival_s=0.0)
    fut = ResultFuture(req, eng)
    eng._futs, eng._lock = {req.uid: fut}, __import__("threading").RLock()
    return eng.cancel_requests([fut])


CALLS = {  # one of each kind of wait: through a restart (report), a call's collected failures, a plain get,
    # the engine-wide cancel and its settling (``actors.remote``), and the cancel a shutdown makes first
    "report": lambda eng: eng.report(),
    "cancel_requests": _cancel_requests,
    "count_spent": lambda eng: eng.count_spent([object()]),
    "cancel": lambda eng: eng.cancel(1.0),
    "wait_cancelled": lambda eng: eng.wait_cancelled(0.0),
    "wind_down": lambda eng: eng.wind_down(1.0),
}


@pytest.fixture
def remote_calls(monkeypatch):
    """``actors.remote``'s cancel and settle, as their own ``ray.get`` raises an actor's error."""
    import actors.remote

    def failing(h: dict, *args: Any, **kwargs: Any) -> int:
        raise _ray_error(_driver_cause[0], "Dispatcher.cancel")

    _driver_cause: list[BaseException] = []
    monkeypatch.setattr(actors.remote, "cancel_work", failing)
    monkeypatch.setattr(actors.remote, "settle", failing)
    return _driver_cause


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_public_call_an_actor_failed_raises_none_of_its_keys(call, remote_calls):
    """Each call raised Ray's ``RayTaskError`` whole, the key and the Redis password in its words (fails on the code
    before: the ``RayTaskError(RuntimeError)`` raised, not a ``SmartbatchError``); now a ``SmartbatchError`` naming
    the engine and the call, Ray's words masked."""
    remote_calls.append(LEAK)
    with pytest.raises(SmartbatchError) as caught:
        CALLS[call](_driver(LEAK))
    said = str(caught.value)
    assert not isinstance(caught.value, ray.exceptions.RayTaskError), type(caught.value)
    assert said.startswith("engine 'prod': an actor it waited on failed ("), said
    assert f"{call}()" in said or call == "wind_down" and "cancel()" in said, said
    assert "RuntimeError: upstream said" in said and KEY not in said and PASSWORD not in said, said
    assert caught.value.__cause__ is None and caught.value.__suppress_context__, "Ray's error chained whole"


@pytest.mark.parametrize("call", ["report", "count_spent", "cancel"])
def test_the_projects_own_error_from_an_actor_is_raised_as_it_was(call, remote_calls):
    """Ours (a ``SmartbatchError`` the actor raised) says what to change: raised as it was, not wrapped."""
    ours = ConfigError("budget.max_budget = -1: a limit is > 0")
    remote_calls.append(ours)
    with pytest.raises(ConfigError) as caught:
        CALLS[call](_driver(ours))
    assert caught.value is ours


def test_a_connect_whose_claim_an_actor_failed_raises_none_of_its_keys(monkeypatch):
    """``Engine.connect`` claims this driver at every hub shard as it builds the engine; the claim's error was Ray's
    whole (fails on the code before: ``RayTaskError(RuntimeError)``)."""
    import actors.remote
    from engine.app import _driver_shared
    from engine.app.driver import Engine

    def get(refs: Any, timeout: float | None = None) -> Any:
        raise _ray_error(LEAK, "ResultHub.claim")

    layout = {"settings": None, "catalog": None}
    monkeypatch.setattr(_driver_shared, "_attach", lambda *a: False)
    monkeypatch.setattr(actors.remote, "attach_actors", lambda name: ({"clock": object(), "hubs": [_Actor()]}, layout))
    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(SmartbatchError) as caught:
        Engine.connect("prod")
    said = str(caught.value)
    assert said.startswith("engine 'prod': an actor it waited on failed (Engine.connect()): "), said
    assert KEY not in said and PASSWORD not in said, said


def test_a_stop_by_name_whose_drain_an_actor_failed_raises_none_of_its_keys(monkeypatch, remote_calls):
    """``Engine.stop_named`` (``smartbatch stop --drain``) asks the dispatchers whether work is under way; their
    error was Ray's whole (fails on the code before: ``RayTaskError(RuntimeError)``). The stop's mark is given back."""
    import actors._peer
    import actors._stop_claim
    import actors.remote
    from engine.app import _driver_shared
    from engine.app.driver import Engine

    released = []
    remote_calls.append(LEAK)
    monkeypatch.setattr(_driver_shared, "_attach", lambda *a: False)
    monkeypatch.setattr(actors._peer, "read_layout", lambda name: {"settings": None})
    monkeypatch.setattr(actors._stop_claim, "read_stop", lambda name: None)
    monkeypatch.setattr(actors._stop_claim, "take_stop", lambda *a: {"layout": {}})
    monkeypatch.setattr(actors._stop_claim, "release_stop", lambda name, claim: released.append(name))
    monkeypatch.setattr(actors.remote, "attach_actors", lambda name: ({"engine": name}, {}))
    monkeypatch.setattr("engine.app._ledger_stop.stop_wait_s", lambda layout: 1.0)
    with pytest.raises(SmartbatchError) as caught:
        Engine.stop_named("prod", drain_s=1.0)
    said = str(caught.value)
    assert said.startswith("engine 'prod': an actor it waited on failed (Engine.stop_named()): "), said
    assert KEY not in said and PASSWORD not in said and released == ["prod"], said
