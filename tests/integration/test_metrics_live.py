"""The reliability metrics of a live engine, scraped from the hub's /metrics: a request that misses its deadline,
a 429 and a 5xx that are retried, the circuit state and the rate-limit wait, over HTTP to the emulator."""

import re
import time
import urllib.request

import pytest

from engine.app.driver import Engine
from engine.app.live import point_at_emulator
from engine.core.catalog import default_catalog
from engine.core.settings import Settings
from engine.emulator import Emulator
from tests.integration._catalogs import OPENAI_ONLY

CAT = default_catalog()
SPEEDUP = 100.0


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in body.splitlines():
        if line.startswith("smartbatch_") and " " in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def test_reliability_metrics_are_scraped_with_plausible_values(ray_session):
    with Emulator(CAT, speedup=SPEEDUP, seed=0, cancel_s=1.0) as emu:
        # Four tenants (the late one is "default") over a cap of two: the setting reaches the hub, which names
        # two and sums the others as _other.
        settings = point_at_emulator(Settings(metrics={"max_tenants": 2}), emu)
        # The first two calls fail (a 429 with Retry-After, then a 500); both are retried and then served.
        emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": 1}, {"status": 500}])
        reqs = [{"id": f"r{k}", "model": "gpt-4o-mini", "prompt": f"summarise ticket {k}", "priority": "urgent",
                 "deadline_s": 600.0, "tenant": ("acme", "beta", "gamma")[k]} for k in range(3)]
        # An engine second is 10 ms here: no call answers within 0.05 engine seconds, so this one is late.
        reqs.append({"id": "late", "model": "gpt-4o-mini", "prompt": "a reply needed at once",
                     "priority": "urgent", "deadline_s": 0.05})
        with Engine.start(settings, catalog=OPENAI_ONLY, speedup=SPEEDUP) as eng:
            results = [f.result(timeout=120) for f in eng.submit_many(reqs)]
            assert eng.metrics_port
            # Results and the dispatcher's counters leave in separate batched messages: wait for the counters,
            # bounded in time (50 scrapes, 5 s, before: a hang guard, not a figure of the engine's).
            samples, give_up = scrape(eng.metrics_port), time.monotonic() + 60
            while total(samples, "smartbatch_retried_calls_total") < 2 and time.monotonic() < give_up:
                time.sleep(0.1)
                samples = scrape(eng.metrics_port)

    by_id = {r.id: r for r in results}
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    assert by_id["late"].deadline_met is False
    late = sum(not r.deadline_met for r in results)
    assert samples['smartbatch_deadline_missed_requests_total{priority="urgent",provider="openai"}'] == late
    assert samples['smartbatch_retried_calls_total{provider="openai",reason="429"}'] == 1
    assert samples['smartbatch_retried_calls_total{provider="openai",reason="5xx"}'] == 1
    assert samples['smartbatch_http_429_responses_total{provider="openai"}'] == 1
    # Two failures do not open the circuit (allowed_fails is larger): every openai model reads closed.
    assert samples['smartbatch_circuit_breaker_open_bool{model="gpt-4o-mini",provider="openai"}'] == 0
    assert total(samples, "smartbatch_circuit_breaker_openings_total") == 0
    # One rate-gate wait per started request (first tries and retries, whatever the mode), as dispatch waits.
    waits = total(samples, "smartbatch_rate_limit_wait_seconds_count")
    assert waits == total(samples, "smartbatch_dispatch_seconds_count") >= len(reqs) + 2
    assert 0 <= total(samples, "smartbatch_rate_limit_wait_seconds_sum") < 3600 * waits
    assert total(samples, "smartbatch_rejected_requests_total") == 0
    assert "smartbatch_cache_redis_up" not in samples  # no Redis configured, so no false "Redis down"
    assert sum(v for k, v in samples.items() if k.startswith("smartbatch_requests_total")) == len(reqs)
    assert emu.bill().total_usd == pytest.approx(sum(r.cost_usd for r in results), abs=1e-9)
    cost = {k: v for k, v in samples.items() if k.startswith("smartbatch_cost_usd_total")}
    tenants = {re.search(r'tenant="([^"]*)"', k).group(1) for k in cost}
    assert "_other" in tenants and len(tenants - {"_other"}) == 2
    assert tenants <= {"acme", "beta", "gamma", "default", "_other"}
    assert sum(cost.values()) == pytest.approx(sum(r.cost_usd for r in results), abs=1e-9)


def test_an_actors_log_line_reaches_the_drivers_logging(ray_session):
    """The cache actor finds its Redis down: the driver gets that line as a record of logger smartbatch.cache
    (not only a line in a Ray worker's file), at the level set by ``log_level``."""
    import logging
    import socket
    import threading

    with socket.socket() as s:  # a port nothing listens on: Redis is down
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    heard = threading.Event()
    got: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record):
            got.append(record)
            if "unreachable" in record.getMessage():
                heard.set()

    logger = logging.getLogger("smartbatch.cache")
    catch = Catch()
    logger.addHandler(catch)
    try:
        settings = Settings(cache={"redis_url": dead, "redis_timeout_s": 0.5}, log_level="warning")
        with Engine.start(settings, catalog=OPENAI_ONLY, speedup=SPEEDUP, metrics_port=None) as eng:
            assert heard.wait(30), [r.getMessage() for r in got]
            rec = next(r for r in got if "unreachable" in r.getMessage())
            assert rec.levelno == logging.WARNING and rec.name == "smartbatch.cache"
            assert rec.getMessage().startswith(f"[{eng.name}.cache] Redis at redis://127.0.0.1:")
    finally:
        logger.removeHandler(catch)
