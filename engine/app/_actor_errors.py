"""An actor's error as a driver's public call raises it. Ray gives an actor's exception to the caller as its
``RayTaskError``, whose words are the actor's whole traceback and its exception's: a provider's or a library's
words may quote a key there, and they reached a caller whose own logger the project does not mask (rvmask83,
keys84). Every public call of ``Engine`` that waits on an actor raises through ``masked_actor_errors``: the
project's own errors as they were raised in the actor, anything else a ``SmartbatchError`` naming the call with
Ray's words masked (``engine.core._logkeys.words``)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from engine.core._logkeys import words
from engine.core.errors import SmartbatchError

__all__ = ["actor_errors", "masked_actor_errors"]

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def actor_errors(ray: Any, engine: str | Callable[[], str], call: str,
                 who: str = "an actor it waited on") -> Iterator[None]:
    """Raise an actor's ``RayTaskError`` met inside as its own ``SmartbatchError``, or masked (see the module).
    ``ray``: the module, or a stand-in with its ``exceptions`` (a unit test's); ``engine``: its name, or what
    reads it once an error came."""
    # None: an engine without Ray (a unit test's stand-in)
    task_error = getattr(getattr(ray, "exceptions", None), "RayTaskError", None)
    try:
        yield
    except Exception as exc:
        if task_error is None or not isinstance(exc, task_error):
            raise
        # ``from None``: chained, Ray's error would print whole under the masked one in any traceback
        raise _masked(exc, engine, call, who) from None


def _masked(exc: BaseException, engine: str | Callable[[], str], call: str, who: str) -> SmartbatchError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SmartbatchError):
        return cause
    engine = engine() if callable(engine) else engine
    return SmartbatchError(f"engine {engine!r}: {who} failed ({call}): {words(exc)}")


def masked_actor_errors(fn: F) -> F:
    """``actor_errors`` around a public method of ``Engine``, naming it: one rule for every call, not a copy per
    call."""
    call = f"{fn.__name__}()"

    @functools.wraps(fn)
    def called(eng: Any, *args: Any, **kwargs: Any) -> Any:
        # ``eng``, not ``self``: the stop's ``_inside`` takes a frame whose first name is ``self`` for one of the
        # engine's own methods, which may hold its lock (a stop() from the main thread would wait bounded)
        with actor_errors(eng._ray, lambda: eng.name, call):
            return fn(eng, *args, **kwargs)

    return called  # type: ignore[return-value]
