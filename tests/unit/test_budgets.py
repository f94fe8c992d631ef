"""Budget rules: windows, priority thresholds, deferral vs rejection, and the never-overrun invariant."""

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.budgets import BudgetBook, BudgetSpec, Claim, Throttle, parse_duration, window_bounds

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
    book = BudgetBook([BudgetSpec(tenant="acme", max_budget=10.0, budget_duration="1d")])
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
    book = BudgetBook([spec])
    open_claims = []
    for k, (amount, prio, frac, fail) in enumerate(ops):
        if book.reserve_many([claim(str(k), amount, prio)], T0)[0].ok:
            open_claims.append((str(k), amount, frac, fail))
        if len(open_claims) > 5:
            rid, amt, f, failed = open_claims.pop(0)
            book.settle_many([(rid, 0.0 if failed else amt * f)])
        (row,) = book.report(T0)
        assert row["spent_usd"] + row["reserved_usd"] <= spec.max_budget + 1e-6
