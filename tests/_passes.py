"""The passes of ``scripts/test``: an environment variable set to ``only`` keeps the tests a rule picks, ``without``
the others; unset, every test runs (tests/unit/conftest.py, tests/integration/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest


def wanted(env: str) -> str:
    return os.environ.get(env, "").strip()


def check(env: str, what: str) -> None:
    """In ``pytest_configure``, before pytest-xdist starts its workers: a collection error in each would hide it."""
    if wanted(env) not in ("", "only", "without"):
        raise pytest.UsageError(f"{env}={wanted(env)!r}: use 'only' ({what}), 'without' (the others) or leave it "
                                "unset (every test)")


def select(env: str, config: pytest.Config, items: list[pytest.Item], picked: Callable[[pytest.Item], bool]) -> None:
    """In ``pytest_collection_modifyitems``: deselect by ``env``."""
    want = wanted(env)
    if not want:
        return
    keep, drop = [], []
    for item in items:
        (keep if picked(item) == (want == "only") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
