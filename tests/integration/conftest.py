import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (start-up costs seconds and ~650 MB here)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    # address="local": never attach to a cluster another test (or a stale current-cluster file) left behind.
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
