"""A fault hunt on the flex tier (OpenAI's ``service_tier: "flex"``) across a dispatcher restart: a flex call's
timeout (maybe billed) before the restart, and a refused flex call whose request left before its standard call.
Dispatchers run as plain asyncio classes at the emulator (no Ray); waits are bounded polls."""

from __future__ import annotations

import asyncio

import pytest

from actors._types import Job
from engine.core.provider_api import CallJob
from tests.unit.test_flex_live import (
    HOLD_S,
    _tiers,
    flex_bound,
    flex_req,
    flex_result,
    settled_at,
    standard_again,
    timing_out,
)
from tests.unit.test_http_providers import Rig, emu  # noqa: F401  (emu: the fixture)


def _restarted(rig: Rig):
    """A new dispatcher on the same journal, hub and budget, the old one's calls cut (its process died)."""
    from actors import Dispatcher

    for t in list(rig.d._tasks):
        t.cancel()
    return Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None, rig.budget,
                      key=rig.d._key)


def test_a_timed_out_flex_calls_bound_outlives_a_restart_during_its_standard_call(emu):  # noqa: F811
    """The flex call timed out (it may have run and been billed), its standard call was under way when the
    dispatcher died: the restarted one makes that call again under its key, and the request still settles at
    its cost plus the flex call's bound, counted as timed out and possibly billed (the restart forgot it: the
    ledger fell short of what the provider may have billed, and the report lost the timeout). Under a budget the
    flex claim is settled at that bound before the standard call, which reserves on its own (stop 72)."""
    emu.faults.script("openai", "chat.completions", [{"timeout_s": HOLD_S}])  # held: the client gives up

    async def go():
        rig = Rig(emu)
        r = timing_out(rig)
        job = Job(0, r, "fp", claim="c0")
        inner, standard = rig.d.provider.call, asyncio.Event()

        async def hang_standard(cj: CallJob):
            if cj.body.get("service_tier") != "flex":  # the standard call leaves, and the process dies
                standard.set()
                await asyncio.Event().wait()
            return await inner(cj)
        rig.d.provider.call = hang_standard
        try:
            await rig.reserve([job])
            await rig.run("flex", [job])
            await standard_again(rig, r)  # its flex claim settled at its bound, the standard price reserved
            await asyncio.wait_for(standard.wait(), 10.0)
            await rig.until(lambda: rig.d._tally_sent == rig.d._tally(), "the tally journaled")
            d2 = _restarted(rig)
            await d2.recover()
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "sync", res.error
            bound = flex_bound(r, rig)
            stats = await d2.stats()
            assert stats["flex_timed_out"] == 1 and stats["possibly_billed"] == 1
            assert stats["possibly_billed_usd"] == pytest.approx(bound, abs=1e-6)
            await settled_at(rig, res.cost_usd + bound)
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_refused_flex_call_rerouted_before_its_standard_call_is_not_made_again_after_a_restart(emu):  # noqa: F811
    """The flex call was refused and, before its standard call started, the model's circuit opened: the request
    went to its fallback. Its journaled flex body went with it (it stayed: a restart made the flex call again
    while the fallback answered the request, paid twice)."""
    emu.faults.refuse_flex(1)

    async def go():
        rig = Rig(emu)
        r = flex_req()
        rig.d.sim.fallbacks[r.model] = "openai/gpt-5"
        inner = rig.d.provider.call

        async def circuit_opens(cj: CallJob):
            rig.d.sim.breaker._open_until[r.model] = rig.clock.now() + 86_400.0  # while the flex call is out
            return await inner(cj)
        rig.d.provider.call = circuit_opens
        try:
            await rig.run("flex", [Job(0, r, "fp")])
            await rig.until(lambda: rig.grouper.readmitted(), "the reroute")
            await rig.until(lambda: rig.d._outbox_empty(), "the outbox flushed")
            assert not await rig.d.journal.items(rig.d._sync_journal.space)
            d2 = _restarted(rig)
            sent = []

            async def spy(cj: CallJob):
                sent.append(cj)
                return await asyncio.Event().wait()
            d2.provider.call = spy
            await d2.recover()
            assert not sent and d2.in_flight == 0
            assert len(emu.bill().items) == 0
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_flex_call_lost_then_refused_keeps_its_bound_beside_the_standard_answer(emu):  # noqa: F811
    """The flex call got no answer (a 504: it may have run and been billed), its retry under the same key was
    refused, and the standard call under a key of its own was answered: that answer says nothing of the lost flex
    call, so its bound at flex prices stays on the budget, possibly billed (the answer was taken as the lost
    call's, at a server that honours keys, and the bound was dropped)."""
    emu.faults.script("openai", "chat.completions", [{"status": 504}, {"status": 429}])

    async def go():
        rig = Rig(emu)
        assert rig.d.provider.honours_keys
        r = flex_req()
        try:
            res = await flex_result(rig, r)
            assert res.status == "ok" and res.mode == "sync", res.error
            assert _tiers(rig) == ["flex", "flex", None] and rig.calls[0][2].maybe_billed
            bound = flex_bound(r, rig)
            stats = await rig.d.stats()
            assert stats["flex_refused"] == 1 and stats["possibly_billed"] == 1
            assert stats["possibly_billed_usd"] == pytest.approx(bound, abs=1e-6)
            await settled_at(rig, res.cost_usd + bound)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_request_withdrawn_while_its_flex_call_times_out_says_it_may_have_been_billed(emu):  # noqa: F811
    """Withdrawn (``Engine.cancel_requests``) while its flex call was out, which then timed out: no standard call
    is made, the request ends cancelled, settled at the flex call's bound, and its error says an earlier try got
    no answer (it said "billed nothing" beside a settlement at that bound)."""
    emu.faults.script("openai", "chat.completions", [{"timeout_s": HOLD_S}])

    async def go():
        rig = Rig(emu)
        r = timing_out(rig)
        inner = rig.d.provider.call

        async def withdrawn_meanwhile(cj: CallJob):
            await rig.d.withdraw([r.uid])
            return await inner(cj)
        rig.d.provider.call = withdrawn_meanwhile
        try:
            res = await flex_result(rig, r)
            assert res.status != "ok" and _tiers(rig) == ["flex"]
            assert "earlier try got no answer" in res.error and "billed nothing" not in res.error, res.error
            bound = flex_bound(r, rig)
            await settled_at(rig, bound)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_flex_call_billed_but_unread_then_refused_leaves_the_ledger_at_or_over_the_bill(emu):  # noqa: F811
    """The flex call ran and was billed, its answer cut short; its retry under the flex key was refused; the
    standard call was answered and billed. The provider billed both: the ledger holds at least that (it held the
    standard call alone, $3.9e-05 of a $5.85e-05 bill)."""
    emu.faults.script("openai", "chat.completions", [{"cut_body": True}, {"status": 429}])

    async def go():
        rig = Rig(emu)
        r = flex_req()
        try:
            res = await flex_result(rig, r)
            assert res.status == "ok" and _tiers(rig) == ["flex", "flex", None], res.error
            assert [i.mode for i in emu.bill().items] == ["flex", "sync"]
            await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
            assert sum(rig.budget.book.spend.values()) >= emu.bill().total_usd
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_journaled_flex_call_resumed_where_the_tier_is_gone_goes_standard(emu):  # noqa: F811
    """A dispatcher restarted with a catalog that has no flex tier for the provider any more (its endpoint set
    ``flex_tier: false`` meanwhile: ``http_setup`` drops the tier) finds a journaled flex call: it is made
    standard and answered (it failed as an engine error: the flex call's timeout asked for a tier the catalog no
    longer had)."""
    async def go():
        rig = Rig(emu)
        r = flex_req()
        sending = asyncio.Event()

        async def under_way(cj: CallJob):  # the flex call leaves (its body journaled first) and the process dies
            sending.set()
            await asyncio.Event().wait()
        rig.d.provider.call = under_way
        try:
            await rig.run("flex", [Job(0, r, "fp")])
            await asyncio.wait_for(sending.wait(), 10.0)
            openai = rig.catalog.providers["openai"].model_copy(update={"flex": None})
            rig.catalog = rig.catalog.model_copy(update={"providers": {**rig.catalog.providers, "openai": openai}})
            d2 = _restarted(rig)
            await d2.recover()
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "sync", res.error
            assert [i.mode for i in emu.bill().items] == ["sync"]
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_flex_call_that_timed_out_then_a_refused_standard_call_marks_the_result_possibly_billed(emu):  # noqa: F811
    """The flex call got no answer (it may have run, under a key of its own; its bound settled with the flex
    claim) and the standard call was refused (a 400, billed nothing): the request fails, and its result still says
    the flex call may be billed (``Result.possibly_billed_usd``: its batch file line's
    ``smartbatch_possibly_billed_usd``), so ``batch --resume`` keeps its line back. Before, a plain refusal: the
    line was sent again, and the flex call maybe paid twice (a review)."""
    from tests.unit.test_flex_live import timing_out

    emu.faults.script("openai", "chat.completions", [{"timeout_s": HOLD_S}, {"status": 400}])

    async def go():
        rig = Rig(emu)
        r = timing_out(rig)
        try:
            res = await flex_result(rig, r)
            assert res.status == "failed" and "HTTP 400" in res.error and _tiers(rig) == ["flex", None], res.error
            assert res.possibly_billed_usd == pytest.approx(flex_bound(r, rig), abs=1e-9), res
            assert "possibly_billed" in res.error
        finally:
            await rig.close()
    asyncio.run(go())
