"""An actor's error as a driver's public call raises it. Ray gives an actor's exception to the caller as its
``RayTaskError``, whose words are the actor's whole traceback and its exception's: a provider's or a library's
words may quote a key there, and they reached a caller whose own logger the project does not mask (rvmask83,
keys84). Every public call of ``Engine`` that waits on an actor raises through ``masked_actor_errors``: the
project's own errors as they were raised in the actor, anything else a ``SmartbatchError`` naming the call with
Ray's words masked (``engine.core._logkeys.words``). What it raises holds no Ray error anywhere in its chain
(``__cause__``, ``__context__``) nor in the locals of its traceback's frames here: ``from None`` hid Ray's error
from a printed traceback only, and a tool that walks the chain or reads a frame's locals (an error tracker's
report) met it whole (rvkeys84)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from engine.core._logkeys import words
from engine.core.errors import SmartbatchError

__all__ = ["actor_errors", "masked_actor_errors", "raise_alone"]

F = TypeVar("F", bound=Callable[..., Any])


class actor_errors:  # noqa: N801 (used as a function: ``with actor_errors(...)``)
    """Raise an actor's ``RayTaskError`` met inside as its own ``SmartbatchError``, or masked (see the module); an
    ``ActorDiedError`` of an actor whose start (``__init__``, a restart's too) failed, whose words quote that
    error's traceback, masked too; the project's errors as they are, any Ray error cut out of their chain.
    ``ray``: the module, or a stand-in with its ``exceptions`` (a unit test's); ``engine``: its name, or what
    reads it once an error came. A class, not ``contextlib.contextmanager``: its ``__exit__`` frame, in the
    traceback of what it raises, kept Ray's error among its locals."""

    def __init__(self, ray: Any, engine: str | Callable[[], str], call: str,
                 who: str = "an actor it waited on") -> None:
        self._ray, self._engine, self._call, self._who = ray, engine, call, who

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        out = _public(exc, self._ray, self._engine, self._call, self._who) if isinstance(exc, Exception) else None
        same = out is exc
        del typ, exc, tb  # (see the class)
        if out is None or same:
            return False  # raised as it was (its Ray links cut, if ours)
        raise_alone(out)


def _public(exc: Exception, ray: Any, engine: str | Callable[[], str], call: str, who: str) -> Exception | None:
    """What a public call raises for ``exc``: a new error, ``exc`` itself (ours, its chain cut), or None (as it is)."""
    exceptions = getattr(ray, "exceptions", None)  # None: an engine without Ray (a unit test's stand-in)
    task_error = getattr(exceptions, "RayTaskError", None)
    died = getattr(exceptions, "RayActorError", None)
    ray_errors = tuple(t for t in (getattr(exceptions, "RayError", None), task_error) if t is not None)
    if task_error is not None and isinstance(exc, task_error):
        cause = getattr(exc, "cause", None)
        out: Exception = cause if isinstance(cause, SmartbatchError) else _masked(exc, engine, call, who)
    elif died is not None and isinstance(exc, died) and getattr(exc, "actor_init_failed", False):
        out = _masked(exc, engine, call, who)
    elif isinstance(exc, SmartbatchError):
        out = exc
    else:
        return None
    _cut(out, ray_errors)
    return out


def _masked(exc: BaseException, engine: str | Callable[[], str], call: str, who: str) -> SmartbatchError:
    engine = engine() if callable(engine) else engine
    return SmartbatchError(f"engine {engine!r}: {who} failed ({call}): {words(exc)}")


def _cut(exc: BaseException, ray_errors: tuple[type, ...]) -> None:
    """Drop every link to a Ray error from ``exc``'s chain (e.g. ``report()``'s ``EngineStopped`` raised from an
    ``ActorDiedError``, whose words quote the dead actor's start-up traceback)."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen and ray_errors:
        seen.add(id(at))
        if isinstance(at.__cause__, ray_errors):
            at.__cause__, at.__suppress_context__ = None, True
        if isinstance(at.__context__, ray_errors):
            at.__context__ = None
        at = at.__cause__ or at.__context__


def raise_alone(out: Exception) -> NoReturn:
    """Raise ``out`` with no ``__context__``: raised in an ``__exit__`` or an ``except`` block, even ``from None``,
    Python chains it to the error being handled (Ray's); re-raised bare, it keeps what it was given."""
    try:
        raise out from None
    except Exception:
        out.__context__ = None
        raise


def masked_actor_errors(fn: F) -> F:
    """``actor_errors`` around a public method of ``Engine``, naming it: one rule for every call, not a copy per
    call."""
    call = f"{fn.__name__}()"

    @functools.wraps(fn)
    def called(eng: Any, *args: Any, **kwargs: Any) -> Any:
        # ``eng``, not ``self``: the stop's ``_inside`` takes a frame whose first name is ``self`` for one of the
        # engine's own methods, which may hold its lock (a stop() from the main thread would wait bounded).
        # ``getattr``: a stand-in without Ray (a unit test's drain) called the method through it and met an
        # AttributeError instead (rvkeys84: test_stop_drain.py failed).
        with actor_errors(getattr(eng, "_ray", None), lambda: eng.name, call):
            return fn(eng, *args, **kwargs)

    return called  # type: ignore[return-value]
