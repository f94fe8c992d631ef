"""A second batch before the sync fallback (issue 13, ``second_batch``): ``smart`` cancels a batch that is late
at a checkpoint and sends its members in a fresh batch with the time left, instead of holding on to the last
safe moment and paying the sync price. The batch turnaround's tail is heavy: a batch still out at the
checkpoint is likely to stay out, and a second batch draws a fresh turnaround."""

from __future__ import annotations

import pytest

from engine.core.catalog import default_catalog
from engine.core.draws import Draws
from engine.core.grouping import Group
from engine.core.request import Request
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
FREE = {"min_batch_saving_usd": 0.0}  # a lone request still rides a batch: the rule under test alone


def batch_smart(params: dict | None = None, cat=CAT):
    """Smart with the flex tier off: gpt-5-mini takes OpenAI's flex tier, where smart would send these requests
    at once, and the case here is its batches."""
    return load_policy("smart", cat, {"flex": False, **(params or {})})


def req(i: int, deadline_s: float, arrival_s: float = 0.0) -> Request:
    return Request.model_validate({"id": f"r{i}", "arrival_s": arrival_s, "model": "gpt-5-mini",
                                   "prompt": f"Summarise report {i}.", "input_tokens": 20_000,
                                   "output_tokens": 800, "deadline_s": deadline_s})


class SlowThenFast(Draws):
    """A world where a batch submitted before ``until_s`` takes ``slow_s`` and one submitted later ``fast_s``."""

    def __init__(self, n: int, until_s: float, slow_s: float = 30_000.0, fast_s: float = 300.0):
        super().__init__(n, 4, 0, 60.0)
        self.until_s, self.slow_s, self.fast_s = until_s, slow_s, fast_s

    def turnaround(self, provider, ba, t, world=None):
        return self.slow_s if t < self.until_s else self.fast_s


def one_batch_decision(params: dict, deadline_s: float):
    prov = CAT.providers["openai"]
    g = Group(("batch", (), 0), prov, prov.models["gpt-5-mini"])
    g.add(req(0, deadline_s))
    return batch_smart({**FREE, "batch_gather_s": 0, **params}).decide(g, 0.0)


def test_the_checkpoint_lies_between_two_turnarounds_and_raises_the_chance_of_a_batch():
    ba = CAT.providers["openai"].batch_api
    one = one_batch_decision({"second_batch": False}, 3600.0)
    two = one_batch_decision({}, 3600.0)
    assert one.mode == two.mode == "batch_api"
    # The last safe moment is unchanged; the checkpoint comes before it, with room for a batch on each side.
    assert ba.turnaround_min_s <= two.hedge_at <= one.hedge_at - ba.turnaround_min_s
    p_one = ba.turnaround_cdf(one.hedge_at)
    f = ba.turnaround_cdf(two.hedge_at)
    p_two = f + (1 - f) * ba.turnaround_cdf(one.hedge_at - two.hedge_at)
    assert p_two > p_one + 0.01
    assert f"P(on time)={p_two:.2f}" in two.reason and "second batch" in two.reason
    assert f"P(on time)={p_one:.2f}" in one.reason


@pytest.mark.parametrize("deadline_s", [400.0, 86_400.0 * 3])
def test_no_checkpoint_where_two_batches_do_not_fit_or_one_is_sure(deadline_s):
    """Too little time for two minimal turnarounds, or a deadline a batch cannot miss: one batch, as before."""
    d = one_batch_decision({}, deadline_s)
    off = one_batch_decision({"second_batch": False}, deadline_s)
    assert d.mode == "batch_api" and d == off


def test_a_batch_late_at_its_checkpoint_rides_a_second_batch_and_keeps_the_discount():
    until = 1200.0  # every batch sent before this is late; one sent after comes back in 5 minutes
    res = simulate([req(0, 3600.0)], batch_smart(FREE), draws=SlowThenFast(1, until))
    first, second = res.batches
    assert (first.mode, first.outcome, second.mode, second.outcome) == ("batch_api", "hedged", "batch_api", "sent")
    assert first.t < until <= second.t < 3600.0 - 300.0
    assert res.done_at[0] <= 3600.0
    batch_price = res.cost[0]

    # Without it the same world leaves the request to its last safe moment, then sync at the full price.
    off = simulate([req(0, 3600.0)], batch_smart({**FREE, "second_batch": False}),
                   draws=SlowThenFast(1, until))
    assert [b.mode for b in off.batches] == ["batch_api", "sync"] and off.done_at[0] <= 3600.0
    assert batch_price == pytest.approx(off.cost[0] / 2, rel=1e-9)


def test_a_second_batch_late_too_still_falls_back_to_sync_in_time():
    res = simulate([req(0, 3600.0)], batch_smart(FREE), draws=SlowThenFast(1, 10 ** 9))
    assert [b.mode for b in res.batches][-1] == "sync"
    assert [b.outcome for b in res.batches if b.mode == "batch_api"] == ["hedged"] * (len(res.batches) - 1)
    assert res.done_at[0] <= 3600.0


def test_members_back_from_one_batch_ride_the_second_together_and_apart_from_fresh_requests():
    """The members of a cancelled batch come back in the same second: they are judged together (five cheap
    requests save enough as one batch, not one by one), and fresh arrivals keep their own gathering and their
    own hedge instead of riding along with requests due sooner."""
    until = 1200.0
    back = [req(i, 3600.0) for i in range(5)]
    probe = simulate(back, batch_smart(FREE), draws=SlowThenFast(5, until))
    checkpoint = float(probe.batches[0].reason.split("cancelled at t=")[1].split("s")[0])
    fresh = [req(10 + i, 3600.0, arrival_s=checkpoint - 30.0 + 20.0 * i) for i in range(3)]
    res = simulate(back + fresh, batch_smart(FREE), draws=SlowThenFast(8, until))
    ids = {r.id: i for i, r in enumerate(res.requests)}
    second = {int(res.batch_of[ids[r.id]]) for r in back}
    assert len(second) == 1
    (b,) = [res.batches[k] for k in second]
    assert (b.mode, b.size, b.outcome) == ("batch_api", 5, "sent") and b.t >= checkpoint
    assert not {int(res.batch_of[ids[r.id]]) for r in fresh} & second
    assert res.met.all()


def test_members_back_from_a_batch_are_told_apart_by_the_runtime_not_by_their_age():
    """Whether a request comes back from a batch cancelled late is the runtime's to say (``returned``): a fresh
    request that reached the policy late (a slow replay, a restart) keeps its lane, and a member back from a
    batch is kept out of its lane's arrival rate, which it would inflate for minutes without ever joining."""
    from engine.core.features import compat_key

    pol = batch_smart()
    r = req(0, 3600.0)
    fresh = pol.group_key(r, compat_key(r), 1500.5)
    back = pol.group_key(r, compat_key(r), 1500.5, returned=True)
    assert fresh == pol.group_key(r, compat_key(r), 0.0) and pol.arrival_key(fresh) == fresh
    assert back[2][:2] == ("back", 1500) and pol.arrival_key(back) is None


def test_a_conversations_normal_and_background_turns_back_from_one_batch_ride_the_next_one_together():
    """Fresh, a conversation's turns share a batch across priorities (their band is capped), so their prefix is
    written once; back from a cancelled batch they were banded by the time each had left, so the normal turn and
    the background turn went to two batches, each writing the prefix again (a review: $2.40 on Mooncake's seed 0;
    capped as fresh ones are, smart's mean over seeds 0-11 fell $0.55-0.63)."""
    from engine.core.features import compat_key

    pol = batch_smart()
    blocks = list(range(100, 140))  # 40 shared blocks: a long conversation at Sonnet, cacheable
    normal, background = (Request.model_validate({
        "id": name, "arrival_s": 0.0, "model": "claude-sonnet-4-5", "prompt": name, "input_tokens": 40 * 512 + 300,
        "output_tokens": 200, "prefix_blocks": blocks, "deadline_s": deadline}) for name, deadline in
        (("normal", 3_600.0), ("background", 86_400.0)))
    now = 1_500.5  # both back in the same second, one with ~2,100 s left and one with ~85,000 s
    keys = [pol.group_key(r, compat_key(r), now, returned=True) for r in (normal, background)]
    assert keys[0] == keys[1] and keys[0][2][:2] == ("back", 1500)
    other = normal.model_copy(update={"prefix_blocks": []})  # no shared prefix: still apart by time left
    assert pol.group_key(other, compat_key(other), now, returned=True) != pol.group_key(
        background.model_copy(update={"prefix_blocks": []}), compat_key(other), now, returned=True)


def test_a_lone_member_back_from_its_checkpoint_rides_its_second_batch():
    """The first batch was judged with the chance of two; at the checkpoint the second one is not judged again
    by value of time (a lone cheap request would fail it and go sync, after giving up the first batch's chance
    to end in time: a review's counterexample)."""
    cheap = Request.model_validate({"id": "c", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "c",
                                    "input_tokens": 7_500, "output_tokens": 300, "deadline_s": 3600.0})
    res = simulate([cheap], batch_smart(),
                   draws=SlowThenFast(1, 1200.0))
    first, second = res.batches
    assert "second batch" in first.reason and first.outcome == "hedged"
    assert (second.mode, second.outcome) == ("batch_api", "sent") and res.met.all()


@pytest.mark.parametrize("reserve", ["request", "model_max"])
def test_a_batch_a_budget_holds_past_its_checkpoint_rides_a_second_batch_not_sync(reserve):
    """Held back by a budget until after its checkpoint, a batch's member goes back to the policy as at a hedge
    (``goes_back``) and rides a second batch at half the price, where it went sync at the full price (and
    reserved the full price, under the budget that had held it). The rest of the dispatch reserves first, so
    the policy sees the budget as it is then (under model-max claims a budget still marked as holding work
    back would send the member sync). The live grouper does the same: tests/unit/test_actors.py."""
    from engine.core.budgets import BudgetSettings, BudgetSpec, Throttle
    from engine.core.settings import Settings

    window_s = 1800.0
    capped = {"max_output_tokens": 800}  # what a model-max claim reserves: the cap sent to the provider
    r = req(1, 3600.0, arrival_s=1.0).model_copy(update=capped)
    params = {**FREE, "batch_gather_s": 0}
    d = one_batch_decision(params, 3600.0)
    assert d.mode == "batch_api" and 1.0 + d.hedge_at < window_s  # its checkpoint passes while it is held
    # The first window's budget is nearly spent by an urgent sync call at t=0; the request's batch waits for
    # the next window, which opens past its checkpoint and long before its last hedge.
    urgent = Request.model_validate({"id": "u", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "Now.",
                                     "input_tokens": 40_000, "output_tokens": 100, "max_output_tokens": 100,
                                     "deadline_s": 300.0, "priority": "urgent"})
    budgets = BudgetSettings(specs=(BudgetSpec(max_budget=0.0105, budget_duration="30m"),),
                             throttle=Throttle(pace=False), reserve_output=reserve)
    settings = Settings().model_copy(update={"budgets": budgets})
    res = simulate([urgent, r], batch_smart(params), settings=settings,
                   draws=SlowThenFast(2, 0.0))  # every batch is back in 5 minutes
    ids = {q.id: i for i, q in enumerate(res.requests)}
    i = ids[r.id]
    assert res.extra["budget"]["overrun_usd"] == 0.0 and res.met.all()
    assert res.mode[i] == 1 and window_s <= res.done_at[i] <= 3600.0 + 1.0  # batch_api, in the second window
    (b,) = [b for b in res.batches if b.id == int(res.batch_of[i])]
    assert (b.mode, b.outcome) == ("batch_api", "sent") and b.t >= window_s
    assert res.cost[i] == pytest.approx(simulate([r], load_policy("naive", CAT)).cost[0] / 2, rel=1e-9)


def test_the_members_back_of_a_budget_try_are_decided_once_every_dispatch_of_it_has_reserved(monkeypatch):
    """One budget try releases two held dispatches at once: a batch whose checkpoint passed while it was held
    (its member goes back to the policy) and a sync call, which the budget refuses. The live grouper reserves
    every dispatch of the try in one call before the member back is grouped again, so the policy reads what
    the budget holds after that call (under model-max claims a budget holding work back sends work sync). The
    simulator sent them one by one: the member back was decided before the sync call had reserved, saw nothing
    held, and rode a batch the live grouper never sent (a helper's review, sim and grouper run side by side)."""
    import engine.sim.simulator as sim_mod
    from engine.core.budgets import BudgetSettings, BudgetSpec, Throttle
    from engine.core.settings import Settings

    def mk(i, arrival_s, inp, out, deadline_s, priority="normal", cap=None):
        return Request.model_validate({"id": i, "arrival_s": arrival_s, "model": "gpt-5-mini", "prompt": f"task {i}",
                                       "input_tokens": inp, "output_tokens": out, "max_output_tokens": cap or out,
                                       "deadline_s": deadline_s, "priority": priority})

    reqs = [mk("u", 0.0, 40_000, 100, 30.0, "urgent"),  # spends the first window
            mk("a", 1.0, 40_000, 800, 3600.0),  # a batch, held past its checkpoint
            mk("c", 2.0, 10_000, 10, 5000.0, cap=800),  # sync (the budget holds work back); most of window 2
            mk("b", 3.0, 20_000, 800, 1807.6, "background")]  # sync; refused behind c in window 2
    budgets = BudgetSettings(specs=(BudgetSpec(max_budget=0.0105, budget_duration="30m"),),
                             throttle=Throttle(pace=False))
    seen: list[tuple[float, list[str]]] = []  # what the policy read of the budget when "a" came back
    admit = sim_mod._Sim.admit

    def spy(self, i, fresh):
        if self.reqs[i].id == "a" and not fresh:
            seen.append((self.now, [s.name for s in self.table.budget.holding]))
        return admit(self, i, fresh)

    monkeypatch.setattr(sim_mod._Sim, "admit", spy)
    res = simulate(reqs, batch_smart({**FREE, "batch_gather_s": 0}),
                   settings=Settings().model_copy(update={"budgets": budgets}))
    ids = {q.id: i for i, q in enumerate(res.requests)}
    assert res.status[ids["c"]] == 1 and res.done_at[ids["c"]] >= 1800.0  # c went in the same try
    assert res.status[ids["b"]] == 4  # refused, so the budget holds work back when "a" is decided
    (at, holding), = seen
    assert at >= 1800.0 and holding == ["global/30m"]
    assert res.mode[ids["a"]] != 1  # not the batch the live grouper never sends


def _burst(n: int = 10, spread_s: float = 0.0) -> list[Request]:
    """A batch file's lines (or a ``submit_many``): small requests at one instant, due within a day."""
    return [Request.model_validate({"id": f"line{k}", "arrival_s": k * spread_s, "model": "gpt-5-mini",
                                    "prompt": f"Write a haiku about the number {k}", "input_tokens": 20,
                                    "output_tokens": 256, "deadline_s": 86400.0}) for k in range(n)]


def test_requests_that_arrive_at_one_instant_are_judged_together_and_ride_one_batch():
    """Decided one by one, the first two lines of a ten-line batch file were each judged alone (a saving under
    ``min_batch_saving_usd``) and sent sync at the full price, while the other eight rode a batch (a helper's
    review as a new user). Arrivals of one instant now join their groups before any is decided."""
    res = simulate(_burst(), batch_smart())
    assert list(res.mode) == [1] * 10 and len({int(b) for b in res.batch_of}) == 1
    # A millisecond apart they are separate arrivals: the first is judged alone, as before.
    apart = simulate(_burst(spread_s=0.001), batch_smart())
    assert apart.mode[0] == 0 and apart.total_cost > res.total_cost


def test_members_back_that_each_have_a_chance_are_not_sent_sync_whole_by_one_mismatched_pair():
    """Members back from a cancelled batch share a band by time left. The band's batch was hedged at its earliest
    deadline less its slowest member's sync time: one member due soon beside another with a long answer left it
    no chance, and every member went sync, though each alone still had one (a review: 313 of 330 such members on
    Mooncake seeds 0-3; -$0.07 a seed over seeds 0-11, every deadline met). Each now keeps its own lead."""
    from engine.core.features import compat_key

    pol = batch_smart()
    prov = CAT.providers["openai"]
    now = 3_000.5

    def back(i: int, left_s: float, output_tokens: int) -> Request:
        return Request.model_validate({"id": f"m{i}", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": f"m{i}",
                                       "input_tokens": 30_000, "output_tokens": output_tokens,
                                       "deadline_s": 3_000 + left_s})
    long_answer, due_soon = back(0, 250.0, 2_500), back(1, 200.0, 100)
    key = pol.group_key(long_answer, compat_key(long_answer), now, returned=True)
    assert pol.group_key(due_soon, compat_key(due_soon), now, returned=True) == key  # one band
    g = Group(key, prov, prov.models["gpt-5-mini"])
    for r in (long_answer, due_soon):
        g.add(r, returned=True)
    d = pol.decide(g, now + 1.0)
    c = pol._text_consts(prov, prov.models["gpt-5-mini"], "gpt-5-mini")
    whole = due_soon.deadline_at - pol._hedge_lead(c, long_answer.output_tokens, 2)
    assert prov.batch_api.turnaround_cdf(whole - now) < pol.params.min_on_time_p  # no chance as before
    assert (d.mode, d.take) == ("batch_api", 2)
    assert d.hedge_at == pytest.approx(min(r.deadline_at - pol._hedge_lead(c, r.output_tokens, 2)
                                           for r in (long_answer, due_soon)))
    assert d.hedge_at <= due_soon.deadline_at - pol._hedge_lead(c, due_soon.output_tokens, 2)

    # A leading member with no chance alone goes sync by itself, and the rest is decided again.
    hopeless = back(2, 130.0, 2_500)
    g2 = Group(key, prov, prov.models["gpt-5-mini"])
    for r in (hopeless, long_answer, due_soon):
        g2.add(r, returned=True)
    d2 = pol.decide(g2, now + 1.0)
    assert (d2.mode, d2.take) == ("sync", 1)


def test_members_back_that_ride_on_their_own_chances_fit_one_wave_of_the_providers_calls():
    """Each member back keeps its own lead only while the fallback is one wave of calls: a review built nine
    members back, eight with long answers and one short one due first, at a provider of 4 calls and batches that
    are always late; the short one fell back behind two waves of long calls and was 14 s late where naive met
    it. At most ``max_concurrency`` ride so; the rest are decided again."""
    from engine.core.request import validation_context

    from .helpers import limited_catalog

    cat = limited_catalog("openai", 4, 0.6, 0.012)

    def rq(i, out, deadline):
        return Request.model_validate({"id": i, "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": f"task {i}",
                                       "input_tokens": 50_000, "output_tokens": out, "deadline_s": deadline},
                                      context=validation_context(cat))
    first = 1106.3
    t1 = first - (3 * (0.6 + 0.012 * 2500) + 15) + 0.5
    reqs = [rq("E", 2500, first)] + [rq(f"L{k}", 2500, t1 + 250) for k in range(8)] + [rq("S", 10, t1 + 140)]
    params = {"min_batch_saving_usd": 0.0, "second_batch": False}
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat, draws=SlowThenFast(len(reqs), 1e9))
    smart = simulate(reqs, batch_smart(params, cat), catalog=cat, draws=SlowThenFast(len(reqs), 1e9))
    assert naive.met.all() and smart.met.all()
    assert any("members back" in b.reason for b in smart.batches)  # the path under test ran
