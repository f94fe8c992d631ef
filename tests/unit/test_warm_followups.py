"""Warm follow-ups (policies/_text.py): a request the batch lane would take goes sync at once when its prompt
prefix is believed warm at the provider and reading it costs less than the batch is expected to. The belief
(``PrefixWarmth``) comes from the runtime's own results; the simulator feeds it as the live dispatchers do."""

from __future__ import annotations

import pytest

from engine.core.catalog import Catalog, default_catalog
from engine.core.cost import price_alone
from engine.core.grouping import PrefixWarmth, WarmNote
from engine.core.request import Request
from engine.core.settings import Settings
from engine.sim.simulator import MODES, simulate
from policies import Smart, SmartParams
from policies._text import warm_sync_pays

PREFIX = list(range(100, 120))  # 20 blocks of 512 tokens: a long conversation so far


def _cat() -> Catalog:
    raw = default_catalog().model_dump()
    for p in raw["providers"].values():
        p["failure_rate"] = 0.0
    return Catalog.model_validate(raw)


def _smart(cat: Catalog, policy: type[Smart] = Smart, **params) -> Smart:
    """``smart`` with the flex tier off (``flex: False``): a warm follow-up is a turn the batch lane would take, and
    a gpt-5 turn whose deadline leaves room goes to the flex tier before that lane is weighed."""
    return policy(cat, SmartParams(flex=False, **params))


def _turn(i: int, at: float, blocks: list[int], deadline_s: float, model: str = "gpt-5") -> Request:
    return Request.model_validate({"id": f"t{i}", "arrival_s": at, "model": model, "prompt": f"turn {i}",
                                   "input_tokens": len(blocks) * 512 + 300, "output_tokens": 200,
                                   "prefix_blocks": blocks, "deadline_s": deadline_s})


def test_the_belief_counts_leading_warm_blocks_per_model_and_forgets_cold_ones():
    w = PrefixWarmth(sweep_s=10.0)
    w.see([WarmNote("openai", "gpt-5", (1, 2, 3), 100.0), WarmNote("openai", "gpt-5", (1, 2), 200.0)], now=0.0)
    assert w.leading("openai", "gpt-5", [1, 2, 3, 4], 50.0) == (3, 100.0)  # all three warm until 100
    assert w.leading("openai", "gpt-5", [1, 2, 3, 4], 150.0) == (2, 200.0)  # block 3 cold by then: ends there
    assert w.leading("openai", "gpt-5", [9, 1, 2], 50.0) == (0, 50.0)  # read from its first block only
    assert w.leading("openai", "gpt-5-mini", [1, 2], 50.0)[0] == 0  # another model's cache
    assert w.leading("anthropic", "gpt-5", [1, 2], 50.0)[0] == 0
    w.see([], now=150.0)  # a sweep: block 3 went cold at 100
    assert len(w) == 2
    w.see([], now=250.0)
    assert len(w) == 0


def test_a_warm_long_prefix_pays_and_a_cold_or_soon_cold_one_does_not():
    cat = _cat()
    ba = cat.providers["openai"].batch_api
    req = _turn(1, 0.0, PREFIX + [7, 8], 3600.0)
    w = PrefixWarmth()
    assert warm_sync_pays(cat, req, ba, 0.9, w, 0.0, 10.0, 512) == 0  # nothing believed warm
    w.see([WarmNote("openai", "gpt-5", tuple(PREFIX), 300.0)], now=0.0)
    assert warm_sync_pays(cat, req, ba, 0.9, w, 0.0, 10.0, 512) == len(PREFIX)
    assert warm_sync_pays(cat, req, ba, 0.9, w, 295.0, 10.0, 512) == 0  # cold before the call could start
    short = _turn(2, 0.0, PREFIX[:3] + list(range(500, 520)), 3600.0)  # most of its prompt is new
    assert warm_sync_pays(cat, short, ba, 0.9, w, 0.0, 10.0, 512) == 0  # the batch's 50 % off the rest wins
    # A batch that surely ends while the prefix is warm reads it too, at half the sync read price.
    fast = ba.model_copy(update={"turnaround_min_s": 1.0, "turnaround_median_s": 2.0, "turnaround_p95_s": 3.0})
    assert warm_sync_pays(cat, req, fast, 0.9, w, 0.0, 10.0, 512) == 0


def test_smart_routes_a_warm_follow_up_to_a_sync_call_that_writes_its_turn():
    cat = _cat()
    req = _turn(1, 0.0, PREFIX + [7, 8], 3600.0)
    w = PrefixWarmth()
    w.see([WarmNote("openai", "gpt-5", tuple(PREFIX), 300.0)], now=0.0)
    pol = _smart(cat)
    key = pol.group_key(req, ("c",), 0.0, warmth=w)
    assert key == ("sync", req.uid, "warm")
    assert pol.group_key(req, ("c",), 0.0, warmth=PrefixWarmth())[0] == "batch"
    assert _smart(cat, warm_margin_s=None).group_key(req, ("c",), 0.0, warmth=w)[0] == "batch"
    # The tier on: due in more than a batch's median turnaround, it takes the warm lane as before (and is then
    # called at the flex tier, ``as_flex``); with every request sent flex at arrival, it goes there at once.
    assert Smart(cat).group_key(req, ("c",), 0.0, warmth=w) == key
    assert Smart(cat, {"flex_now_s": 1e9}).group_key(req, ("c",), 0.0, warmth=w)[0] == "flex"
    from engine.runtime.scheduler import GroupTable

    table = GroupTable(pol, cat)
    table.warm([WarmNote("openai", "gpt-5", tuple(PREFIX), 300.0)], 0.0)
    (d,), wake = table.add(req, ("c",), 0.0)
    assert wake is None and d.decision.mode == "sync" and d.decision.cache_write
    assert "warm" in d.decision.reason


@pytest.mark.parametrize("first", ["sync", "batch_api"])
def test_in_the_simulator_a_follow_up_reads_what_its_first_turn_left_warm(first):
    """The first turn goes sync (urgent) or in a batch (in a world 100x faster than the catalog says, so it
    ends within the TTL of its submission); the follow-up, due in an hour, comes while that prefix is believed
    warm: it is sent at once and reads it, for less than a cold batch and in seconds. Off (``warm_margin_s:
    None``), it waits for a batch."""
    cat = _cat()
    settings = Settings.model_validate({"sim": {"turnaround_scale": 0.01}})
    reqs = [_turn(1, 0.0, PREFIX, 200.0 if first == "sync" else 3600.0), _turn(2, 150.0, PREFIX + [7, 8], 3600.0)]
    base = {"batch_gather_s": 0.0}
    on = simulate(reqs, _smart(cat, **base), catalog=cat, settings=settings, seed=3)
    off = simulate(reqs, _smart(cat, warm_margin_s=None, **base), catalog=cat, settings=settings, seed=3)
    assert MODES[on.mode[0]] == first and MODES[off.mode[0]] == first and on.done_at[0] < reqs[1].arrival_s
    assert MODES[on.mode[1]] == "sync" and MODES[off.mode[1]] == "batch_api"
    assert any("warm at the provider" in b.reason for b in on.batches)
    assert on.cost[1] == pytest.approx(price_alone(reqs[1], cat, "sync", warm_blocks=len(PREFIX), write=True).total)
    assert on.cost[1] < price_alone(reqs[1], cat, "batch_api").total
    assert on.done_at[1] < off.done_at[1] and on.done_at[1] <= reqs[1].deadline_at
    assert on.cost[0] == pytest.approx(off.cost[0])  # the first turn is the same either way
    # With the flex tier on and every request sent flex at arrival, both turns go flex at once, and the follow-up
    # reads there what its first turn left warm; by default the first turn rides as above and the warm follow-up
    # is called at the flex tier.
    flex = simulate(reqs, Smart(cat, SmartParams(**base, flex_now_s=1e9)), catalog=cat, settings=settings, seed=3)
    assert [MODES[m] for m in flex.mode] == ["flex", "flex"] and flex.done_at[0] < reqs[1].arrival_s
    assert flex.cost[1] == pytest.approx(price_alone(reqs[1], cat, "flex", warm_blocks=len(PREFIX)).total)
    auto = simulate(reqs, Smart(cat, SmartParams(**base)), catalog=cat, settings=settings, seed=3)
    assert MODES[auto.mode[0]] == ("flex" if first == "sync" else first) and MODES[auto.mode[1]] == "flex"
    assert auto.cost[1] == pytest.approx(price_alone(reqs[1], cat, "flex", warm_blocks=len(PREFIX), write=True).total)
    assert flex.cost[1] < price_alone(reqs[1], cat, "flex").total


def test_a_batch_member_is_believed_warm_only_until_a_ttl_after_its_batch_was_submitted():
    """Members run somewhere between a batch's submission and its end: a follow-up coming later than one TTL
    after the submission is not sent sync on that belief, even though the simulator's batch ran at its end and
    left the prefix warm."""
    cat = _cat()
    settings = Settings.model_validate({"sim": {"turnaround_scale": 0.2}})
    reqs = [_turn(1, 0.0, PREFIX, 3600.0), _turn(2, 320.0, PREFIX + [7, 8], 3600.0)]
    res = simulate(reqs, _smart(cat, batch_gather_s=0.0), catalog=cat, settings=settings, seed=3)
    assert MODES[res.mode[0]] == "batch_api" and res.done_at[0] < reqs[1].arrival_s
    assert MODES[res.mode[1]] == "batch_api"
    assert not any("warm at the provider" in b.reason for b in res.batches)


def test_a_request_named_warm_that_goes_sync_for_its_deadline_is_no_warm_follow_up():
    """A plain sync key ends with the request's id: an urgent request whose id is "warm", with nothing warm,
    is sent sync for its deadline, neither marked for a cache write it was not chosen for nor told it is warm."""
    from engine.runtime.scheduler import GroupTable

    cat = _cat()
    req = _turn(1, 0.0, PREFIX, 30.0, model="claude-sonnet-4-5").model_copy(update={"id": "warm"})
    table = GroupTable(Smart(cat), cat)
    (d,), _ = table.add(req, ("c",), 0.0)
    assert d.decision.mode == "sync" and not d.decision.cache_write
    assert "deadline too close" in d.decision.reason and "warm at the provider" not in d.decision.reason


def test_an_explicit_cache_is_read_only_up_to_where_an_entry_ends():
    """An explicit cache (Anthropic) holds exact prefixes that end at a breakpoint: a request sharing 6 of the
    10 blocks a call cached reads nothing there (a review measured it on the emulator: nothing read, 6,144
    tokens written), while one that extends all 10 reads them; an automatic cache is read block by block."""
    w = PrefixWarmth()
    w.see([WarmNote("anthropic", "claude-sonnet-4-5", tuple(range(10)), 300.0)], now=0.0)
    part = list(range(6)) + [50, 51]
    longer = list(range(10)) + [50, 51]
    assert w.leading("anthropic", "claude-sonnet-4-5", part, 10.0) == (6, 300.0)
    assert w.leading("anthropic", "claude-sonnet-4-5", part, 10.0, exact=True) == (0, 10.0)
    assert w.leading("anthropic", "claude-sonnet-4-5", longer, 10.0, exact=True) == (10, 300.0)
    w.see([WarmNote("anthropic", "claude-sonnet-4-5", tuple(range(4)), 200.0)], now=0.0)  # an entry at 4
    assert w.leading("anthropic", "claude-sonnet-4-5", part, 10.0, exact=True) == (4, 200.0)
    # The policy asks for the exact run at an explicit cache only: a request sharing 14 of 20 cached blocks is
    # sent warm at OpenAI (automatic, read block by block) and not at Anthropic.
    cat, shared = _cat(), tuple(range(100, 120))
    for provider, model in (("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-5")):
        w = PrefixWarmth()
        w.see([WarmNote(provider, model, shared, 300.0)], now=0.0)
        req = _turn(2, 0.0, list(shared[:14]) + [7], 3600.0, model=model)
        n = warm_sync_pays(cat, req, cat.providers[provider].batch_api, 0.9, w, 0.0, 10.0, 512)
        assert n == (0 if provider == "anthropic" else 14)


def test_a_note_ends_at_the_last_whole_block_which_the_next_turn_shares():
    """A trace's last prefix block is usually partial (its id is the turn's own); the next turn of the
    conversation shares every whole block before it. The note leaves the partial one out, so the entry it
    records ends where the next turn can read it (the live Anthropic body sends the partial block with the
    rest of the prompt)."""
    turn = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": "claude-sonnet-4-5", "prompt": "x",
                                   "input_tokens": 5 * 512 + 200, "output_tokens": 10,
                                   "prefix_blocks": [1, 2, 3, 4, 5, 99]})
    note = WarmNote.of(turn, 6, 10.0, 300.0, 512)
    assert note.blocks == (1, 2, 3, 4, 5) and note.until == 310.0
    w = PrefixWarmth()
    w.see([note], now=10.0)
    assert w.leading("anthropic", "claude-sonnet-4-5", [1, 2, 3, 4, 5, 6, 7], 20.0, exact=True)[0] == 5


def test_a_provider_with_a_batch_api_and_no_prompt_cache_sends_nothing_warm():
    """A catalog may declare a batch API without a prompt cache (an overlay's provider): nothing is read warm
    there, and a request with prefix blocks still goes to the batch lane (before, ``warm_sync_pays`` read
    ``prompt_cache.automatic`` of None and the policy raised on every such request)."""
    raw = _cat().model_dump()
    raw["providers"]["openai"]["prompt_cache"] = None
    cat = Catalog.model_validate(raw)
    req = _turn(1, 0.0, PREFIX + [7, 8], 3600.0)
    w = PrefixWarmth()
    w.see([WarmNote("openai", "gpt-5", tuple(PREFIX), 300.0)], now=0.0)
    assert warm_sync_pays(cat, req, cat.providers["openai"].batch_api, 0.9, w, 0.0, 10.0, 512) == 0
    assert _smart(cat).group_key(req, ("c",), 0.0, warmth=w)[0] == "batch"
