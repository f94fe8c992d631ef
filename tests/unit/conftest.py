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
import sys
from pathlib import Path

import pytest

from tests._passes import check, select, wanted

REALTIME_ENV = "SMARTBATCH_REALTIME"


_RUNS_AN_EMULATOR = re.compile(r"\bEmulator\b|\bemu\b|\bRig\(")


@functools.cache
def _module_runs_an_emulator(path: Path) -> bool:
    return bool(_RUNS_AN_EMULATOR.search(path.read_text(encoding="utf-8")))


def is_realtime(item: pytest.Item) -> bool:
    return item.get_closest_marker("realtime") is not None or _module_runs_an_emulator(Path(item.path))


def pytest_configure(config):
    check(REALTIME_ENV, "the tests that run an emulator in real time")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """A pass does not import the modules none of whose tests it would keep: each worker of each pass collected
    all 133 modules (12 CPU-s apiece, four workers a pass on 2 cores: 25 s before the realtime pass's first test).
    Under ``without``, a module that runs an emulator has no test left (the rule is per module); under ``only``, a
    module that runs none has no test left unless its source names the ``realtime`` mark. Decided from the
    source, as ``is_realtime`` does, so a pass keeps exactly the tests ``pytest_collection_modifyitems`` would."""
    want = wanted(REALTIME_ENV)
    if not want or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    runs = _module_runs_an_emulator(collection_path)
    if want == "without":
        return True if runs else None
    return None if runs or "realtime" in collection_path.read_text(encoding="utf-8") else True


def pytest_collection_modifyitems(config, items):
    select(REALTIME_ENV, config, items, is_realtime)


@pytest.fixture(autouse=True)
def _no_ray_started():
    """A unit test runs no Ray: one that started a local Ray by accident (an unpatched ``ray.get_actor`` auto-inits
    it) cost 3 s and 650 MB, and a session's Ray fixture later in the same process then refused to start. (A Ray
    an integration test's session fixture started before it, in one pytest run of both, is that fixture's.)"""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this unit test started a local Ray: patch the Ray calls it reaches (tests/unit run without Ray)")
