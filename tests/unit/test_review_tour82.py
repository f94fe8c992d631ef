"""A review of stop 82's tour (a helper's, ``rvtour82``): what a result, a route and a page said that was false.
The dispatcher runs as a plain asyncio class against the emulator (no Ray)."""

from __future__ import annotations

import asyncio
import types

import pytest

from actors import BudgetController
from actors._types import BatchJob, Job
from engine.app._endpoint_videos import VideoRoutes
from engine.app._endpoint_wire import ApiError
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.settings import Settings
from engine.runtime.outcomes import billed_reason
from tests.unit.test_flex_live import flex_req, no_flex_tier
from tests.unit.test_http_providers import Rig, emu, priced  # noqa: F401  (emu: the fixture)

FLEX_LANE = "flex now: batch prices, no wait"  # smart's reason for a request of the flex lane (policies/smart.py)


@pytest.mark.parametrize("reason, mode, said", [
    (FLEX_LANE, "flex", FLEX_LANE),
    (FLEX_LANE, "sync", "sync now: the flex tier did not serve it, so it was called at the standard tier and "
                        "billed at its prices"),
    ("flex now: deadline too close for a batch; prefix marked for caching", "sync",
     "sync now: deadline too close for a batch; prefix marked for caching; the flex tier did not serve it"),
    ("sync now: deadline too close for a batch", "sync", "sync now: deadline too close for a batch"),
    ("batch API: 4 requests", "batch_api", "batch API: 4 requests"),
])
def test_a_results_reason_says_the_tier_it_was_billed_at(reason, mode, said):
    assert billed_reason(reason, mode).startswith(said)


@pytest.mark.parametrize("refused", [True, False])
def test_a_flex_decision_billed_standard_does_not_say_batch_prices(emu, refused):  # noqa: F811
    # The README's request (deadline_s 600, the flex lane) came back mode "sync", billed at the standard price,
    # its reason "flex now: batch prices, no wait": the tier had refused it (or the server does not take it).
    async def go():
        rig = Rig(emu)
        if refused:
            emu.faults.refuse_flex(1)
        else:
            no_flex_tier(rig)
        try:
            r = flex_req()
            await rig.d.run_many([BatchJob("b", "flex", None, False, "process_individually", FLEX_LANE,
                                           [Job(0, r, "fp")])])
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert res.status == "ok" and res.mode == "sync", res.error
            assert res.cost_usd == pytest.approx(priced(res, r, "sync"), abs=1e-12)
            assert "batch prices" not in res.reason and "flex tier did not serve it" in res.reason, res.reason
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_flex_decision_served_at_flex_keeps_its_reason(emu):  # noqa: F811
    async def go():
        rig = Rig(emu)
        try:
            r = flex_req()
            await rig.d.run_many([BatchJob("b", "flex", None, False, "process_individually", FLEX_LANE,
                                           [Job(0, r, "fp")])])
            res = await rig.until(lambda: rig.results.get(r.id), "the result")
            assert (res.status, res.mode, res.reason) == ("ok", "flex", FLEX_LANE), res.error
            assert res.cost_usd == pytest.approx(priced(res, r, "flex"), abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_veo_model_at_the_videos_route_is_a_400_where_two_providers_offer_sora():
    # The Sora models' shutdown was looked up by model name alone (``find_model``): a catalog whose two
    # OpenAI-wire providers both offer sora-2 made that lookup raise, and the 400 a 500.
    cat = default_catalog()
    two = cat.model_copy(update={"providers": {**cat.providers, "openai-eu": cat.providers["openai"]}})
    routes = VideoRoutes(types.SimpleNamespace(settings=Settings()), two, headers_of=lambda *_: {})
    with pytest.raises(ApiError) as caught:
        routes._checked(types.SimpleNamespace(headers={}), {"model": "veo-3.1-generate-001", "prompt": "A heron"})
    assert caught.value.status == 400 and "sora-2 on 2026-09-24" in str(caught.value), caught.value


def test_a_removed_budget_leaves_the_lists_at_once_and_its_windows_spend_waits_for_it_until_the_window_ends():
    # docs/budgets.md said a removed budget's windows "still report until they end": `budget list` and `status`
    # drop it at once (listed, it would read as in force). What stays is its window's spend, in the ledger (a
    # memory ledger's report lists the window among `windows`), found by the budget added again before it ends.
    day = BudgetSpec(tenant="acme", max_budget=1.0, budget_duration="1d")

    async def go():
        clock = ManualClock(0.0)
        ctl = BudgetController(BudgetSettings(specs=(day,)), None, clock)
        await ctl.reserve_many([Claim("a", "acme", "openai", "gpt-5-mini", "urgent", 0.5)])
        await ctl.settle_many([("a", 0.4)])
        await ctl.change_budgets(remove=[day.name])
        rep = await ctl.report()
        assert rep["budgets"] == [] and [(w["budget"], w["spent_usd"]) for w in rep["windows"]] == [(day.name, 0.4)]
        await ctl.change_budgets([day])  # added again within its window: that window's spend
        assert [(r["budget"], r["spent_usd"]) for r in (await ctl.report())["budgets"]] == [(day.name, 0.4)]
        await ctl.change_budgets(remove=[day.name])
        clock.advance(86_400.0)
        await ctl.change_budgets([day])  # after it ended: a new window, nothing spent in it
        assert [(r["budget"], r["spent_usd"]) for r in (await ctl.report())["budgets"]] == [(day.name, 0.0)]
    asyncio.run(go())
