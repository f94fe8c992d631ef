"""Conversation groups (issue 13, ``conversation_groups: true``, off by default): a request with a cacheable prompt prefix gathers with
the requests that start with the same cacheable run (the turns of one conversation), from its own first turn,
instead of with its whole lane. Two requests share a cache read only when they start with the same cacheable
run, so the split loses no sharing; it stops a lane's flush from cutting a conversation in two, which then
writes its prefix twice. Value of time still weighs the whole lane: a conversation alone in a busy lane is no
lone request."""

from __future__ import annotations

from engine.core.catalog import default_catalog
from engine.core.features import compat_key
from engine.core.request import Request
from engine.runtime.scheduler import GroupTable
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
CONV = {"conversation_groups": True}


def turn(rid: str, arrival_s: float, blocks: list[int], model: str = "claude-sonnet-4-5") -> Request:
    return Request.model_validate({"id": rid, "arrival_s": arrival_s, "model": model, "prompt": f"turn {rid}",
                                   "input_tokens": 512 * len(blocks), "output_tokens": 300,
                                   "prefix_blocks": blocks, "deadline_s": 86_400.0, "priority": "background"})


def test_a_lane_flush_no_longer_cuts_a_conversation_in_two():
    lane_flush = simulate([turn("x", 0.0, list(range(100, 110)))], load_policy("smart", CAT)).batches[0].t
    first = turn("a1", lane_flush - 10.0, list(range(10)))
    follow = turn("a2", lane_flush + 60.0, list(range(12)))  # the first turn's prompt, its answer and a new ask
    trace = [turn("x", 0.0, list(range(100, 110))), first, follow]

    res = simulate(trace, load_policy("smart", CAT, CONV))
    batch = {r.id: int(res.batch_of[i]) for i, r in enumerate(res.requests)}
    assert batch["a1"] == batch["a2"] != batch["x"]
    assert res.batches[batch["a1"]].mode == "batch_api"

    lanes = simulate(trace, load_policy("smart", CAT))  # the default: one group per lane
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
    res = simulate(convs, load_policy("smart", CAT, CONV))
    modes = [b.mode for b in res.batches]
    assert modes[1:] == ["batch_api"] * 29, {b.reason for b in res.batches if b.mode == "sync"}
    alone = simulate(convs[:1], load_policy("smart", CAT, CONV))
    assert [b.mode for b in alone.batches] == ["sync"] and "min_batch_saving_usd" in alone.batches[0].reason
