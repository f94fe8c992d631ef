"""What a new user's bulk job from a driver script ran into (a helper's tour, against the emulator)."""

from __future__ import annotations

import pytest

from engine.core.budgets import BudgetSpec, Claim
from engine.core.ledger import BudgetBook


@pytest.mark.parametrize(("priority", "fraction"), [("normal", 0.95), ("background", 0.80)])
def test_a_rejection_with_money_left_says_the_rest_is_kept_for_more_urgent_work(priority, fraction):
    # 956 normal requests of $0.0001 each were refused with "budget global has $0.007697 left" and no word of
    # why: normal work may spend 95 % of a budget, the rest is urgent work's.
    book = BudgetBook([BudgetSpec(max_budget=0.15)])
    (ok,) = book.reserve_many([Claim("big#0", "t", "openai", "gpt-5.4-mini", "urgent", 0.145)], 0.0)
    assert ok.ok
    book.settle_many([("big#0", 0.145)])
    (v,) = book.reserve_many([Claim("small#0", "t", "openai", "gpt-5.4-mini", priority, 0.0001)], 0.0)
    assert v.reason == "budget_exhausted"
    why = v.why(0.0001)
    assert "has $0.005000 left" in why
    assert f"budgets.throttle.{priority}" in why and "kept for more urgent work" in why
    assert f"may spend only ${0.15 * fraction:.6f} of its $0.150000" in why
    assert "reserves up to $0.000100" in why and "raise the budget" in why


def test_a_rejection_that_the_money_left_would_not_cover_anyway_keeps_its_reservation_message():
    book = BudgetBook([BudgetSpec(max_budget=0.05)])
    (v,) = book.reserve_many([Claim("q1#0", "t", "openai", "gpt-5-mini", "normal", 0.256)], 0.0)
    why = v.why(0.256)
    assert "reserves up to $0.256000" in why and "max_tokens" in why and "throttle" not in why
