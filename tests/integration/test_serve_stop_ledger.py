"""``smartbatch stop --name`` of a ``smartbatch serve`` engine while its Redis budget ledger's Redis is away, as real
processes: the serve on a Ray of its own (its default), the stop from another process.

The stop removes the engine's layout first, then keeps what Redis has not taken (``engine.app._ledger_stop``,
``journal.ledger_wait_s`` for Redis). ``serve`` exits as soon as the layout goes, and its Ray with it: the budget
controller died with what waited for Redis in it, kept in no file, and the stop then waited a minute for the dead
GCS and failed (exit 1, 62 s, nothing kept, in a helper's rehearsal of stop 75's change).
"""

import os
import pickle
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration._catalogs import openai_only_file
from tests.integration._sessions import kill_session

BIN = Path(sys.executable).parent / "smartbatch"

# Run in a process of its own, attached to the serve's Ray (this one may have a Ray of the session): two claims,
# Redis paused, then a settlement and a charge that wait for it in the budget controller's outbox.
_FILL = """
import os, signal, sys
import ray
from engine.core.budgets import Charge, Claim
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
b = ray.get_actor(sys.argv[2] + ".budget", namespace="smartbatch")
ok = ray.get(b.reserve_many.remote([Claim(i, "acme", "openai", "gpt-5-mini", "urgent", 2.0) for i in ("a0", "a1")]),
             timeout=60)
assert all(v.ok for v in ok), ok
os.kill(int(sys.argv[3]), signal.SIGSTOP)
ray.get(b.settle_many.remote([("a0", 1.5)]), timeout=60)
ray.get(b.charge_many.remote([Charge("late:m1", "acme", "openai", "gpt-5-mini", 0.5)]), timeout=60)
"""


@pytest.mark.timeout(400)
def test_smartbatch_stop_of_a_served_engine_keeps_its_outbox_before_serve_stops_its_ray(own_redis, tmp_path):
    name = f"stopledger-{secrets.token_hex(3)}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "SMARTBATCH_BUDGETS__REDIS_URL": own_redis.url,
           "SMARTBATCH_BUDGETS__REDIS_PREFIX": f"sbtest-{name}",
           "SMARTBATCH_BUDGETS__SPECS": '[{"max_budget": 10, "budget_duration": "1d"}]',
           "SMARTBATCH_BUDGETS__REDIS_TIMEOUT_S": "0.3", "SMARTBATCH_BUDGETS__REDIS_RETRY_S": "0.05",
           "SMARTBATCH_JOURNAL__LEDGER_DIR": str(tmp_path / "ledgers"), "SMARTBATCH_JOURNAL__LEDGER_WAIT_S": "2"}
    # OpenAI alone and a policy without reuse (no cache actor): the test calls the budget controller alone.
    serve = subprocess.Popen([str(BIN), "serve", "--name", name, "--catalog", str(openai_only_file(tmp_path)),
                              "--policy", "naive", "--speedup", "100"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp_path)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in serve.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    seen, address, paused = [], None, False
    try:
        while (line := lines.get(timeout=180)) is not None and not line.startswith("stop:"):
            seen.append(line)
            address = line.split(":", 1)[1].strip() if line.startswith("ray address:") else address
        assert line is not None and address, "serve exited early:\n" + "".join(seen)
        paused = True  # (from the filler's SIGSTOP on: SIGCONT below, whatever happens)
        fill = subprocess.run([sys.executable, "-c", _FILL, address, name, str(own_redis.proc.pid)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert fill.returncode == 0, fill.stderr[-3000:]
        t0 = time.monotonic()
        stop = subprocess.run([str(BIN), "stop", "--name", name, "--address", address, "--drain-s", "0"], env=env,
                              capture_output=True, text=True, timeout=240)
        took = time.monotonic() - t0
    finally:
        if paused:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        if serve.poll() is None:
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                kill_session(serve.pid)  # Ray's workers too: a killpg leaves them to run on for seconds
                serve.wait(30)
        reader.join(30)  # at the pipe's end, once every process holding it is gone
        serve.stdout.close()
    kept = list((tmp_path / "ledgers").rglob("*.outbox"))
    said = " ".join((stop.stdout + stop.stderr).split())
    assert stop.returncode == 0 and took < 45, (took, said)  # before: exit 1 after 62 s, the GCS gone under it
    assert len(kept) == 1, (kept, said)  # before: none, the outbox gone with the serve's Ray
    left = pickle.loads(kept[0].read_bytes())
    assert (left["settlements"], left["charges"], left["unsettled_usd"]) == (1, 1, 2.0), left
    assert serve.returncode == 0, serve.returncode
