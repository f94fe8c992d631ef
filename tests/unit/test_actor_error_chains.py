"""What a public driver call raises for an actor's error holds no Ray error anywhere (rvkeys84, a review of keys84).
keys84 raised a masked ``SmartbatchError`` ``from None``: that hides Ray's error from a printed traceback only. The
``RayTaskError``, its words the actor's traceback and a key they quoted, stayed the masked error's
``__context__``, and a project error given as it was raised kept it there too; the ``__exit__`` frame in its
traceback held it among its locals; ``report()`` raised its ``EngineStopped`` ``from`` an ``ActorDiedError``, whose
words quote the dead actor's start-up traceback, and every other call raised that ``ActorDiedError`` whole. A
tool that walks the chain or reads a frame's locals (an error tracker's report) met the key. No Ray: stand-in
actors whose calls raise Ray's own errors, made without a cluster."""

from __future__ import annotations

from typing import Any

import pytest
import ray.exceptions

from engine.core.errors import ConfigError, EngineStopped, SmartbatchError
from tests.unit.test_actor_error_keys import CALLS, KEY, LEAK, PASSWORD, _driver, _ray_error


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every error it links to (``__cause__``, ``__context__``), each once."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _holds_no_ray_error(exc: BaseException) -> None:
    chain = _chain(exc)
    assert not any(isinstance(e, ray.exceptions.RayError) for e in chain), [type(e).__name__ for e in chain]
    assert not any(KEY in str(e) or PASSWORD in str(e) for e in chain), [str(e)[:200] for e in chain]
    tb = exc.__traceback__
    while tb is not None:  # the frames past the test's own: the driver's, the helper's (not the test's locals)
        frame = tb.tb_frame
        if "/tests/" not in frame.f_code.co_filename:
            held = [k for k, v in frame.f_locals.items() if isinstance(v, ray.exceptions.RayError)]
            assert not held, f"{frame.f_code.co_name} holds Ray's error in {held}"
        tb = tb.tb_next


def _actor_init_failed() -> ray.exceptions.ActorDiedError:
    """Ray's error of a call to an actor whose start (a restart's ``__init__``) failed: its words quote that
    failure's traceback."""
    return ray.exceptions.ActorDiedError(ray.exceptions.RayTaskError("Dispatcher.__init__", f"Traceback ...\n"
                                                                     f"RuntimeError: {LEAK}", LEAK))


@pytest.fixture
def remote_calls(monkeypatch):
    """``actors.remote``'s cancel and settle, as their own ``ray.get`` raises the error given."""
    import actors.remote

    given: list[BaseException] = []

    def failing(h: dict, *args: Any, **kwargs: Any) -> int:
        raise given[0]

    monkeypatch.setattr(actors.remote, "cancel_work", failing)
    monkeypatch.setattr(actors.remote, "settle", failing)
    return given


@pytest.mark.parametrize("call", sorted(CALLS))
def test_the_masked_error_of_a_call_chains_no_ray_error(call, remote_calls):
    """Fails on the code before: the masked error's ``__context__`` was the ``RayTaskError(RuntimeError)``, the key
    in its words."""
    remote_calls.append(_ray_error(LEAK, "Dispatcher.cancel"))
    with pytest.raises(SmartbatchError) as caught:
        CALLS[call](_driver(LEAK))
    _holds_no_ray_error(caught.value)


@pytest.mark.parametrize("call", ["report", "count_spent", "cancel"])
def test_the_projects_own_error_given_as_raised_chains_no_ray_error(call, remote_calls):
    """The actor's ``ConfigError`` is raised as it was, its ``__context__`` Ray's error (whose words, the actor's
    traceback, quote what it was raised from: a library's error, a key). Fails on the code before."""
    ours = ConfigError("budget.max_budget = -1: a limit is > 0")
    remote_calls.append(_ray_error(ours, "Dispatcher.cancel"))
    with pytest.raises(ConfigError) as caught:
        CALLS[call](_driver(ours))
    assert caught.value is ours
    _holds_no_ray_error(caught.value)


class _DeadRay:
    """Every ``get`` meets an actor whose restart's ``__init__`` failed."""

    exceptions = ray.exceptions

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        raise _actor_init_failed()


def test_report_of_an_engine_whose_actor_died_chains_no_ray_error(remote_calls):
    """``report()``'s ``EngineStopped`` names the ``ActorDiedError``'s type; it was raised ``from`` it, and a printed
    traceback showed its words, the dead actor's start-up traceback, whole. Fails on the code before
    (``__cause__`` the ``ActorDiedError``)."""
    eng = _driver(LEAK)
    eng._ray = _DeadRay()
    with pytest.raises(EngineStopped) as caught:
        eng.report()
    assert "one of its actors died for good" in str(caught.value) and "(ActorDiedError)" in str(caught.value)
    _holds_no_ray_error(caught.value)


@pytest.mark.parametrize("call", ["cancel", "count_spent", "wind_down"])
def test_a_call_that_met_an_actor_whose_start_failed_raises_none_of_its_keys(call, remote_calls):
    """Every call but ``report()`` raised the ``ActorDiedError`` whole: its words quote the failed ``__init__``'s
    traceback, the key in it (fails on the code before: ``ActorDiedError`` raised, not a ``SmartbatchError``)."""
    remote_calls.append(_actor_init_failed())
    eng = _driver(LEAK)
    eng._ray = _DeadRay()
    with pytest.raises(SmartbatchError) as caught:
        CALLS[call](eng)
    said = str(caught.value)
    assert said.startswith("engine 'prod': an actor it waited on failed ("), said
    assert "creation task" in said and KEY not in said and PASSWORD not in said, said
    _holds_no_ray_error(caught.value)


class _GroupersFail:
    """The budget actor answers; a grouper told of the change fails on an error not the project's."""

    exceptions = ray.exceptions

    def get(self, refs: Any, timeout: float | None = None) -> Any:
        asked = refs[0] if isinstance(refs, list) else refs
        if asked == "set_budgets":
            raise _ray_error(LEAK, "Grouper.set_budgets")
        return {"report": {"budgets": [], "ledger": None}, "budget_specs": (0, []),
                "change_budgets": (1, (), "inc")}[asked]


def test_a_budget_change_a_grouper_failed_raises_none_of_its_keys():
    """``remove_budget`` tells every grouper of the change it made (``_tell_groupers``): a grouper's error was Ray's
    whole, out of the budget actor's mask (fails on the code before: ``RayTaskError(RuntimeError)``)."""
    eng = _driver(LEAK)
    eng._ray = _GroupersFail()
    with pytest.raises(SmartbatchError) as caught:
        eng.remove_budget("tenant=acme/1d")
    said = str(caught.value)
    assert said.startswith("engine 'prod': an actor it waited on failed (remove_budget()): "), said
    assert KEY not in said and PASSWORD not in said, said
    _holds_no_ray_error(caught.value)


class _Failing:
    """A dispatcher stand-in whose every call's ref raises Ray's error of ``LEAK`` when awaited."""

    def __getattr__(self, name: str) -> Any:
        class Call:
            @staticmethod
            def remote(*args: Any) -> Any:
                async def ref() -> Any:
                    raise _ray_error(LEAK, f"Dispatcher.{name}")

                return ref()

        return Call


@pytest.mark.parametrize("call", ["count_tokens", "video_content", "video_progress"])
def test_an_async_call_a_dispatcher_failed_chains_no_ray_error(call):
    """The async calls (the endpoint's count and video routes) raise a ``ProviderError`` naming Ray's error's type
    alone, ``from None``: the ``RayTaskError``, the key in its words, stayed its ``__context__`` (fails on the code
    before)."""
    import asyncio

    from engine.core.errors import ProviderError

    eng = _driver(LEAK)
    eng._gone, eng._h["dispatchers"] = None, {"openai": _Failing()}
    args = {"count_tokens": ({"messages": []},), "video_content": ("https://x/v",), "video_progress": (["u1"],)}
    with pytest.raises(ProviderError) as caught:
        asyncio.run(getattr(eng, call)("openai", *args[call]))
    assert "could not answer" in str(caught.value) and "(RayTaskError(RuntimeError))" in str(caught.value)
    _holds_no_ray_error(caught.value)


@pytest.mark.parametrize("met", ["init", "call"])
def test_a_start_whose_actors_failed_to_start_raises_none_of_their_keys(monkeypatch, met):
    """``Engine.start`` waits on its actors as it starts them (``actors.remote.start_actors``: the budget ledger's
    check, the clocks, the cache's warm-up), outside keys84's mask, which covered its claims at the hub shards
    only: an actor whose ``__init__`` failed (``ActorDiedError``, its words that traceback) or a first call that
    failed (``RayTaskError``) was raised whole (fails on the code before: Ray's error raised, the key in it)."""
    import actors.remote
    from engine.app import driver
    from engine.app.driver import Engine
    from engine.core.settings import Settings

    def start_actors(*args: Any, engine: str, **kwargs: Any) -> dict:
        raise _actor_init_failed() if met == "init" else _ray_error(LEAK, "BudgetController.check_ledger")

    import actors._peer

    monkeypatch.setattr(driver, "init_ray", lambda address: False)  # (no Ray: the start is cut where it begins)
    monkeypatch.setattr(actors._peer, "read_layout", lambda name: None)
    monkeypatch.setattr(driver, "check_not_stopping", lambda name: None)
    monkeypatch.setattr(actors.remote, "start_actors", start_actors)
    with pytest.raises(SmartbatchError) as caught:
        Engine.start(Settings(), name="prod")
    said = str(caught.value)
    assert said.startswith("engine 'prod': an actor it waited on failed (Engine.start()): "), said
    assert KEY not in said and PASSWORD not in said, said
    _holds_no_ray_error(caught.value)
