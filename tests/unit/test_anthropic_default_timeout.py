"""A sync Claude call at the endpoint's default client timeout (600 s, connect 5 s: the ``anthropic`` SDK's own
default) with no cap of its own. The Messages API needs ``max_tokens``, so the engine sends the model's maximum
(64,000 for claude-haiku-4-5), and the SDK refuses such a non-streaming call at a client whose timeout is its
default ("Streaming is required for operations that may take longer than 10 minutes", a ``ValueError`` raised
before anything is sent). A new user's tour found every such call failed as "engine error: ValueError" (a Claude
model through the endpoint's chat completions, or a driver's ``submit`` without ``max_tokens``); the other tests
set a 30 s timeout, where the SDK skips its check."""

from __future__ import annotations

import asyncio
import time

import anthropic  # noqa: F401 - imported before the clock starts (the provider imports it when built)

from actors.providers import make_provider
from engine.app.live import point_at_emulator
from engine.app.provider_setup import http_setup
from engine.core.catalog import default_catalog
from engine.core.clock import ScaledClock
from engine.core.draws import Draws
from engine.core.provider_api import CallJob, Secret, call_key
from engine.core.request import Request
from engine.core.settings import Settings
from engine.emulator import Emulator
from engine.runtime.providers import SimProvider

SPEED = 1000.0


def test_a_claude_call_without_a_cap_goes_at_the_default_client_timeout():
    with Emulator(default_catalog(), latency_scale=0.0, speedup=SPEED) as emu:
        s = point_at_emulator(Settings(), emu, ("openai", "anthropic"))
        default = type(s.providers.endpoints["anthropic"])(api="anthropic", api_key_env="ANTHROPIC_API_KEY")
        assert (default.timeout_s, default.connect_timeout_s) == (600.0, 5.0)  # as the SDK's own default
        eps = {**s.providers.endpoints, "anthropic": s.providers.endpoints["anthropic"].model_copy(
            update={"timeout_s": default.timeout_s, "connect_timeout_s": default.connect_timeout_s})}
        s = s.model_copy(update={"providers": s.providers.model_copy(update={"endpoints": eps})})
        cat, _ = http_setup(emu.catalog, s, need_keys=False)
        r = Request.model_validate({"id": "c1", "arrival_s": 0.0, "model": "claude-haiku-4-5", "prompt": "Hi"})

        async def go():
            sim = SimProvider(cat.provider("anthropic"), cat, s, Draws(0, 4, 0, 60.0), draw=False)
            p = make_provider("anthropic", cat, s, sim, ScaledClock(time.time(), SPEED), Secret("k"))
            try:
                return await p.call(CallJob(call_key(r.tenant, r.id, r.model, 0), r, 0.0, 0, 0))
            finally:
                await p.close()

        out = asyncio.run(go())
    assert out.ok, out.error  # before: "engine error: ValueError" from the SDK, nothing sent
    assert out.usage.output_tokens > 0 and out.cost > 0


KEY_SAID = "sk-ant-api03-" + "x" * 40


def test_a_call_that_raises_fails_its_request_saying_why():
    """A provider's call that raises (a bug, or an SDK refusing a call before it is sent, as above) fails its
    request with the exception's words: the tour's result said only "engine error: ValueError", and why was in the
    dispatcher's log alone."""
    from tests.unit.test_http_providers import CAT, Rig, jobs_of

    async def boom(job):
        raise ValueError("Streaming is required for operations that may take longer than 10 minutes "
                         f"(sent with {KEY_SAID})")

    async def go(emu):
        rig = Rig(emu, "anthropic")
        try:
            rig.d.provider.call = boom
            (j,) = jobs_of("anthropic", 1)
            await rig.run("sync", [j])
            return await rig.until(lambda: rig.results.get(j.req.id), "the result")
        finally:
            await rig.close()

    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        r = asyncio.run(go(emu))
    assert r.status == "failed" and r.cost_usd == 0, r
    assert "engine error: ValueError: Streaming is required" in r.error, r.error
    assert KEY_SAID not in r.error and "[redacted]" in r.error  # its words may quote a key: never in a result


def test_an_exception_without_words_is_said_by_its_type_alone():
    # A review of stop 79: "engine error: TimeoutError: " for a bare TimeoutError, a colon before nothing.
    from actors._dispatch_outbox import engine_error

    assert engine_error(None, TimeoutError()) == "engine error: TimeoutError"
    assert engine_error(None, KeyError("model")) == "engine error: KeyError: 'model'"
