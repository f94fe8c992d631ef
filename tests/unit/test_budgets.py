"""Budget rules: windows, priority thresholds, deferral vs rejection, and the never-overrun invariant."""

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.budgets import BudgetSpec, Claim, Throttle, parse_duration, window_bounds
from engine.core.catalog import default_catalog
from engine.core.ledger import BudgetBook
from engine.core.request import Request

T0 = float(calendar.timegm((2026, 11, 29, 10, 30, 0)))


def claim(rid, amount, priority="normal", tenant="acme", provider="openai", model="gpt-5"):
    return Claim(rid, tenant, provider, model, priority, amount)


def test_durations_and_windows():
    assert parse_duration("1h") == (1.0, "h") and parse_duration(None) is None
    with pytest.raises(ValueError, match="budget_duration 'weekly'"):
        parse_duration("weekly")
    assert window_bounds("1h", T0) == (T0 - 1800, T0 + 1800)
    start, end = window_bounds("1mo", T0)  # the calendar month, UTC
    assert (start, end) == (calendar.timegm((2026, 11, 1, 0, 0, 0)), calendar.timegm((2026, 12, 1, 0, 0, 0)))
    assert window_bounds(None, T0) == (0.0, float("inf"))
    with pytest.raises(ValueError, match="soft_budget 5.0 must be <= max_budget 1.0"):
        BudgetSpec(max_budget=1, soft_budget=5)
    with pytest.raises(ValueError, match="must grow with priority"):
        Throttle(background=0.99, normal=0.9)


def test_background_then_normal_stop_before_urgent_and_the_window_decides_deferral():
    book = BudgetBook([BudgetSpec(tenant="acme", max_budget=10.0, budget_duration="1d")], Throttle(pace=False))
    assert book.reserve_many([claim("a", 7.9, "background")], T0)[0].ok
    v = book.reserve_many([claim("b", 0.2, "background")], T0)[0]  # 8.1 > 80 %, but only while "a" is open
    assert (v.ok, v.reason, v.retry_at) == (False, "wait", None)
    book.settle_many([("a", 7.9)])
    v = book.reserve_many([claim("b", 0.2, "background")], T0)[0]  # now spent: wait for the next window
    assert (v.ok, v.reason, v.retry_at) == (False, "deferred", window_bounds("1d", T0)[1])
    assert book.reserve_many([claim("c", 1.5, "normal")], T0)[0].ok  # 9.4 <= 95 %
    book.settle_many([("c", 1.5)])
    assert book.reserve_many([claim("d", 0.2, "normal")], T0)[0].reason == "deferred"
    assert book.reserve_many([claim("e", 0.6, "urgent")], T0)[0].ok  # 10.0 <= 100 %
    book.settle_many([("e", 0.6)])
    v = book.reserve_many([claim("f", 0.01, "urgent")], T0)[0]  # urgent work is never deferred
    assert (v.ok, v.reason, v.remaining_usd) == (False, "budget_exhausted", pytest.approx(0.0, abs=1e-9))
    assert book.reserve_many([claim("g", 5, "normal", tenant="globex")], T0)[0].ok  # not covered
    book.settle_many([("g", 1.0), ("g", 1.0)])  # settles once; the repeat changes nothing
    (row,) = book.report(T0)
    assert row["spent_usd"] == pytest.approx(10.0) and row["reserved_usd"] == pytest.approx(0.0)
    assert book.spend_report() == [{"tenant": "acme", "provider": "openai", "model": "gpt-5", "spent_usd": 10.0},
                                   {"tenant": "globex", "provider": "openai", "model": "gpt-5", "spent_usd": 1.0}]
    assert book.overrun_usd() == 0.0
    assert book.reserve_many([claim("h", 7.9, "background")], T0 + 86400)[0].ok  # a new day, a new window
    assert [w["window"] for w in book.windows()] == [f"{window_bounds('1d', T0)[0]:.0f}",
                                                     f"{window_bounds('1d', T0 + 86400)[0]:.0f}"]


def test_pacing_spreads_non_urgent_spend_over_the_window_and_never_holds_urgent_work():
    spec = BudgetSpec(max_budget=100.0, budget_duration="1d")
    book = BudgetBook([spec])  # pacing on, 10 % up front
    start = window_bounds("1d", T0)[0]  # T0 is 10:30 UTC: 43.75 % of the day has passed
    a = 0.8 * (0.4375 + 0.1) * 100 - 0.01
    assert book.reserve_many([claim("a", a, "background")], T0)[0].ok
    book.settle_many([("a", a)])
    v = book.reserve_many([claim("b", 1.0, "background")], T0)[0]  # deferred until the line reaches a + 1
    assert v.reason == "deferred" and v.retry_at == pytest.approx(start + ((a + 1.0) / 80 - 0.1) * 86400)
    assert book.reserve_many([claim("c", 1.0, "normal")], T0)[0].ok  # normal's line is higher (95 %)
    assert book.reserve_many([claim("d", 50.0, "urgent")], T0)[0].ok  # urgent is never paced
    never = BudgetBook([BudgetSpec(max_budget=100.0, horizon_s=1000.0)])
    assert not never.reserve_many([claim("e", 20.0, "normal")], 50.0)[0].ok  # 95 % x (5 % + 10 %) = 14.25
    assert never.reserve_many([claim("e", 20.0, "normal")], 200.0)[0].ok


def test_a_budget_that_never_resets_rejects_and_the_tightest_spec_wins():
    book = BudgetBook([BudgetSpec(max_budget=100.0), BudgetSpec(model="gpt-5", max_budget=1.0)])
    v = book.reserve_many([claim("a", 2.0, "background")], T0)[0]
    assert (v.ok, v.reason, v.budget) == (False, "budget_exhausted", "model=gpt-5")
    assert book.reserve_many([claim("b", 2.0, "background", model="gpt-5-mini")], T0)[0].ok


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.sampled_from(["urgent", "normal", "background"]),
                          st.floats(0, 1), st.booleans()), min_size=1, max_size=200))
def test_spend_never_passes_the_hard_limit(ops):
    """Whatever the estimates, priorities and failures: actual cost <= its reservation (the estimate is an
    upper bound), so spent + reserved never passes the limit."""
    spec = BudgetSpec(max_budget=10.0, budget_duration="1h")
    book = BudgetBook([spec], Throttle(pace=False))
    open_claims = []
    for k, (amount, prio, frac, fail) in enumerate(ops):
        if book.reserve_many([claim(str(k), amount, prio)], T0)[0].ok:
            open_claims.append((str(k), amount, frac, fail))
        if len(open_claims) > 5:
            rid, amt, f, failed = open_claims.pop(0)
            book.settle_many([(rid, 0.0 if failed else amt * f)])
        (row,) = book.report(T0)
        assert row["spent_usd"] + row["reserved_usd"] <= spec.max_budget + 1e-6


# -- the controller under concurrency, and budgets in the simulator ------------------------------------------


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(500, 3000), st.floats(0, 0.5), st.floats(0.01, 1.0),
       st.integers(1, 50))
def test_thousands_of_concurrent_reservations_never_pass_the_limit(seed, n, fail_rate, max_amount, width):
    """Reservations and settlements interleave on one event loop as the grouper's and dispatchers' calls do;
    actual costs are at most the reservation, some calls fail (settle 0). Spend never passes the limit."""
    import asyncio
    import random

    from actors.budget import BudgetController
    from engine.core.budgets import BudgetSettings
    from engine.core.clock import ManualClock

    limit = 20.0
    rng = random.Random(seed)
    ops = [(rng.uniform(0, max_amount), rng.choice(["urgent", "normal", "background"]), rng.random(),
            rng.random() < fail_rate) for _ in range(n)]

    async def go():
        ctl = BudgetController(BudgetSettings(specs=(BudgetSpec(max_budget=limit, budget_duration="1d"),)), None,
                               ManualClock(T0))
        checked = []

        async def worker(part):
            for k, (amount, prio, frac, fail) in part:
                (v,) = await ctl.reserve_many([claim(f"c{k}", amount, prio)])
                await asyncio.sleep(0)  # let every other worker in between
                if v.ok:
                    await ctl.settle_many([(f"c{k}", 0.0 if fail else amount * frac)])
                rep = await ctl.report()
                checked.append(rep["budgets"][0]["spent_usd"] + rep["budgets"][0]["reserved_usd"])

        await asyncio.gather(*(worker(list(enumerate(ops))[w::width]) for w in range(width)))
        assert max(checked) <= limit + 1e-6
        rep = await ctl.report()
        assert rep["overrun_usd"] == 0.0 and rep["spent_usd"] <= limit + 1e-6

    asyncio.run(go())


def small_trace(n=600):
    from engine.core.tracegen import synth

    return synth(n, seed=11, duration_s=1800.0)


@settings(max_examples=5, deadline=None)
@given(st.floats(0.05, 1.2), st.sampled_from([None, "5m", "15m"]), st.floats(0.1, 0.6),
       st.sampled_from(["naive", "smart", "batch-all"]))
def test_the_simulator_never_spends_past_a_budget(share, duration, tenant_share, policy):
    from engine.core.catalog import default_catalog
    from engine.core.settings import Settings, with_budget
    from engine.sim.simulator import simulate
    from policies import load_policy

    reqs = small_trace()
    cat = default_catalog()
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat).total_cost
    total, tenant_a = share * naive, tenant_share * share * naive
    s = with_budget(Settings(), total, {"tenant-a": tenant_a}, duration)
    res = simulate(reqs, load_policy(policy, cat), catalog=cat, settings=s)
    budget = res.extra["budget"]
    assert budget["overrun_usd"] == 0.0
    for w in budget["windows"]:
        assert w["spent_usd"] <= w["max_budget"] + 1e-9 and w["reserved_usd"] == pytest.approx(0.0, abs=1e-9)
    if duration is None:  # one window: check against the results themselves
        assert res.cost.sum() <= total + 1e-9
        assert sum(c for c, r in zip(res.cost, res.requests) if r.tenant == "tenant-a") <= tenant_a + 1e-9
    s = res.summary()
    assert s["completed"] + s["failed"] + sum(s["rejected"].values()) == len(reqs)  # nothing is lost


def test_under_a_tight_budget_urgent_work_goes_first():
    from engine.core.catalog import default_catalog
    from engine.core.settings import Settings, with_budget
    from engine.sim.simulator import simulate
    from policies import load_policy

    reqs = small_trace(1500)
    cat = default_catalog()
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat).total_cost
    s = with_budget(Settings(), naive / 3, horizon_s=max(r.arrival_s for r in reqs))
    res = simulate(reqs, load_policy("smart", cat), catalog=cat, settings=s)
    met = res.summary()["deadline_met_by_priority"]
    # Paced over the trace's span, non-urgent spend is spread over time and urgent work finds the rest.
    assert met["urgent"] > 0.9 and met["urgent"] > met["normal"] > met["background"]
    assert res.summary()["rejected"]["budget_exhausted"] > 0
    assert res.total_cost <= naive / 3 + 1e-9


def test_background_work_past_its_threshold_is_deferred_to_the_next_window():
    from engine.core.catalog import default_catalog
    from engine.core.request import Request, validation_context
    from engine.core.settings import Settings, with_budget
    from engine.sim.simulator import simulate
    from policies import load_policy

    cat = default_catalog()
    ctx = validation_context(cat, Settings())
    reqs = [Request.model_validate({"id": f"bg{i}", "arrival_s": i * 3.0, "model": "gemini-2.5-flash",
                                    "input_tokens": 2000, "output_tokens": 300, "priority": "background",
                                    "deadline_s": 4 * 3600.0}, context=ctx) for i in range(1200)]  # one hour
    hourly = 0.4 * simulate(reqs, load_policy("naive", cat), catalog=cat).total_cost
    res = simulate(reqs, load_policy("naive", cat), catalog=cat, settings=with_budget(Settings(), hourly, None, "1h"))
    b = res.extra["budget"]
    assert b["deferrals"] > 0 and b["overrun_usd"] == 0.0
    for w in b["windows"]:  # background work stops at 80 % of each window's limit
        assert w["spent_usd"] <= 0.8 * hourly + 1e-9
    later = [r for r, st_, d in zip(res.requests, res.status, res.done_at) if st_ == 1 and d >= 3600.0]
    assert len(later) > 0 and len(b["windows"]) >= 2  # deferred work ran in the next hour


def test_a_reservation_ttl_past_what_redis_takes_as_an_expiry_is_refused_naming_it():
    """The Redis ledger's scripts set expiries from ``reservation_ttl_s`` (the book's sequence, a settlement's
    marker). 1e16 s, past what Redis takes (its expiry in ms overflows), passed the start's checks: every
    reservation then failed as an outage, and before stop 77 every settlement was refused by its script and dropped,
    its spend never counted (a review). Now refused where it is set, naming it and the bound."""
    from engine.core.errors import ConfigError
    from engine.core.settings import load_settings

    with pytest.raises(ConfigError, match=r"budgets\.reservation_ttl_s .*must be <= 3\.1536e\+08, got 1e\+16"):
        load_settings(budgets={"reservation_ttl_s": 1e16})
    assert load_settings(budgets={"reservation_ttl_s": 315_360_000}).budgets.reservation_ttl_s == 315_360_000


def test_the_reservation_bound_honours_a_cap_and_names_a_bad_one():
    from pydantic import ValidationError

    from engine.core.catalog import default_catalog
    from engine.core.cost import reserve_bound
    from engine.core.request import Request, validation_context
    from engine.core.settings import Settings
    from engine.core.trace import _problems_of

    cat = default_catalog()
    ctx = validation_context(cat, Settings())
    r = Request.model_validate({"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "input_tokens": 1000,
                                "output_tokens": 200}, context=ctx)
    capped = r.model_copy(update={"max_output_tokens": 500})
    assert reserve_bound(r, cat, "sync") == pytest.approx((1000 * 0.25 + 128_000 * 2.0) * 1e-6)
    assert reserve_bound(r, cat, "sync", 200) == pytest.approx((1000 * 0.25 + 200 * 2.0) * 1e-6)
    assert reserve_bound(capped, cat, "sync") == pytest.approx((1000 * 0.25 + 500 * 2.0) * 1e-6)
    assert reserve_bound(capped, cat, "batch_api") == pytest.approx(0.5 * (1000 * 0.25 + 500 * 2.0) * 1e-6)
    with pytest.raises(ValidationError) as err:
        Request.model_validate({"id": "b", "arrival_s": 0, "model": "gpt-5-mini", "input_tokens": 10,
                                "output_tokens": 200, "max_output_tokens": 100}, context=ctx)
    problems = _problems_of(err.value)
    assert problems[0][0] == "max_output_tokens" and "under output_tokens 200" in problems[0][1]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["gpt-5-mini", "claude-sonnet-4-5", "gemini-2.5-flash", "flux-1-dev", "imagen-4"]),
       st.integers(1, 20_000), st.integers(0, 4000), st.lists(st.integers(0, 5), max_size=4),
       st.sampled_from(["sync", "batch_api", "gpu_batch"]), st.integers(1, 6))
def test_no_dispatch_bills_more_than_its_reservation(model, inp, out, blocks, mode, n):
    """The estimate is an upper bound whatever the cache state and batch: the hard limit rests on this."""
    from engine.core.catalog import default_catalog
    from engine.core.cost import mode_allowed, price_batch, reserve_bound
    from engine.core.request import Request, validation_context
    from engine.core.settings import Settings

    cat = default_catalog()
    prov_name, spec = cat.find_model(model)
    prov = cat.providers[prov_name]
    if not mode_allowed(prov, spec, mode):
        return
    ctx = validation_context(cat, Settings())
    reqs = [Request.model_validate({"id": f"r{k}", "arrival_s": 0, "model": model, "input_tokens": inp,
                                    "output_tokens": out, "prefix_blocks": blocks, "prompt": f"p {k % 2}"},
                                   context=ctx) for k in range(n)]
    for warm in ((), tuple(blocks)):
        for r, p in zip(reqs, price_batch(reqs, cat, mode, warm=warm)):
            assert p.total <= reserve_bound(r, cat, mode) + 1e-12


def test_one_triage_of_a_budget_verdict_for_both_runtimes():
    """The simulator and the grouper act on a verdict through one rule (engine.runtime.reservation)."""
    from engine.core.budgets import LEDGER, Verdict
    from engine.runtime.reservation import claim_amount, dispatch_mode, triage

    CAT = default_catalog()

    assert triage(Verdict(True), 10.0) == "go"
    assert triage(Verdict(False, "wait", budget="b"), 10.0) == "wait"
    assert triage(Verdict(False, "budget_unavailable", budget=LEDGER), 10.0) == "retry"
    assert triage(Verdict(False, "deferred", retry_at=10.0, budget="b"), 10.0) == "defer"
    assert triage(Verdict(False, "deferred", retry_at=10.5, budget="b"), 10.0) == "reject"  # after the deadline
    assert triage(Verdict(False, "budget_exhausted", budget="b"), 10.0) == "reject"
    assert dispatch_mode("batch_api", 5.0, 5.0) == "sync" and dispatch_mode("batch_api", 6.0, 5.0) == "batch_api"
    urgent = Request.model_validate({"id": "u", "arrival_s": 0, "model": "gpt-5-mini", "input_tokens": 1000,
                                     "output_tokens": 100, "priority": "urgent"})
    normal = urgent.model_copy(update={"priority": "normal"})
    # An urgent batch member reserves the sync price (its hedge is covered); a normal one the batch price.
    assert claim_amount(urgent, CAT, "batch_api", False) == claim_amount(urgent, CAT, "sync", False)
    assert claim_amount(normal, CAT, "batch_api", False) < claim_amount(normal, CAT, "sync", False)
    assert claim_amount(normal, CAT, "sync", True) > claim_amount(normal, CAT, "sync", False)  # model max


def test_a_body_request_reserves_for_its_bytes_where_its_text_tokenizes_denser_than_the_estimate():
    """Input tokens are estimated at 4 characters each; Chinese text (digits, code) comes denser, and a budget
    reserved on the estimate was overrun threefold (a helper's fault hunt: $0.31 spent of $0.10). A token holds at
    least one byte of text, so a body's bytes bound it; a bare prompt (a trace's recorded size) keeps its count."""
    from engine.core.cost import input_bound, reserve_bound
    from engine.core.request import Request, validation_context

    CAT = default_catalog()
    ctx = validation_context(CAT)
    text = "预算不能超支" * 2000  # 12,000 characters, up to a token each
    body = Request.model_validate({"id": "zh", "arrival_s": 0.0, "model": "claude-haiku-4-5", "max_tokens": 5,
                                   "messages": [{"role": "user", "content": text}]}, context=ctx)
    spec = CAT.model("anthropic", "claude-haiku-4-5")
    w = CAT.provider("anthropic").prompt_cache.write_multiplier
    assert body.input_tokens < len(text) / 3  # the estimate
    assert reserve_bound(body, CAT, "sync") >= (spec.input_per_mtok * w * len(text) + spec.output_per_mtok * 5) / 1e6
    # Only its text counts so: an image's base64 is no text (a review: 1.5 MB of it reserved $7.50, not $0.0068).
    png = "data:image/png;base64," + "A" * 400_000
    img = Request.model_validate({"id": "img", "arrival_s": 0.0, "model": "claude-haiku-4-5", "max_tokens": 5,
                                  "messages": [{"role": "user", "content": [
                                      {"type": "text", "text": "Describe it."},
                                      {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                   "data": png.split(",", 1)[1]}}]}]}, context=ctx)
    assert input_bound(img, spec) == img.input_tokens + len("Describe it.")
    bare = Request.model_validate({"id": "t", "arrival_s": 0.0, "model": "claude-haiku-4-5", "prompt": "x" * 40,
                                   "input_tokens": 3000, "max_output_tokens": 5}, context=ctx)
    assert reserve_bound(bare, CAT, "sync") == pytest.approx((spec.input_per_mtok * w * 3000
                                                              + spec.output_per_mtok * 5) / 1e6)


def test_a_window_whose_reservations_sum_a_hair_below_zero_reads_zero_not_minus_zero():
    """Reservations released in another order than taken can sum to -1e-12: the report read ``-0.0`` (a helper's
    parity hunt)."""
    import math

    from engine.core.budgets import usd, window_row

    row = window_row(BudgetSpec(max_budget=1.0), "all@0", 0.5, 0.1 + 0.2 - 0.3 - 1e-12)
    assert row["reserved_usd"] == 0.0 and math.copysign(1.0, row["reserved_usd"]) == 1.0
    assert math.copysign(1.0, usd(-1e-9)) == 1.0 and usd(0.1234567) == 0.123457


def test_a_request_pacing_holds_past_its_deadline_is_told_pacing_holds_it_and_the_ways_on():
    """A live tour: a $0.004 day budget, four urgent requests spent $0.0027, and six normal ones of $0.0009 each
    were rejected with "budget global/1d resets at t=86400s, after the deadline" alone, $0.0013 left: pacing held
    them (normal work may reach 9.5 % of the limit in a day's first minutes), and the reason named neither it
    nor a way on. The verdict is the same; its reason says what holds the request and how to send it."""
    from engine.runtime.reservation import triage

    book = BudgetBook([BudgetSpec(max_budget=0.004, budget_duration="1d")], Throttle())
    start = window_bounds("1d", T0)[0]
    assert book.reserve_many([claim("u", 0.0027, "urgent")], start + 60)[0].ok
    book.settle_many([("u", 0.0027)])
    v = book.reserve_many([claim("n", 0.0009)], start + 60)[0]
    assert v.reason == "deferred" and triage(v, start + 660) == "reject"  # a deadline of 10 minutes
    why = v.why(0.0009)
    assert "budget global/1d has $0.001300 left" in why and f"normal work may reach ${0.004 * 0.95 * (60 / 86400 + 0.1):.6f}" in why
    assert "budgets.throttle.pace" in why and "SMARTBATCH_BUDGETS__THROTTLE__PACE=false" in why
    assert "send it urgent" in why and "later deadline" in why and "reserves up to $0.000900" in why
    # Without pacing, past its fraction, it waits for the window's reset; said so, with that fraction's way on.
    book = BudgetBook([BudgetSpec(max_budget=0.004, budget_duration="1d")], Throttle(pace=False))
    assert book.reserve_many([claim("u", 0.0035, "urgent")], start + 60)[0].ok
    book.settle_many([("u", 0.0035)])
    v = book.reserve_many([claim("n", 0.0004)], start + 60)[0]
    why = v.why(0.0004)
    assert v.reason == "deferred" and "when the window resets" in why and "raise that fraction" in why
    assert "pac" not in why.replace("space", "")


def test_a_paced_request_dearer_than_its_prioritys_whole_share_is_not_told_it_could_go_at_the_windows_end():
    """Stop 75's note: a paced $1 day budget, normal work's share $0.95, a normal request reserving $0.97 was
    deferred to the window's end and told it "could go only at t=...s" there, or with pacing off: no window
    ever lets it pass at that priority. The verdict is the same; the reason says so and names the ways on."""
    book = BudgetBook([BudgetSpec(max_budget=1.0, budget_duration="1d")], Throttle())
    start = window_bounds("1d", T0)[0]
    v = book.reserve_many([claim("n", 0.97)], start + 60)[0]
    assert v.reason == "deferred" and v.retry_at == window_bounds("1d", T0)[1]  # the decision is unchanged
    for why in (v.why(0.97), v.held(0.97)):
        assert "could go" not in why and "PACE=false" not in why and "later deadline" not in why
        assert "more than normal work may reach in any window" in why and "$0.950000" in why
        assert "budgets.throttle.normal" in why and "raise the budget" in why and "send it urgent" in why
        assert "budgets.reserve_output" in why and "max_tokens" in why
