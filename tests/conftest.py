from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.core.catalog import default_catalog
from engine.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """The shared real data beside the checkout (../shared/data/real), or SMARTBATCH_DATA_DIR."""
    env = os.environ.get("SMARTBATCH_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = real_data_dir()
    if not (d / "SOURCES.md").exists():
        pytest.skip(f"real data not found at {d}: put the shared data beside the checkout "
                    "(../shared/data/real) or set SMARTBATCH_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def catalog():
    return default_catalog()


@pytest.fixture(scope="session")
def settings():
    return Settings()
