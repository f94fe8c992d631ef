"""The budget-wait rule (engine.runtime.waiting), which the simulator and the grouper both apply."""

from engine.core.budgets import BudgetSpec, Verdict
from engine.core.request import Request
from engine.runtime.waiting import MAX_SHARE, MIN_SHARE, BudgetWaits


def req(i, priority="normal", deadline_s=600.0, tenant="acme"):
    return Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 100,
                                   "output_tokens": 10, "priority": priority, "deadline_s": deadline_s,
                                   "tenant": tenant})


def test_a_try_takes_the_due_work_most_urgent_first_and_at_most_its_share():
    w = BudgetWaits(step_s=1.0)
    w.share = 3
    held = [req(0, "background"), req(1, "normal", 900), req(2, "urgent", 300), req(3, "normal", 400),
            req(4, "urgent", 200)]
    for k, r in enumerate(held):
        w.hold(r.uid, r, 10.0, "b", k)
    w.hold("later", req(9, "urgent", 100), 50.0, "b", 9)  # not due yet
    late, ready = w.take(10.0)
    assert late == [] and [h.payload for h in ready] == [4, 2, 3]  # urgent by deadline, then normal
    assert len(w) == 3 and held[3].uid not in w and held[1].uid in w
    _, ready = w.take(10.0)
    assert [h.payload for h in ready] == [1, 0]  # the rest; the one due later stays
    assert list(w.held) == ["later"]


def test_work_held_to_its_deadline_is_taken_for_rejection_even_when_not_due():
    w = BudgetWaits()
    r = req(0, deadline_s=30.0)
    w.hold(r.uid, r, 100.0, "b", "x")  # deferred past its deadline: never tried, rejected at the deadline
    assert w.next_try(0.0) == 30.0
    late, ready = w.take(30.0)
    assert [h.payload for h in late] == ["x"] and ready == [] and len(w) == 0 and w.next_try(30.0) is None


def test_held_work_is_rejected_once_a_sync_call_could_no_longer_finish_by_its_deadline():
    """With the runtimes' lead (the median of a sync call for the request), held work is given up when sending it
    would buy a late answer, so the budget it would take goes to work that can still be on time."""
    from engine.core.catalog import default_catalog
    from engine.runtime.waiting import sync_lead

    lead = sync_lead(default_catalog())
    r = req(0, deadline_s=30.0)
    last = r.deadline_at - lead(r)
    assert 0.0 < lead(r) < 30.0
    w = BudgetWaits(lead_s=lead)
    w.hold(r.uid, r, 100.0, "b", "x")
    assert w.next_try(0.0) == last
    assert w.take(last - 0.01) == ([], []) and len(w) == 1  # it could still finish: kept
    late, ready = w.take(last)
    assert [h.payload for h in late] == ["x"] and ready == [] and len(w) == 0


def test_tries_are_at_least_half_a_step_apart_and_a_deferral_waits_for_its_window():
    w = BudgetWaits(step_s=4.0)
    r = req(0)
    w.hold(r.uid, r, 0.0, "b", None)
    assert w.next_try(10.0) == 12.0  # due already: not again at once
    assert w.due_after("wait", Verdict(False, "wait", budget="b"), 10.0) == 14.0
    assert w.due_after("retry", Verdict(False, "budget_unavailable"), 10.0) == 14.0
    assert w.due_after("defer", Verdict(False, "deferred", budget="b", retry_at=3600.0), 10.0) == 3600.0
    assert w.due_after("defer", Verdict(False, "deferred", budget="b", retry_at=11.0), 10.0) == 14.0


def test_the_share_halves_when_work_is_held_back_again_and_doubles_while_it_gets_through():
    w = BudgetWaits()
    first = w.share
    go, wait = Verdict(True), Verdict(False, "wait", budget="b")
    w.adapt([go, wait])
    assert w.share == first // 2
    w.adapt([go, Verdict(False, "deferred", budget="b", retry_at=5.0)])  # a pacing line not reached yet
    assert w.share == first // 4
    for _ in range(20):
        w.adapt([wait])
    assert w.share == MIN_SHARE
    w.adapt([go, Verdict(False, "budget_exhausted", budget="b")])  # a refusal is final: not a crowd waiting
    assert w.share == 2 * MIN_SHARE
    for _ in range(20):
        w.adapt([go])
    assert w.share == MAX_SHARE


def test_no_overtaking_less_urgent_work_under_a_budget_waits_behind_held_urgent_work():
    acme = BudgetSpec(tenant="acme", max_budget=1.0)
    other = BudgetSpec(tenant="globex", max_budget=1.0)
    w = BudgetWaits()
    assert w.overtaken([acme, other]) == []
    u = req(0, "urgent")
    w.hold(u.uid, u, 5.0, acme.name, None)
    over = w.overtaken([acme, other])
    assert [(s.name, top) for s, top in over] == [(acme.name, 0)]
    assert w.blocker(req(1, "normal"), over) == acme.name  # covered by the budget, less urgent: behind
    assert w.blocker(req(2, "urgent"), over) is None  # as urgent: not behind
    assert w.blocker(req(3, "background", tenant="globex"), over) is None  # another budget
    w.drop(u.uid)
    assert w.overtaken([acme, other]) == [] and w.drop(u.uid) is None


def test_what_it_keeps_is_bounded_by_what_is_held_not_by_what_passed_through():
    w = BudgetWaits()
    for k in range(20_000):  # held, then sent on: a day of deadlines ahead of each
        r = req(k, deadline_s=86_400.0)
        w.hold(r.uid, r, 1.0, "b", k)
        w.take(2.0)
    assert len(w) == 0 and len(w._by_deadline) <= 1024 + 2
    keep = req(1, "urgent", deadline_s=86_400.0)
    w.hold(keep.uid, keep, 50.0, "b", "kept")
    for k in range(3_000):
        r = req(10_000 + k, deadline_s=86_400.0)
        w.hold(r.uid, r, 1.0, "b", k)
        w.take(2.0)
    _, ready = w.take(60.0)
    assert [h.payload for h in ready] == ["kept"]  # compacting kept what was held


def test_a_reservation_asks_a_priority_at_a_time_most_urgent_first():
    from engine.runtime.waiting import tiers

    rs = [req(0, "background"), req(1, "normal"), req(2, "urgent"), req(3, "normal"), req(4, "urgent")]
    assert [[r.id for r in t] for t in tiers(rs, lambda r: r)] == [["r2", "r4"], ["r1", "r3"], ["r0"]]
    assert tiers([], lambda r: r) == []


def test_members_a_try_took_hold_less_urgent_work_behind_them_until_their_reservation_answers():
    acme = BudgetSpec(tenant="acme", max_budget=1.0)
    w = BudgetWaits()
    u = req(0, "urgent")
    w.hold(u.uid, u, 1.0, acme.name, None)
    _, ready = w.take(1.0)
    assert w.overtaken([acme]) == []
    w.ask(ready)  # their reservation is under way
    assert len(w) == 0 and w.blocker(req(1), w.overtaken([acme])) == acme.name
    w.answered([u.uid])
    assert w.overtaken([acme]) == []
    w.ask(ready)
    w.hold(u.uid, u, 2.0, acme.name, None)  # held again: counted once
    w.answered([u.uid])
    assert [(s.name, top) for s, top in w.overtaken([acme])] == [(acme.name, 0)]
    w.drop(u.uid)
    assert w.overtaken([acme]) == []
