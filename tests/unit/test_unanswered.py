"""A sync call that got no answer (a client timeout) may still have been billed: a request whose every attempt
timed out fails, and its budget keeps the call's upper bound instead of nothing, counted in the report."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors import Dispatcher
from engine.core.cost import reserve_bound
from engine.core.settings import Resilience
from engine.emulator import Emulator
from tests.unit.helpers import sdk_request
from tests.unit.test_http_providers import CAT, Rig, http_settings, jobs_of


async def kept_bound(rig: Rig, j) -> float:
    """Wait for the claim to settle; it must hold the call's upper bound (what ``_maybe_billed`` keeps)."""
    await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
    bound = reserve_bound(j.req, rig.catalog, "sync", None)
    assert sum(rig.budget.book.spend.values()) == pytest.approx(bound, abs=1e-12)
    return bound


def answers_lost(rig: Rig, lost) -> list:
    """Every chat call of ``rig``'s dispatcher runs (and is billed); the answer of call ``n`` (from 1) is lost, as
    a client timeout, where ``lost(n)``. Returns the calls made, as they are made."""
    comp = rig.d.provider.client.chat.completions
    create, calls, sdk = comp.create, [], rig.d.provider._sdk

    async def call(**kw):
        calls.append(kw)
        made = await create(**kw)
        if lost(len(calls)):
            raise sdk.APITimeoutError(request=sdk_request())
        return made

    comp.create = call
    return calls


async def billed_later(emu: Emulator, bound: float) -> None:
    """The provider finishes the abandoned call and bills it, within the bound the budget kept."""
    deadline = time.monotonic() + 60.0  # a safety net: the call ends ~2.5 s real after it began, idle or loaded
    while not emu.bill().items:
        assert time.monotonic() < deadline, "the abandoned call was never billed"
        await asyncio.sleep(0.05)
    assert 0 < emu.bill().total_usd <= bound


# The client's timeout, far below the ~2.5 s real a call takes, so each call is abandoned while its answer is
# awaited (maybe billed). The connection has its own timeout (``connect_timeout_s``, 5 s): with one 0.1 s timeout
# for both, a loaded machine (a CI rehearsal, stop 78) timed out the connection itself, "never sent".
TIMEOUT_S = 0.1


def test_a_request_whose_calls_all_timed_out_keeps_its_upper_bound_on_its_budget():
    # Each call takes about 2.5 s real (a seeded draw at this latency scale) against a 0.1 s client timeout: the
    # four attempts give up first, and the provider finishes the first one and bills it.
    with Emulator(CAT, latency_scale=3000.0, speedup=1000.0) as slow:
        (j,) = jobs_of("openai", 1, claims=True)

        async def go():
            rig = Rig(slow, timeout_s=TIMEOUT_S)
            try:
                await rig.reserve([j])
                await rig.run("sync", [j])
                r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
                # Cut by the client's 0.1 s timeout, or by the call's bound (twice it) where the connection and
                # the send took 0.1 s (a run at idle priority beside two busy loops, a flake hunt, stop 80): each
                # is a call abandoned unanswered, the same to the budget.
                cut = ("timed out", "no whole answer within")
                assert r.status == "failed" and r.cost_usd == 0.0 and any(c in r.error for c in cut), r
                assert "may have billed" in r.error and "possibly_billed" in r.error
                assert all(not o.ok and o.maybe_billed for _, _, o in rig.calls) and len(rig.calls) >= 2
                bound = await kept_bound(rig, j)
                stats = await rig.d.stats()
                assert stats["possibly_billed"] == 1 and stats["possibly_billed_usd"] == pytest.approx(bound, abs=1e-6)
                await billed_later(slow, bound)  # settled at 0 before: the ledger was short of the bill
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_timed_out_call_whose_retry_is_answered_settles_at_its_real_cost():
    """The retry under the same key got the answer: the request was billed once, at its usage, and nothing is
    kept beyond it. (The first call's answer is lost after the provider made and billed it, as a client timeout
    that fired late; a real slow call against a short timeout depended on the retries' backoff outlasting the
    call, and failed on a loaded machine.)"""
    with Emulator(CAT, latency_scale=0.0, speedup=1000.0) as emu:  # it honours Idempotency-Key
        (j,) = jobs_of("openai", 1, claims=True)

        async def go():
            rig = Rig(emu)
            calls = answers_lost(rig, lambda n: n == 1)
            try:
                await rig.reserve([j])
                await rig.run("sync", [j])
                r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
                assert r.status == "ok" and rig.calls[0][2].maybe_billed and len(calls) == 2, (r, calls)
                assert len(emu.bill().items) == 1 and emu.bill().total_usd == pytest.approx(r.cost_usd, abs=1e-12)
                await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
                assert sum(rig.budget.book.spend.values()) == pytest.approx(r.cost_usd, abs=1e-12)
                assert (await rig.d.stats())["possibly_billed"] == 0 and not rig.d._unanswered
            finally:
                await rig.close()
        asyncio.run(go())


def test_where_the_key_is_not_honoured_a_retry_answered_after_a_billed_timeout_keeps_the_first_calls_bound():
    """OpenAI and Anthropic do not document Idempotency-Key: the call that timed out ran and was billed, and its
    retry ran and was billed again. The ledger counted the answered call only, short of the bill; it now keeps
    the unanswered call's upper bound beside it, counted as possibly billed. (The emulator honours keys unless
    told not to; where it does, the retry settles at its real cost, above.)"""
    with Emulator(CAT, latency_scale=0.0, speedup=1000.0, honour_keys=False) as emu:
        (j,) = jobs_of("openai", 1, claims=True)

        async def go():
            rig = Rig(emu)
            assert rig.d.provider.honours_keys is False
            calls = answers_lost(rig, lambda n: n == 1)
            try:
                await rig.reserve([j])
                await rig.run("sync", [j])
                r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
                assert r.status == "ok" and len(calls) == 2 and len(emu.bill().items) == 2, (r, calls)
                await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
                spent = sum(rig.budget.book.spend.values())
                bound = reserve_bound(j.req, rig.catalog, "sync", None)
                assert spent == pytest.approx(r.cost_usd + bound, abs=1e-12) and spent >= emu.bill().total_usd
                assert (await rig.d.stats())["possibly_billed"] == 1
            finally:
                await rig.close()
        asyncio.run(go())


@pytest.mark.parametrize("then_ok", [True, False])
def test_where_the_key_is_not_honoured_each_unanswered_call_keeps_its_bound(then_ok):
    """Two calls ran and were billed and got no answer; then a third is answered, or every try fails. Each
    unanswered call is a bill of its own where the key is not honoured: the ledger kept one bound (a review:
    $0.000230 against a bill of $0.000345)."""
    with Emulator(CAT, latency_scale=0.0, speedup=1000.0, honour_keys=False) as emu:
        (j,) = jobs_of("openai", 1, claims=True)

        async def go():
            rig = Rig(emu)
            calls = answers_lost(rig, lambda n: n <= 2 or not then_ok)
            try:
                await rig.reserve([j])
                await rig.run("sync", [j])
                r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
                lost = 2 if then_ok else len(calls)
                assert r.status == ("ok" if then_ok else "failed") and len(emu.bill().items) == len(calls), r
                await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
                spent = sum(rig.budget.book.spend.values())
                bound = reserve_bound(j.req, rig.catalog, "sync", None)
                assert spent == pytest.approx((r.cost_usd if then_ok else 0.0) + lost * bound, abs=1e-12)
                assert spent >= emu.bill().total_usd and (await rig.d.stats())["possibly_billed"] == lost
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_request_rerouted_after_a_timed_out_call_keeps_that_calls_upper_bound_on_its_budget():
    """A timeout is a failure to the circuit breaker: a run of slow answers opens it, and the request goes to the
    fallback model with a new reservation. The timed-out call may still be billed (the provider finishes it), and
    nothing retries its key: the claim it was made under keeps the call's upper bound, as for a failed request.
    Before, it was settled at 0 and the bill was not on the ledger."""
    res = Resilience(allowed_fails=1, window_s=3600.0, cooldown_time=3600.0,
                     fallbacks={"openai/gpt-5-mini": "openai/gpt-5"})
    with Emulator(CAT, latency_scale=3000.0, speedup=1000.0) as emu:  # ~2.5 s real per call, as above
        (j,) = jobs_of("openai", 1, claims=True)

        async def go():
            # 1 s, still far below the ~2.5 s the first call takes: the fallback's 400 is answered in time however
            # loaded the machine (at 0.1 s it timed out too under CI's load, and its own bound was kept beside the
            # first call's: $1.536 possibly billed, a helper's hunt, stop 80).
            rig = Rig(emu, timeout_s=1.0, resilience=res)
            try:
                await rig.reserve([j])
                await rig.run("sync", [j])
                await rig.resolved([j])
                (back,) = rig.grouper.readmitted()
                assert back.req.model == "gpt-5" and back.claim is None and rig.calls[0][2].maybe_billed
                bound = await kept_bound(rig, j)
                stats = await rig.d.stats()
                assert stats["rerouted"] == 1 and stats["possibly_billed"] == 1 and not rig.d._unanswered
                # The fallback refuses it: its result (its batch file line, smartbatch_possibly_billed_usd) still
                # says the first model's call may be billed, or a --resume sent it there again, paid twice.
                # Before, the reroute forgot it: a plain refusal, sent again (a review).
                # The abandoned call ends (billed) before the 400 is scripted: a loaded machine's first call reached
                # the emulator after its client gave up, took the 400 meant for the fallback, and the fallback was
                # answered (a helper's hunt, stop 80).
                await billed_later(emu, bound)
                emu.faults.script("openai", "chat.completions", [{"status": 400}])
                await rig.reserve([back := back._replace(claim="c-fallback")])
                await rig.run("sync", [back])
                got = await rig.until(lambda: rig.results.get(j.req.id), "the fallback's refusal")
                assert got.status == "failed" and "HTTP 400" in got.error, got
                assert got.possibly_billed_usd == pytest.approx(bound, abs=1e-12) and "possibly_billed" in got.error
                assert len(emu.bill().items) == 1  # the refusal billed nothing
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_call_resumed_after_a_restart_keeps_its_upper_bound_if_every_retry_fails():
    """The dispatcher died after a call timed out (or while it was on the wire): the restarted one makes it
    again under its key, and those retries fail (500s). The first call may be billed all the same, as before the
    restart: its claim keeps the call's upper bound. Before, the restart forgot the timeout and settled it at 0."""
    with Emulator(CAT, latency_scale=3000.0, speedup=1000.0) as slow:  # ~2.5 s real per call, as above
        (j,) = jobs_of("openai", 1, claims=True)

        async def go():
            rig = Rig(slow, timeout_s=TIMEOUT_S)
            try:
                await rig.reserve([j])
                await rig.run("sync", [j])
                await rig.until(lambda: rig.calls, "the first call's timeout")
                assert rig.calls[0][2].maybe_billed
                for t in list(rig.d._tasks):  # the dispatcher dies: its retries and timers with it
                    t.cancel()
                for h in list(rig.d._timers):
                    h.cancel()
                slow.faults.script("openai", "chat.completions", [{"status": 500}] * 10)
                # Its retries get their 500 however slow the machine: with the 0.1 s timeout, a round trip slowed
                # past it (a helper's delay injection in the emulator) timed out instead. Below the ~2.5 s a call
                # takes, so a retry the provider answered would still time out, never pass for a 500.
                again = Dispatcher("openai", rig.catalog, http_settings(slow, timeout_s=1.0), 0, rig.clock,
                                   [rig.grouper], rig.hub, None, rig.budget, key=rig.d._key)
                try:
                    await again.recover()
                    assert again.resumed_calls == 1
                    r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
                    assert r.status == "failed" and "HTTP 500" in r.error, r
                    await kept_bound(rig, j)
                    assert (await again.stats())["possibly_billed"] == 1 and "possibly_billed" in r.error
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


def _transport_error(rig: Rig, name: str) -> type:
    """The HTTP transport's own error class ``name`` (httpx's, or the fork the SDK is built on)."""
    import sys

    transport = next(c for c in type(rig.d.provider.client._client).__mro__ if not c.__module__.startswith("openai"))
    return getattr(sys.modules[transport.__module__.split(".")[0]], name)


@pytest.mark.parametrize(("cut", "billed"), [("ReadError", True), ("ConnectError", False)])
def test_a_connection_cut_after_the_request_went_keeps_its_bound_and_one_never_made_does_not(cut, billed):
    """The provider ran and billed the call, and the connection was cut before its answer came (a reset, a proxy's
    idle cut of a long generation): the SDK raises its connection error, and every retry under the key then fails.
    Taken for "nothing reached the provider", the claim settled at 0 while the bill had the call. A connection
    that was never made (refused) sent nothing: its request settles at 0, as before."""
    with Emulator(CAT, latency_scale=0.0, speedup=1000.0) as emu:
        (j,) = jobs_of("openai", 1, claims=True)

        async def go():
            rig = Rig(emu)
            comp = rig.d.provider.client.chat.completions
            create, calls = comp.create, []
            sdk = rig.d.provider._sdk

            async def first_answer_lost(**kw):
                calls.append(kw)
                if len(calls) == 1:
                    if billed:
                        await create(**kw)  # run and billed; then the connection is cut
                    emu.faults.script("openai", "chat.completions", [{"status": 500}] * 5)  # every retry fails
                    raise sdk.APIConnectionError(request=sdk_request()) from _transport_error(rig, cut)("cut")
                return await create(**kw)

            comp.create = first_answer_lost
            try:
                await rig.reserve([j])
                await rig.run("sync", [j])
                r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
                assert r.status == "failed" and len(calls) >= 2, (r.error, len(calls))
                assert bool(emu.bill().items) is billed
                if billed:
                    bound = await kept_bound(rig, j)
                    assert emu.bill().total_usd <= bound and (await rig.d.stats())["possibly_billed"] == 1
                else:
                    await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
                    assert sum(rig.budget.book.spend.values()) == 0.0
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_rerouted_request_its_fallback_refuses_at_the_grouper_still_says_the_first_models_call_may_be_billed():
    """A request rerouted after a timed-out call (``Job.billed_usd``: that call's bound, settled with the first
    model's claim) that the fallback's grouper ends (here its budget spent) says the call may be billed: its line
    is kept back by ``batch --resume``. Before, a plain refusal, sent again to the first model: maybe paid twice."""
    from actors import Grouper, ResultHub
    from actors._types import Job
    from engine.core.clock import ManualClock
    from policies import load_policy
    from tests.unit.helpers import Recorder
    from tests.unit.test_actors import CAT as ACAT
    from tests.unit.test_actors import ledger, req

    async def go():
        disp, hub = Recorder(), ResultHub()
        g = Grouper(load_policy("naive", ACAT), ACAT, ManualClock(0.0), {"openai": disp}, ledger(0.0), hub)
        await g.add([Job(0, req(0), "a", billed_usd=0.25)])
        (res,) = await hub.pull(0.01)
        assert res.status == "rejected" and res.error.startswith("budget_exhausted")
        assert res.possibly_billed_usd == pytest.approx(0.25) and "possibly_billed" in res.error
    asyncio.run(go())


def test_a_call_s_connection_has_its_own_timeout_so_a_short_call_timeout_is_not_taken_for_a_connect():
    """``connect_timeout_s`` (5 s, the SDKs' default) bounds the connect, ``timeout_s`` the rest of the call: with
    one timeout for both, an unreachable endpoint held each call ``timeout_s`` (600 s) before it failed over, and a
    0.1 s ``timeout_s`` on a loaded machine timed out connecting (a call never sent), failing the tests above."""
    from actors.providers.anthropic_http import AnthropicProvider
    from actors.providers.openai_http import OpenAIProvider
    from engine.core.clock import ManualClock
    from engine.core.settings import ProviderEndpoint, Settings

    for name, cls in (("openai", OpenAIProvider), ("anthropic", AnthropicProvider)):
        ep = ProviderEndpoint(api=name, api_key_env="X", base_url="http://127.0.0.1:1/v1", timeout_s=0.1)
        t = cls(name, CAT, Settings(), ep, None, ManualClock(0.0)).client.timeout
        assert (t.connect, t.read, t.write) == (5.0, 0.1, 0.1), (name, t)


def test_a_call_with_its_own_timeout_keeps_the_connect_timeout():
    """A flex call, a token count and a video download pass their own timeout (the tier's 900 s, 60 s, 120 s). Given
    as a float, the SDK took it for every phase, the connect too: an unreachable endpoint held each such call that
    long, not ``connect_timeout_s``, the very hold ``connect_timeout_s`` was made to end (a review, stop 78)."""
    import httpx2 as httpx

    from actors.providers.anthropic_http import AnthropicProvider
    from actors.providers.openai_http import OpenAIProvider
    from engine.core.clock import ManualClock
    from engine.core.provider_api import CallJob
    from engine.core.settings import ProviderEndpoint, Settings
    from tests.unit.test_flex_live import flex_req

    seen: list[dict] = []

    class Live(ManualClock):  # engine seconds are real ones, as at speed-up 1: the flex call may run 900 s
        def real_delay(self, virtual_s: float) -> float:
            return virtual_s

    def answer(request: httpx.Request) -> httpx.Response:  # nothing leaves the process: the timeout is read here
        seen.append(request.extensions["timeout"])
        return httpx.Response(500, json={"error": {"message": "no", "type": "server_error"}})

    def provider(name, cls):
        ep = ProviderEndpoint(api=name, api_key_env="X", base_url="http://127.0.0.1:1/v1")
        p = cls(name, CAT, Settings(), ep, None, Live(0.0))
        p.client = p.client.with_options(http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)))
        return p

    async def go():
        oai = provider("openai", OpenAIProvider)
        await oai.call(CallJob("k", flex_req(), 0.0, 0, 0, flex=True))
        await oai.video_content("http://127.0.0.1:1/v1/videos/video_1/content", "video")
        await provider("anthropic", AnthropicProvider).count_tokens({"model": "claude-sonnet-4-5", "messages": []})
    asyncio.run(go())
    assert len(seen) == 3 and [t["read"] for t in seen] == [900.0, 120.0, 60.0], seen
    assert all(t["connect"] == 5.0 for t in seen), seen
