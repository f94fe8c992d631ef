"""A hung engine actor (alive, its event loop blocked) is killed by the driver that started the engine once it has
answered no health check for ``settings.actor_hang_s``; Ray restarts it and the recovery re-admits what it held,
so every request still resolves (engine/app/_supervise.py). Without the rule the requests sent to a hung ingest
would stay open for as long as it hangs."""

from __future__ import annotations

import concurrent.futures as cf
import time

import ray

from engine.app.driver import Engine
from engine.core.settings import Settings
from tests.integration._catalogs import OPENAI_ONLY

SPEEDUP = 100.0
# Also bounds the silence of the restarting ingest, which a health check would count as hung too: a restart
# takes ~1.9 s here, and at 3 s one slower than ~4 s on a loaded machine was killed a second time.
HANG_S = 8.0


def requests(tag: str, n: int, now: float) -> list[dict]:
    return [{"id": f"{tag}{i}", "model": "gpt-5-mini", "prompt": f"Summarise ticket {tag}-{i}.", "arrival_s": now,
             "deadline_s": 600.0, "priority": "urgent"} for i in range(n)]


def test_a_hung_ingest_is_killed_restarted_and_loses_nothing(ray_session):
    # naive reuses nothing, so the engine starts no cache actor (a process fewer): the hang, the kill and the
    # re-admission are ingest's and the driver's (its requests are distinct urgent ones, sent sync either way).
    eng = Engine.start(Settings(actor_hang_s=HANG_S), catalog=OPENAI_ONLY, policy="naive", speedup=SPEEDUP,
                       metrics_port=None)
    try:
        before = eng.submit_many(requests("a", 50, eng.now()))
        assert all(f.result(timeout=60).status == "ok" for f in before)
        ingest = eng._h["named"]["ingest"]
        # Blocks the actor's event loop far longer than the test may take: only a kill ends it.
        t0 = time.monotonic()
        ingest.__ray_call__.remote(lambda self: time.sleep(600))
        # Calls to an async actor are not ordered: submit only once the loop is blocked (a ping goes unanswered),
        # or the requests may pass ingest before the sleep starts and nothing hangs (seen on a loaded machine).
        for _ in range(60):
            ready, _ = ray.wait([ingest.ping.remote()], timeout=1.0)
            if not ready:
                break
        else:
            raise AssertionError("ingest kept answering: the blocking call never ran")
        during = eng.submit_many(requests("b", 50, eng.now()))
        done, open_ = cf.wait(during, timeout=120)
        assert not open_, f"{len(open_)} requests still open after 120 s"
        assert all(f.result().status == "ok" for f in during), {f.result().error for f in during}
        # The requests were sent on to the restarted ingest as soon as a call failed, so they can end before
        # the health check records the restart: wait for the record, then read the counts.
        assert eng.wait_recovered("ingest", 1, timeout=60), eng.restarts
        assert eng.hung == {"ingest": 1} and eng.restarts.get("ingest", 0) >= 1
        assert time.monotonic() - t0 >= HANG_S  # they waited for the kill, not for a sleep that never ends
        after = eng.submit_many(requests("c", 20, eng.now()))
        assert all(f.result(timeout=60).status == "ok" for f in after)
    finally:
        eng.stop()
