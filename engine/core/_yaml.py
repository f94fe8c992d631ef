"""A YAML file's parse error as one line: where (file:line:column) and what the parser expected, for the
catalog and a variants file alike (PyYAML's own message is several lines, with a pointer under the text)."""

from __future__ import annotations

import yaml

__all__ = ["yaml_problem"]


def yaml_problem(exc: yaml.YAMLError, where: str) -> str:
    """``"{where}:{line}:{column}: not valid YAML ({what})"``, the line and column from 1 where PyYAML gives them."""
    mark = getattr(exc, "problem_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{at}: not valid YAML ({what})"
