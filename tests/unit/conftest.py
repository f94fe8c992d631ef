"""``scripts/test`` runs the unit tests in two parts (SMARTBATCH_REALTIME=only, then =without; unset, all of them):
first, alone, those whose verdict rests on real time, then the others beside the integration tests' solo pass at
idle priority, where a test may be held off the CPU for a moment whenever that pass wants it. A test rests on real
time when an HTTP emulator runs during it: the emulator's clock is the real one times its speed-up (often 1,000:
a test held off the CPU for 0.4 s missed a window of 400 emulated seconds beside the solo pass in stop 53). That
is every test of a module whose source names the ``Emulator`` class, an ``emu`` or a ``Rig`` (the dispatcher rig
that calls one), and any test marked ``realtime``."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from tests._passes import check, select

REALTIME_ENV = "SMARTBATCH_REALTIME"


_RUNS_AN_EMULATOR = re.compile(r"\bEmulator\b|\bemu\b|\bRig\(")


@functools.cache
def _module_runs_an_emulator(path: Path) -> bool:
    return bool(_RUNS_AN_EMULATOR.search(path.read_text(encoding="utf-8")))


def is_realtime(item: pytest.Item) -> bool:
    return item.get_closest_marker("realtime") is not None or _module_runs_an_emulator(Path(item.path))


def pytest_configure(config):
    check(REALTIME_ENV, "the tests that run an emulator in real time")


def pytest_collection_modifyitems(config, items):
    select(REALTIME_ENV, config, items, is_realtime)
