"""Conversation groups (issue 13, ``conversation_groups``, on by default since stop 41): a request with a cacheable prompt prefix gathers with
the requests that start with the same cacheable run (the turns of one conversation), from its own first turn,
instead of with its whole lane. Two requests share a cache read only when they start with the same cacheable
run, so the split loses no sharing; it stops a lane's flush from cutting a conversation in two, which then
writes its prefix twice. Value of time still weighs the whole lane: a conversation alone in a busy lane is no
lone request. The lane's groups due about together ride one provider batch (``ride_s``), so the lane does not send
one provider batch per conversation."""

from __future__ import annotations

import heapq

import pytest

from engine.core.budgets import BudgetSpec
from engine.core.catalog import default_catalog
from engine.core.errors import PolicyError
from engine.core.features import compat_key
from engine.core.request import Request
from engine.runtime.scheduler import GroupTable
from engine.sim.simulator import simulate
from policies import Smart, load_policy

CAT = default_catalog()
CONV = {"conversation_groups": True}
LANES = {"conversation_groups": False}
NO_FLEX = {"flex": False}  # gpt-5-mini takes OpenAI's flex tier: off where its batch lane (or a sync call) is the case


def turn(rid: str, arrival_s: float, blocks: list[int], model: str = "claude-sonnet-4-5",
         deadline_s: float = 86_400.0, output_tokens: int = 300, tenant: str = "default") -> Request:
    return Request.model_validate({"id": rid, "arrival_s": arrival_s, "model": model, "prompt": f"turn {rid}",
                                   "input_tokens": 512 * len(blocks), "output_tokens": output_tokens,
                                   "tenant": tenant, "prefix_blocks": blocks, "deadline_s": deadline_s,
                                   "priority": "background"})


def test_a_lane_flush_no_longer_cuts_a_conversation_in_two():
    lane_flush = simulate([turn("x", 0.0, list(range(100, 110)))], load_policy("smart", CAT)).batches[0].t
    first = turn("a1", lane_flush - 10.0, list(range(10)))
    follow = turn("a2", lane_flush + 60.0, list(range(12)))  # the first turn's prompt, its answer and a new ask
    trace = [turn("x", 0.0, list(range(100, 110))), first, follow]

    res = simulate(trace, load_policy("smart", CAT, CONV))
    batch = {r.id: int(res.batch_of[i]) for i, r in enumerate(res.requests)}
    assert batch["a1"] == batch["a2"] != batch["x"]
    assert res.batches[batch["a1"]].mode == "batch_api"

    lanes = simulate(trace, load_policy("smart", CAT, LANES))  # one group per lane
    by_lane = {r.id: int(lanes.batch_of[i]) for i, r in enumerate(lanes.requests)}
    assert by_lane["a1"] == by_lane["x"] != by_lane["a2"]  # the lane's flush took the first turn alone
    # Together, the follow-up reads the ten blocks its first turn writes; apart, each pays them in full.
    assert res.total_cost < lanes.total_cost


def test_conversations_count_their_arrivals_in_their_lane():
    pol = load_policy("smart", CAT, CONV)
    table = GroupTable(pol, CAT)
    convs = [turn(f"c{i}", float(i), [1000 * i + k for k in range(10)]) for i in range(30)]
    for r in convs:
        table.add(r, compat_key(r), r.arrival_s)
    keys = {pol.group_key(r, compat_key(r), r.arrival_s) for r in convs}
    assert len(keys) == 30 == len(table.groups)  # a group per conversation
    assert len(table.rates) == 1  # ... counted in one lane
    (lane,) = {k[:3] for k in keys}
    assert all(g.rate_key == lane for g in table.groups.values())


def test_a_conversation_alone_in_a_busy_lane_still_rides_a_batch():
    """Thirty one-turn conversations of cheap requests: each saves less than ``min_batch_saving_usd`` alone,
    but the lane's company over their gather is worth it, as when they shared one group."""
    convs = [turn(f"c{i}", float(i), [1000 * i + k for k in range(4)], model="gpt-5-mini") for i in range(30)]
    res = simulate(convs, load_policy("smart", CAT, {**CONV, **NO_FLEX}))
    modes = [res.batches[int(b)].mode for b in res.batch_of]  # each request's dispatch
    assert modes[1:] == ["batch_api"] * 29, {b.reason for b in res.batches if b.mode == "sync"}
    alone = simulate(convs[:1], load_policy("smart", CAT, {**CONV, **NO_FLEX}))
    assert [b.mode for b in alone.batches] == ["sync"] and "min_batch_saving_usd" in alone.batches[0].reason


def _two_turn_conversations(n: int) -> list[Request]:
    """``n`` conversations, one starting every 10 s, each with a follow-up 30 s after its first turn."""
    out = []
    for i in range(n):
        blocks = [1000 * i + k for k in range(10)]
        out += [turn(f"c{i}a", 10.0 * i, blocks), turn(f"c{i}b", 10.0 * i + 30.0, blocks + [1000 * i + 10])]
    return sorted(out, key=lambda r: r.arrival_s)


def test_conversations_due_together_ride_one_provider_batch():
    trace = _two_turn_conversations(40)
    ride = simulate(trace, load_policy("smart", CAT))  # the default: ride_s = 120
    alone = simulate(trace, load_policy("smart", CAT, {"ride_s": 0}))
    split = []
    for res in (ride, alone):
        assert res.met.all()
        of = {r.id: int(res.batch_of[i]) for i, r in enumerate(res.requests)}
        split.append({i for i in range(40) if of[f"c{i}a"] != of[f"c{i}b"]})
        assert len(split[-1]) <= 2  # (a member whose call the seed fails is retried alone)
        assert (res.status == 1).all()  # every request done (status code 1: ok), none lost or failed
    assert split[0] <= split[1]  # riding cuts no conversation in two
    n_ride = sum(b.mode == "batch_api" for b in ride.batches)
    n_alone = sum(b.mode == "batch_api" for b in alone.batches)
    assert n_alone >= 40  # one provider batch per conversation
    # 40 conversations started over 400 s, each due 120 s or less after another's: a few provider batches.
    assert 1 <= n_ride <= 6, [(b.t, b.size) for b in ride.batches]
    assert ride.total_cost <= alone.total_cost + 1e-9


def test_a_group_that_would_hedge_the_batch_sooner_does_not_ride_it():
    """A rider must not cost the members already in the batch their time: one due earlier waits for its own
    batch, and so does one whose long output would bring the hedge forward by more than ``ride_s`` (its sync
    fallback takes longer), while a twin due no earlier, of the same output, rides along."""
    lead = turn("lead", 0.0, list(range(10)))
    early = turn("early", 5.0, list(range(100, 110)), deadline_s=80_000.0)  # due before the lead
    long = turn("long", 5.0, list(range(300, 310)), output_tokens=64_000)  # its fallback takes many minutes
    twin = turn("twin", 5.0, list(range(200, 210)))  # due after it
    res = simulate([lead, early, long, twin], load_policy("smart", CAT))
    of = {r.id: int(res.batch_of[i]) for i, r in enumerate(res.requests)}
    assert of["lead"] == of["twin"] != of["early"] and of["long"] not in (of["lead"], of["early"])
    assert {res.batches[of[k]].mode for k in of} == {"batch_api"}


def test_a_group_a_budget_holds_back_does_not_ride_a_batch():
    """Smart sends work a budget holds back sync (its model-max reservation would stay open for a whole
    turnaround); riding someone else's batch must not smuggle it in."""
    table = GroupTable(load_policy("smart", CAT), CAT)
    a, b = turn("a", 0.0, list(range(10))), turn("b", 1.0, list(range(100, 110)), tenant="held")
    wakes = [table.add(r, compat_key(r), r.arrival_s)[1] for r in (a, b)]
    table.budget.holding = (BudgetSpec(tenant="held", max_budget=1.0),)  # the budget starts holding "held" back
    sent = []
    for w in wakes:
        sent += [(d.decision.mode, [m.id for m in d.members]) for d in table.wake(w, w.at)[0]]
    assert sent == [("batch_api", ["a"]), ("sync", ["b"])]


class _Self(Smart):
    """Names the deciding group itself as its rider."""

    def riders(self, group, others, now):
        return [group]


class _Twice(Smart):
    """Names each of the lane's other groups twice."""

    def riders(self, group, others, now):
        return others + others


@pytest.mark.parametrize("rogue", [_Self, _Twice])
def test_the_runtime_refuses_riders_that_would_send_a_member_twice(rogue):
    table = GroupTable(rogue(CAT), CAT)
    reqs = [turn("a", 0.0, list(range(10))), turn("b", 1.0, list(range(100, 110)))]
    wakes = [table.add(r, compat_key(r), r.arrival_s)[1] for r in reqs]
    with pytest.raises(PolicyError, match="riders"):
        table.wake(wakes[0], wakes[0].at)
    assert list(table.groups) == [wakes[1].group.key]  # the other group stays, whole, to be decided


def test_the_lane_index_forgets_every_group_that_leaves_the_table():
    """A long-running grouper must not keep the groups it sent (riders or not, batch or sync) in its lanes."""
    table = GroupTable(load_policy("smart", CAT, NO_FLEX), CAT)
    cheap = [turn(f"s{i}", 2000.0 * i, [7000 + 100 * i + k for k in range(4)], model="gpt-5-mini")
             for i in range(5)]  # lone and cheap: sent sync at once, never a batch
    trace = sorted(_two_turn_conversations(12) + cheap, key=lambda r: r.arrival_s)
    wakes, sent, indexed = [], [], 0

    def carry_out(ds, nxt):
        sent.extend(m.id for d in ds for m in d.members)
        if nxt:
            heapq.heappush(wakes, (nxt.at, len(sent), id(nxt), nxt))

    def wake_until(t):
        while wakes and wakes[0][0] <= t:
            at, *_, w = heapq.heappop(wakes)
            carry_out(*table.wake(w, at))

    for r in trace:
        wake_until(r.arrival_s)
        carry_out(*table.add(r, compat_key(r), r.arrival_s))
        indexed = max(indexed, sum(len(lane) for lane in table._lanes.values()))
    assert indexed >= 12  # the open conversations are indexed while they gather
    wake_until(float("inf"))
    assert sorted(sent) == sorted(r.id for r in trace)  # each sent once
    assert not table.groups and not table._lanes
