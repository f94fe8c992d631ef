"""The passes of ``scripts/test`` skip importing the modules none of whose tests they keep (stop 69). Skipped by
both unit passes, or by the solo pass while it holds a solo test, a module's tests would silently never run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration import conftest as integration
from tests.unit import conftest as unit

TESTS = Path(__file__).resolve().parents[1]


def _kept(hook, env: str, want: str, path: Path, monkeypatch) -> bool:
    monkeypatch.setenv(env, want)
    return not hook(path, None)


def test_every_unit_module_is_imported_by_the_pass_that_runs_its_tests(monkeypatch):
    for path in sorted((TESTS / "unit").glob("test_*.py")):
        runs = unit._module_runs_an_emulator(path)
        assert _kept(unit.pytest_ignore_collect, unit.REALTIME_ENV, "only" if runs else "without", path,
                     monkeypatch), path
        # The other pass skips it, unless its source names the mark (a test of it may be realtime).
        other = _kept(unit.pytest_ignore_collect, unit.REALTIME_ENV, "without" if runs else "only", path,
                      monkeypatch)
        assert other == (not runs and "realtime" in path.read_text(encoding="utf-8")), path


def test_the_solo_pass_imports_every_module_that_names_the_mark_and_the_others_pass_imports_all(monkeypatch):
    for path in sorted((TESTS / "integration").glob("test_*.py")):
        names = "solo" in path.read_text(encoding="utf-8")
        assert _kept(integration.pytest_ignore_collect, integration.SOLO_ENV, "only", path, monkeypatch) == names
        assert _kept(integration.pytest_ignore_collect, integration.SOLO_ENV, "without", path, monkeypatch)


@pytest.mark.parametrize("want", ["", "only", "without"])
def test_what_is_not_a_test_module_is_left_to_pytest(monkeypatch, want):
    for hook, env in ((unit.pytest_ignore_collect, unit.REALTIME_ENV),
                      (integration.pytest_ignore_collect, integration.SOLO_ENV)):
        for path in (TESTS / "unit" / "helpers.py", TESTS / "integration" / "_parity.py", TESTS / "unit"):
            monkeypatch.setenv(env, want)
            assert hook(path, None) is None


def _bytecode_collections() -> list[tuple[str, list[str]]]:
    """The collections ``scripts/test`` makes with bytecode on (``PYTHONDONTWRITEBYTECODE=`` emptied): each one's
    SMARTBATCH_REALTIME and the test directories it names."""
    text = (TESTS.parent / "scripts" / "test").read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#") and "--collect-only" in line and "PYTHONDONTWRITEBYTECODE= " in line:
            env = re.search(r"SMARTBATCH_REALTIME=(\w*)", line)
            found.append((env.group(1) if env else "", re.findall(r"\btests/\w+", line)))
    return found


def test_every_test_module_has_its_asserts_rewritten_once_before_the_passes(monkeypatch):
    """Where PYTHONDONTWRITEBYTECODE is set (our machines), a module that no collection with bytecode on imported
    has its asserts rewritten again by each worker of the pass that runs it: the last unit pass's four workers
    spent 12.9 CPU-s apiece collecting against 5.4 with them kept (stop 86)."""
    made = _bytecode_collections()
    unit_envs = [env for env, dirs in made if "tests/unit" in dirs]
    assert any("tests/integration" in dirs for _, dirs in made), made
    for path in sorted((TESTS / "unit").glob("test_*.py")):
        assert any(_kept(unit.pytest_ignore_collect, unit.REALTIME_ENV, env, path, monkeypatch)
                   for env in unit_envs), (path, made)
