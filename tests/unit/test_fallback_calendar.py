"""Batches whose hedges fall due together share the provider's concurrent calls (``FallbackCalendar``): a batch's
hedge leaves room for its own members' sync fallbacks, and since stop 57 for those of the other batches under way
too. Before, a helper's property test found deadlines that naive met missed by smart: three lanes hedged at one
instant at a provider of one call, and two of their fallbacks queued past their deadlines."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.grouping import FallbackCalendar
from engine.core.request import Request, validation_context
from engine.core.settings import Settings, SimSettings
from engine.sim.simulator import simulate
from policies import load_policy

from .helpers import limited_catalog


def catalog(conc: int, base_s: float, per_token_s: float = 0.0):
    return limited_catalog("openai", conc, base_s, per_token_s)


def trace(cat, rows) -> list[Request]:
    return [Request.model_validate({"id": f"q{i}", "arrival_s": a, "model": m, "input_tokens": tin,
                                    "output_tokens": tout, "deadline_s": d, "priority": "normal"},
                                   context=validation_context(cat)) for i, (a, m, tin, tout, d) in enumerate(rows)]


def batch_smart(cat, params: dict | None = None):
    """Smart with the flex tier off: gpt-5 and gpt-5-mini take OpenAI's flex tier, where smart would send these
    requests at once, and the case here is the batches' fallbacks."""
    return load_policy("smart", cat, {"flex": False, **(params or {})})


def late_where_naive_is_not(cat, reqs, scale=1.0, seed=0, params=None) -> list[tuple[str, float]]:
    s = Settings(sim=SimSettings(turnaround_scale=scale))
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat, settings=s, seed=seed)
    smart = simulate(reqs, batch_smart(cat, params), catalog=cat, settings=s, seed=seed)
    assert naive.met.all()  # every case here is one naive meets in full
    assert any(b.outcome == "hedged" for b in smart.batches)  # the case is the fallbacks', not a lucky draw
    return [(r.id, round(float(smart.done_at[k] - r.deadline_at), 1)) for k, r in enumerate(smart.requests)
            if not smart.met[k]]


def test_three_lanes_that_hedge_at_one_instant_take_turns_at_a_one_call_provider():
    """The helper's case: three models' batches, one member each, due together, batches 50x slower than the
    catalog says. Each hedge left one call's time: the three fell back at once and two were late (4-57 s)."""
    cat = catalog(1, 0.6, 0.012)
    reqs = trace(cat, [(0.0, m, 20_000, 3_000, 1_800.0) for m in ("gpt-5", "gpt-5-mini", "gpt-4o-mini")])
    assert late_where_naive_is_not(cat, reqs, scale=50.0, seed=2) == []


def test_a_later_batch_with_a_long_answer_falls_back_before_an_earlier_ones_short_call_not_across_it():
    """A batch decided later, with a long answer (24.6 s a call), was hedged into the window an earlier batch had
    left for its own short call, and that call waited behind it past its deadline."""
    cat = catalog(1, 0.6, 0.012)
    reqs = trace(cat, [(0.0, "gpt-5-mini", 2_000, 10, 600.0), (0.0, "gpt-5-mini", 20_000, 10, 900.0),
                       (20.0, "gpt-5", 2_000, 2_000, 900.0)])
    assert late_where_naive_is_not(cat, reqs, params={"min_batch_saving_usd": 0.0}) == []


def test_a_new_fallback_does_not_push_a_chain_of_earlier_ones_past_their_deadlines():
    """Ours ends before the next reservation begins, but served in turn it delays that one, which delays the
    one after it: the calendar follows the chain, not only the reservations our window meets."""
    cal = FallbackCalendar()
    cal.reserve("openai", (675.0, 705.0, 1, 30.0), ["a"], 0.0)
    cal.reserve("openai", (825.0, 885.0, 1, 30.0), ["b"], 0.0)  # due by 885, planned to start at 825
    cal.reserve("openai", (855.0, 885.0, 1, 30.0), ["c"], 0.0)
    # At 815 ours would end at 845, and push b to 875 and c to 905, past 885: it goes before b instead.
    assert cal.latest("openai", 815.0, 845.0, 1, 30.0, 1, 0.0) == pytest.approx(795.0)
    assert cal.latest("openai", 815.0, 845.0, 1, 30.0, 3, 0.0) == 815.0  # three calls at once: no one waits
    cal.free("b")  # b's batch was cancelled, its members decided again: its calls are free
    assert cal.latest("openai", 815.0, 845.0, 1, 30.0, 1, 0.0) == 815.0
    assert len(cal) == 2


def test_a_big_batch_shares_a_wave_with_small_ones_when_the_calls_allow_it():
    """Served in turn, 129 calls and 10 more at 128 at once take two waves either way: the big batch is not moved
    before the small one (an early rule that reserved every call for the big one's whole window moved such
    batches 150 s earlier, and cost Mooncake $2.70 on a seed)."""
    cal = FallbackCalendar()
    cal.reserve("anthropic", (3_650.0, 3_700.0, 10, 20.0), ["s"], 0.0)
    assert cal.latest("anthropic", 3_648.0, 3_711.0, 129, 31.5, 128, 0.0) == 3_648.0


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_smart_meets_every_deadline_naive_meets_when_batches_are_late_and_calls_are_few(data):
    """Batches up to 50x slower than the catalog says, at a provider of 2 or 4 calls at once, with sync calls of
    up to a minute: whatever naive meets, smart meets. (At one call at once, a request sent sync at its arrival
    can still take the call a fallback due a moment later counted on: docs/reliability.md, "Left".)"""
    cat = catalog(data.draw(st.sampled_from([2, 4])), data.draw(st.sampled_from([0.6, 5.0, 30.0])),
                  data.draw(st.sampled_from([0.0, 0.012])))
    t, rows = 0.0, []
    for _ in range(data.draw(st.integers(2, 30))):
        t += data.draw(st.sampled_from([0.0, 1.0, 20.0, 120.0]))
        rows.append((t, data.draw(st.sampled_from(["gpt-5-mini", "gpt-5"])),
                     data.draw(st.sampled_from([2_000, 20_000, 200_000])), data.draw(st.sampled_from([10, 500, 2_000])),
                     data.draw(st.sampled_from([600.0, 900.0, 1_800.0, 3_600.0]))))
    reqs = trace(cat, rows)
    s = Settings(sim=SimSettings(turnaround_scale=data.draw(st.sampled_from([1.0, 5.0, 50.0]))))
    seed = data.draw(st.integers(0, 2))
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat, settings=s, seed=seed)
    params = data.draw(st.sampled_from([{}, {"min_batch_saving_usd": 0.0}, {"hedge_retry": True}]))
    smart = simulate(reqs, batch_smart(cat, params), catalog=cat, settings=s, seed=seed)
    missed = [r.id for k, r in enumerate(smart.requests) if naive.met[k] and not smart.met[k]]
    assert not missed, missed


def test_the_calendar_holds_only_reservations_not_yet_ended_and_their_members():
    """A long-running engine reserves a batch an hour: ended reservations go with their members' ids (a review: 48
    batches of 50,000 held 2.4 million ids and 260 MiB, since only a count of 64 pruned them)."""
    cal = FallbackCalendar()
    for h in range(48):
        t = h * 3_600.0
        cal.reserve("openai", (t + 1_000.0, t + 1_100.0, 50, 20.0), [f"b{h}-{i}" for i in range(50)], t)
    assert len(cal) == 1 and len(cal._of) == 50  # the last one only: the others' ends have passed


def _finishes(jobs: list, conc: int) -> list[float]:
    """When each of ``jobs`` ([start, end, calls, call_s], by start) has its last call done, served in turn."""
    from engine.core.fallbacks import _serve

    free = [float("-inf")] * conc
    return [_serve(free, start, n, call) for start, _, n, call, *_ in jobs]


def test_calls_are_served_by_the_call_that_frees_first():
    """A first version stepped a batch's calls in even waves round the provider's calls, which is wrong when one
    call is held much longer than the others: it must give what a call-by-call queue gives."""
    import heapq

    def by_call(jobs, conc):
        free, out = [float("-inf")] * conc, []
        for start, _, n, call in jobs:
            last = start
            for _ in range(n):
                at = max(start, heapq.heappop(free)) + call
                heapq.heappush(free, at)
                last = max(last, at)
            out.append(last)
        return out
    jobs = [[0.0, 0, 3, 10.0], [2.0, 0, 5, 7.0], [4.0, 0, 1, 30.0], [40.0, 0, 9, 2.5], [41.0, 0, 2, 60.0]]
    for conc in (1, 2, 4, 16):
        assert _finishes(jobs, conc) == pytest.approx(by_call(jobs, conc))
    # Worked by hand at two calls: the 30-s call holds one until 61, so the nine short calls queue on the other.
    assert _finishes(jobs, 2) == pytest.approx([20.0, 34.0, 61.0, 62.5, 122.5])


def test_a_fallback_that_fits_just_before_a_reservation_begins_is_not_moved_a_whole_duration():
    """Served first and sharing the calls, ours at 99.99 finishes by 200 and the reservation still by 300: no need
    to end before it begins (a review: the hedge moved 150 s earlier than needed)."""
    cal = FallbackCalendar()
    cal.reserve("p", (100.0, 300.0, 2, 100.0), ["a"], 0.0)
    assert cal.latest("p", 150.0, 250.0, 2, 100.0, 2, 0.0) == pytest.approx(100.0, abs=1e-3)


def _latest_by_replay(cal: FallbackCalendar, provider, start, end, calls, call_s, conc, now) -> float:
    """``latest`` as it was before stop 60: every try serves every reservation again from the first."""
    cal._expire(now)
    book = cal._by.get(provider)
    if not book:
        return start
    dur = end - start
    floor = start - 3 * max(dur, max(r[1] - r[0] for r in book), 1.0)
    near = [r for r in book if r[1] > floor]
    if calls + sum(r[2] for r in near) <= conc:
        return start
    alone = _finishes(near, conc)
    tries = sorted({start, *(x for r in near for x in (r[0] - dur, r[0] - 1e-6, r[1] - dur)
                            if floor <= x < start)}, reverse=True)[:16]
    for t in tries:
        mine = [t, t + dur, calls, call_s]
        jobs = sorted([*near, mine], key=lambda x: x[0])
        done = dict(zip(map(id, jobs), _finishes(jobs, conc), strict=True))
        if done[id(mine)] <= mine[1] + 1e-6 and all(
                done[id(r)] <= max(r[1], was) + 1e-6 for r, was in zip(near, alone, strict=True)):
            return t
    return tries[-1]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 30), st.integers(1, 12), st.integers(1, 20)),
                min_size=1, max_size=10),
       st.integers(0, 15), st.integers(1, 40), st.integers(1, 20), st.integers(1, 20), st.integers(1, 6))
def test_latest_answers_as_serving_every_reservation_again_for_each_try_did(book, s, d, n, call, conc):
    """Stop 60 starts each try from the calls as they stand before its place (a quarter of a Mooncake run's time
    went to serving every reservation again per try): the answers must be the very same."""
    cal = FallbackCalendar()
    for k, (a, span, m, c) in enumerate(book):  # whole seconds: starts tie with each other and with the tries
        cal.reserve("openai", (float(a), float(a + span), m, float(c)), [f"b{k}-{i}" for i in range(m)], 0.0)
    ask = ("openai", float(s), float(s + d), n, float(call), conc, 0.0)
    assert cal.latest(*ask) == _latest_by_replay(cal, *ask)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 60), st.integers(1, 4), st.integers(1, 40)),
                min_size=1, max_size=30),
       st.integers(0, 400), st.integers(0, 60), st.integers(1, 4), st.integers(1, 40), st.integers(1, 4))
def test_latest_answers_as_the_replay_on_calendars_with_idle_gaps(book, s, d, n, call, conc):
    """Stop 61 reads the reservations only as far as a question needs and stops serving them at the first that
    starts with every call free: on calendars spread out enough to have such gaps, the answers are the same."""
    cal = FallbackCalendar()
    for k, (a, span, m, c) in enumerate(book):
        cal.reserve("openai", (float(a), float(a + span), m, float(c)), [f"b{k}-{i}" for i in range(m)], 0.0)
    ask = ("openai", float(s), float(s + d), n, float(call), conc, 0.0)
    assert cal.latest(*ask) == _latest_by_replay(cal, *ask)


def test_latest_serves_only_the_reservations_near_its_own_not_a_day_of_them(monkeypatch):
    """With every request sent at once (``batch_gather_s: 0``) a provider holds a reservation per batch, up to a day
    ahead, and each ask served all of them again: 70 % of the Azure conversation trace's run (stop 61). Those past
    an instant with every call free finish as they would without ours, and are no longer served."""
    import engine.core.fallbacks as fb

    cal = FallbackCalendar()
    for k in range(5):  # a busy minute about ours
        cal.reserve("p", (1_000.0 + 2 * k, 1_100.0, 1, 30.0), [f"a{k}"], 0.0)
    for k in range(2_000):  # and a day of reservations, one at a time, each done before the next begins
        cal.reserve("p", (5_000.0 + 40 * k, 5_060.0 + 40 * k, 1, 30.0), [f"b{k}"], 0.0)
    ask = ("p", 1_005.0, 1_065.0, 1, 30.0, 2, 0.0)
    served, serve = [0], fb._serve

    def counted(*a):
        served[0] += 1
        return serve(*a)
    monkeypatch.setattr(fb, "_serve", counted)
    got = cal.latest(*ask)
    assert served[0] < 50, served[0]
    monkeypatch.setattr(fb, "_serve", serve)
    assert got == _latest_by_replay(cal, *ask)
