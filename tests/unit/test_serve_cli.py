"""`smartbatch serve` without Ray: one serve per engine name on a machine (a second one is refused at once, naming
the first), an endpoint port already in use is refused, and a stop that Ray goes down under does not wait on it.
The real processes (a serve, a second serve, a SIGTERM to the process group) are in
tests/integration/test_serve_crash.py."""

import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from typer.testing import CliRunner

from engine.app import cli_serve
from engine.app.cli import app
from engine.app.cli_serve import NameClaim, stop_or_lose_ray
from engine.app.serve_http import port_in_use, start_endpoint
from engine.core.errors import ConfigError

runner = CliRunner()


@pytest.fixture(autouse=True)
def own_claims(tmp_path, monkeypatch):
    """Claims in this test's own directory; and no serve here may get as far as starting an engine."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def started(*_a, **_k):
        raise AssertionError("serve went on to start an engine")
    monkeypatch.setattr(cli_serve, "_settings", started)
    return tmp_path


def test_a_second_serve_of_a_name_is_refused_naming_the_first_and_the_fix():
    first = NameClaim("prod")
    try:
        first.publish(address="10.0.0.5:6379", endpoint="http://127.0.0.1:8000/v1")
        r = runner.invoke(app, ["serve", "--name", "prod", "--http-port", "8000"])
        assert r.exit_code == 2, r.output
        out = " ".join(r.output.split())
        assert out.startswith("error: engine 'prod' is already served on this machine"), out
        for fact in (f"pid {cli_serve.os.getpid()}", "Ray address 10.0.0.5:6379", "endpoint http://127.0.0.1:8000/v1",
                     "smartbatch stop --name prod --address 10.0.0.5:6379", "another --name"):
            assert fact in out, (fact, out)
        # Another name is not this one's business (it fails here only at the engine start this test forbids).
        assert _went_on(["serve", "--name", "staging"])
    finally:
        first.release()
    assert not first.path.exists()  # nothing left behind in the temp directory
    assert _went_on(["serve", "--name", "prod"])  # released: the name is free again


def _went_on(args: list[str]) -> bool:
    r = runner.invoke(app, args)
    return r.exit_code == 1 and "serve went on to start an engine" in r.output


def test_a_claim_is_held_by_the_process_and_dropped_when_it_ends(own_claims):
    """Two processes, as two serves would be; the kernel drops the lock when the holder exits, however it exits."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from engine.app.cli_serve import NameClaim; "
                               "c = NameClaim('prod'); print('held', flush=True); sys.stdin.read()"],
                              env={**cli_serve.os.environ, "TMPDIR": str(own_claims)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"pid {holder.pid}, still starting\); stop it first"):
            NameClaim("prod")
    finally:
        holder.kill()  # no release(): as a crash or SIGKILL would leave it
        holder.wait(30)
        holder.stdout.close()
        holder.stdin.close()
    NameClaim("prod").release()


def test_an_endpoint_port_in_use_is_refused_naming_the_engine_there():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = runner.invoke(app, ["serve", "--name", "other", "--http-port", str(port)])
        assert r.exit_code == 2, r.output
        out = " ".join(r.output.split())
        assert f"--http-port {port}: 127.0.0.1:{port} is in use" in out and "another --http-port (0: a free one)" in out
        assert "stop what listens there" in out
        first = NameClaim("prod")
        try:
            first.publish(address="10.0.0.5:6379", endpoint=f"http://127.0.0.1:{port}/v1")
            out = " ".join(runner.invoke(app, ["serve", "--name", "other", "--http-port", str(port)]).output.split())
            assert f"engine 'prod' serves its endpoint there (pid {cli_serve.os.getpid()})" in out, out
            assert "smartbatch stop --name prod --address 10.0.0.5:6379" in out
        finally:
            first.release()


def test_a_port_shared_with_so_reuseport_counts_as_in_use():
    # Ray Serve's proxy listens with SO_REUSEPORT: a second proxy (a second engine's) on its port did not fail,
    # it shared the port, and the kernel split the connections between the two engines.
    with socket.socket() as proxy:
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        port = proxy.getsockname()[1]
        assert port_in_use("127.0.0.1", port) is not None
        assert port_in_use("0.0.0.0", port) is not None
        with pytest.raises(ConfigError, match=rf"port {port}: 127.0.0.1:{port} is in use .*another port"):
            start_endpoint("prod", port=port)  # refused before Serve starts: no Ray here
    assert port_in_use("127.0.0.1", port) is None


# --- stopping: the engine's Ray calls against Ray's own processes -------------------------------------------

def test_a_stop_returns_when_a_ray_process_exits_under_calls_that_would_block():
    """SIGTERM to the whole process group stops Ray's processes too; the stop's Ray calls then blocked for a
    minute. Here a real process stands for Ray's, and the calls block until the test ends."""
    never = threading.Event()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        outcome: list[str] = []
        t = threading.Thread(target=lambda: outcome.append(stop_or_lose_ray(never.wait, [proc], timeout_s=60,
                                                                            grace_s=0.5)))
        t.start()
        proc.kill()
        proc.wait(30)
        t.join(30)
        assert outcome == ["ray-gone"]
    finally:
        never.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdin.close()


def test_a_stop_that_shuts_its_own_ray_down_is_done_not_ray_gone():
    """An engine that started its Ray shuts it down at the end of its stop, so Ray's processes exit before the
    steps return: every `smartbatch batch` run ended as if interrupted (exit 130, "interrupted" printed)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    killed = threading.Event()

    def steps():  # the engine's stop, ending with ray.shutdown(): the processes go, then the call returns
        proc.kill()
        proc.wait(30)
        killed.set()
        threading.Event().wait(0.3)  # what ray.shutdown() still does after its processes are gone
    try:
        assert stop_or_lose_ray(steps, [proc], timeout_s=60, grace_s=30) == "done" and killed.is_set()
    finally:
        proc.stdin.close()


def test_a_stop_with_ray_running_waits_for_its_calls_and_raises_their_error():
    calls: list[str] = []
    assert stop_or_lose_ray(lambda: calls.append("stopped"), []) == "done" and calls == ["stopped"]

    def fails():
        raise RuntimeError("the hub said no")
    with pytest.raises(RuntimeError, match="the hub said no"):
        stop_or_lose_ray(fails, [])
    never = threading.Event()
    try:
        t0 = time.monotonic()
        assert stop_or_lose_ray(never.wait, [], timeout_s=0.2) == "timeout"
        assert time.monotonic() - t0 < 10
    finally:
        never.set()


def test_the_serve_watch_outlasts_a_read_that_fails_twice_and_ends_when_the_engine_is_gone(monkeypatch):
    """One failed read of the engine's layout (a busy GCS) used to end serve, and with it the engine for every
    driver attached; three in a row now do, and a layout that is gone ends it at once."""
    import threading

    import actors._peer
    from engine.app.cli_serve import _watch_layout

    answers = iter([RuntimeError("busy"), RuntimeError("busy"), {"kinds": []}, RuntimeError("busy"), None])
    seen = []

    def read_layout(name):
        a = next(answers)
        seen.append(a)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(actors._peer, "read_layout", read_layout)
    done = threading.Event()
    _watch_layout("prod", done, every_s=0.001)
    assert done.is_set() and len(seen) == 5 and seen[-1] is None


def test_stop_without_address_finds_the_serve_of_that_name_on_this_machine(monkeypatch):
    """Each serve starts a Ray of its own; `--address auto` is Ray's guess, which took another Ray of the machine
    (a `ray start` cluster, another job's) and said "no engine named 'prod' runs (running: none)" while it ran.
    The README's `smartbatch stop --name prod` now uses the address that serve published."""
    import ray

    import engine.app._driver_shared as shared
    from engine.app.driver import Engine

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the suite's own Ray may run in this process
    asked = []

    def init(address, flag="address"):
        asked.append(address)
        raise ConfigError("stop here")
    monkeypatch.setattr(shared, "init_ray", init)
    claim = NameClaim("prod")
    try:
        claim.publish(address="10.0.0.5:6379")
        runner.invoke(app, ["stop", "--name", "prod"])
        runner.invoke(app, ["stop", "--name", "staging"])  # no serve of that name here: Ray's own guess
        with pytest.raises(ConfigError):
            Engine.connect("prod")
    finally:
        claim.release()
    runner.invoke(app, ["stop", "--name", "prod"])  # that serve has ended
    assert asked == ["10.0.0.5:6379", "auto", "10.0.0.5:6379", "auto"]


def test_an_endpoint_key_variable_that_is_not_set_is_refused_naming_it(monkeypatch):
    monkeypatch.delenv("SB_TEST_ENDPOINT_KEY", raising=False)
    r = runner.invoke(app, ["serve", "--name", "keyed", "--http-port", "0", "--http-key-env", "SB_TEST_ENDPOINT_KEY"])
    assert r.exit_code == 2 and "--http-key-env SB_TEST_ENDPOINT_KEY" in " ".join(r.output.split()), r.output
    monkeypatch.setenv("SB_TEST_ENDPOINT_KEY", "s3cret-key")
    assert _went_on(["serve", "--name", "keyed", "--http-port", "0", "--http-key-env", "SB_TEST_ENDPOINT_KEY"])


def test_an_endpoint_key_given_in_place_of_its_variable_is_refused_and_never_printed(monkeypatch):
    """``--http-key-env $KEY`` (the key where its variable's name goes): "the variable <key> is not set" printed
    the key (a review of stop 70)."""
    monkeypatch.delenv("sk-live-s3cret", raising=False)
    r = runner.invoke(app, ["serve", "--name", "keyed", "--http-port", "0", "--http-key-env", "sk-live-s3cret"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and out.startswith("error: --http-key-env") and "never the key itself" in out, out
    assert "s3cret" not in out, out


def test_a_tenant_key_is_refused_before_anything_starts_naming_the_option_and_the_fix(monkeypatch):
    """``--http-tenant-key TENANT=VAR``: each fault is one error naming the option and the fix, and no key is ever
    printed, not even one given in place of its variable."""
    for var, key in (("SB_TEST_ACME", "sk-acme-key"), ("SB_TEST_ALSO", "sk-acme-key"), ("SB_TEST_GLOBEX", "sk-gx"),
                     ("SB_TEST_ADMIN", "sk-admin-key"), ("SB_TEST_BLANK", "  ")):
        monkeypatch.setenv(var, key)
    monkeypatch.delenv("SB_TEST_UNSET", raising=False)

    def refused(*specs: str, port: bool = True, admin: bool = False) -> str:
        args = ["serve", "--name", "keyed", *(["--http-port", "0"] if port else []),
                *(["--http-key-env", "SB_TEST_ADMIN"] if admin else [])]
        for spec in specs:
            args += ["--http-tenant-key", spec]
        r = runner.invoke(app, args)
        out = " ".join(r.output.split())
        assert r.exit_code == 2 and out.startswith("error: --http-tenant-key"), (specs, r.output)
        assert not any(key in out for key in ("sk-acme-key", "sk-gx", "sk-admin-key", "sk-inline")), out
        return out

    assert "TENANT=VAR" in refused("SB_TEST_ACME") and "TENANT=VAR" in refused("=SB_TEST_ACME")
    # the key alone, in place of TENANT=VAR (a shell's $ACME_KEY): it was echoed in full (a review of stop 70)
    assert "TENANT=VAR" in refused("sk-inline") and "TENANT=VAR" in refused("=sk-inline")
    assert "never the key itself" in refused("acme=sk-inline")  # the key where its variable's name goes
    assert "never the key itself" in refused("acme=")
    assert "tenant 'a\\tb'" in refused("a\tb=SB_TEST_ACME")  # a name the engine refuses
    assert "tenant ' acme'" in refused(" acme=SB_TEST_ACME")  # one a header could not carry
    assert "SB_TEST_UNSET is not set or empty" in refused("acme=SB_TEST_UNSET")
    assert "SB_TEST_BLANK is not set or empty" in refused("acme=SB_TEST_BLANK")
    out = refused("acme=SB_TEST_ACME", "globex=SB_TEST_ALSO")  # one key for two tenants
    assert "SB_TEST_ALSO holds the same key as SB_TEST_ACME, the key of tenant 'acme'" in out and "its own key" in out
    out = refused("acme=SB_TEST_ADMIN", admin=True)  # the operator's key, which acts for every tenant
    assert "--http-key-env SB_TEST_ADMIN" in out and "a key of its own" in out
    assert "pass --http-port too" in refused("acme=SB_TEST_ACME", port=False)
    # Good ones go on (one tenant may have several keys, a tenant's name may hold '='), and no key is asked of
    # the operator: a tenant key alone on an address others can reach is no keyless endpoint.
    assert _went_on(["serve", "--name", "keyed", "--http-port", "0", "--http-key-env", "SB_TEST_ADMIN",
                     "--http-tenant-key", "acme=SB_TEST_ACME", "--http-tenant-key", "acme=SB_TEST_ALSO",
                     "--http-tenant-key", "team=2=SB_TEST_GLOBEX"])
    r = runner.invoke(app, ["serve", "--name", "open", "--http-host", "0.0.0.0", "--http-port", "0",
                            "--http-tenant-key", "acme=SB_TEST_ACME"])
    assert "serve went on to start an engine" in r.output and "asks no key" not in r.output, r.output


def test_an_endpoint_others_can_reach_without_a_key_is_warned_of():
    r = runner.invoke(app, ["serve", "--name", "open", "--http-host", "0.0.0.0", "--http-port", "0"])
    assert "asks no key" in " ".join(r.output.split()) and "--http-key-env" in r.output, r.output
    assert "asks no key" not in runner.invoke(app, ["serve", "--name", "local", "--http-port", "0"]).output


def test_a_state_dir_needs_the_endpoint_and_a_writable_directory(tmp_path):
    r = runner.invoke(app, ["serve", "--name", "stateful", "--state-dir", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--state-dir" in r.output and "--http-port" in r.output, r.output
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = runner.invoke(app, ["serve", "--name", "stateful", "--http-port", "0", "--state-dir", str(blocker / "s")])
    assert r.exit_code == 2 and f"--state-dir {blocker / 's'}" in " ".join(r.output.split()), r.output
    assert _went_on(["serve", "--name", "stateful", "--http-port", "0", "--state-dir", str(tmp_path / "s")])
    assert (tmp_path / "s").is_dir()


def test_a_stop_that_fails_as_ray_goes_down_under_it_is_ray_gone_not_an_error():
    """A SIGTERM to the whole process group reaches Ray's processes and serve's at once: a step can fail on the
    dying GCS a moment before any of them has exited. That is Ray gone (serve exits 0), not a failed stop (1)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    failed = threading.Event()

    def steps():
        failed.set()
        raise ConnectionError("the GCS went away")

    def ray_goes_down():
        failed.wait(30)
        proc.kill()
    try:
        threading.Thread(target=ray_goes_down, daemon=True).start()
        assert stop_or_lose_ray(steps, [proc], timeout_s=60, grace_s=0.0) == "ray-gone"
        proc.wait(30)
        # With Ray's processes all running through the settle time, the step's error is the stop's.
        alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        try:
            with pytest.raises(ConnectionError, match="the GCS went away"):
                stop_or_lose_ray(steps, [alive], timeout_s=60, grace_s=0.0)
        finally:
            alive.kill()
            alive.wait(30)
            alive.stdin.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()


def test_stop_returns_once_the_serve_it_stopped_has_let_go_of_the_name(own_claims, monkeypatch):
    """`smartbatch stop` returned as the engine went, and its serve took 7 s more (its endpoint, its Ray) to let go
    of the name: `stop` then `serve` again, a restart on the same --state-dir, was refused as already served (a
    helper's tour). A real process stands for serve; it exits a moment after the engine is stopped."""
    from engine.app.driver import Engine

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engine.app.cli_serve import NameClaim; "
                               "c = NameClaim('prod'); c.publish(address='10.0.0.5:6379'); print('held', flush=True); "
                               "sys.stdin.read(); time.sleep(0.5)"],
                              env={**cli_serve.os.environ, "TMPDIR": str(own_claims)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    stopped = []

    def stop_named(name, *, address, **_):
        stopped.append((name, address))
        holder.stdin.close()  # the engine is gone: its serve begins to exit
        return 9
    monkeypatch.setattr(Engine, "stop_named", staticmethod(stop_named))
    monkeypatch.setattr(cli_serve, "check_answers", lambda *_: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = runner.invoke(app, ["stop", "--name", "prod"])
        assert r.exit_code == 0 and "stopped engine 'prod' (9 actors)" in r.output, r.output
        assert holder.poll() is not None  # gone by the time stop returned
        NameClaim("prod").release()  # and a new serve may take the name
        assert stopped == [("prod", "auto")]
    finally:
        holder.kill()
        holder.wait(30)
        holder.stdout.close()


def test_a_stop_while_another_stop_of_the_engine_runs_says_so_plainly_and_exits_0(monkeypatch):
    """Two `smartbatch stop --name` at once (a script's loop, two shells): the second said at ERROR that the budget
    ledger "did not say what waits for its Redis ... whatever it held is dropped", or that no engine of that name
    ran (exit 2), neither true. Now it says a stop is under way, waits for it (``Engine.stop_named``'s
    ``waiting``), and says the engine stopped: exit 0, as the first."""
    from engine.app.driver import Engine

    def stop_named(name, *, address, waiting=None, **_):
        if waiting is not None:
            waiting({"pid": 4242, "host": "box", "at": time.time(), "job": "02000000"})
        return 0  # the stop under way stopped it
    monkeypatch.setattr(Engine, "stop_named", staticmethod(stop_named))
    monkeypatch.setattr(cli_serve, "check_answers", lambda *_: None)
    r = runner.invoke(app, ["stop", "--name", "prod", "--address", "10.0.0.5:6379"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0, said
    assert "a stop of engine 'prod' is already under way (pid 4242 on box" in said and "waiting for it to end" in said
    assert "engine 'prod' stopped, by the stop that was under way" in said and "error" not in said.lower()
