"""A path of a translated body as the caller wrote it. The endpoint sends an OpenAI body to a Claude model in
Anthropic's shapes (``engine.app._endpoint_claude``), and a Responses body goes as messages
(``engine.core.responses_input``); the engine's checks read the body as it goes on the wire, so a refusal named a
field the caller never sent (``messages[1].content[0].text`` for ``input[1].content[0].text``). ``came`` maps
each moved path (dotted, ``messages.2.content.1``) to the caller's."""

from __future__ import annotations

import re

from engine.core._checks import FieldProblem

__all__ = ["callers_field", "renamed"]

_INDEX = re.compile(r"\[(\d+)\]")


def callers_field(field: str, came: dict[str, str]) -> str:
    """``field`` (a path of the body the engine got, in either style: ``messages[2].content[1]`` or
    ``messages.2.content.1``) as the caller wrote it: the longest recorded prefix of it renamed (``came``),
    written in the style it came in."""
    if not came:
        return field
    parts = _INDEX.sub(r".\1", field).split(".")
    for n in range(len(parts), 0, -1):
        old = came.get(".".join(parts[:n]))
        if old is not None:
            path = ".".join([old, *parts[n:]])
            return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path) if "[" in field else path
    return field


def renamed(problem: FieldProblem, came: dict[str, str], where: str = "body") -> FieldProblem:
    """``problem`` (its field under ``where``, the body's path) with its field, and the field in its message,
    named as the caller wrote it."""
    field = problem.field
    if not came or not field.startswith(f"{where}."):
        return problem
    old = callers_field(field.removeprefix(f"{where}."), came)
    if old == field.removeprefix(f"{where}."):
        return problem
    return FieldProblem(f"{where}.{old}", str(problem).replace(field, f"{where}.{old}"))
