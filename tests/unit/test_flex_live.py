"""The live engine's flex tier (OpenAI's ``service_tier: "flex"``): the emulator's tier (served at batch prices
for the catalog's flex models, a 400 naming the field for another, a fault knob that refuses it with a 429 billed
nothing), the simulated provider's flex draws, and a dispatcher over HTTP carrying out smart's flex decisions:
answered at flex and billed at its prices, or refused (or timed out) and sent once at the standard tier under a
key of its own, no try spent. Dispatchers run as plain asyncio classes (no Ray); waits are bounded polls."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import openai
import pytest

from actors._types import Job
from actors.providers.simulated import SimulatedProvider
from engine.core.budgets import Claim
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.cost import CacheSplit, mode_factor, price_text, reserve_bound
from engine.core.draws import Draws
from engine.core.latency import flex_timeout_s
from engine.core.provider_api import CallJob
from engine.core.request import Request
from engine.core.settings import Settings
from engine.emulator import Emulator
from engine.runtime.providers import SimProvider
from tests.unit.test_http_providers import KEY, Rig, emu, priced  # noqa: F401  (emu: the fixture)

CAT = default_catalog()
OPENAI = CAT.provider("openai")
# Real seconds the emulator holds a call that must time out: far past the flex call's 0.5 s, so a loaded machine's
# late timer still times out (held 2 s before: 1.5 s of slack); the emulator's stop ends the hold.
HOLD_S = 60.0


def flex_req(rid: str = "flex-0", model: str = "gpt-5-mini", **kw: Any) -> Request:
    d = {"id": rid, "arrival_s": 0.0, "model": model, "input_tokens": 60, "output_tokens": 12,
         "prompt": f"Say hi to {rid}.", "deadline_s": 86_400.0}
    d.update(kw)
    return Request.model_validate(d)


def timing_out(rig: Rig) -> Request:
    """A flex request whose deadline leaves its flex call 500 engine s (0.5 real s at the rig's speed) before the
    standard call's room: the emulator's hold (``HOLD_S``) outlasts the call's timeout. The rig's clock stands
    still until the flex call has taken its timeout, so that room is the call's however long the reserve and the
    dispatch took: a loaded machine's 0.6 s there (the clock running) left the call none, and it went standard
    without a flex call."""
    r = flex_req(deadline_s=1.0)
    room = r.deadline_at - flex_timeout_s(OPENAI, r, 0.0)
    clock, provider = rig.clock, rig.d.provider
    held = clock.now()
    clock.now = lambda: held  # (an instance attribute shadows the method until the call's timeout is taken)
    wait = provider._flex_wait

    def timed(job):
        try:
            return wait(job)
        finally:
            if "now" in vars(clock):  # the clock runs on from where it stood
                del clock.now
                clock.offset += held - clock.now()
    provider._flex_wait = timed
    return r.model_copy(update={"deadline_s": held + room + 500.0})


def flex_bound(r: Request, rig: Rig) -> float:
    """What a flex call that got no answer keeps on the budget: its upper bound at flex prices."""
    return reserve_bound(r, rig.catalog, "sync", None) * mode_factor(OPENAI, "flex")


async def flex_result(rig: Rig, r: Request):
    """``r`` reserved (claim ``c0``) and dispatched at the flex tier by ``rig``'s dispatcher: its result. A flex
    call the tier did not serve comes back to the grouper (its claim held the flex price), which reserves the
    standard price (claim ``c1``, releasing what it got back) and sends it sync as decided (``Grouper.add``)."""
    job = Job(0, r, "fp", claim="c0")
    await rig.reserve([job])
    await rig.run("flex", [job])
    got = await rig.until(lambda: rig.results.get(r.id) or rig.grouper.readmitted(), "the result or the job back")
    if not isinstance(got, list):
        return got
    await standard_again(rig, r)
    return await rig.until(lambda: rig.results.get(r.id), "the result")


async def standard_again(rig: Rig, r: Request) -> None:
    """As ``Grouper.add`` does with a flex job back from its dispatcher (``Job.standard``): reserve the standard
    price (claim ``c1``), releasing the claim it came back with, and send it sync as decided."""
    (back,) = await rig.until(rig.grouper.readmitted, "the job back")
    assert back.standard == (False, "test", "test") and back.req == r
    assert rig.d.in_flight == 0 and all(j.body.get("service_tier") == "flex" for j, _, _ in rig.calls if j.body)
    std = Claim("c1", r.tenant, r.provider, r.model, r.priority, reserve_bound(r, rig.catalog, "sync", None))
    assert all(v.ok for v in await rig.budget.reserve_many([std], [back.claim] if back.claim else []))
    await rig.run("sync", [back._replace(claim="c1", standard=None)], bid="b2")


async def settled_at(rig: Rig, usd: float) -> None:
    """Wait for the request's claim to settle, and check the ledger's spend is ``usd``."""
    await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
    assert sum(rig.budget.book.spend.values()) == pytest.approx(usd, abs=1e-9)


# -- the emulator -----------------------------------------------------------------------------------------------
def _client(e: Emulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=e.base_url("openai"), api_key=KEY, max_retries=0)


def test_the_emulator_serves_flex_at_flex_prices_on_both_routes_and_says_so(emu):  # noqa: F811
    c = _client(emu)
    try:
        chat = c.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi there"}],
                                         service_tier="flex")
        resp = c.responses.create(model="gpt-5", input="hello there", service_tier="flex")
        std = c.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi there"}])
    finally:
        c.close()
    assert chat.service_tier == resp.service_tier == "flex" and std.service_tier == "default"
    items = emu.bill().items
    assert [i.mode for i in items] == ["flex", "flex", "sync"]
    for item, model in zip(items, ["gpt-5-mini", "gpt-5", "gpt-5-mini"]):
        u = item.usage
        split = CacheSplit(u["cache_read_tokens"], u["cache_write_tokens"], u["plain_input_tokens"])
        assert item.cost_usd == pytest.approx(price_text(OPENAI, OPENAI.models[model], split, u["output_tokens"],
                                                         item.mode).total, abs=1e-12)
    assert items[0].cost_usd == pytest.approx(items[2].cost_usd * mode_factor(OPENAI, "flex"), abs=1e-12)


def test_the_emulator_refuses_flex_for_a_model_without_it_naming_the_field(emu):  # noqa: F811
    c = _client(emu)
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                      service_tier="flex")
    finally:
        c.close()
    err = exc.value.body
    assert err["param"] == "service_tier" and err["type"] == "invalid_request_error" and "flex" in err["message"]
    assert not emu.bill().items


def test_the_emulator_refuses_the_next_flex_calls_on_its_knob_unbilled(emu):  # noqa: F811
    """``refuse_flex``: the next N flex calls get 429 "Resource Unavailable", billed nothing; standard calls and
    the flex calls after them are served. Set over HTTP as the other fault knobs are."""
    origin = emu.base_url("openai").rsplit("/openai/", 1)[0]
    post = urllib.request.Request(origin + "/_emulator/faults", data=json.dumps({"refuse_flex": 2}).encode(),
                                  method="POST")
    assert json.load(urllib.request.urlopen(post, timeout=5))["ok"] is True
    c = _client(emu)
    msgs = [{"role": "user", "content": "hi"}]
    try:
        c.chat.completions.create(model="gpt-5-mini", messages=msgs)  # standard: not counted
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as exc:
                c.chat.completions.create(model="gpt-5-mini", messages=msgs, service_tier="flex")
            assert "Resource Unavailable" in str(exc.value) and exc.value.response.headers.get("retry-after") is None
        assert c.chat.completions.create(model="gpt-5-mini", messages=msgs, service_tier="flex").service_tier == "flex"
    finally:
        c.close()
    assert [i.mode for i in emu.bill().items] == ["sync", "flex"]


# -- the simulated provider (a live engine's providers without an endpoint) -----------------------------------
def test_the_simulated_provider_draws_flex_calls_slower_at_flex_prices_and_refused_unbilled():
    """The live dispatcher's simulated provider draws what the simulator draws for a flex call (``flex=True``):
    before, it drew every call standard, so a flex decision was timed, billed and never refused as sync."""
    settings = Settings()
    sim = SimProvider(OPENAI, CAT, settings, Draws(0, settings.sim.max_attempts, 3, settings.sim.batch_slot_s), draw=False)
    prov = SimulatedProvider(sim, ManualClock(0.0))
    refused = served = 0
    for row in range(400):
        r = flex_req(f"r{row}")
        job = CallJob("k", r, 0.0, 0, row, flex=True)
        drawn, _ = sim.draw_sync(row, r, 0.0, 0, False, flex=True)
        out = asyncio.run(prov.call(job))
        assert out.refused == drawn.refused and (out.cost, out.ok) == (drawn.cost, drawn.ok)
        if out.refused:
            refused += 1
            assert out.cost == 0.0 and not out.ok
        elif out.ok:
            served += 1
            assert out.flex and out.at == drawn.at
            std, _ = sim.draw_sync(row, r, 0.0, 0, False)
            assert out.cost == pytest.approx(std.cost * mode_factor(OPENAI, "flex")) and out.at > std.at
    assert refused and served


# -- the dispatcher over HTTP -----------------------------------------------------------------------------------
def _tiers(rig: Rig) -> list[str | None]:
    return [job.body.get("service_tier") if job.body else None for job, _, _ in rig.calls]


def _flex_metric(rig: Rig, what: str) -> float | None:
    """The hub's ``smartbatch_flex_{what}_calls_total`` for openai (None: not exported yet)."""
    return rig.hub.metrics.registry.get_sample_value(f"smartbatch_flex_{what}_calls_total", {"provider": "openai"})


def test_a_flex_dispatch_is_answered_at_flex_and_billed_at_its_prices(emu):  # noqa: F811
    async def go():
        rig = Rig(emu)
        try:
            r = flex_req()
            await rig.run("flex", [Job(0, r, "fp")])
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "flex", res.error
            assert _tiers(rig) == ["flex"]
            (item,) = emu.bill().items
            assert item.mode == "flex" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            assert res.cost_usd == pytest.approx(priced(res, r, "flex"), abs=1e-12)
            assert (await rig.d.stats())["flex_refused"] == 0
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_refused_flex_call_goes_standard_once_under_its_own_key_no_try_spent(emu):  # noqa: F811
    """A 429 "Resource Unavailable" billed nothing: the request is sent again at once at the standard tier, under
    an Idempotency-Key of its own, its attempts untouched, no breaker failure and no 429 in the metrics; its
    result says sync, billed once at the standard price, the bill and the engine agreeing."""
    emu.faults.refuse_flex(1)

    async def go():
        rig = Rig(emu)
        try:
            r = flex_req()
            res = await flex_result(rig, r)
            (back,) = rig.grouper.readmitted()
            assert back.claim == "c0" and back.attempts == 0  # unbilled: released as the standard price is reserved
            assert res.status == "ok" and res.mode == "sync", res.error
            assert _tiers(rig) == ["flex", None] and [j.attempt for j, _, _ in rig.calls] == [0, 0]
            first, second = (j for j, _, _ in rig.calls)
            assert first.key == second.key and first.body != second.body  # one record, two bodies: two keys
            keys = [i.idempotency_key for i in emu.bill().items]
            assert len(keys) == 1 and keys[0] is not None
            assert rig.calls[0][2].refused and not rig.calls[0][2].rate_limited
            (item,) = emu.bill().items
            assert item.mode == "sync" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            stats = await rig.d.stats()
            assert stats["flex_refused"] == 1 and stats["possibly_billed"] == 0
            # On the metrics page too, per provider (it was in the report only), and not as a rate limit's 429
            await rig.until(lambda: _flex_metric(rig, "refused") == 1, "the refusal on the metrics page")
            assert _flex_metric(rig, "timed_out") is None
            assert rig.hub.metrics.registry.get_sample_value("smartbatch_http_429_responses_total",
                                                             {"provider": "openai"}) is None
            assert not rig.d._counts.http_429 and not rig.d._counts.retries
            assert not rig.d.sim.breaker.opened and not rig.d.sim.breaker._fails.get(r.model)
            await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
            assert sum(rig.budget.book.spend.values()) == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_flex_call_that_times_out_is_possibly_billed_and_sent_standard(emu):  # noqa: F811
    """No answer within the flex call's timeout (the room its deadline leaves a standard call after it): it may
    have run, so its bound at flex prices stays on the budget (``possibly_billed``, even where the provider
    honours keys: the standard call has a key of its own), and the request is answered at the standard tier."""
    emu.faults.script("openai", "chat.completions", [{"timeout_s": HOLD_S}])  # held: the client gives up

    async def go():
        rig = Rig(emu)
        r = timing_out(rig)
        try:
            res = await flex_result(rig, r)
            (back,) = rig.grouper.readmitted()
            # Maybe billed: its claim settled at its flex bound, and the standard call reserves on its own
            assert back.claim is None
            assert res.status == "ok" and res.mode == "sync", res.error
            assert _tiers(rig) == ["flex", None] and rig.calls[0][2].maybe_billed
            stats = await rig.d.stats()
            bound = flex_bound(r, rig)
            assert stats["flex_timed_out"] == 1 and stats["possibly_billed"] == 1
            await rig.until(lambda: _flex_metric(rig, "timed_out") == 1, "the timeout on the metrics page")
            assert _flex_metric(rig, "refused") is None
            assert stats["possibly_billed_usd"] == pytest.approx(bound, abs=1e-6)
            assert res.possibly_billed_usd == pytest.approx(bound, abs=1e-9)  # said beside its cost (bill84)
            await settled_at(rig, res.cost_usd + bound)
        finally:
            await rig.close()
    asyncio.run(go())


def test_an_answered_request_whose_flex_call_timed_out_says_that_call_may_be_billed_beside_its_cost(emu):  # noqa: F811
    """No budget (a batch file's run): the flex call given up at its timeout ran at the emulator and was billed
    there, and the standard call answered. The result says so beside its cost (``possibly_billed_usd``: the flex
    call's bound), as the ledger's stats did; the bill lies between the two. Before, the answered result said its
    standard cost alone, and the batch file's report was short of the bill by every such call (a clean-clone
    rehearsal under load: $0.000288, seven flex calls of gpt-5-mini; bill84)."""
    emu.faults.script("openai", "chat.completions", [{"trickle_s": 0.3}])  # run and billed, its answer too slow

    async def go():
        rig = Rig(emu)
        r = timing_out(rig)
        try:
            await rig.run("flex", [Job(0, r, "fp")])  # no claim: sent standard by this dispatcher at once
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "sync", res.error
            assert _tiers(rig) == ["flex", None] and rig.calls[0][2].maybe_billed
            assert res.possibly_billed_usd == pytest.approx(flex_bound(r, rig), abs=1e-9), res
        finally:
            await rig.close()
        bill = emu.bill()
        assert [i.mode for i in bill.items] == ["flex", "sync"]  # both calls on the bill
        assert res.cost_usd < bill.total_usd <= res.cost_usd + res.possibly_billed_usd
    asyncio.run(go())


def test_a_flex_call_answered_a_byte_at_a_time_is_given_up_at_its_bound_and_sent_standard_at_once(emu):  # noqa: F811
    """The flex call runs (billed) and its answer comes a byte every 0.3 s, inside its 0.5 s timeout between reads:
    cut at its whole bound (``HttpBase._call_bound``), it is a flex call that got no answer, as one that timed out:
    its bound at flex prices stays, and it goes standard at once, no try spent. Before (a review of moneyhunt), the
    cut was a failed try, waited out and made again as flex until no room was left, then sent standard: a try of
    the request's few spent, the standard call later than its deadline's room allows, ``flex_timed_out`` 0."""
    emu.faults.script("openai", "chat.completions", [{"trickle_s": 0.3}])

    async def go():
        rig = Rig(emu)
        r = timing_out(rig)
        try:
            res = await flex_result(rig, r)
            (back,) = rig.grouper.readmitted()
            assert back.attempts == 0 and back.claim is None
            assert res.status == "ok" and res.mode == "sync", res.error
            assert _tiers(rig) == ["flex", None] and rig.calls[0][2].maybe_billed
            stats = await rig.d.stats()
            assert stats["flex_timed_out"] == 1 and stats["possibly_billed"] == 1
            assert stats["possibly_billed_usd"] == pytest.approx(flex_bound(r, rig), abs=1e-6)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_flex_call_that_times_out_at_a_server_not_yet_seen_serving_flex_keeps_its_standard_bound(emu):  # noqa: F811
    """At a server named ``flex_tier: true`` not yet seen serving the tier (``flex_served`` unset), a flex call
    given up at its timeout may have been served, and billed, standard (the server may ignore the field): its bound
    stays at the standard prices, not the flex ones. Before, it kept the flex bound, half what the server may have
    billed, and every such probe that timed out (the server never answering one, it never became known) passed a
    hard budget by that half again."""
    emu.faults.script("openai", "chat.completions", [{"timeout_s": HOLD_S}])  # held: the client gives up

    async def go():
        rig = Rig(emu)
        rig.d.provider.flex_served = False  # as at another address named flex_tier: true
        r = timing_out(rig)
        try:
            res = await flex_result(rig, r)
            assert res.status == "ok" and res.mode == "sync", res.error
            assert _tiers(rig) == ["flex", None] and rig.calls[0][2].maybe_billed
            bound = reserve_bound(r, rig.catalog, "sync", None)  # the standard call's, not its flex one
            stats = await rig.d.stats()
            assert stats["flex_timed_out"] == 1 and stats["possibly_billed"] == 1
            assert stats["possibly_billed_usd"] == pytest.approx(bound, abs=1e-6)
            await settled_at(rig, res.cost_usd + bound)
        finally:
            await rig.close()
    asyncio.run(go())


def no_flex_tier(rig: Rig) -> None:
    """The rig's OpenAI endpoint set ``flex_tier: false``: a wire-format-only server that does not take the tier."""
    ep = rig.settings.providers.endpoints["openai"].model_copy(update={"flex_tier": False})
    rig.d.provider.endpoint = ep
    rig.d.provider.takes_flex = rig.d.provider._flex_to()


def test_a_server_that_does_not_take_the_tier_gets_flex_decisions_standard(emu):  # noqa: F811
    """A wire-format-only server (vLLM, Groq) may not know ``service_tier: "flex"``: sent no tier, billed
    standard, its result saying sync."""
    async def go():
        rig = Rig(emu)
        no_flex_tier(rig)
        try:
            r = flex_req()
            await rig.run("flex", [Job(0, r, "fp")])
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "sync" and _tiers(rig) == [None]
            assert [i.mode for i in emu.bill().items] == ["sync"]
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_reserved_flex_decision_a_server_cannot_take_goes_back_for_the_standard_price_unsent(emu):  # noqa: F811
    """Its claim holds the flex price: the standard call it would get (the server does not take the tier) waits
    for its grouper to reserve the standard price; nothing is called on the flex claim, which goes back with
    the job to be released in that reservation."""
    async def go():
        rig = Rig(emu)
        no_flex_tier(rig)
        try:
            r = flex_req()
            res = await flex_result(rig, r)
            (back,) = rig.grouper.readmitted()
            assert back.claim == "c0" and back.standard is not None
            assert res.status == "ok" and res.mode == "sync" and _tiers(rig) == [None]
            assert [i.mode for i in emu.bill().items] == ["sync"] and (await rig.d.stats())["flex_refused"] == 0
            await settled_at(rig, emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_journaled_flex_body_keeps_its_tier_and_a_refusal_replaces_it(emu):  # noqa: F811
    """The sync body record journaled before the call keeps the tier (a restarted dispatcher makes the same call
    at the same tier under the same key); a refusal drops it, and the standard call journals its own."""
    emu.faults.refuse_flex(1)

    async def go():
        rig = Rig(emu)
        puts: list[tuple[str, dict, str]] = []
        put = rig.d._sync_journal.put

        async def spy(key: str, rec: tuple) -> None:
            puts.append((key, rec[3], rec[0].mode))
            return await put(key, rec)
        rig.d._sync_journal.put = spy
        try:
            r = flex_req()
            await rig.run("flex", [Job(0, r, "fp")])
            await rig.until(lambda: rig.results.get(r.id), "the result")
            assert [(b.get("service_tier"), mode) for _, b, mode in puts] == [("flex", "flex"), (None, "sync")]
            assert puts[0][0] == puts[1][0]  # one record key; the bodies name two Idempotency-Keys
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_dry_run_table_counts_the_requests_planned_at_flex(tmp_path):
    """`run --dry-run` shows each provider's requests by mode: smart's flex ones had no column, so the row's
    modes did not add up to its requests."""
    from typer.testing import CliRunner

    from engine.app.cli import app

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"id": f"r{i}", "arrival_s": float(i), "model": "gpt-5-mini",
                                         "prompt": f"say {i}", "deadline_s": 7200}) + "\n" for i in range(3)))
    r = CliRunner().invoke(app, ["run", str(trace), "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    head = next(line for line in r.output.splitlines() if "provider" in line and "requests" in line)
    row = next(line for line in r.output.splitlines() if line.lstrip("│ ").startswith("openai"))
    cols = [c.strip() for c in head.strip("│┃ ").replace("┃", "│").split("│")]
    vals = [c.strip() for c in row.strip("│ ").split("│")]
    got = dict(zip(cols, vals))
    assert got["requests"] == "3" and got["flex"] == "3", r.output


def test_a_dispatcher_restarted_during_a_flex_call_makes_it_again_at_flex_under_its_key(emu):  # noqa: F811
    """The journaled record keeps the tier: the restarted dispatcher sends the same flex body, so the same
    Idempotency-Key, and the answer is billed once at flex prices."""
    from actors import Dispatcher
    from engine.core.provider_api import idempotency_key

    async def go():
        rig = Rig(emu)
        r = flex_req()
        sending, first = asyncio.Event(), []

        async def under_way(job: CallJob):  # the call leaves (its body journaled first) and the process dies
            first.append(idempotency_key(job.key, job.body))
            sending.set()
            await asyncio.Event().wait()
        rig.d.provider.call = under_way
        try:
            await rig.run("flex", [Job(0, r, "fp")])
            await asyncio.wait_for(sending.wait(), 10.0)
            ((b, _, _, body),) = (await rig.d.journal.items(rig.d._sync_journal.space)).values()
            assert b.mode == "flex" and body["service_tier"] == "flex"
            for t in list(rig.d._tasks):
                t.cancel()
            d2 = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=rig.d._key)
            sent, inner = [], d2.provider.call

            async def spy(job: CallJob):
                sent.append(idempotency_key(job.key, job.body))
                return await inner(job)
            d2.provider.call = spy
            await d2.recover()
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "flex" and sent == first
            (item,) = emu.bill().items
            assert item.mode == "flex" and item.idempotency_key == first[0]
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_engine_plans_without_the_tier_where_the_server_may_not_take_it(emu, monkeypatch):  # noqa: F811
    """Sent standard at such a server, a flex decision would cost twice what smart planned: the catalog the engine
    plans with has no flex tier there, so smart batches that text as before. OpenAI's own API and the emulator
    (``point_at_emulator``) keep it."""
    from engine.app.live import point_at_emulator
    from engine.app.provider_setup import http_setup
    from engine.core.features import compat_key
    from engine.core.settings import ProviderEndpoint, ProvidersSettings
    from policies import load_policy

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    emulated = point_at_emulator(Settings(), emu, providers=("openai",))
    vllm = Settings(providers=ProvidersSettings(mode="http", endpoints={"openai": ProviderEndpoint(
        api="openai", base_url="http://127.0.0.1:8000/v1", api_key_env="X")}))
    own = Settings(providers=ProvidersSettings(mode="http", endpoints={"openai": ProviderEndpoint(
        api="openai", api_key_env="X")}))
    flex = {name: http_setup(CAT, s, need_keys=False)[0].providers["openai"].flex is not None
            for name, s in (("emulator", emulated), ("vllm", vllm), ("openai", own))}
    assert flex == {"emulator": True, "vllm": False, "openai": True}
    r = flex_req(deadline_s=600.0)  # due within a batch's median turnaround: flex at arrival where the tier is
    keys = {name: load_policy("smart", http_setup(CAT, s, need_keys=False)[0]).group_key(r, compat_key(r), 0.0)
            for name, s in (("emulator", emulated), ("vllm", vllm))}
    assert keys["emulator"][0] == "flex" and keys["vllm"][0] != "flex"


def test_a_request_whose_body_names_its_tier_goes_at_that_tier_unwarned(emu, caplog):  # noqa: F811
    """A body that asks ``service_tier: "default"`` is sent so, even on a flex decision: billed standard, its result
    saying sync, and no warning that a flex call was served at another tier (none was asked)."""
    async def go():
        rig = Rig(emu)
        try:
            r = flex_req(body={"messages": [{"role": "user", "content": "hi"}], "service_tier": "default"})
            await rig.run("flex", [Job(0, r, "fp")])
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "sync" and _tiers(rig) == ["default"]
        finally:
            await rig.close()
    with caplog.at_level("WARNING", logger="smartbatch.providers"):
        asyncio.run(go())
    assert not [m for m in caplog.messages if "flex call was served" in m]


def test_a_flex_call_served_at_another_tier_is_billed_at_that_tiers_prices_said_once(emu, monkeypatch, caplog):  # noqa: F811
    """A server that ignores the field answers ``service_tier: "default"``: billed standard, so counted at the
    standard prices (at flex prices the ledger fell short of the bill by half), its result saying sync; logged
    once, not per call."""
    import engine.emulator._openai as emu_openai

    monkeypatch.setattr(emu_openai, "_tier", lambda ctx, body: "sync")  # the tier asked, ignored

    async def go():
        rig = Rig(emu)
        try:
            reqs = [flex_req(f"other-{i}") for i in range(2)]
            await rig.run("flex", [Job(i, r, "fp") for i, r in enumerate(reqs)])
            got = [await rig.until(lambda r=r: rig.results.get(r.id), "the result") for r in reqs]
            assert _tiers(rig) == ["flex", "flex"] and [res.mode for res in got] == ["sync", "sync"]
            assert sum(res.cost_usd for res in got) == pytest.approx(emu.bill().total_usd, abs=1e-12)
            assert [i.mode for i in emu.bill().items] == ["sync", "sync"]
        finally:
            await rig.close()
    with caplog.at_level("WARNING", logger="smartbatch.providers"):
        asyncio.run(go())
    assert len([m for m in caplog.messages if "flex call was served at service tier 'default'" in m]) == 1


def test_a_flex_call_the_gate_starts_standard_is_made_and_billed_standard_as_the_simulator_does(emu):  # noqa: F811
    """Behind a gate with one call at a time, the first of two flex dispatches starts while the other waits: the
    runtime starts it standard (a slow call would hold the slot from the queue; ``SimProvider.pump``), and the
    dispatcher makes and bills it so. Before, it read the tier from its dispatch and made a flex call, where the
    simulator's plan had a standard one; the second, alone at the gate, goes flex."""
    from engine.core.catalog import RateLimits
    from engine.runtime.ratelimit import RateGate

    async def go():
        rig = Rig(emu)
        try:
            rig.d.sim.gates[None] = RateGate(RateLimits(rpm=10_000, tpm=4_000_000, max_concurrency=1))
            first, second = flex_req("g0"), flex_req("g1")
            await rig.run("flex", [Job(0, first, "fp0"), Job(1, second, "fp1")])
            await rig.until(lambda: len(rig.results) == 2, "both results")
            assert _tiers(rig) == [None, "flex"]
            assert [rig.results[r.id].mode for r in (first, second)] == ["sync", "flex"]
            assert sum(res.cost_usd for res in rig.results.values()) == pytest.approx(
                sum(item.cost_usd for item in emu.bill().items), abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_reserved_flex_call_the_gate_would_start_standard_goes_back_unsent_or_ends_if_withdrawn(emu):  # noqa: F811
    """As above, the three claimed (at the flex price): the first two, which the gate would start standard while
    others wait, are not called on their flex claims: one goes back to its grouper for the standard price, its
    claim with it; the other, withdrawn meanwhile, ends here unsent (before, a withdrawn one was dropped unended).
    The last, alone at the gate, goes flex."""
    from engine.core.catalog import RateLimits
    from engine.runtime.ratelimit import RateGate

    async def go():
        rig = Rig(emu)
        try:
            rig.d.sim.gates[None] = RateGate(RateLimits(rpm=10_000, tpm=4_000_000, max_concurrency=1))
            reqs = [flex_req(f"g{i}") for i in range(3)]
            jobs = [Job(i, r, f"fp{i}", claim=f"c{i}") for i, r in enumerate(reqs)]
            await rig.reserve(jobs)
            await rig.d.withdraw([reqs[1].uid])
            await rig.run("flex", jobs)
            await rig.until(lambda: len(rig.results) == 2 and rig.grouper.readmitted(), "two results and one back")
            (back,) = rig.grouper.readmitted()
            assert back.req == reqs[0] and back.claim == "c0" and back.standard is not None
            assert rig.results[reqs[1].id].status != "ok" and rig.results[reqs[2].id].mode == "flex"
            assert _tiers(rig) == ["flex"] and rig.d.in_flight == 0
            await rig.until(lambda: set(rig.budget.book.claims) == {"c0"}, "the others settled")
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_grouper_reserves_the_standard_price_of_a_flex_call_gone_standard_or_holds_it():
    """A flex job back from its dispatcher (``Job.standard``) is sent sync as decided, no new decision: its flex
    claim is released in the call that reserves the standard price. A budget that cannot hold that price now
    holds the job back as held work, and nothing goes to the dispatcher unreserved."""
    from actors import BudgetController, Grouper, ResultHub
    from engine.core.budgets import BudgetSettings, BudgetSpec
    from engine.core.clock import ManualClock
    from policies import load_policy
    from tests.unit.helpers import Recorder

    async def go(other_in_bounds: float) -> tuple[Recorder, Grouper, BudgetController, float]:
        clock = ManualClock(0.0)
        r = flex_req(tenant="acme")
        sync = reserve_bound(r, CAT, "sync", None)
        spec = BudgetSpec(tenant="acme", max_budget=1.2 * sync)
        ctl = BudgetController(BudgetSettings(specs=[spec]), None, clock)
        disp = Recorder()
        g = Grouper(load_policy("smart", CAT), CAT, clock, {"openai": disp}, ctl, ResultHub(), budget_specs=(spec,))
        flex = Claim("c0", r.tenant, r.provider, r.model, r.priority, reserve_bound(r, CAT, "flex", None))
        other = Claim("other", r.tenant, r.provider, r.model, r.priority, other_in_bounds * sync)
        assert all(v.ok for v in await ctl.reserve_many([flex, other] if other_in_bounds else [flex]))
        await g.add([Job(0, r, "fp", claim="c0", standard=(True, "process_individually", "flex, held work"))])
        while g._tasks:
            await asyncio.gather(*list(g._tasks))
        await asyncio.sleep(0)
        return disp, g, ctl, sync

    disp, g, ctl, sync = asyncio.run(go(0.0))
    (_, ([batch], *_)), = disp.calls
    (job,) = batch.jobs
    assert (batch.mode, batch.cache_write, batch.reason) == ("sync", True, "flex, held work")
    assert job.standard is None and job.claim != "c0"
    assert list(ctl.book.claims) == [job.claim] and ctl.book.claims[job.claim][1][0][1] == pytest.approx(sync)
    # Another claim open, no room for the standard price once the flex claim is released: the job waits for
    # that claim to settle (held work), sent nowhere meanwhile
    disp, g, ctl, sync = asyncio.run(go(0.5))
    assert not disp.calls and len(g.waits) == 1 and list(ctl.book.claims) == ["other"]


def test_a_reserved_flex_decision_sent_standard_by_its_body_or_its_server_reserves_the_standard_price_first(
        emu, monkeypatch):  # noqa: F811
    """Its claim holds the flex price: a body naming its own tier ("default") is sent standard, billed standard,
    and so is every flex call once the server answered one at another tier (it ignores the field): such a job
    goes back for the standard price before any call (before, called on its flex claim: billed twice what it held)."""
    import engine.emulator._openai as emu_openai

    async def go():
        rig = Rig(emu)
        try:
            named = flex_req("named", body={"messages": [{"role": "user", "content": "hi"}], "service_tier": "default"})
            res = await flex_result(rig, named)
            assert res.status == "ok" and res.mode == "sync" and _tiers(rig) == ["default"]
            (back,) = rig.grouper.readmitted()
            assert back.claim == "c0"
            await settled_at(rig, emu.bill().total_usd)
            # A server that ignores the tier: an unreserved flex call learns it, billed standard
            monkeypatch.setattr(emu_openai, "_tier", lambda ctx, body: "sync")
            first = flex_req("first")
            await rig.run("flex", [Job(1, first, "fp")], bid="b3")
            await rig.until(lambda: rig.results.get(first.id), "the first result")
            assert rig.d.provider.flex_unserved and _tiers(rig)[-1] == "flex"
            calls = len(rig.calls)
            second = flex_req("second")
            job = Job(2, second, "fp", claim="c2")
            await rig.reserve([job])
            await rig.run("flex", [job], bid="b4")
            (back,) = await rig.until(lambda: [j for j in rig.grouper.readmitted() if j.req.id == second.id], "back")
            assert back.claim == "c2" and back.standard is not None and len(rig.calls) == calls
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_reserved_flex_call_retried_once_the_server_showed_it_ignores_the_tier_goes_back_for_the_standard_price(
        emu):  # noqa: F811
    """Its flex call failed with a 500 (a try, retried) and, before the retry, the server answered another flex
    call at another tier (``flex_unserved``): the retry is no flex call, and is not made on its flex claim either,
    but goes back for the standard price, as a new dispatch does. Before, the retry was queued standard on its
    flex claim (``_retry_later``) and billed up to twice what the claim held."""
    emu.faults.script("openai", "chat.completions", [{"status": 500}])

    async def go():
        rig = Rig(emu)
        try:
            spy = rig.d.provider.call

            async def meanwhile(job):
                out = await spy(job)
                rig.d.provider.flex_unserved = True  # another flex call, answered at another tier, came back
                return out

            rig.d.provider.call = meanwhile
            r = flex_req("retried")
            job = Job(0, r, "fp", claim="c0")
            await rig.reserve([job])
            await rig.run("flex", [job])
            got = await rig.until(lambda: rig.results.get(r.id) or rig.grouper.readmitted(), "the result or back")
            assert isinstance(got, list), f"made on its flex claim: {got}"
            (back,) = got
            assert (back.claim, back.attempts, back.standard) == ("c0", 1, (False, "test", "test"))
            assert _tiers(rig) == ["flex"] and rig.d.in_flight == 0
        finally:
            await rig.close()
    asyncio.run(go())


def test_at_a_server_not_yet_seen_serving_flex_one_reserved_flex_call_goes_at_a_time(emu, monkeypatch):  # noqa: F811
    """A server named ``flex_tier: true`` (neither OpenAI's address nor the emulator's: ``flex_served`` unset) may
    ignore the field and bill every flex call under way standard, each up to twice its flex claim. Until it answers
    one at flex, one reserved flex call goes at a time; another goes back for the standard price, uncalled. Before,
    both were made on their flex claims and billed standard. Once one is served at flex, they go together."""
    import engine.emulator._openai as emu_openai

    async def two_at_once(rig: Rig, tag: str) -> list[Job]:
        """Two reserved flex dispatches, the calls held until both have been made or sent back."""
        jobs = [Job(i, flex_req(f"{tag}-{i}"), "fp", claim=f"{tag}{i}") for i in range(2)]
        held, spy = asyncio.Event(), rig.d.provider.call
        made: list[str] = []

        async def gated(job):
            made.append(job.req.id)
            await held.wait()
            return await spy(job)
        rig.d.provider.call = gated
        await rig.reserve(jobs)
        await rig.run("flex", jobs, bid=tag)

        def back() -> list[Job]:
            return [j for j in rig.grouper.readmitted() if j.req.id.startswith(tag)]
        await rig.until(lambda: len(made) + len(back()) == 2, "both made, or one made and one back")
        held.set()
        await rig.until(lambda: all(rig.results.get(r) for r in made), "the made calls answered")
        rig.d.provider.call = spy
        return back()

    async def go(ignored: bool):
        if ignored:
            monkeypatch.setattr(emu_openai, "_tier", lambda ctx, body: "sync")  # the tier asked, ignored
        rig = Rig(emu)
        try:
            rig.d.provider.flex_served = False  # as at another address named flex_tier: true
            tag = "ignored" if ignored else "served"  # ids of their own: the emulator replays a key it answered
            (back,) = await two_at_once(rig, tag)
            assert back.claim == f"{tag}1" and back.standard is not None and _tiers(rig) == ["flex"]
            assert rig.d.provider.flex_served is not ignored
            if not ignored:  # served at flex once: both of the next go flex
                assert await two_at_once(rig, "then") == [] and _tiers(rig) == ["flex"] * 3
        finally:
            await rig.close()
    asyncio.run(go(False))
    asyncio.run(go(True))
