"""The problem a check of a request's raw values raises. Apart from ``engine.core._checks`` so that the checks split
from it (``_body_checks``) raise it too, and ``_checks`` imports them back."""

from __future__ import annotations

__all__ = ["FieldProblem"]


class FieldProblem(ValueError):
    """A cross-field problem found while filling defaults, tagged with the field the user should fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
