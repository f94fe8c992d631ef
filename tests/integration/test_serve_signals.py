"""`smartbatch serve` as real processes: a second serve of its name, or on its endpoint's port, is refused at
once naming it; and a SIGTERM to its whole process group (what `timeout`, systemd's control-group stop or
`kill -- -PGID` send) stops it in seconds, leaving none of its Ray's processes behind. That SIGTERM reached Ray's
own processes too (they block only SIGINT), and serve's stop then waited a minute on the dead GCS.

One serve start for all of it (a Ray and an engine cost seconds); the checks without Ray are in
tests/unit/test_serve_cli.py.
"""

import os
import queue
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration._catalogs import openai_only_file

BIN = Path(sys.executable).parent / "smartbatch"


def _env():
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (the serve and the Ray processes it started)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except (OSError, ValueError):  # not a process, or gone meanwhile
            continue
        if d.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            out.append(int(d.name))
    return out


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait (on each process's pidfd: an event, not a polled delay) until they have exited; those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds to wait on the Ray processes")
@pytest.mark.timeout(300)
def test_one_serve_per_name_and_sigterm_to_its_process_group_stops_it_at_once(tmp_path):
    name = f"sig-{secrets.token_hex(3)}"
    server = subprocess.Popen([str(BIN), "serve", "--name", name, "--http-port", "0",
                               "--catalog", str(openai_only_file(tmp_path))], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in server.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        endpoint = address = None
        while True:
            line = lines.get(timeout=120)
            assert line is not None, "serve exited early:\n" + "".join(seen)
            seen.append(line)
            endpoint = line.split(" at ", 1)[1].strip() if line.startswith("OpenAI-compatible endpoint at") else endpoint
            address = line.split(":", 1)[1].strip() if line.startswith("ray address:") else address
            if line.startswith("stop:"):
                break
        port = endpoint.rsplit(":", 1)[1].split("/")[0]

        again = subprocess.run([str(BIN), "serve", "--name", name], env=_env(), capture_output=True, text=True,
                               timeout=60)
        err = " ".join(again.stderr.split())
        assert again.returncode == 2, err
        for fact in (f"engine {name!r} is already served", f"pid {server.pid}", f"Ray address {address}",
                     f"endpoint {endpoint}", f"smartbatch stop --name {name} --address {address}", "another --name"):
            assert fact in err, (fact, err)
        other = subprocess.run([str(BIN), "serve", "--name", name + "-b", "--http-port", port], env=_env(),
                               capture_output=True, text=True, timeout=60)
        err = " ".join(other.stderr.split())
        assert other.returncode == 2 and f"engine {name!r} serves its endpoint there" in err, err

        group = _group(server.pid)
        assert len(group) > 2, group  # serve, and at least the GCS and the raylet
        t0 = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)
        code = server.wait(timeout=30)  # it took over 60 s: the stop's Ray calls waited for the dead GCS
        took = time.monotonic() - t0
        reader.join(30)
        seen.extend(x for x in iter(lines.get, None))
        assert code == 0, "".join(seen[-30:])
        assert took < 20, took
        assert any("Ray's processes stopped with this one" in x for x in seen), "".join(seen[-10:])
        assert _wait_gone(group, 30) == []  # the GCS outlives a SIGTERM: serve stopped it
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        reader.join(30)  # at the pipe's end, once the server is gone
        server.stdout.close()
