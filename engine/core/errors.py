"""Every error smartbatch raises on purpose.

    SmartbatchError
    ├── ConfigError          a setting or catalog entry is wrong (names the field and the fix)
    │   └── CatalogError     the provider/model catalog is invalid or lacks a model
    ├── TraceError           a trace line is invalid (file, line, field, fix)
    ├── RegistryError        unknown or doubly registered policy name
    ├── PolicyError          a policy returned something the engine cannot carry out
    ├── ProviderError        a (simulated or real) provider call failed for good
    ├── RequestError         a request given to submit() is invalid (names the field)
    ├── EngineStopped        submit() on a stopped engine
    └── Overloaded           too many unfinished requests: submit() could not wait

Library errors are wrapped with ``raise X(...) from exc`` so callers only catch ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

__all__ = [
    "CatalogError",
    "ConfigError",
    "EngineStopped",
    "Overloaded",
    "RequestError",
    "PolicyError",
    "ProviderError",
    "RegistryError",
    "SmartbatchError",
    "TraceError",
]


class SmartbatchError(Exception):
    """Base of every smartbatch error."""


class ConfigError(SmartbatchError):
    """A setting is wrong; the message names the setting and what to change."""


class CatalogError(ConfigError):
    """The provider/model catalog is invalid or lacks what a request asks for."""


class TraceError(SmartbatchError):
    """One or more trace lines are invalid.

    ``problems`` holds ``(path, line_no, field, message)`` tuples, one per problem (a line may have several;
    line 0: the whole file or a command-line option), so a caller can show them all at once instead of making
    the user fix one line per run. ``hint`` ends the message: what to do about them.
    """

    HINT = "fix the line(s) named, or pass --skip-invalid to skip and count bad lines"

    def __init__(self, problems: list[tuple[str, int, str, str]], hint: str | None = None, what: str = "trace"):
        self.problems = problems
        hint = self.HINT if hint is None else hint
        self._made = (problems, hint, what)
        lines = [_where(p, n, f, m) for p, n, f, m in problems[:20]]
        if len(problems) == 1:
            text = lines[0] + (f"; {hint}" if hint else "")
        else:
            more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
            tail = f"\n{hint[:1].upper()}{hint[1:]}." if hint else ""
            # A line may hold several problems: "27 invalid line(s)" of a 19-line file counted problems as lines
            # (and a whole file's, line 0, as one more line).
            on_lines = [(p, n) for p, n, _, _ in problems if n]
            bad = len(set(on_lines))
            head = f"{len(problems)}" if not bad else f"{bad}" if bad == len(on_lines) else \
                f"{len(on_lines)} problems on {bad}"
            text = f"{head} invalid {what} line(s):\n" + "\n".join(lines) + more + tail
        super().__init__(text)

    def __reduce__(self):
        # Raised in a Ray task, it is pickled to the caller: rebuilt from its message alone it could not be made
        # again, and Ray gave an UnserializableException in its place.
        return type(self), self._made, self.__dict__


def _where(path: str, line: int, field: str, message: str) -> str:
    at = f"{path}:{line}" if line else path
    return f"{at}: field '{field}': {message}"


class RegistryError(SmartbatchError):
    """A policy name is unknown or registered twice."""


class PolicyError(SmartbatchError):
    """A policy's decision cannot be carried out."""


class ProviderError(SmartbatchError):
    """A provider call failed after all retries. ``maybe_done``: no answer came (a timeout, a dropped connection,
    a 5xx), so the provider may have done what was asked. ``retry_after_s``: it was rate limited (a 429), so
    nothing was done, and it may be made again after that many seconds. ``quota``: the provider refused it for
    the account's billing (no credit, a spend limit), saying so in this message; no wait lifts it."""

    maybe_done: bool = False
    retry_after_s: float | None = None
    quota: str | None = None


class EngineStopped(SmartbatchError):
    """``submit`` on an engine that was stopped (start a new one with ``Engine.start``). ``admitted``: how many of
    the call's requests were let in before the stop, by parts of a call larger than the room (sent: they may be
    billed); none for a call refused whole."""

    admitted = 0


class Overloaded(SmartbatchError):
    """The engine holds ``max_pending`` unfinished requests and ``submit`` could not wait (``overload="raise"``, or a
    done-callback's submit) or waited ``submit_timeout_s`` in vain: retry later, or raise ``max_pending``.
    ``futures``: those of the new requests the call queued before it gave up, in parts of a call larger than the room
    (``overload="block"``), in the order given (``admitted``: how many); they run on, and the same requests submitted
    again give them back, never a second call (none: nothing of the call was queued, as always with
    ``overload="raise"``). Raised in a Ray task it reaches the caller with ``admitted`` and no ``futures`` (they stay
    with the driver that holds them)."""

    def __init__(self, message: str, futures: Sequence[Future] = ()):
        super().__init__(message)
        self.futures, self.admitted = list(futures), len(futures)

    def __reduce__(self):
        # Raised in a Ray task, it is pickled to the caller: its futures (a lock each) cannot be, and Ray gave an
        # UnserializableException in its place. The count crosses; the futures stay with the driver holding them.
        return type(self), (str(self),), {"futures": [], "admitted": self.admitted}


class RequestError(SmartbatchError, ValueError):
    """A request given to ``submit`` is invalid. ``field`` names what to fix; nothing was queued, but for a call let
    in by parts (``overload="block"``) refused as it waited for room because another submit took one of its ids
    with other content (``id_taken``): its earlier parts run on, and the message says how many. ``position``:
    where it was among the requests of one ``submit_many`` (from 0), which names a request that has no id.
    ``code``: a machine-readable kind, where callers tell one apart (``id_taken``: the id names other content).
    A ``ValueError`` too: ``Request(**kw)`` raised pydantic's ``ValidationError`` (one) before it said the field
    and the fix, and a driver's ``except ValueError`` around it must still catch the refusal."""

    def __init__(self, request_id: str | None, field: str, message: str, position: int | None = None,
                 code: str | None = None):
        self.request_id, self.field, self.position, self.code = request_id, field, position, code
        self._message = message
        rid = f"request {request_id!r}" if request_id else "request"
        at = f" (at {position} of the requests given, counting from 0)" if position is not None else ""
        super().__init__(f"{rid}{at}: field '{field}': {message}")

    def __reduce__(self):
        # Request(**kw) in a Ray task: pickled to the caller, as TraceError is (and pydantic's error was).
        return type(self), (self.request_id, self.field, self._message, self.position, self.code), self.__dict__
