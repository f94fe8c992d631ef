"""Checks of a request's raw values that do not need the catalog: valid Unicode, a body that is JSON. They
raise ``FieldProblem``, which names the field to fix; ``engine.core.request`` runs them while filling
defaults."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FieldProblem", "check_json", "check_text"]


class FieldProblem(ValueError):
    """A cross-field problem found while filling defaults, tagged with the field the user should fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_text(value: Any, where: str) -> None:
    """Strings must be valid Unicode: a lone surrogate (what json.loads gives for an escaped half pair) cannot
    be encoded for any provider, so it is refused here, per request, rather than failing a whole batch later.
    Walked with a stack, not recursion, so a deeply nested body cannot exhaust Python's stack."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise FieldProblem(where, f"{where} is not valid Unicode (a lone surrogate such as \\ud800); "
                                   "send UTF-8 text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def check_json(body: dict, where: str) -> None:
    """The body is sent as JSON, fingerprinted as JSON and carried between processes: anything else (a
    number as an object key, a set, a generator, NaN) is refused here, per request, rather than failing the
    call that carries its neighbours. Walked with a stack, as ``check_text``."""
    stack: list[tuple[str, Any]] = [(where, body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise FieldProblem(path, f"{path} has the key {k!r} ({type(k).__name__}); JSON object keys "
                                       f"are strings: write it as {str(k)!r}")
                stack.append((f"{path}.{k}", item))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{path}[{n}]", item) for n, item in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise FieldProblem(path, f"{path} is {v!r}, which JSON cannot carry; send a finite number")
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise FieldProblem(path, f"{path} is a {type(v).__name__}, not JSON; send strings, numbers, true/"
                               "false, null, lists and objects")
