"""The HTTP providers (OpenAI and Anthropic over the official SDKs) against the loopback emulator, driven through a
``Dispatcher`` as a plain asyncio class (no Ray) and, where that is simpler, directly.

Time: the engine runs on a ``ScaledClock`` and the emulator at the same speed-up, so engine seconds and emulator
seconds pass alike. Batch turnarounds are fixed (the test catalog's turnaround distribution is a point), so member
``k`` of ``n`` finishes at ``start + T * (k + 1) / n``. One HTTP round trip to the emulator takes up to ~50 ms real
(tens of engine seconds), so a test that races the clock asserts only what holds whatever the round trips take,
plus the invariant (billed by the provider <=> a result, else handed back). Every wait is a bounded poll of the
hub, the grouper stand-in or the emulator; none is a fixed sleep as the synchronisation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import anthropic  # noqa: F401 - imported before any rig's clock starts: a provider imports its SDK when built,
import hypothesis.strategies as st
import openai  # noqa: F401 - and openai's import takes ~0.8 s, 800 engine s at SPEED, out of a deadline's room
import pytest
from hypothesis import given, settings

from actors import BudgetController, Dispatcher, ResultHub
from actors._types import BatchJob, Job
from actors.providers import make_provider
from actors.providers._http import BatchHandle
from actors.providers._wire import message_parts, redact, retry_after
from actors.providers.anthropic_http import AnthropicProvider
from actors.providers.openai_http import OpenAIProvider
from engine.app.live import as_emulated, point_at_emulator
from engine.app.provider_setup import http_setup
from engine.core.batchfile import provider_status
from engine.core.budgets import BudgetSettings, Claim
from engine.core.catalog import Catalog, default_catalog
from engine.core.clock import Clock, ManualClock, ScaledClock
from engine.core.cost import price_usage, reserve_bound
from engine.core.draws import Draws
from engine.core.provider_api import CallJob, CallOutcome, Provider, Secret, call_key, idempotency_key
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import Resilience, Settings, SimSettings
from engine.emulator import Emulator
from engine.emulator._text import anthropic_prompt
from engine.runtime.providers import SimProvider
from tests.unit.helpers import Recorder
from tests.unit.test_body_tokens import TOOL_USE_PROMPT

# The Anthropic SDK warns that catalog models such as claude-sonnet-4-5 near their end of life: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

KEY = "sk-test-NEVERSHOWN-9"
SPEED = 1000.0  # engine (and emulator) seconds per real second
T = 1000.0  # every batch's turnaround, engine seconds: 1 s real
N = 4  # members of a test batch: they finish T/4 = 250 engine s (250 ms real) apart
EMU_CANCEL_S = 20.0  # engine seconds the emulator takes to cancel a batch
VALIDATING_S = {"openai": 1.0, "anthropic": 0.0}  # OpenAI batches validate first; Message Batches do not
MODEL = {"openai": "gpt-5-mini", "anthropic": "claude-sonnet-4-5"}
ROUTE = {"openai": "chat.completions", "anthropic": "messages"}
BATCH_ROUTE = {"openai": "batches", "anthropic": "messages.batches"}  # the bill's route of a batch member
PROVIDERS = pytest.mark.parametrize("provider", ["openai", "anthropic"])


def fixed_turnaround_catalog(turnaround_s: float, names: tuple[str, ...] = ("openai", "anthropic")) -> Catalog:
    """The default catalog with every batch of the providers ``names`` taking exactly ``turnaround_s`` (a point,
    so a test waits for a known time)."""
    cat = default_catalog()
    providers = dict(cat.providers)
    for name in names:
        p = providers[name]
        providers[name] = p.model_copy(update={"batch_api": p.batch_api.model_copy(update={
            "turnaround_min_s": turnaround_s, "turnaround_median_s": turnaround_s,
            "turnaround_p95_s": turnaround_s})})
    return Catalog.model_validate({"schema_version": cat.schema_version,
                                   "providers": {k: v.model_dump() for k, v in providers.items()}})


CAT = fixed_turnaround_catalog(T)


# -- harness -------------------------------------------------------------------------------------------------------
@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


def http_settings(emu: Emulator, *, timeout_s: float = 30.0, cancel_s: float | None = None,
                  http: tuple[str, ...] = ("openai", "anthropic"), **kw: Any) -> Settings:
    """Settings whose ``http`` providers are called over HTTP at ``emu`` (``point_at_emulator``), with short
    polls, the given client timeout (real s) and cancel allowance (engine s), replaying requests at their size."""
    s = point_at_emulator(Settings(**kw), emu, http)
    eps = {name: ep.model_copy(update={"timeout_s": timeout_s, "poll_min_s": 10.0, "poll_max_s": 40.0,
                                       **({} if cancel_s is None else {"cancel_s": cancel_s})})
           for name, ep in s.providers.endpoints.items()}
    return s.model_copy(update={"providers": s.providers.model_copy(update={"endpoints": eps, "replay": True})})


def journal_delete_fails_once(rig, space: str, hold_retry: bool = False) -> list:
    """The journal's first delete in ``space`` fails (a Redis blip); the keys it refused are in the list returned.
    ``hold_retry``: every later delete there waits for good (until its task is cancelled), so a restart comes
    inside the retry's window however slow the machine (a retry 0.2 s later cleared the record first on a loaded
    one)."""
    inner, failed = rig.d.journal.delete, []

    async def delete(sp, keys):
        if sp == space and not failed:
            failed.append(keys)
            raise ConnectionError("the journal's Redis timed out")
        if sp == space and hold_retry:
            await asyncio.Event().wait()
        return await inner(sp, keys)

    rig.d.journal.delete = delete
    return failed


# A rig's wait for its results, real s: a safety net, not a premise. At 10 s, a module's first Claude calls, in a
# run at idle priority beside two busy loops (7-8 min a run), had not resolved (a flake hunt, stop 80: 2 of 7 runs).
UNTIL_S = 60.0


class Rig:
    """One dispatcher over HTTP at the emulator, with a hub, a budget ledger and a recording grouper."""

    def __init__(self, emu: Emulator, provider: str = "openai", *, key: str = KEY, speed: float = SPEED,
                 endpoint: dict[str, Any] | None = None, clock: Clock | None = None, **settings_kw: Any):
        self.emu, self.name = emu, provider
        http = tuple(dict.fromkeys(("openai", "anthropic", provider)))  # google too when it is the one driven
        self.settings = http_settings(emu, http=http, **settings_kw)
        if endpoint:  # settings of the driven provider's endpoint, e.g. {"remake_lost_veo_creates": True}
            eps = {**self.settings.providers.endpoints}
            eps[provider] = eps[provider].model_copy(update=endpoint)
            self.settings = self.settings.model_copy(update={"providers": self.settings.providers.model_copy(
                update={"endpoints": eps})})
        # The catalog the engine plans with: its batch_api.cancel_s is the endpoint's (engine.app.driver).
        self.catalog, _ = http_setup(emu.catalog, self.settings, need_keys=False)
        self.clock = clock or ScaledClock(time.time(), speed)
        self.hub, self.grouper = ResultHub(), Recorder()
        self.budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        self.d = Dispatcher(provider, self.catalog, self.settings, 0, self.clock, [self.grouper], self.hub, None,
                            self.budget, key=Secret(key))
        self.results: dict[str, Result] = {}
        self.calls: list[tuple[CallJob, float, CallOutcome]] = []  # (job, engine start, outcome) of every call
        inner = self.d.provider.call

        async def spy(job: CallJob) -> CallOutcome:
            start = self.clock.now()
            out = await inner(job)
            self.calls.append((job, start, out))
            return out

        self.d.provider.call = spy  # an instance attribute shadows the method: the dispatcher calls this

    async def reserve(self, jobs: list[Job]) -> None:
        claims = [Claim(j.claim, j.req.tenant, j.req.provider, j.req.model, j.req.priority, 1.0) for j in jobs]
        assert all(v.ok for v in await self.budget.reserve_many(claims))

    async def run(self, mode: str, jobs: list[Job], hedge_at: float | None = None, bid: str = "b") -> None:
        await self.d.run_many([BatchJob(bid, mode, hedge_at, False, "test", "test", jobs)])

    async def until(self, probe: Callable[[], Any], what: str, timeout_s: float = UNTIL_S) -> Any:
        """Pull results into ``self.results`` until ``probe()`` is truthy; fail after ``timeout_s`` (a bound)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for r in await self.hub.pull(0.01):
                assert r.id not in self.results, f"{r.id} resolved twice"
                self.results[r.id] = r
            got = probe()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: results {self.results}, "
                                     f"grouper {self.grouper.readmitted()}")

    async def resolved(self, jobs: list[Job], timeout_s: float = UNTIL_S) -> None:
        """Wait until every job has a result or went back to the grouper (whichever way it ends)."""
        def done() -> bool:
            back = {j.req.id for j in self.grouper.readmitted()}
            return all(j.req.id in self.results or j.req.id in back for j in jobs)
        await self.until(done, f"{[j.req.id for j in jobs]} to resolve", timeout_s)

    async def settled_to(self, billed_usd: float) -> None:
        """Every claim settled, the budget's spend ``billed_usd`` (the provider's bill), nothing left under way."""
        await self.until(lambda: not self.budget.book.claims, "every claim settled")
        assert sum(self.budget.book.spend.values()) == pytest.approx(billed_usd, abs=1e-12)
        assert self.d.in_flight == 0 and not self.d._open

    async def close(self) -> None:
        await self.d.provider.close()


def req(i: int, provider: str = "openai", **kw: Any) -> Request:
    d = {"id": f"{provider}-{i}", "arrival_s": 0.0, "model": MODEL[provider], "input_tokens": 300 + 10 * i,
         "output_tokens": 20 + i, "prompt": f"task {i}"}
    d.update(kw)
    return Request.model_validate(d)


def jobs_of(provider: str, n: int = N, claims: bool = False, **kw: Any) -> list[Job]:
    return [Job(i, req(i, provider, **kw), f"fp-{provider}-{i}", claim=f"c{i}" if claims else None)
            for i in range(n)]


def batch_key(j: Job) -> str:
    return call_key(j.req.tenant, j.req.id, j.req.model, j.attempts)


def priced(r: Result, req_: Request, mode: str) -> float:
    u = r.usage
    assert u is not None
    return price_usage(req_, CAT, mode, input_tokens=u["input_tokens"], output_tokens=u["output_tokens"],
                       cache_read=u["cache_read"], cache_write=u["cache_write"]).total


async def hedge_figures(rig: Rig) -> tuple[float, float]:
    """The hub's hedge metrics (batches cancelled at their hedge, members they kept), once the dispatcher's
    counts have reached it."""
    await rig.d.flush()
    await asyncio.gather(*rig.d.hub._tasks)
    v, labels = rig.hub.metrics.registry.get_sample_value, {"provider": rig.name}
    return (v("smartbatch_hedge_cancelled_batches_total", labels) or 0,
            v("smartbatch_hedge_kept_members_total", labels) or 0)


def billed_by_custom_id(emu: Emulator) -> dict[str, Any]:
    items = [i for i in emu.bill().items if i.custom_id is not None]
    ids = [i.custom_id for i in items]
    assert len(ids) == len(set(ids)), f"a batch member was billed twice: {ids}"
    return {i.custom_id: i for i in items}


def assert_batch_member(r: Result, j: Job, item: Any, provider: str) -> None:
    """``r`` came from the batch output: real text, billed once at the batch price, as the emulator billed it."""
    assert r.status == "ok" and r.mode == "batch_api" and r.real, r
    assert r.output and not r.output.startswith("sim://") and len(r.output) == 4 * j.req.output_tokens
    assert r.usage["input_tokens"] == j.req.input_tokens and r.usage["output_tokens"] == j.req.output_tokens
    assert item.mode == "batch_api" and item.route == BATCH_ROUTE[provider]
    assert r.cost_usd == pytest.approx(priced(r, j.req, "batch_api"), abs=1e-12)
    assert r.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
    assert r.cost_usd < priced(r, j.req, "sync")  # the batch discount


# -- 1. sync round trip --------------------------------------------------------------------------------------------
@PROVIDERS
def test_sync_call_round_trip_bills_real_usage_once(emu, provider):
    async def go():
        rig = Rig(emu, provider)
        try:
            (j,) = jobs_of(provider, 1)
            await rig.run("sync", [j])
            r = (await rig.until(lambda: rig.results.get(j.req.id), "the result"))
            assert r.status == "ok" and r.real and r.mode == "sync", r
            assert r.output.startswith("[emulator ") and len(r.output) == 4 * j.req.output_tokens
            # Replayed at its recorded size: the provider counted exactly the request's tokens.
            assert r.usage == {"input_tokens": j.req.input_tokens, "output_tokens": j.req.output_tokens,
                               "cache_read": 0, "cache_write": 0}
            assert r.raw and r.raw["usage"]
            (item,) = emu.bill().items
            assert r.provider_request_id == item.request_id and item.mode == "sync" and item.custom_id is None
            assert r.cost_usd > 0
            assert r.cost_usd == pytest.approx(priced(r, j.req, "sync"), abs=1e-12)
            assert r.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            assert emu.count(ROUTE[provider]) == 1 and rig.d.in_flight == 0
            (job, _, _), = rig.calls
            assert job.key == call_key(j.req.tenant, j.req.id, j.req.model, 0)
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("provider,model", [("openai", "gpt-6.2-sol"), ("anthropic", "claude-sonnet-5-5")])
def test_a_sync_call_alone_saves_nothing_against_its_list_price_whatever_its_answers_length(emu, provider, model):
    """The report's saving is against each served request's list price (sync, alone, no cache read). Priced at
    the request's estimate (256 output tokens without one) while billed at the 2,000 its answer wrote, a call at
    exactly its list price read as a loss of $0.0174 at gpt-6.2-sol: a run of GPT-6 and Claude 5.5 bodies billed
    $0.90 against $1.37 at list prices reported a saving of -$0.26 (a parity hunt)."""
    async def go():
        rig = Rig(emu, provider)
        try:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": "at length [[emulator:output_tokens=2000]]"}]}
            if provider == "anthropic":
                body["max_tokens"] = 4000
            ask = Request.model_validate({"id": "long", "arrival_s": 0.0, "model": model, **body})
            assert ask.output_tokens < 2000  # the estimate
            await rig.run("sync", [Job(0, ask, "fp-long")])
            r = await rig.until(lambda: rig.results.get("long"), "the result")
            assert r.status == "ok" and r.usage["output_tokens"] == 2000 and r.usage["cache_read"] == 0
            rep = await rig.hub.report()
            assert rep["list_price_usd"] == pytest.approx(r.cost_usd, abs=2e-6)
            assert rep["saving_usd"] == pytest.approx(0.0, abs=2e-6)
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("in_flight", [False, True])
def test_a_reused_copy_is_listed_at_the_tokens_of_the_answer_it_was_given(in_flight):
    """A copy the cache answers saves its whole list price, taken at the answer's tokens (the call it follows):
    at the estimate, a copy of a 2,000-token answer was listed at 256 output tokens, an eighth of its worth."""
    from actors import ResultCache
    from engine.core.grouping import ReuseSettings
    from engine.runtime.outcomes import list_price

    ask = Request.model_validate({"id": "first", "arrival_s": 0.0, "model": "gpt-6.2-sol", "prompt": "at length"})
    usage = {"input_tokens": 300, "output_tokens": 2000, "cache_read": 0, "cache_write": 0}

    async def go():
        hub = ResultHub()
        cache = ResultCache(ReuseSettings(exact=True, in_flight=True, near=False), hub, ManualClock(5.0))
        first, again = Job(0, ask, "fp-1"), Job(1, ask.model_copy(update={"id": "again"}), "fp-1")
        assert await cache.lookup([first]) == [0]
        if in_flight:
            assert await cache.lookup([again]) == []  # follows the call under way
        done = Result(id="first", status="ok", output="x" * 8000, cost_usd=0.0206, usage=usage, mode="sync",
                      provider="openai", model="gpt-6.2-sol", done_s=1.0)
        await cache.complete([(first.fp, done)])
        if not in_flight:
            assert await cache.lookup([again]) == []  # served from the cache
        (hit,) = await hub.pull(0.01)
        return hit, await hub.report()

    hit, rep = asyncio.run(go())
    assert hit.status == "reused" and hit.usage == usage
    listed = list_price(ask, CAT, usage)
    assert listed == pytest.approx(300 * 2e-6 + 2000 * 10e-6) and listed > 5 * list_price(ask, CAT)
    assert rep["list_price_usd"] == pytest.approx(listed, abs=1e-6) == rep["saving_usd"]


@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-2"])
@pytest.mark.parametrize("quality", ["low", "high"])
def test_an_image_is_generated_and_billed_at_the_quality_its_params_ask(emu, quality, model):
    """``params.quality``, which the cost model prices, reaches the provider: left out of the body, the image
    was generated at the provider's default quality, billed at that price and reported at the asked one."""
    r = Request.model_validate({"id": "img", "arrival_s": 0.0, "model": model, "prompt": "a red fox",
                                "params": {"size": "1536x1024", "quality": quality}})
    listed = CAT.model("openai", model).per_image_quality[quality]["1536x1024"]

    async def go():
        rig = Rig(emu, "openai")
        try:
            await rig.run("sync", [Job(0, r, "fp-img")])
            res = await rig.until(lambda: rig.results.get("img"), "the image")
            (item,) = emu.bill().items
            # and the prompt's text tokens, as the answer's usage counts them (r's 3 tokens here)
            billed = listed + res.usage["input_tokens"] * CAT.model("openai", model).prompt_per_mtok / 1e6
            assert res.status == "ok" and res.usage["input_tokens"] == r.input_tokens == 3
            assert res.cost_usd == pytest.approx(billed, abs=1e-12) and item.cost_usd == pytest.approx(billed, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


RESULTS_ROUTE = {"openai": "files.content", "anthropic": "messages.batches.results"}


# -- 2. batch round trip -------------------------------------------------------------------------------------------
@PROVIDERS
@pytest.mark.parametrize("read_fails", [False, True], ids=["", "results-read-fails-once"])
def test_batch_round_trip_resolves_every_member_billed_once_at_the_batch_price(emu, provider, read_fails):
    # Anthropic: the members share a 1,024-token prefix (two blocks), so the first writes the cache and the
    # later ones read it, through the breakpoints the provider places.
    extra = {"input_tokens": 1500, "prefix_blocks": [11, 12]} if provider == "anthropic" else {}
    jobs = jobs_of(provider, claims=True, **extra)
    if read_fails:
        # The batch completed and was billed; reading its results fails once. It is read again: a member handed
        # back for want of its result would be sent again and paid twice.
        emu.faults.script(provider, RESULTS_ROUTE[provider], [{"status": 500}])

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            bill = emu.bill()
            assert len(bill.items) == N and sum(r.cost_usd for r in rig.results.values()) == pytest.approx(
                bill.total_usd, abs=1e-12)
            assert emu.count(ROUTE[provider]) == 0  # nothing went sync
            if provider == "anthropic":
                usage = [rig.results[j.req.id].usage for j in jobs]
                assert usage[0]["cache_write"] == 1024 and usage[0]["cache_read"] == 0
                assert all(u["cache_read"] == 1024 and u["cache_write"] == 0 for u in usage[1:])
            # The budget settled every claim at its member's cost.
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            assert sum(rig.budget.book.spend.values()) == pytest.approx(bill.total_usd, abs=1e-12)
            assert rig.d.in_flight == 0
        finally:
            await rig.close()
    asyncio.run(go())


# -- 2b. a Claude call with tools -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "batch_api"])
@pytest.mark.parametrize("kind", [None, "any"])
def test_a_claude_call_with_tools_bills_anthropic_s_tool_use_prompt_cached_with_the_tools_and_reserved_for(emu, mode,
                                                                                                            kind, request):
    """Anthropic bills a call that carries tools a system prompt of its own (346 tokens, 313 when tool_choice
    forces a call) ahead of the tools; the emulator billed none of it. Through the Anthropic provider, each call is
    billed it, the engine's bill is the emulator's, a breakpoint after the tools caches it with them (the second
    call reads what the first wrote), and the estimate and a reservation of the request's own output bound it."""
    if mode == "sync":
        # The second call reads what the first wrote within the cache's 5 minutes, emulator seconds: 0.3 s real at
        # the fixture's 1,000x, which a loaded machine outlasted between the two calls (both wrote: a flake hunt,
        # stop 80). Here an emulator at real speed: 5 minutes. (A batch's members are meant to outlast it, below.)
        emu = Emulator(CAT, latency_scale=0.0, speedup=1.0).start()
        request.addfinalizer(emu.stop)
    tool = {"name": "lookup", "description": "Looks a city up in the atlas. " * 170,
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "cache_control": {"type": "ephemeral"}}
    choice = {} if kind is None else {"tool_choice": {"type": kind}}
    bodies = [{"max_tokens": 50, "messages": [{"role": "user", "content": f"Weather in city {i}?"}], "tools": [tool],
               **choice} for i in range(2)]
    jobs = [Job(i, Request.model_validate({"id": f"t{i}", "arrival_s": 0.0, "model": MODEL["anthropic"], "body": b}),
                f"fp-t{i}") for i, b in enumerate(bodies)]

    async def go():
        rig = Rig(emu, "anthropic")
        try:
            for batch in ([jobs] if mode == "batch_api" else [[j] for j in jobs]):
                await rig.run(mode, batch, bid=batch[0].req.id)
                await rig.resolved(batch)
            return dict(rig.results)
        finally:
            await rig.close()
    results = asyncio.run(go())
    items = billed_by_custom_id(emu) if mode == "batch_api" else {i.request_id: i for i in emu.bill().items}
    hidden = TOOL_USE_PROMPT[kind]
    for k, (j, body) in enumerate(zip(jobs, bodies, strict=True)):
        r = results[j.req.id]
        item = items[batch_key(j) if mode == "batch_api" else r.provider_request_id]
        bare = anthropic_prompt(body)  # the body's tools and text, as the emulator counts them
        assert sum(item.usage.get(f, 0) for f in ("input_tokens", "cache_read_input_tokens",
                                                  "cache_creation_input_tokens")) == bare.tokens + hidden
        prefix = math.ceil(bare.breakpoints[0] / 4) + hidden  # the tool-use prompt and the tools, cached
        # (the members of a test batch finish T / 2 = 500 s apart, past the 5-minute TTL: each writes)
        read = k > 0 and mode == "sync"
        assert (r.usage["cache_write"], r.usage["cache_read"]) == ((0, prefix) if read else (prefix, 0))
        assert r.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
        assert bare.tokens + hidden <= j.req.input_tokens
        assert r.cost_usd <= reserve_bound(j.req, CAT, mode, j.req.output_tokens)


# -- 3. a failed member --------------------------------------------------------------------------------------------
@PROVIDERS
def test_a_failed_batch_member_is_retried_unbilled_and_the_others_billed_once(emu, provider):
    jobs = jobs_of(provider, claims=True)
    emu.faults.fail_members = {batch_key(jobs[1])}

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            (back,) = rig.grouper.readmitted()
            # Handed back to the policy as its next attempt (a new custom_id), its claim settled at 0.
            assert back.req.id == jobs[1].req.id and back.attempts == 1 and back.hedges == 0 and back.claim is None
            assert jobs[1].req.id not in rig.results and await rig.hub.pull(0) == []
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs if j is not jobs[1]}
            for j in jobs:
                if j is not jobs[1]:
                    assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            # The retry, sent as the policy would (here sync), is billed once: nothing was paid twice.
            await rig.run("sync", [back], bid="retry")
            r = await rig.until(lambda: rig.results.get(back.req.id), "the retried member")
            assert r.status == "ok" and r.mode == "sync"
            bill = emu.bill()
            assert len(bill.items) == N
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(bill.total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


# -- 4. an expired batch -------------------------------------------------------------------------------------------
@PROVIDERS
def test_an_expired_batch_keeps_its_finished_members_and_hands_back_the_rest(emu, provider):
    jobs = jobs_of(provider, claims=True)
    emu.faults.expire_batches(1, finished_fraction=0.6)  # members 0 and 1 finish (at 0.25 T and 0.5 T)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            back = rig.grouper.readmitted()
            assert sorted(j.req.id for j in back) == [jobs[2].req.id, jobs[3].req.id]
            # Not failed and not a new attempt: unfinished, so sent again (the claim goes back with the job).
            assert all(j.hedges == 1 and j.attempts == 0 and j.claim is not None for j in back)
            assert set(rig.results) == {jobs[0].req.id, jobs[1].req.id}
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(jobs[0]), batch_key(jobs[1])}
            for j in jobs[:2]:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(emu.bill().total_usd, abs=1e-12)
            await rig.until(lambda: set(rig.budget.book.claims) == {"c2", "c3"}, "finished claims settled")
            assert rig.d.batches_cancelled == 0 and rig.d.in_flight == 0
        finally:
            await rig.close()
    asyncio.run(go())


# -- 5. cancel at the hedge, with partial results ------------------------------------------------------------------
def assert_split_by_the_bill(rig: Rig, emu: Emulator, jobs: list[Job], provider: str) -> set[str]:
    """Every member either came back as a result billed once at the batch price (it finished) or went back to the
    grouper unbilled (it did not run), never both and never neither. Returns the ids that finished."""
    billed = billed_by_custom_id(emu)
    back = {j.req.id: j for j in rig.grouper.readmitted()}
    for j in jobs:
        in_results, in_back = j.req.id in rig.results, j.req.id in back
        assert in_results != in_back, (j.req.id, in_results, in_back)
        assert (batch_key(j) in billed) is in_results, (j.req.id, "billed" if batch_key(j) in billed else "unbilled")
        if in_results:
            assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
        else:
            assert back[j.req.id].hedges == 1 and back[j.req.id].attempts == 0
    assert set(billed) <= {batch_key(j) for j in jobs}
    return {j.req.id for j in jobs if j.req.id in rig.results}


@pytest.fixture
def quarter() -> Iterator[Emulator]:
    """The emulator at a quarter of ``SPEED``, for tests whose split of a batch's members rests on round trips
    that take a few hundred ms of real time (as the unit suite's two workers can make them): with a ``Rig`` of
    the same speed, every margin is four times longer in real time."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED / 4, cancel_s=EMU_CANCEL_S,
                  validating_s=VALIDATING_S["openai"], finalizing_s=1.0) as e:
        yield e


@PROVIDERS
def test_a_batch_cancelled_at_its_hedge_keeps_finished_members_and_never_sends_them_again(quarter, provider):
    emu, jobs = quarter, jobs_of(provider, claims=True)

    async def go():
        # The allowance for the cancel (engine s) exceeds the emulator's cancel time, as a real provider's
        # maximum exceeds a typical cancel. Member 0 must finish before the hedge (0.35 T after it is
        # submitted) and member 3 after the cancel lands: at SPEED that was 0.35 s and 0.4 s of real time.
        rig = Rig(emu, provider, cancel_s=10 * EMU_CANCEL_S, speed=SPEED / 4)
        cancels: list[float] = []
        inner = rig.d.provider.cancel

        async def cancel(handle: Any) -> None:
            cancels.append(rig.clock.now())
            await inner(handle)

        rig.d.provider.cancel = cancel
        try:
            await rig.reserve(jobs)
            # Member 0 finishes before the hedge (at 0.25 T, plus the submission's round trips), member 3 (at T)
            # long after the cancel; members 1 and 2 go either way, depending on how long the round trips take.
            hedge_at = rig.clock.now() + VALIDATING_S[provider] + 0.6 * T
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs)
            assert len(cancels) == 1 and cancels[0] >= hedge_at
            finished = assert_split_by_the_bill(rig, emu, jobs, provider)
            assert jobs[0].req.id in finished and jobs[3].req.id not in finished
            assert rig.d.batches_cancelled == 1 and rig.d.members_saved_by_cancel == len(finished)
            assert await hedge_figures(rig) == (1, len(finished))
            assert rig.d.paid_twice == 0
            unfinished = [j for j in jobs if j.req.id not in finished]
            await rig.until(lambda: set(rig.budget.book.claims) == {j.claim for j in unfinished},
                            "finished claims settled, unfinished ones held")
            # The policy's fallback sends what came back (sync): only the unfinished members are sent.
            await rig.run("sync", rig.grouper.readmitted(), bid="fallback")
            await rig.until(lambda: len(rig.results) == N, "the fallback results")
            assert emu.count(ROUTE[provider]) == len(unfinished)
            assert emu.count("batches.create") + emu.count("messages.batches.create") == 1
            assert sorted(job.req.id for job, _, _ in rig.calls) == sorted(j.req.id for j in unfinished)
            bill = emu.bill()
            assert sorted(i.mode for i in bill.items) == ["batch_api"] * len(finished) + ["sync"] * len(unfinished)
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(bill.total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


async def _create_then_die(rig: Rig, emu: Emulator, jobs: list[Job], create: str) -> None:
    """``rig``'s dispatcher sends ``jobs`` as a batch and dies once its create reached the provider, before it
    heard back: its tasks are cancelled, as a process's death ends them."""
    inner = rig.d.provider.submit_batch

    async def create_then_die(*args: Any) -> Any:
        await inner(*args)
        await asyncio.Event().wait()  # the answer never comes back: the process died here

    rig.d.provider.submit_batch = create_then_die
    await rig.reserve(jobs)
    await rig.run("batch_api", jobs)
    await rig.until(lambda: emu.count(create, status=200) == 1, "the create reached the provider")
    for t in list(rig.d._tasks):
        t.cancel()


@PROVIDERS
def test_a_batch_create_cut_by_the_dispatchers_death_is_followed_after_its_restart_never_created_twice(emu, provider):
    """The dispatcher dies after its create reached the provider, before it heard back. Restarted from the same
    arguments (as Ray does), it finds the batch (OpenAI: by its metadata; Anthropic: the only running batch of
    that many requests it does not follow), follows it, and every member is billed once, as a batch member. The
    emulator plays the providers as documented, ignoring Idempotency-Key: Anthropic's create made again under
    the key made a second batch, and every member was billed twice."""
    jobs = jobs_of(provider, claims=True)
    create = "batches.create" if provider == "openai" else "messages.batches.create"
    emu.honour_keys = False

    async def go():
        rig = Rig(emu, provider)
        try:
            await _create_then_die(rig, emu, jobs, create)
            d2 = Dispatcher(provider, rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            assert await d2.recover() == 1
            assert await d2.recall([j.req.uid for j in jobs]) == [j.req.uid for j in jobs]
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)  # no member billed twice
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            assert emu.count(ROUTE[provider]) == 0  # nothing went sync
            assert emu.count(create, status=200) == 1  # found, not created again
            await rig.until(lambda: not d2._open, "the batch left the journal")
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_an_anthropic_batch_cut_and_ended_before_the_restart_is_told_from_a_look_alike_by_its_members(emu):
    """The restart comes after the cut create's batch has ended, and a newer batch of as many requests (another
    client's on the same key) has ended too. No running batch can be told apart, but an ended one's results
    name its members: the dispatcher follows the one whose custom_ids are its members', reads their results, and
    creates nothing again; the look-alike is left alone."""
    emu.honour_keys = False
    jobs = jobs_of("anthropic", claims=True)
    create = "messages.batches.create"

    async def go():
        rig = Rig(emu, "anthropic")
        client = rig.d.provider.client
        try:
            await _create_then_die(rig, emu, jobs, create)
            params = {"model": MODEL["anthropic"], "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            other = await client.messages.batches.create(
                requests=[{"custom_id": f"other-{i}", "params": params} for i in range(N)])
            deadline = time.monotonic() + 20.0
            async for b in client.messages.batches.list():
                while (await client.messages.batches.retrieve(b.id)).processing_status != "ended":
                    assert time.monotonic() < deadline, f"batch {b.id} never ended"
                    await asyncio.sleep(0.05)
            d2 = Dispatcher("anthropic", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            assert await d2.recover() == 1
            assert await d2.recall([j.req.uid for j in jobs]) == [j.req.uid for j in jobs]
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs} | {f"other-{i}" for i in range(N)}
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "anthropic")
            assert emu.count(create, status=200) == 2 and emu.count(ROUTE["anthropic"]) == 0
            assert other.id not in {h.id for *_, h, _ in d2._open.values() if h is not None}
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_cancel_allowance_counts_from_when_the_provider_took_the_cancel():
    cancel_s = 300.0  # engine s; far longer than a round trip, so the outcome does not depend on one
    speed = SPEED / 4  # member 0 finishes 0.05 T before the cancel is taken: 50 ms of real time at SPEED, 200 here
    with Emulator(CAT, latency_scale=0.0, speedup=speed, cancel_s=cancel_s) as slow_cancel:
        jobs = jobs_of("openai")

        async def go():
            rig = Rig(slow_cancel, "openai", speed=speed)  # the allowance is emu.cancel_s, as point_at_emulator sets
            assert rig.catalog.provider("openai").batch_api.cancel_s == cancel_s
            inner = rig.d.provider.cancel

            async def cancel_over_a_slow_link(handle: Any) -> None:
                await asyncio.sleep(100.0 / speed)  # 100 engine s on the wire before the provider takes it
                await inner(handle)

            rig.d.provider.cancel = cancel_over_a_slow_link
            try:
                # The cancel is taken at >= 0.2 T + 100 and ends 300 later: members 0 (and likely 1) finish.
                await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 0.2 * T)
                await rig.resolved(jobs)
                assert batch_key(jobs[0]) in billed_by_custom_id(slow_cancel)
                assert_split_by_the_bill(rig, slow_cancel, jobs, "openai")
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_poll_sent_before_the_cancel_allowance_ends_and_answered_after_it_does_not_end_the_wait():
    """A poll's status is the provider's when the poll was sent. Every poll after the cancel comes back 400
    engine seconds after the provider answered it (a slow link), past the 300 s allowance: the first, sent
    at the cancel, says "cancelling" and returns past the allowance. The dispatcher polls once more rather than
    send the members sync: they finished within the allowance, and sent again they were paid twice (as the
    dispatcher did when it judged that first poll by when its answer came)."""
    cancel_s = 300.0
    # At half speed: member 0 must finish before the cancel ends, 250 engine seconds after the hedge set before the
    # upload and the create: 0.25 s of real time at SPEED against 0.16 s those took under load (a helper's hunt).
    speed = SPEED / 2
    with Emulator(CAT, latency_scale=0.0, speedup=speed, cancel_s=cancel_s) as slow_cancel:
        jobs = jobs_of("openai")

        async def go():
            rig = Rig(slow_cancel, "openai", speed=speed)
            cancel, poll = rig.d.provider.cancel, rig.d.provider.poll
            cancelled = asyncio.Event()

            async def cancel_and_note(handle: Any) -> None:
                await cancel(handle)
                cancelled.set()

            async def slow_answer_after_the_cancel(handle: Any) -> Any:
                st = await poll(handle)
                if cancelled.is_set():
                    await asyncio.sleep(400.0 / speed)
                return st

            rig.d.provider.cancel, rig.d.provider.poll = cancel_and_note, slow_answer_after_the_cancel
            try:
                await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 0.2 * T)
                await rig.resolved(jobs)
                assert cancelled.is_set()
                finished = assert_split_by_the_bill(rig, slow_cancel, jobs, "openai")
                assert finished  # judged by when its answer came, every member went back to the grouper
                assert rig.d.paid_twice == 0
            finally:
                await rig.close()
        asyncio.run(go())


# -- 6-9. sync failures: the providers' outcomes, then the dispatcher's retries ----------------------------------
def direct(emu: Emulator, provider: str, key: str = KEY, clock: Any = None, **settings_kw: Any) -> Provider:
    """The HTTP provider alone (``make_provider``), on an engine clock at the emulator's speed (or ``clock``)."""
    s = http_settings(emu, **settings_kw)
    cat, _ = http_setup(emu.catalog, s, need_keys=False)
    sim = SimProvider(cat.provider(provider), cat, s, Draws(0, 4, 0, 60.0), draw=False)
    p = make_provider(provider, cat, s, sim, clock or ScaledClock(time.time(), SPEED), Secret(key))
    assert p.real and isinstance(p, Provider)
    return p


def one_call(emu: Emulator, provider: str):
    """The outcome of one sync call of a request through the HTTP provider alone (``direct``), closed after it."""
    async def go():
        p = direct(emu, provider)
        try:
            return await p.call(job_of(req(0, provider)))
        finally:
            await p.close()
    return asyncio.run(go())


def job_of(r: Request, attempt: int = 0) -> CallJob:
    return CallJob(call_key(r.tenant, r.id, r.model, 0), r, 0.0, attempt, 0)


@pytest.mark.parametrize(("provider", "status", "retryable"), [
    ("openai", 429, True), ("openai", 500, True), ("openai", 400, False), ("openai", 401, False),
    ("anthropic", 429, True), ("anthropic", 529, True), ("anthropic", 400, False)])
def test_an_error_answer_is_an_unbilled_outcome_and_the_sdk_does_not_retry(emu, provider, status, retryable):
    emu.faults.script(provider, ROUTE[provider], [{"status": status, "retry_after_s": 7.5 if status == 429 else None}])

    out = one_call(emu, provider)
    assert not out.ok and out.cost == 0.0 and out.usage is None and out.retryable is retryable and out.real
    assert out.error.startswith(f"{provider} HTTP {status}: "), out.error
    assert out.retry_after_s == (7.5 if status == 429 else None)
    assert emu.count(ROUTE[provider]) == 1 and emu.bill().items == ()  # max_retries=0: one call, not billed


@pytest.mark.parametrize(("etype", "status"), [("invalid_request_error", 400), ("overloaded_error", 529)])
def test_an_anthropic_batch_members_error_says_its_http_status_as_a_sync_calls_does(emu, etype, status):
    """A Message Batch member errored with Anthropic's type alone: the endpoint read no status in it and answered
    a bad member (an extra field) 502, an api_error the SDKs retry, where a sync call's refusal is the caller's
    400 (a live tour of /v1/messages/batches)."""
    j = job_of(req(0, "anthropic"))
    error = {"type": "error", "error": {"type": etype, "message": "foo: Extra inputs are not permitted"}}

    async def go():
        p = direct(emu, "anthropic")
        try:
            async def results(bid):
                return [{"custom_id": j.key, "result": {"type": "errored", "error": error}}], []
            p._results = results
            handle = BatchHandle("msgbatch_x", [j], None)
            handle.batch = type("Ended", (), {"processing_status": "ended"})()
            return (await p.fetch(handle))[j.key]
        finally:
            await p.close()
    out = asyncio.run(go())
    assert not out.ok and out.cost == 0.0 and out.retryable is (status != 400)
    failed = Result(id="r", status="failed", error=f"anthropic failed after 1 attempt(s): {out.error}")
    assert provider_status(failed) == status, out.error
    assert "foo: Extra inputs are not permitted" in out.error


def test_a_429_is_retried_no_earlier_than_its_retry_after(emu):
    wait_s = 100.0  # engine seconds (100 ms real)
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": wait_s}])

    async def go():
        rig = Rig(emu)
        try:
            (j,) = jobs_of("openai", 1)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok" and r.real, r
            (j1, _, o1), (j2, start2, o2) = rig.calls
            assert not o1.ok and o1.retry_after_s == wait_s and o2.ok
            # A rate limit's 429 billed nothing: not a try (test_rate_limits), sent again under the same key.
            assert (j1.attempt, j2.attempt) == (0, 0) and j1.key == j2.key
            assert start2 >= o1.at + wait_s - 1e-3 * SPEED  # engine time (1 ms real: the two clocks' reads)
            # The SDK retried nothing: the emulator saw exactly the engine's two calls.
            assert emu.count("chat.completions", status=429) == 1 and emu.count("chat.completions", status=200) == 1
            assert len(emu.bill().items) == 1 and r.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_an_openai_429_without_retry_after_is_retried_after_its_rate_limit_resets(emu):
    """OpenAI's 429s may carry no ``Retry-After``, only ``x-ratelimit-reset-requests``/``-tokens`` (a helper's
    protocol hunt): read as no wait at all, a window of 100 s was retried 1 s later (and a minute's window failed
    the request after its four tries within 7 s)."""
    wait_s = 100.0  # engine seconds (100 ms real)
    emu.faults.retry_after_header = False
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": wait_s}])

    async def go():
        rig = Rig(emu)
        try:
            (j,) = jobs_of("openai", 1)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok", r
            (_, _, o1), (_, start2, o2) = rig.calls
            assert not o1.ok and o1.retry_after_s == wait_s and o2.ok
            assert start2 >= o1.at + wait_s - 1e-3 * SPEED
        finally:
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m40s",
      "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "0s"}, 100.0),
    ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s",
      "x-ratelimit-reset-requests": "12ms"}, 360.0),
    ({"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "1.5s"}, 1.5),
    ({"retry-after": "3", "x-ratelimit-reset-tokens": "6m0s"}, 3.0),
    ({"x-ratelimit-reset-tokens": "soon"}, None),
])
def test_a_rate_limits_reset_is_read_when_a_429_says_no_retry_after(headers, seconds):
    assert retry_after(headers) == seconds


def test_5xx_is_retried_with_backoff_then_failed_unbilled(emu):
    emu.faults.script("openai", "chat.completions", [{"status": 500}] * 3)

    async def go():
        rig = Rig(emu, sim=SimSettings(max_attempts=3))
        try:
            (j,) = jobs_of("openai", 1)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "failed" and r.cost_usd == 0.0 and r.real, r
            assert "openai failed after 3 attempt(s): openai HTTP 500" in r.error
            assert [job.attempt for job, _, _ in rig.calls] == [0, 1, 2]
            for (_, _, prev), (_, start, _) in zip(rig.calls, rig.calls[1:]):
                assert start > prev.at  # a backoff between attempts
            assert emu.count("chat.completions", status=500) == 3 and emu.bill().items == ()
        finally:
            await rig.close()
    asyncio.run(go())


def test_failures_open_the_circuit_and_send_the_work_to_the_fallback_model(emu):
    emu.faults.script("openai", "chat.completions", [{"status": 500}] * 4)
    res = Resilience(allowed_fails=2, window_s=3600.0, cooldown_time=3600.0,
                     fallbacks={"openai/gpt-5-mini": "openai/gpt-5"})

    async def go():
        rig = Rig(emu, resilience=res)
        try:
            (j,) = jobs_of("openai", 1)
            await rig.run("sync", [j])
            await rig.resolved([j])
            (back,) = rig.grouper.readmitted()
            assert (back.req.provider, back.req.model) == ("openai", "gpt-5") and j.req.id not in rig.results
            stats = await rig.d.stats()
            assert stats["circuit_opened"] == 1 and stats["rerouted"] == 1
            assert emu.count("chat.completions") == 2 and emu.bill().items == ()  # the third try never left
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_timed_out_call_is_retried_with_the_same_idempotency_key_and_billed_once(emu):
    # Held past the client's timeout, far past it (2 s before; the emulator's stop ends the hold).
    emu.faults.script("openai", "chat.completions", [{"timeout_s": 60.0}])

    async def go():
        rig = Rig(emu, timeout_s=0.25)
        sent: list[dict] = []
        completions = rig.d.provider.client.chat.completions
        create = completions.create

        async def spy(**kw: Any) -> Any:
            sent.append(dict(kw["extra_headers"]))
            return await create(**kw)

        completions.create = spy
        try:
            (j,) = jobs_of("openai", 1)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok", r
            # (a try after the held one may time out too: its 0.25 s is within a loaded machine's stall)
            (j1, _, _), *_, (_, _, last) = rig.calls
            assert all(not o.ok and "timed out" in o.error for _, _, o in rig.calls[:-1]) and last.ok
            key = idempotency_key(call_key(j.req.tenant, j.req.id, j.req.model, 0), j1.body)
            assert [h["Idempotency-Key"] for h in sent] == [key] * len(rig.calls)  # one body at the first try
            assert len(emu.bill().items) == 1 and r.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_retry_after_a_timeout_is_answered_from_the_first_calls_bill():
    """A call the provider finished (and billed) after the client gave up: the retry, with the same
    Idempotency-Key, gets that answer and pays nothing more."""
    with Emulator(CAT, latency_scale=300.0, speedup=1000.0) as slow:  # ~0.25 s real per call (seeded draw)
        async def go():
            p = direct(slow, "openai", timeout_s=0.1)
            try:
                job = job_of(req(0))
                first = await p.call(job)
                assert not first.ok and first.retryable and "timed out after 0.1 s" in first.error
                deadline = time.monotonic() + 10.0
                while not slow.bill().items:  # the provider finishes the abandoned call and bills it
                    assert time.monotonic() < deadline, "the abandoned call was never billed"
                    await asyncio.sleep(0.01)
                again = await p.call(job)
            finally:
                await p.close()
            (item,) = slow.bill().items
            assert again.ok and again.provider_request_id == item.request_id
            assert again.cost == pytest.approx(item.cost_usd, abs=1e-12)
        asyncio.run(go())


def test_a_400_fails_at_once_without_a_retry(emu):
    emu.faults.script("openai", "chat.completions", [{"status": 400, "message": "max_tokens is too large"}])

    async def go():
        rig = Rig(emu)
        try:
            (j,) = jobs_of("openai", 1)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "failed" and r.cost_usd == 0.0
            assert r.error.startswith("openai failed after 1 attempt(s): openai HTTP 400: ") and r.real
            assert r.error.endswith("max_tokens is too large")
            assert len(rig.calls) == 1 and emu.count("chat.completions") == 1 and emu.bill().items == ()
        finally:
            await rig.close()
    asyncio.run(go())


# -- 10. the key never shows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [KEY, "NEVERSHOWN-plain-key-1234567890abcdef"], ids=["sk-shaped", "plain"])
def test_the_api_key_never_shows(emu, caplog, key):
    """Neither a key shaped like one nor one that is not: the provider redacts the key it holds by value."""
    caplog.set_level(logging.DEBUG)
    quoting = f"Incorrect API key provided: {key}"

    async def go() -> list[str]:
        rig = Rig(emu, key=key)
        seen: list[str] = []
        try:
            jobs = jobs_of("openai", 2)
            await rig.run("sync", jobs[:1])  # a call that succeeds
            await rig.until(lambda: rig.results.get(jobs[0].req.id), "the result")
            # An error answer that quotes the key back: as an outcome ...
            emu.faults.script("openai", "chat.completions", [{"status": 401, "message": quoting}])
            out = await rig.d.provider.call(job_of(jobs[1].req))
            assert not out.ok and "[redacted]" in out.error
            seen.append(out.error)
            # ... and as the refusal of a batch, which the dispatcher logs and hands back.
            emu.faults.script("openai", "batches.create", [{"status": 401, "message": quoting}])
            with pytest.raises(Exception) as refused:
                await rig.d.provider.submit_batch([job_of(jobs[1].req)], None)
            seen += [str(refused.value), repr(refused.value), "".join(traceback.format_exception(refused.value))]
            emu.faults.script("openai", "batches.create", [{"status": 401, "message": quoting}])
            await rig.run("batch_api", jobs[1:], bid="refused")
            await rig.resolved(jobs[1:])
            assert [j.req.id for j in rig.grouper.readmitted()] == [jobs[1].req.id]
            seen += [r.model_dump_json() for r in rig.results.values()]
            seen += [repr(rig.d), repr(rig.d.provider), str(await rig.d.stats())]
        finally:
            await rig.close()
        return seen

    seen = asyncio.run(go())
    seen += [rec.getMessage() for rec in caplog.records] + [caplog.text]
    seen += [emu.bill().model_dump_json(), repr(emu.calls), repr(emu)]
    assert any("batch submission failed" in s for s in seen)  # the refusal was logged ...
    leaks = [s for s in seen if key in s]
    assert not leaks, leaks  # ... and nothing showed the key


# -- _wire -----------------------------------------------------------------------------------------------------------
_MARKER_CHARS = len(" [[emulator:output_tokens=]]")


def replayed(input_tokens: int, output_tokens: int = 50, blocks: tuple[int, ...] = (), rid: str = "r",
             prompt: str = "p") -> Request:
    return Request.model_validate({"id": rid, "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": input_tokens,
                                   "output_tokens": output_tokens, "prefix_blocks": list(blocks), "prompt": prompt})


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6000), st.integers(0, 100_000), st.lists(st.integers(0, 50), max_size=6, unique=True),
       st.text(max_size=40))
def test_a_replayed_line_is_sent_at_its_recorded_size_naming_its_output(input_tokens, output_tokens, blocks, prompt):
    r = replayed(input_tokens, output_tokens, tuple(blocks), prompt=prompt)
    parts, tail = message_parts(r, 512, 4.0, replay=True)
    text = "".join(parts) + tail
    assert all(len(p) == 2048 for p in parts) and len(parts) <= len(blocks)
    assert tail.count(f"[[emulator:output_tokens={output_tokens}]]") >= 1
    room = input_tokens * 4 - 2048 * len(parts)
    if room > len(str(output_tokens)) + _MARKER_CHARS:
        assert len(text) == input_tokens * 4  # exactly the recorded size
    else:  # no room left for the marker: a few characters over, at most the marker and one more
        assert input_tokens * 4 <= len(text) <= input_tokens * 4 + len(str(output_tokens)) + _MARKER_CHARS + 1
    # Every block that fits whole is sent.
    assert len(parts) == min(len(blocks), input_tokens * 4 // 2048)


def test_requests_that_share_prefix_blocks_share_their_text():
    a = message_parts(replayed(3000, blocks=(1, 2, 3), rid="a", prompt="first"), 512, 4.0, replay=True)
    b = message_parts(replayed(2600, blocks=(1, 2, 9), rid="b", prompt="second"), 512, 4.0, replay=True)
    assert a[0][:2] == b[0][:2] and a[0][2] != b[0][2] and a[0][0] != a[0][1]
    assert a[1] != b[1] and "[a] first" in a[1][:20] and "[b] second" in b[1][:20]
    # Not replayed, a prompt long enough for its count is sent as it is; a placeholder is still replayed.
    long = Request.model_validate({"id": "l", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "x" * 400,
                                   "input_tokens": 100, "prefix_blocks": [1]})
    assert message_parts(long, 512, 4.0) == ([], "x" * 400)
    assert len("".join(message_parts(replayed(3000, blocks=(1,)), 512, 4.0)[0])) == 2048


@pytest.mark.parametrize("ids", [("gemini-4-argon-s1", "gemini-4-argon-s2"), ("conv-7-turn-10", "conv-7-turn-11")])
def test_a_replayed_line_reads_no_more_than_its_shared_blocks_at_a_one_token_cache(ids):
    """Replayed, two lines sharing prefix blocks share nothing after them: at an automatic cache of one-token
    granularity (Gemini's) the second reads its blocks alone, as the cost model's split says. Their tails began
    with their ids, whose common start ("gemini-4-argon-s") the emulator read too: gemini-4-argon over HTTP was
    billed 4 tokens of each call at 0.1x where the simulator priced them plain (a parity hunt)."""
    from engine.core.cost import cache_split, price_text
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import Prompt

    google = default_catalog().provider("google")
    spec = google.models["gemini-4-argon"]
    caches, blocks = PromptCaches(), list(range(10))
    lines = [Request.model_validate({"id": i, "arrival_s": 0.0, "model": "gemini-4-argon", "prompt": "question",
                                     "input_tokens": 10 * 512 + 100, "output_tokens": 50, "prefix_blocks": blocks})
             for i in ids]
    longer = lines[0].model_copy(update={"id": "longer", "prefix_blocks": blocks + [99],
                                         "input_tokens": 11 * 512 + 100})
    splits = []
    for k, r in enumerate([lines[0], longer, lines[1]]):
        parts, tail = message_parts(r, 512, 4.0, replay=True)
        splits.append(caches.use(google, spec, r.model, Prompt("".join(parts) + tail, (), ""), float(k)))
    assert splits[1].read == splits[2].read == 10 * 512
    # (Where the rest of a prompt falls is no matter to a bill at a 1x write: the prices are compared.)
    model = cache_split(google, spec, 10 * 512 + 100, 10, 10, 0, 512)
    assert price_text(google, spec, splits[2], 50, "sync").total == pytest.approx(
        price_text(google, spec, model, 50, "sync").total, rel=1e-12)


def test_redact_hides_given_secrets_and_anything_shaped_like_a_key():
    assert redact(f"bad key {KEY}!") == "bad key [redacted]!"
    assert redact("k=sk-proj-abcDEF123_-x and sk-ant-api03-zzzzzz") == "k=[redacted] and [redacted]"
    assert redact("token plainsecret42 here", ["plainsecret42"]) == "token [redacted] here"
    assert redact("nothing to hide: sk-abc", ["", "absent"]) == "nothing to hide: sk-abc"  # too short for a key
    # Google's keys (AIza and 35 more), since Gemini is called for real: the dispatcher's logs of a batch's file
    # deletes and watches redact by shape alone.
    assert redact("key=AIzaSyD-0123456789abcdefghijABCDEFGHIJ_.") == "key=[redacted]."


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "7"}, 7.0), ({"retry-after": "0.5"}, 0.5), ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
    ({"retry-after": "-3"}, 0.0), ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None), ({}, None),
    (None, None), ({"retry-after-ms": "soon"}, None)])
def test_retry_after_reads_seconds_or_milliseconds(headers, seconds):
    assert retry_after(headers) == seconds


# -- Anthropic cache_control breakpoints -----------------------------------------------------------------------------
def anthropic_body(r: Request, *args: int, cache_write: bool = False) -> dict:
    s = Settings().model_copy(update={"providers": Settings().providers.model_copy(update={"replay": True})})
    p = AnthropicProvider("anthropic", CAT, s, s.providers.endpoints["anthropic"], Secret(KEY), ManualClock(0.0))
    try:
        return p.body(CallJob("k", r, 0.0, 0, 0, cache_write), *args)
    finally:
        asyncio.run(p.close())


def marked(body: dict) -> list[int]:
    (msg,) = body["messages"]
    return [k for k, block in enumerate(msg["content"]) if "cache_control" in block]


def test_anthropic_breakpoints_mark_the_warm_prefix_the_shared_prefix_and_a_requested_write():
    r = replayed(4000, blocks=(1, 2, 3)).model_copy(update={"provider": "anthropic", "model": "claude-sonnet-4-5"})
    body = anthropic_body(r)
    assert len(body["messages"][0]["content"]) == 4 and marked(body) == []  # three blocks and the tail
    assert body["max_tokens"] == CAT.model("anthropic", "claude-sonnet-4-5").max_output_tokens
    assert marked(anthropic_body(r, 2)) == [1]  # the end of the prefix believed warm
    assert marked(anthropic_body(r, 0, 3)) == [2]  # the end of the prefix a later batch member shares
    assert marked(anthropic_body(r, 1, 2)) == [0, 1]
    assert marked(anthropic_body(r, cache_write=True)) == [2]  # the whole shared prefix
    assert marked(anthropic_body(r, 9, 9)) == []  # beyond the blocks: nothing to mark
    assert anthropic_body(r, 2)["messages"][0]["content"][1]["cache_control"] == {"type": "ephemeral"}
    # A request with its own messages is sent as it is, with the model and the cap set.
    own = r.model_copy(update={"body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}})
    assert anthropic_body(own, 2) == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                      "model": "claude-sonnet-4-5"}


def test_anthropic_the_engines_marks_beside_a_bodys_own_stay_within_four():
    """A replayed request whose body carries two marks of its own (its system) got three more from the engine:
    five on the wire, which Anthropic refuses (a review). The furthest marks are kept."""
    r = replayed(4000, blocks=(1, 2, 3)).model_copy(update={"provider": "anthropic", "model": "claude-sonnet-4-5"})
    system = [{"type": "text", "text": f"rule {k}", "cache_control": {"type": "ephemeral"}} for k in range(2)]
    mine = r.model_copy(update={"body": {"system": system}})
    body = anthropic_body(mine, 1, 2, cache_write=True)
    assert marked(body) == [1, 2] and body["system"] == system  # of the engine's [0, 1, 2]
    assert marked(anthropic_body(r, 1, 2, cache_write=True)) == [0, 1, 2]  # without marks of its own, all three
    full = r.model_copy(update={"body": {"system": [*system, *system]}})
    assert marked(anthropic_body(full, 1, 2, cache_write=True)) == []


def test_anthropic_a_mark_on_a_partial_last_block_lands_on_the_last_rendered_block():
    """1,300 tokens with three block ids: two whole blocks and a partial third, which is sent with the tail. A
    batch mark (or a warm prefix) of all three blocks is the prefix up to the second: dropped, the first member
    of a batch wrote nothing and every later member that shares its prefix missed it (and wrote it again)."""
    r = replayed(1300, blocks=(1, 2, 3)).model_copy(update={"provider": "anthropic", "model": "claude-sonnet-4-5"})
    assert len(anthropic_body(r)["messages"][0]["content"]) == 3  # two blocks and the tail
    assert marked(anthropic_body(r, 0, 3)) == [1]
    assert marked(anthropic_body(r, 3)) == [1]
    assert marked(anthropic_body(r, 3, 3)) == [1]
    assert marked(anthropic_body(r, 0, 4)) == []  # past the request's own blocks: nothing to mark


@pytest.fixture
def still() -> Iterator[tuple[Emulator, ManualClock]]:
    """An emulator and an engine clock that stand still: no prompt-cache entry expires between a test's calls. At
    ``SPEED`` the 5-minute TTL is 0.3 s of real time, which a loaded machine once passed between two calls."""
    clock = ManualClock(1_000.0)
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as e:
        e.follow(clock)
        yield e, clock


def test_anthropic_learns_warmth_from_usage_and_reads_what_it_wrote(still):
    emu, clock = still
    first, second = (replayed(1500, 20, (11, 12), rid=f"w{i}").model_copy(
        update={"provider": "anthropic", "model": "claude-sonnet-4-5"}) for i in range(2))

    async def go() -> list[CallOutcome]:
        p = direct(emu, "anthropic", clock=clock)
        try:
            a = await p.call(job_of(first)._replace(cache_write=True))
            b = await p.call(job_of(second))  # no write asked: the breakpoint is at the prefix now warm
            return [a, b]
        finally:
            await p.close()

    a, b = asyncio.run(go())
    assert a.ok and b.ok and (a.usage.cache_write, a.usage.cache_read) == (1024, 0)
    assert (b.usage.cache_write, b.usage.cache_read) == (0, 1024) and b.usage.input_tokens == 1500
    items = emu.bill().items
    assert [i.cost_usd for i in items] == pytest.approx([a.cost, b.cost], abs=1e-12)
    assert b.cost < a.cost


def test_anthropic_believes_warm_only_the_blocks_a_call_read_or_wrote(still):
    """A call that read two warm blocks and wrote nothing leaves its other blocks cold. Believed warm, they drew
    the next call's breakpoint past the cached prefix, where the provider writes: a write nobody asked for."""
    writer, reader, later = (replayed(n, 20, blocks, rid=f"v{i}").model_copy(
        update={"provider": "anthropic", "model": "claude-sonnet-4-5"})
        for i, (n, blocks) in enumerate([(1500, (21, 22)), (2600, (21, 22, 23, 24)), (2600, (21, 22, 23, 24))]))
    emu, clock = still

    async def go() -> list[CallOutcome]:
        p = direct(emu, "anthropic", clock=clock)
        try:
            return [await p.call(job_of(writer)._replace(cache_write=True)), await p.call(job_of(reader)),
                    await p.call(job_of(later))]
        finally:
            await p.close()

    a, b, c = asyncio.run(go())
    assert (a.usage.cache_write, b.usage.cache_read, b.usage.cache_write) == (1024, 1024, 0)
    assert (c.usage.cache_read, c.usage.cache_write) == (1024, 0)


def test_openai_and_anthropic_providers_are_built_from_settings(emu):
    async def go():
        for name, cls in (("openai", OpenAIProvider), ("anthropic", AnthropicProvider)):
            p = direct(emu, name)
            try:
                assert type(p) is cls and f"{emu.port}/{name}" in repr(p) and KEY not in repr(p)
            finally:
                await p.close()
    asyncio.run(go())



def test_a_simulator_beside_the_emulator_draws_no_failures_for_the_providers_it_plays():
    """The emulator fails no call unless a fault plan says so: a simulator run compared with an emulated one
    must not retry members the emulator ran at once (retried later, they read prefixes warmed meanwhile)."""
    cat = as_emulated(CAT)
    assert cat.provider("openai").failure_rate == cat.provider("anthropic").failure_rate == 0.0
    assert cat.provider("google").failure_rate == CAT.provider("google").failure_rate > 0  # still simulated
    assert CAT.provider("anthropic").failure_rate > 0  # the catalog itself is left as it is
    assert cat.model("anthropic", "claude-sonnet-4-5") == CAT.model("anthropic", "claude-sonnet-4-5")
