"""Value of time (issue 13): ``smart`` holds a request for a batch only when the batch is worth the wait.

A batch must be expected to save at least ``min_batch_saving_usd`` in all (its members now, plus those the
lane's recent arrival rate brings before it is sent), at least ``min_saving_rel`` of the list price, and more
than its members' wait is worth at ``wait_usd_per_hour``. Otherwise the requests go at once."""

from __future__ import annotations

import math

import pytest

from engine.core.catalog import default_catalog
from engine.core.cost import MODES, price_alone
from engine.core.features import compat_key
from engine.core.grouping import Group, LaneRates
from engine.core.request import Request
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()


def batching(params: dict | None = None):
    """``smart`` with the flex tier off (``flex: False``): these tests weigh the batch lane, which a request for a
    model with the tier (gpt-5-mini, gpt-5.4-mini) skips for flex when its deadline leaves room."""
    return load_policy("smart", CAT, {"flex": False, **(params or {})})


def req(i: int, deadline_s: float, arrival_s: float = 0.0, priority: str = "normal", **kw) -> Request:
    return Request.model_validate({"id": f"q{i}", "arrival_s": arrival_s, "model": "gpt-5-mini",
                                   "prompt": f"Summarise report {i}.", "deadline_s": deadline_s,
                                   "priority": priority} | kw)


@pytest.mark.parametrize("model", ["gpt-5-mini", "gpt-5.4-mini", "gpt-4o-mini", "claude-haiku-4-5"])
@pytest.mark.parametrize("deadline_s", [300.0, 600.0, 3600.0, 86400.0])
def test_a_lone_request_that_a_batch_would_barely_save_on_is_sent_at_once(deadline_s, model):
    """The README's first example: one gpt-5.4-mini request (gpt-5-mini until stop 62). Before, it waited for a
    one-request batch with an expected saving of $0.0001 and came back at 580 s of a 600 s deadline. With the
    flex tier (smart's default), a model that takes it goes there at once instead: batch prices, no wait."""
    one = req(0, deadline_s, model=model)
    res = simulate([one], batching())
    (b,) = res.batches
    assert (b.mode, b.t) == ("sync", 0.0) and res.done_at[0] < 10.0
    assert "under min_batch_saving_usd" in b.reason
    # With the threshold off, the same request waits for a batch (the old behaviour): the rule is what moved it.
    off = simulate([one], batching({"min_batch_saving_usd": 0.0}))
    assert off.batches[0].mode == "batch_api" or off.batches[0].t > 0.0
    tiered = simulate([one], load_policy("smart", CAT))
    if CAT.providers[one.provider].supports_flex(model):
        assert [(x.mode, x.t) for x in tiered.batches] == [("flex", 0.0)] and tiered.met.all()
        flex, sync = (price_alone(one, CAT, m).total for m in ("flex", "sync"))
        assert tiered.cost[0] == pytest.approx(flex) and flex < sync
    else:  # a model without the tier is judged as above
        assert [(x.mode, x.t, x.reason) for x in tiered.batches] == [(b.mode, b.t, b.reason)]


@pytest.mark.parametrize("deadline_s", [600.0, 86400.0])  # sent flex at arrival; sent at once after a batch is weighed
def test_a_request_whose_body_names_its_tier_is_planned_and_priced_at_that_tier(deadline_s):
    """A body naming ``service_tier: "default"`` (the one tier besides ``auto`` a request may name) chose its tier: the live engine sends and bills it there, so
    smart plans it there too. Before, the simulator planned it at flex and priced it at batch prices while a live
    run paid standard. A body saying ``auto`` still goes flex, as a live engine sends it."""
    body = {"messages": [{"role": "user", "content": "Summarise the report."}]}
    chose = req(0, deadline_s, body={**body, "service_tier": "default"})
    res = simulate([chose], load_policy("smart", CAT))
    assert [b.mode for b in res.batches] == ["sync"] and res.met.all()
    assert res.cost[0] == pytest.approx(price_alone(chose, CAT, "sync").total)
    auto = simulate([req(0, deadline_s, body={**body, "service_tier": "auto"})], load_policy("smart", CAT))
    assert [b.mode for b in auto.batches] == ["flex"]


def test_a_lone_request_does_not_count_itself_as_company():
    """Alone in a new lane, a request is judged on its own saving: it goes at once, not after a gather that
    nothing joins (which would only make it late at the sync price)."""
    res = simulate([req(0, 86400.0, input_tokens=2000, output_tokens=500)], batching())
    (b,) = res.batches
    assert (b.mode, b.t) == ("sync", 0.0)


def test_a_batch_worth_its_wait_still_gathers_and_saves():
    """Two thousand long-deadline requests at once: far above the threshold, they ride the batch API."""
    reqs = [req(i, 86400.0, input_tokens=2000, output_tokens=500) for i in range(2000)]
    res = simulate(reqs, batching())
    modes = [MODES[m] for m in res.mode]
    assert modes.count("batch_api") >= 1900, modes.count("sync")
    assert res.total_cost < simulate(reqs, load_policy("naive", CAT)).total_cost * 0.6


def test_a_lone_request_waits_when_the_lane_brings_company():
    """The same lone request gathers when its lane has seen steady arrivals: the projected batch (members now
    plus the lane's rate times the gather) clears the threshold."""
    threshold = {"min_batch_saving_usd": 0.05}
    # One request every 5 s for 20 minutes in the same lane (same model, same deadline bucket).
    steady = [req(i, 86400.0, arrival_s=5.0 * i, input_tokens=2000, output_tokens=500) for i in range(240)]
    res = simulate(steady, batching(threshold))
    early = [b for b in res.batches if b.t < 60.0]
    late = [b for b in res.batches if b.t >= 600.0]
    assert early and all(b.mode == "sync" for b in early)  # no history yet: nothing says company is coming
    assert any(b.mode == "batch_api" and b.size > 10 for b in late)  # with history, the lane batches


def test_a_price_of_waiting_sends_at_once_what_would_otherwise_wait():
    # Large enough that even the first, alone in its lane, is worth a batch.
    reqs = [req(i, 86400.0, priority="background", input_tokens=20000, output_tokens=500) for i in range(50)]
    cheap = simulate(reqs, batching())
    assert {MODES[m] for m in cheap.mode} == {"batch_api"}
    dear = simulate(reqs, batching({"wait_usd_per_hour": {"background": 1.0}}))
    assert {MODES[m] for m in dear.mode} == {"sync"} and "its wait is worth" in dear.batches[0].reason
    # Priced for another priority only: background work still waits.
    other = simulate(reqs, batching({"wait_usd_per_hour": {"urgent": 1.0}}))
    assert {MODES[m] for m in other.mode} == {"batch_api"}


def test_a_minimum_share_of_the_price_sends_a_long_shot_batch_at_once():
    reqs = [req(i, 1800.0, input_tokens=20000, output_tokens=2000) for i in range(100)]
    base = simulate(reqs, batching())
    assert "batch_api" in {b.mode for b in base.batches}
    strict = simulate(reqs, batching({"min_saving_rel": 0.45}))  # needs P(on time) >= 0.9
    assert {b.mode for b in strict.batches} == {"sync"} and "under min_saving_rel" in strict.batches[0].reason


def test_lane_rates_decay_with_time_and_forget_the_oldest_lane():
    r = LaneRates(tau_s=100.0, capacity=2)
    for t in range(10):
        r.see("a", float(t))
    # An arrival k seconds ago counts exp(-k / tau); the rate is the count over tau.
    assert r.rate("a", 9.0) == pytest.approx(sum(math.exp(-k / 100.0) for k in range(10)) / 100.0)
    assert r.rate("a", 109.0) == pytest.approx(r.rate("a", 9.0) * math.exp(-1.0))
    assert r.rate("never", 0.0) == 0.0
    r.see("b", 10.0)
    r.see("c", 11.0)
    assert len(r) == 2 and r.rate("a", 11.0) == 0.0  # "a" was seen least recently: forgotten


# -- the rules at their boundaries, from the catalog's numbers (a Group decided directly) ----------------------

# Sent at once, one batch to its hedge (no second batch, tests/unit/test_second_batch.py): P(on time) is the
# turnaround's CDF at the hedge.
ONE_BATCH = {"batch_gather_s": 0, "second_batch": False}


def batch_group(n: int = 20, deadline_s: float = 7200.0, priority: str = "normal"):
    """``n`` gpt-5-mini requests at t=0, sent at once (no gather): P(on time) and the hedge come from the
    catalog (see test_rules_timing.py for the hedge rule)."""
    prov = CAT.providers["openai"]
    g = Group(("batch", (), 0), prov, prov.models["gpt-5-mini"])
    for i in range(n):
        g.add(req(i, deadline_s, priority=priority, input_tokens=3000, output_tokens=400))
    return prov, g


def known(prov, g):
    """P(on time), the expected saving, and the expected wait in hours, as the rule states them."""
    hedge_at = batching({**ONE_BATCH, "min_batch_saving_usd": 0.0, "min_saving_rel": 0.0}).decide(g, 0.0).hedge_at
    ba = prov.batch_api
    p = ba.turnaround_cdf(hedge_at)
    spec = prov.models["gpt-5-mini"]
    price = (spec.input_per_mtok * g.input_tokens + spec.output_per_mtok * g.output_tokens) / 1e6
    saving = p * ba.discount * price
    hours = (p * min(ba.turnaround_median_s, hedge_at) + (1 - p) * hedge_at) / 3600
    return p, saving, hours


def mode_with(g, flex: bool = False, **params):
    d = load_policy("smart", CAT, {**ONE_BATCH, "flex": flex, **params}).decide(g, 0.0)
    return d.mode, d.reason


def test_a_batch_not_worth_its_wait_is_called_at_the_flex_tier_where_the_model_takes_it():
    """With the tier on, the call smart makes instead costs batch prices too (``as_flex``)."""
    prov, g = batch_group()
    _, saving, _ = known(prov, g)
    mode, why = mode_with(g, flex=True, min_batch_saving_usd=saving * 10, min_saving_rel=0.0)
    assert mode == "flex" and why.startswith("flex now: a batch would save")


def test_the_minimum_saving_in_usd_is_the_expected_saving_itself():
    prov, g = batch_group()
    _, saving, _ = known(prov, g)
    assert mode_with(g, min_batch_saving_usd=saving * 0.999, min_saving_rel=0.0)[0] == "batch_api"
    mode, why = mode_with(g, min_batch_saving_usd=saving * 1.001, min_saving_rel=0.0)
    assert mode == "sync" and f"${saving:.4f}" in why


def test_the_minimum_share_is_p_on_time_times_the_discount():
    prov, g = batch_group()
    p, _, _ = known(prov, g)
    share = p * prov.batch_api.discount
    assert 0.05 < share < 0.5  # a boundary that means something
    assert mode_with(g, min_batch_saving_usd=0.0, min_saving_rel=share)[0] == "batch_api"  # at it: worth it
    mode, why = mode_with(g, min_batch_saving_usd=0.0, min_saving_rel=share + 1e-9)
    assert mode == "sync" and f"save {share:.0%} of the list price" in why


@pytest.mark.parametrize("priority", ["urgent", "normal", "background"])
def test_the_wait_is_priced_per_member_by_its_priority(priority):
    prov, g = batch_group(priority=priority)
    _, saving, hours = known(prov, g)
    per_hour = saving / (hours * len(g))  # the price at which the wait costs exactly the saving
    base = {"min_batch_saving_usd": 0.0, "min_saving_rel": 0.0}
    assert mode_with(g, **base, wait_usd_per_hour={priority: per_hour * 0.99})[0] == "batch_api"
    mode, why = mode_with(g, **base, wait_usd_per_hour={priority: per_hour * 1.01})
    assert mode == "sync" and "its wait is worth" in why
    other = next(q for q in ("urgent", "normal", "background") if q != priority)
    assert mode_with(g, **base, wait_usd_per_hour={other: per_hour * 100})[0] == "batch_api"


def test_only_the_lanes_a_policy_weighs_take_room_in_the_arrival_table():
    """Smart reads arrival rates for its batch lanes only; its one-request sync keys (one per request) would
    otherwise push slow lanes out of the bounded table under heavy sync traffic. Its flex keys (one per request
    too, with the tier on) take no room either."""
    from engine.core.features import compat_key
    from engine.runtime.scheduler import GroupTable

    sync = [Request.model_validate({"id": f"s{i}", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": f"hi {i}",
                                    "deadline_s": 20.0, "priority": "urgent"}) for i in range(50)]
    lane = [req(i, 86400.0, input_tokens=2000, output_tokens=500) for i in range(5)]
    pol = batching()
    table = GroupTable(pol, CAT)
    for r in sync + lane:
        table.add(r, compat_key(r), 0.0)
    keys = {pol.group_key(r, compat_key(r), 0.0) for r in lane}
    assert len(table.rates) == len(keys) == 1  # the batch lane, none of the 50 sync keys
    flexing = load_policy("smart", CAT)  # the tier on: requests due within a batch's median go flex, a key each
    soon = [req(100 + i, 600.0, input_tokens=2000, output_tokens=500) for i in range(5)]
    table = GroupTable(flexing, CAT)
    for r in sync + soon:
        table.add(r, compat_key(r), 0.0)
    assert {flexing.group_key(r, compat_key(r), 0.0)[0] for r in soon} == {"flex"} and len(table.rates) == 0


def test_turns_with_a_cacheable_prefix_share_a_band_past_the_confident_deadline():
    """Past the turnaround quantile at ``band_p`` a batch is rarely hedged, so normal and background turns
    that carry a cacheable prefix share one group (one batch, one prefix write). Work with nothing to share
    keeps its factor-of-two band."""
    pol = batching()
    conv = {"prefix_blocks": list(range(8)), "input_tokens": 5000, "output_tokens": 200}
    normal, background = req(1, 3600.0, **conv), req(2, 86400.0, priority="background", **conv)
    key = pol.group_key
    assert key(normal, compat_key(normal), 0.0) == key(background, compat_key(background), 0.0)
    plain_n, plain_b = req(3, 3600.0), req(4, 86400.0, priority="background")
    assert key(plain_n, compat_key(plain_n), 0.0) != key(plain_b, compat_key(plain_b), 0.0)
    apart = batching({"band_p": 1.0})
    assert apart.group_key(normal, compat_key(normal), 0.0) != apart.group_key(background, compat_key(background),
                                                                              0.0)


def test_the_shared_band_gathers_longer_and_work_due_sooner_or_with_nothing_to_share_does_not():
    """``shared_gather_p_loss`` (3 %) sets how long a group gathers when its members share a cacheable prefix and
    its earliest deadline lies past the band cap: more of a conversation's turns then meet in one batch. Other
    groups gather with ``gather_p_loss`` (1 %): prefix or not, due sooner than the cap, they go as before."""
    def first_batch(deadline_s: float, prefix: bool, params: dict | None = None) -> float:
        # Each its own prefix (no request finds another's warm, which would send it at once): the band's rule alone.
        reqs = [req(i, deadline_s, arrival_s=float(i), input_tokens=5000, output_tokens=200,
                    prefix_blocks=[100 * i + k for k in range(8)] if prefix else []) for i in range(40)]
        res = simulate(reqs, batching(params))
        return min(b.t for b in res.batches if b.mode == "batch_api")

    cap = CAT.providers["openai"].batch_api.turnaround_quantile(load_policy("smart", CAT).params.band_p)
    assert 1200.0 < cap < 3600.0
    assert first_batch(3600.0, True) > first_batch(3600.0, False)
    assert first_batch(3600.0, True, {"shared_gather_p_loss": 0.01}) == first_batch(3600.0, False)
    assert first_batch(1200.0, True) == first_batch(1200.0, False)



def test_a_gathering_group_is_decided_as_a_fresh_group_of_its_members_would_be():
    """The gather time a policy keeps on a group (decided on every arrival) is kept only while what it comes from
    stands: a member with a longer output lengthens the sync fallback's lead, so the batch stops gathering
    sooner. Before stop 48 the kept value ignored the output, and the group gathered on as if it had not come."""
    prov = CAT.providers["openai"]
    spec = prov.models["gpt-5-mini"]
    smart = load_policy("smart", CAT, {"min_batch_saving_usd": 0.0, "min_saving_rel": 0.0})
    short = [req(i, 3600.0, arrival_s=0.0, input_tokens=20_000, output_tokens=200) for i in range(30)]
    long_out = req(99, 3600.0 - 10.0, arrival_s=10.0, input_tokens=20_000, output_tokens=60_000)
    g = Group(("batch", (), 0), prov, spec)
    for r in short:
        g.add(r)
    before = smart.decide(g, 5.0)
    g.add(long_out)
    kept = smart.decide(g, 10.0)

    fresh = Group(("batch", (), 0), prov, spec)
    for r in [*short, long_out]:
        fresh.add(r)
    assert before.action == kept.action == "wait"
    assert kept.wake_at == load_policy("smart", CAT, smart.params).decide(fresh, 10.0).wake_at
    assert kept.wake_at < before.wake_at  # a longer fallback leaves less time to gather


# -- GPU lanes: company to come, judged one horizon at a time ---------------------------------------------------

def image(i: int, arrival_s: float, priority: str = "background", deadline_s: float = 86400.0) -> Request:
    return Request.model_validate({"id": f"img{i}", "arrival_s": arrival_s, "model": "flux-1-dev",
                                   "prompt": f"A lighthouse in fog, take {i}", "deadline_s": deadline_s,
                                   "priority": priority})


def test_a_lone_gpu_job_with_no_company_in_sight_goes_at_once():
    """examples/driver.py's lone background image used to wait for a GPU batch until its latest safe start
    (engine time about 86,000 s) to save about a cent it could never save alone."""
    res = simulate([image(0, 10.0)], load_policy("smart", CAT))
    (b,) = res.batches
    assert (b.mode, b.t) == ("gpu_batch", 10.0) and "no company expected" in b.reason
    assert res.done_at[0] - 10.0 < 120.0


def test_a_gpu_lane_with_steady_arrivals_still_fills_its_batches():
    steady = [image(i, 30.0 * i) for i in range(64)]  # one image every 30 s
    res = simulate(steady, load_policy("smart", CAT))
    full = CAT.providers["modal-h100"].gpu_batching.max_batch
    in_full = sum(b.size for b in res.batches if b.size == full)
    assert in_full >= 48, [b.size for b in res.batches]
    assert res.met.all()


def test_a_gpu_lane_gone_quiet_stops_holding_its_jobs():
    """Three jobs, then silence: they gather while the arrivals promise company, and go once the promise has
    faded, hours before the latest safe start that a deadline-driven gather would wait for."""
    burst = [image(i, float(i)) for i in range(3)]
    res = simulate(burst, load_policy("smart", CAT))
    last = max(b.t for b in res.batches)
    assert last < 3 * 3600.0, [(b.t, b.size, b.reason) for b in res.batches]
    assert any(b.size >= 2 for b in res.batches)  # the company that came was gathered
    assert "no company expected" in max(res.batches, key=lambda b: b.t).reason  # the faded promise ended it


def test_a_price_of_waiting_sends_gpu_jobs_at_once():
    steady = [image(i, 30.0 * i) for i in range(32)]
    dear = simulate(steady, load_policy("smart", CAT, {"wait_usd_per_hour": {"background": 10.0}}))
    assert all(b.size == 1 for b in dear.batches)
    assert any("its wait is worth" in b.reason for b in dear.batches)
