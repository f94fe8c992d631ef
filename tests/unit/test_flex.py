"""OpenAI's flex tier in the simulator, the cost model and smart: batch prices at once, refusals sent standard."""

import pytest

from engine.core.catalog import default_catalog
from engine.core.cost import MODES, mode_allowed, price_alone, reserve_bound
from engine.core.errors import CatalogError
from engine.core.request import Request
from engine.sim.lower_bound import lower_bound
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()


def _cat(**flex):
    oa = CAT.providers["openai"]
    return CAT.model_copy(update={"providers": {**CAT.providers, "openai": oa.model_copy(
        update={"flex": oa.flex.model_copy(update=flex)})}})


def _reqs(n: int = 40, model: str = "gpt-5-mini", deadline_s: float = 600.0, input_tokens: int = 3000) -> list[Request]:
    return [Request.model_validate({"id": f"r{i}", "arrival_s": 10.0 * i, "model": model, "input_tokens": input_tokens,
                                    "output_tokens": 400, "deadline_s": deadline_s, "prompt": f"ask {i}"})
            for i in range(n)]


def test_the_tier_is_priced_at_batch_rates_for_its_models_only_and_reserved_at_its_own_price():
    oa = CAT.providers["openai"]
    r = _reqs(1)[0]
    assert price_alone(r, CAT, "flex").total == pytest.approx(price_alone(r, CAT, "batch_api").total)
    assert price_alone(r, CAT, "flex").total == pytest.approx(0.5 * price_alone(r, CAT, "sync").total)
    # Reserved at the flex price: a call the tier does not serve reserves the standard price again before it goes.
    assert reserve_bound(r, CAT, "flex") == pytest.approx(0.5 * reserve_bound(r, CAT, "sync"))
    assert "flex" in MODES and mode_allowed(oa, oa.models["gpt-5-mini"], "flex")
    assert not mode_allowed(oa, oa.models["gpt-4o-mini"], "flex")
    assert not mode_allowed(CAT.providers["anthropic"], CAT.providers["anthropic"].models["claude-sonnet-4-5"], "flex")
    with pytest.raises(CatalogError, match="flex.models"):
        price_alone(_reqs(1, "gpt-4o-mini")[0], CAT, "flex")


def test_smart_sends_flex_models_at_once_at_the_tier_and_others_as_before():
    cat = _cat(unavailable_rate=0.0)
    res = simulate(_reqs(), load_policy("smart", cat), catalog=cat)
    assert res.met.all()
    assert {MODES[m] for m in res.mode} == {"flex"}
    assert res.total_cost == pytest.approx(sum(price_alone(r, cat, "flex").total for r in res.requests), rel=1e-9)
    # At once: answered within a slow call of arrival, not after a batch's gather and turnaround.
    assert max(res.done_at - [r.arrival_s for r in res.requests]) < 120.0
    # Off, or a model without the tier: no flex call is made.
    for policy, reqs in ((load_policy("smart", cat, {"flex": False}), _reqs()),
                         (load_policy("smart", cat), _reqs(model="gpt-4o-mini"))):
        assert "flex" not in {MODES[m] for m in simulate(reqs, policy, catalog=cat).mode}


def test_a_deadline_too_short_for_a_slow_flex_call_then_a_standard_one_is_sent_standard():
    cat = _cat(unavailable_rate=0.0, slowdown=50.0)  # a flex call's p99 then passes 20 s
    res = simulate(_reqs(5, deadline_s=20.0), load_policy("smart", cat), catalog=cat)
    assert {MODES[m] for m in res.mode} == {"sync"} and res.met.all()


def test_a_refused_flex_call_is_billed_nothing_and_sent_once_at_the_standard_tier_with_no_attempt_spent():
    cat = _cat(unavailable_rate=0.99)
    reqs = _reqs()
    res = simulate(reqs, load_policy("smart", cat), catalog=cat)
    refused = res.extra["flex_refused"]
    assert refused >= 30  # of 40, at 99 %
    modes = [MODES[m] for m in res.mode]
    assert modes.count("sync") == refused and modes.count("flex") == len(reqs) - refused
    assert res.met.all()  # all answered, none failed
    # Each billed once: at the standard price if refused, else at flex's (no prefix here, so no cache).
    want = sum(price_alone(r, cat, m).total for r, m in zip(res.requests, modes))
    assert res.total_cost == pytest.approx(want, rel=1e-9)
    # The bound still lies below (it lets a flex call through however often it is refused).
    assert lower_bound(reqs, catalog=cat).total_usd <= res.total_cost + 1e-9


def test_flex_calls_are_slower_than_standard_ones_by_the_catalogs_slowdown():
    fast, slow = _cat(unavailable_rate=0.0, slowdown=1.0), _cat(unavailable_rate=0.0, slowdown=4.0)
    reqs = _reqs(20)
    lat = [simulate(reqs, load_policy("smart", c), catalog=c) for c in (fast, slow)]
    waited = [res.done_at - [r.arrival_s for r in res.requests] for res in lat]
    assert waited[1] == pytest.approx(4.0 * waited[0], rel=1e-6)


def test_a_flex_call_that_could_outlast_the_tiers_client_timeout_is_not_made_even_with_a_day_to_spare():
    cat = _cat(unavailable_rate=0.0, slowdown=40.0, timeout_s=120.0)  # p99 of a 400-token answer: ~20 s x 40
    now = {"flex_now_s": 1e9}  # every request that fits goes flex at arrival
    res = simulate(_reqs(3, deadline_s=86400.0), load_policy("smart", cat, now), catalog=cat)
    assert "flex" not in {MODES[m] for m in res.mode} and res.met.all()
    roomy = _cat(unavailable_rate=0.0, slowdown=40.0, timeout_s=3600.0)
    assert {MODES[m] for m in simulate(_reqs(3, deadline_s=86400.0), load_policy("smart", roomy, now),
                                       catalog=roomy).mode} == {"flex"}


@pytest.mark.parametrize("conc, base_s, n, deadline_s", [(1, 5.0, 30, 200.0), (2, 5.0, 40, 150.0), (1, 0.6, 20, 30.0)])
def test_where_calls_queue_at_the_gate_flex_does_not_cost_a_deadline_naive_meets(conc, base_s, n, deadline_s):
    """A flex call holds its slot ``slowdown`` times as long: behind a busy gate it is sent standard (a helper's
    hunt: with one slot and 5-s calls, smart met 14 of 30 deadlines where naive met 30)."""
    from engine.core.request import validation_context

    from .helpers import limited_catalog
    cat = limited_catalog("openai", conc, base_s, 0.0)
    ctx = validation_context(cat)
    reqs = [Request.model_validate({"id": f"q{i}", "arrival_s": float(i), "model": "gpt-5-mini", "prompt": f"task {i}",
                                    "input_tokens": 2_000, "output_tokens": 100, "deadline_s": deadline_s},
                                   context=ctx) for i in range(n)]
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat, seed=0)
    smart = simulate(reqs, load_policy("smart", cat), catalog=cat, seed=0)
    assert not (naive.met & ~smart.met).any()
    assert "flex" in {MODES[m] for m in smart.mode}  # still where the gate is free


def test_work_due_after_a_batchs_median_turnaround_rides_a_batch_and_a_late_one_falls_back_at_the_flex_tier():
    """By default (``flex_now_s`` None) a request due within the provider's median batch turnaround goes flex at
    arrival; one due later rides a batch first (where a conversation's turns share a prefix), hedged with room
    for a flex call, so a late batch's members are called at batch prices too."""
    cat = _cat(unavailable_rate=0.0)
    median = cat.providers["openai"].batch_api.turnaround_median_s
    soon = simulate(_reqs(5, deadline_s=median - 60.0), load_policy("smart", cat), catalog=cat)
    assert {MODES[m] for m in soon.mode} == {"flex"}
    # In a world 20x slower than the catalog says, every batch is late at its hedge: its members go flex.
    from engine.core.settings import Settings
    slow = Settings.model_validate({"sim": {"turnaround_scale": 20.0}})
    big = _reqs(5, deadline_s=2 * median, input_tokens=40_000)  # worth a batch's wait (min_batch_saving_usd)
    later = simulate(big, load_policy("smart", cat), catalog=cat, settings=slow)
    assert later.met.all() and any(b.mode == "batch_api" for b in later.batches)
    assert {MODES[m] for m in later.mode} == {"flex"}
    # Hedged for a standard call only (the tier off), the same members fall back at the standard price.
    off = simulate(big, load_policy("smart", cat, {"flex": False}), catalog=cat, settings=slow)
    assert {MODES[m] for m in off.mode} == {"sync"} and later.total_cost < off.total_cost


def _claims_of(monkeypatch) -> list[tuple[str, str, float]]:
    """Every reservation and settlement the simulator's ledger takes, in order: ("reserve", request, amount) and
    ("settle", request, actual)."""
    from engine.core.ledger import BudgetBook

    seen: list[tuple[str, str, float]] = []
    reserve, settle = BudgetBook.reserve_many, BudgetBook.settle_many

    def spy_reserve(self, claims, now):
        seen.extend(("reserve", c.rid.split("#")[0], c.amount) for c in claims)
        return reserve(self, claims, now)

    def spy_settle(self, items):
        seen.extend(("settle", cid.split("#")[0], usd) for cid, usd in items)
        return settle(self, items)
    monkeypatch.setattr(BudgetBook, "reserve_many", spy_reserve)
    monkeypatch.setattr(BudgetBook, "settle_many", spy_settle)
    return seen


def test_a_flex_call_reserves_the_flex_price_and_a_refused_one_the_standard_price_before_it_goes(monkeypatch):
    """Under a budget a flex call holds its bound at flex prices (half the standard at OpenAI); refused (billed
    nothing), its claim is released and the standard price reserved before the standard call, so the budget
    holds what that call may bill. Before, a flex call held the standard price for its whole slow call."""
    from engine.core.settings import Settings, with_budget

    cat = _cat(unavailable_rate=0.5)
    reqs = _reqs(30)
    seen = _claims_of(monkeypatch)
    res = simulate(reqs, load_policy("smart", cat), catalog=cat, settings=with_budget(Settings(), 100.0))
    assert res.extra["flex_refused"] > 0 and res.met.all()
    flex, sync = (reserve_bound(reqs[0], cat, m) for m in ("flex", "sync"))
    assert flex == pytest.approx(0.5 * sync)
    for r in reqs:
        mine = [(what, usd) for what, rid, usd in seen if rid == r.id]
        assert mine[0] == ("reserve", pytest.approx(flex))
        if len(mine) > 2:  # refused: the flex claim released unbilled before the standard price is reserved
            assert mine[1:3] == [("settle", 0.0), ("reserve", pytest.approx(sync))]
    assert sum(len([1 for w, rid, _ in seen if w == "reserve" and rid == r.id]) > 1 for r in reqs) == \
        res.extra["flex_refused"]
    assert res.extra["budget"]["overrun_usd"] == 0.0


def test_refused_flex_calls_under_a_tight_budget_wait_for_the_standard_price_never_sent_unreserved():
    """Every flex call refused, a hard budget of a few standard bounds: each standard call waits until the budget
    holds its standard price (or is rejected at its deadline); sent on the flex claim, the run spent past the
    limit."""
    from engine.core.settings import Settings, with_budget

    cat = _cat(unavailable_rate=1.0)
    reqs = _reqs(30, deadline_s=3600.0)
    limit = 2.5 * reserve_bound(reqs[0], cat, "sync")
    res = simulate(reqs, load_policy("smart", cat), catalog=cat, settings=with_budget(Settings(), limit))
    assert res.extra["flex_refused"] > 0
    assert res.extra["budget"]["overrun_usd"] == 0.0 and res.total_cost <= limit + 1e-12


@pytest.mark.parametrize("reserved", [False, True])
def test_the_gate_hands_back_flex_work_it_would_start_standard_where_its_claim_holds_the_flex_price(reserved):
    """Waited past its room for a slow call, flex work starts standard at the gate (``SimProvider.pump``). Where
    the runtime says its claim holds the flex price (``flex_reserved``), it comes back unstarted instead
    (``to_standard``), its gate slot untaken, to reserve the standard price first; else it starts standard."""
    from engine.core.draws import Draws
    from engine.core.settings import Settings
    from engine.runtime.providers import SimProvider, Work

    settings = Settings()
    sim = SimProvider(CAT.providers["openai"], CAT, settings,
                      Draws(0, settings.sim.max_attempts, 0, settings.sim.batch_slot_s), draw=False)
    if reserved:
        sim.flex_reserved = lambda w: w.item == "claimed"
    r = _reqs(1, deadline_s=5.0)[0]  # no room for a flex call and a standard one after it
    sim.enqueue(Work("flex", "claimed", [r], [0], [0]))
    (e,), _ = sim.pump(0.0)
    assert e.kind == ("to_standard" if reserved else "sync") and e.work.item == "claimed"
    assert sim.gates[None].running == (0 if reserved else 1)


@pytest.mark.parametrize(("url", "flex_tier", "planned"), [
    ("http://127.0.0.1:8765/openai/v1", None, True), ("http://localhost:8765/openai/v1/", None, True),
    ("http://127.0.0.1:8765/openai/v1", False, False), ("http://127.0.0.1:8000/v1", None, False),
    ("http://127.0.0.1:8000/v1", True, True)])
def test_a_live_run_at_the_emulators_address_plans_the_tier_without_flex_tier(monkeypatch, url, flex_tier, planned):
    """The README's run against ``smartbatch emulate`` sets no ``flex_tier``: its live engine planned no flex (the
    tier dropped from its catalog) while the simulator row of the same run did. The emulator's address (loopback,
    ``/openai/v1``, as for ``strict_fields``) now says the server takes it; a wire-format server (vLLM's ``/v1``)
    still does not unless told, and ``flex_tier`` overrides either way."""
    from engine.app.provider_setup import http_setup
    from engine.core.settings import Settings

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    ep = {"api": "openai", "api_key_env": "OPENAI_API_KEY", "base_url": url, "flex_tier": flex_tier}
    plan, _ = http_setup(CAT, Settings(providers={"mode": "http", "endpoints": {"openai": ep}}))
    assert (plan.providers["openai"].flex is not None) is planned
    assert (plan.providers["openai"].flex == CAT.providers["openai"].flex) is planned
