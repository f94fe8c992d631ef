"""One named engine shared by several driver processes: `smartbatch serve --name` starts it (with its
OpenAI-compatible endpoint), drivers attach with `Engine.connect`, share its idempotency and its report, leave
without stopping it, and `smartbatch stop` stops it (and `serve` then exits). The third driver loads the
near-duplicate libraries before its Ray starts, as a script that simulates first does (usearch 2.26 made that
abort the process; the version is pinned below it).

Every process here is real: the server, three drivers and the stop command each attach to the server's own
local Ray, as drivers on a machine or cluster would.
"""

import json
import os
import queue
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration._catalogs import openai_only_file
from tests.integration._sessions import kill_session

BIN = Path(sys.executable).parent / "smartbatch"

DRIVER = r"""
import json, sys
name, address, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if prefix == "c":
    # The third driver simulates first: the near-duplicate libraries (the WordLlama tokenizer, the usearch
    # index) are loaded before its Ray starts. usearch 2.26 made that ray.init abort the process.
    import numpy as np
    from engine.core import embedding
    from engine.runtime import reuse
    assert reuse._Hnsw is not None, "usearch is not installed"
    embedding.load_embedder()
    reuse._Hnsw(ndim=8, dtype="i8").add(np.arange(3), np.eye(3, 8, dtype=np.float32))
from engine import Engine
from engine.core.errors import ConfigError
out = {}
if prefix == "c":  # it also asks for an engine that does not exist
    try:
        Engine.connect("no-such-engine", address=address)
    except ConfigError as exc:
        out["missing"] = str(exc)
with Engine.connect(name, address=address) as eng:
    ask = lambda rid, prompt: {"id": rid, "model": "gpt-4o-mini", "prompt": prompt, "priority": "urgent",
                               "deadline_s": 30}
    reqs = [ask(f"{prefix}-{k}", f"{prefix} question {k}") for k in range(n)]
    if prefix != "c":
        reqs += [ask("common", "the same question"), ask("clash", f"not the same question: {prefix}")]
    futs = eng.submit_many(reqs)
    out["results"] = [f.result(timeout=90).model_dump(mode="json") for f in futs]
    clash = [r for r in out["results"] if r["id"] == "clash"]
    if clash and clash[0]["status"] == "failed":  # the other driver's content has the id: asked with it now
        other = "b" if prefix == "a" else "a"
        again = eng.submit(ask("clash", f"not the same question: {other}")).result(timeout=90)
        out["clash_again"] = again.model_dump(mode="json")
    out["report"] = eng.report()
for late in (lambda: eng.submit(ask("late", "after leaving")), eng.report):
    try:
        late()
    except Exception as exc:
        out.setdefault("late", []).append(f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def _env():
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _lines(proc) -> tuple[queue.Queue, threading.Thread]:
    """The process's output lines as they come (read in a thread, so waiting for one is bounded)."""
    q: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            q.put(line)
        q.put(None)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return q, reader


def _wait_for(q: queue.Queue, prefix: str, seen: list, timeout: float = 90) -> str:
    while True:
        line = q.get(timeout=timeout)
        if line is None:
            raise AssertionError("the server exited early:\n" + "".join(seen))
        seen.append(line)
        if line.startswith(prefix):
            return line[len(prefix):].strip()


def _driver(name: str, address: str, prefix: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, name, address, prefix, str(n)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.timeout(400)
def test_drivers_share_one_named_engine_and_leave_it_running(tmp_path):
    name = f"shared-{secrets.token_hex(3)}"
    server = subprocess.Popen([str(BIN), "serve", "--name", name, "--speedup", "100", "--http-port", "0",
                               "--catalog", str(openai_only_file(tmp_path))], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    reader = None
    try:
        lines, reader = _lines(server)
        address = _wait_for(lines, "ray address:", seen)
        base_url = _wait_for(lines, "OpenAI-compatible endpoint at", seen)
        _wait_for(lines, "stop:", seen)

        a, b = _driver(name, address, "a", 5), _driver(name, address, "b", 5)  # at the same time
        ra, rb = _result(a), _result(b)
        for prefix, got in (("a", ra), ("b", rb)):
            by_id = {r["id"]: r for r in got["results"]}
            assert all(by_id[f"{prefix}-{k}"]["status"] == "ok" for k in range(5)), by_id
            assert not any(i.startswith("b-" if prefix == "a" else "a-") for i in by_id)  # only its own results
        # One id from two drivers with the same content is one request: both get its one result.
        ca = next(r for r in ra["results"] if r["id"] == "common")
        cb = next(r for r in rb["results"] if r["id"] == "common")
        assert ca["status"] == cb["status"] == "ok" and ca["output"] == cb["output"]
        # With other content, the second to arrive is refused, naming the id; the first is served.
        clash = sorted((r["status"], r["error"] or "") for got in (ra, rb) for r in got["results"]
                       if r["id"] == "clash")
        assert [s for s, _ in clash] == ["failed", "ok"] and "field 'id'" in clash[0][1]
        # The refused driver asks again with the content the id has: answered, where its refused future held the
        # id for the driver's retention (an hour) and every such submit raised (a helper's tour).
        (again,) = [got["clash_again"] for got in (ra, rb) if "clash_again" in got]
        winner = next(r for got in (ra, rb) for r in got["results"] if r["id"] == "clash" and r["status"] == "ok")
        assert again["status"] in ("ok", "reused") and again["output"] == winner["output"], again
        # A driver that left says how to come back, for a submit and for a report alike.
        assert all(len(got["late"]) == 2 and all(m.startswith("EngineStopped") and "Engine.connect()" in m
                                                 for m in got["late"]) for got in (ra, rb)), ra["late"]

        # Both drivers have stopped; the engine runs on, for an application that speaks OpenAI's API to the
        # endpoint `serve --http-port` started, and for a third driver, which sees everything the others did.
        import openai

        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
                extra_headers={"X-Smartbatch-Priority": "urgent", "X-Smartbatch-Deadline": "30"})
        assert raw.parse().choices[0].message.content and raw.headers["x-smartbatch-mode"] == "sync"
        rc = _result(_driver(name, address, "c", 1))
        assert rc["results"][0]["status"] == "ok"
        assert rc["report"]["requests"] == 5 + 5 + 1 + 1 + 1 + 1  # common and clash generated once each
        assert "no-such-engine" in rc["missing"] and name in rc["missing"]  # names what does run

        stop = subprocess.run([str(BIN), "stop", "--name", name, "--address", address], env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and f"stopped engine {name!r}" in stop.stdout, stop.stdout + stop.stderr
        assert server.wait(timeout=60) == 0  # serve saw its engine stopped and exited
        _wait_for(lines, f"engine {name!r} was stopped", seen)  # (the reader's queue, fed to the pipe's end)
    finally:
        if server.poll() is None:
            kill_session(server.pid)  # Ray's workers too, each in a process group of its own
            server.wait(30)
        if reader is not None:
            reader.join(30)  # at the pipe's end, once the server is gone
        server.stdout.close()
