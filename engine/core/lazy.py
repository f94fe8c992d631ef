"""Lazy package attributes (PEP 562): a package names its public classes and functions, and loads the module
of each on first use, so a process that needs part of a package loads only that part (every Ray worker of the
engine imports the packages of its actor's class)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, home: Mapping[str, str], names: Sequence[str],
                 namespace: MutableMapping[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's ``__getattr__`` and ``__dir__``: ``home`` maps each lazy name to the module it lives in;
    ``namespace`` is the package's ``globals()``, where a loaded name is kept so later lookups skip this."""

    def __getattr__(name: str) -> Any:
        where = home.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
