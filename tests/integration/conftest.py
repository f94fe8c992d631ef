import gc
import os
from pathlib import Path

import pytest

from tests._passes import check, select, wanted

# CI sets SMARTBATCH_REQUIRE_REDIS=1: there a Redis test that skips (redis-server missing, or any other reason)
# fails instead, because the Redis settle and the cache TTL are only checked by these tests.
REQUIRE_REDIS_ENV = "SMARTBATCH_REQUIRE_REDIS"
REDIS_FIXTURES = frozenset({"redis_server", "own_redis", "redis_cluster", "redis_cluster_replicas"})
# scripts/test runs the integration tests in two passes: the others on two workers, then the ``solo`` ones alone
# (SMARTBATCH_SOLO=without, then =only). Unset, every test runs.
SOLO_ENV = "SMARTBATCH_SOLO"
# What each scope of the parallel pass takes (a module, or a class of one: what ``--dist loadscope`` keeps on one
# worker), in seconds of its tests' setup, call and teardown (``--durations=0``), measured in stop 75 with other
# work on the machine (about 1.5x a quiet one's: the order is what counts), those whose engines stops 76 and 84
# merged scaled by their engine starts; one not named is taken for short (under 10 s). The pass hands scopes out
# longest first (below): a new long module belongs here.
SCOPE_SECONDS = {
    "test_engine.py": 110, "test_budget_stop_outbox.py": 70, "test_http_engine.py": 60, "test_serve_crash.py": 70,
    "test_driver_crash.py": 60, "test_chaos.py": 52, "test_shared_engine.py": 51, "test_budget_faults_hunt.py": 50,
    "test_redis_cluster_failover.py": 25, "test_batch_crash.py": 38, "test_redis_faults.py": 35,
    "test_batch_crash_redis.py": 35, "test_endpoint_live.py": 33, "test_serve_stop_ledger.py": 38,
    "test_release_faults.py": 26, "test_serve_drain.py": 22, "test_stop_crash.py": 19, "test_metrics_live.py": 21,
    "test_redis_cluster_engine.py": 20, "test_reliability.py": 18, "test_async_api.py": 19, "test_budget_redis.py": 19,
    "test_parity_faults.py": 19, "test_hung_actor.py": 17, "test_batchfile_live.py": 13, "test_flex_http.py": 12,
    "test_driver_resume_live.py": 11,
    "test_engine.py::TestOnOneQuietEngine": 13,
}


@pytest.fixture(autouse=True)
def _collected_at_its_end():
    """A full collection at each test's end (this fixture is torn down after the test's own). An object a test left
    unclosed (a Redis client's connection, a socket, a process) warns when it is collected, and under
    ``filterwarnings = error`` that warning failed whichever test of the worker was running then: stop 80's CI
    failed that way a test that uses no Redis in its process, and stop 55's two more. Collected here, it fails the
    test that left it. Its cost: 0.054 s of CPU a collection in a process holding Ray, the engine and its actors'
    modules (131k objects; measured in stop 80 with the machine loaded): about 6 s on each worker of the
    parallel pass (110 tests each)."""
    yield
    gc.collect()


def _redis_required() -> bool:
    return os.environ.get(REQUIRE_REDIS_ENV, "").strip() == "1"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (start-up costs seconds and ~650 MB here)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    # address="local": never attach to a cluster another test (or a stale current-cluster file) left behind.
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


class RedisServer:
    """A real redis-server on a free port, no persistence; ``stop``/``start`` keep the port (Redis down and
    back). Waiting for it to listen is waiting on the server, bounded, never a fixed sleep."""

    def __init__(self, tmp_dir):
        import shutil
        import socket

        self.binary = shutil.which("redis-server")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tmp_dir
        self.proc = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # Held until the fixture ends: a client dropped unclosed is collected whenever the collector runs, and its
        # ResourceWarning failed whichever test that was (a later test of the worker, under filterwarnings=error).
        self._clients: list = []

    def start(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--enable-debug-command", "yes", "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Wait for the server's own "ready" line: an event, not a guessed delay.
        seen = []
        for line in self.proc.stdout:
            seen.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError(f"redis-server did not start on port {self.port}: {''.join(seen[-5:])}")
        # Keep draining its output so a full pipe never blocks the server.
        import threading

        self._drain = threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True)
        self._drain.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self._gone()
            self.proc = None

    def crash(self) -> None:
        """Kill the server as a crash would (no save on the way out); ``start`` brings it back from its snapshot."""
        self.proc.kill()
        self._gone()

    def _gone(self) -> None:
        self.proc.wait(10)
        # The drain ends at the pipe's EOF, once the server is gone; closed under it while it still read (a test's
        # crash did so at once), its thread raised "I/O operation on closed file", which failed the test.
        self._drain.join(10)
        self.proc.stdout.close()

    def client(self):
        import redis

        c = redis.Redis(port=self.port)
        self._clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()


def _drain(out) -> None:
    """Read a server's output to its end, so a full pipe never blocks it; a pipe closed under it ends it too."""
    try:
        for _ in out:
            pass
    except ValueError:  # closed by ``stop`` after its bounded wait for the end
        pass


def _need_redis():
    import shutil

    if shutil.which("redis-server") is None:
        why = ("redis-server is not installed (apt-get install -y redis-server; scripts/test does it when run "
               "as root)")
        if _redis_required():
            pytest.fail(f"{why}, and {REQUIRE_REDIS_ENV}=1 says Redis tests must run here", pytrace=False)
        pytest.skip(why)


def pytest_configure(config):
    check(SOLO_ENV, "the solo tests")
    # pytest-xdist's loadscope hands scopes out by their number of tests, most first: the one-test modules, the
    # longest of the pass among them (serving and killing real processes, 40-65 s each), came last, and the pass
    # ended with one worker on such a test while the other had run dry. The order of collection (longest first,
    # in ``pytest_collection_modifyitems``) is the one kept instead.
    if getattr(config.option, "dist", "no") == "loadscope":
        config.option.loadscopereorder = False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The solo pass does not import the modules whose source never names the mark: it runs 7 tests of 151, and
    collecting every module cost its one process about 3 s of the critical path before its first test."""
    if (wanted(SOLO_ENV) == "only" and collection_path.suffix == ".py" and collection_path.name.startswith("test_")
            and "solo" not in collection_path.read_text(encoding="utf-8")):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """Deselects by ``SMARTBATCH_SOLO``: ``only`` keeps the tests marked ``solo``, ``without`` the others."""
    select(SOLO_ENV, config, items, lambda item: item.get_closest_marker("solo") is not None)
    if hasattr(config, "workerinput"):  # an xdist worker's collection, whose order its scheduler follows
        # Longest scope first: the short ones left at the end even out the two workers' ends. A stable sort, so
        # each scope's tests keep their order (a module's later tests may read what its earlier ones left on its
        # shared engine).
        items.sort(key=lambda item: -SCOPE_SECONDS.get(_scope(item), 0))


def _scope(item: pytest.Item) -> str:
    """The item's scope as ``--dist loadscope`` groups it (its node id up to the last ``::``), from its file's name."""
    return item.nodeid.rsplit("::", 1)[0].rsplit("/", 1)[-1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under SMARTBATCH_REQUIRE_REDIS=1, a test that uses a Redis fixture and skips, for whatever reason,
    is reported as failed with the skip's reason."""
    outcome = yield
    rep = outcome.get_result()
    if (rep.skipped and not hasattr(rep, "wasxfail") and _redis_required()
            and REDIS_FIXTURES & set(getattr(item, "fixturenames", ()))):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"a Redis test skipped ({reason}), and {REQUIRE_REDIS_ENV}=1 says Redis tests must run here"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session; each test uses its own key prefix."""
    _need_redis()
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.close_clients()
    srv.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone, for stopping and restarting it."""
    _need_redis()
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.close_clients()
    srv.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real local Redis Cluster (three masters, no replicas) for the session (each start takes 2-4 s; three
    modules use it); each test uses its own prefix, and one that pauses a node or takes slots down gives them back."""
    from tests.integration._cluster_redis import LocalCluster

    _need_redis_cli()
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_cluster_replicas(tmp_path_factory):
    """A real local Redis Cluster of three masters with a replica each and a 1 s ``cluster-node-timeout`` (a
    master killed is failed over in about two seconds), for the failover tests; a test that kills a master starts
    it again (``LocalCluster.revive``, it rejoins as a replica), so the next finds three pairs. Every node is
    killed at the end, a stopped one too."""
    from tests.integration._cluster_redis import LocalCluster

    _need_redis_cli()
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster-replicas"), replicas=1, node_timeout_ms=1000)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _need_redis_cli() -> None:
    """Skip (fail under SMARTBATCH_REQUIRE_REDIS=1) without redis-server or redis-cli."""
    import shutil

    _need_redis()
    if shutil.which("redis-cli") is None:  # it joins the nodes (installed with redis-server by apt)
        why = "redis-cli is not installed (apt-get install -y redis-tools), and it makes the local Redis Cluster"
        if _redis_required():
            pytest.fail(f"{why}, and {REQUIRE_REDIS_ENV}=1 says Redis tests must run here", pytrace=False)
        pytest.skip(why)
