import numpy as np
import pytest

from engine.core.catalog import default_catalog
from engine.core.cost import price_batch
from engine.core.grouping import Decision
from engine.core.request import Request
from engine.core.tracegen import from_azure, from_mooncake, synth
from engine.sim.lower_bound import _cluster_writes, _max_overlap, batch_eligible, lower_bound
from engine.sim.simulator import simulate
from policies import load_policy
from policies.baselines import Naive

from .helpers import KINDS, kind_trace

CAT = default_catalog()
POLICIES = ["naive", "cache-only", "fixed", "batch-all", "smart"]
VARIANTS = [("smart", {"gather_p_loss": 0.2}), ("smart", {"min_on_time_p": 0.0, "hedge_margin_s": 0}),
            ("fixed", {"max_batch_size": 8, "batch_wait_timeout_s": 600}), ("batch-all", {"batch_wait_s": 3600}),
            ("cache-only", {"in_flight": True})]


def _check_no_policy_beats_the_bound(reqs, seed=0):
    lb = lower_bound(reqs, seed=seed)
    naive = None
    for name, params in [(p, {}) for p in POLICIES] + VARIANTS:
        res = simulate(reqs, load_policy(name, CAT, params), seed=seed)
        relaxed = lower_bound(reqs, seed=seed, relax=~res.met)
        assert res.total_cost >= relaxed.total_usd - 1e-9, (name, params, res.total_cost, relaxed.total_usd)
        if res.met.all():
            assert res.total_cost >= lb.total_usd - 1e-9, (name, params)
        if name == "naive":
            naive = res.total_cost
    assert 0 < lb.total_usd <= naive


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_policy_beats_the_bound_on_synthetic_traces(seed):
    _check_no_policy_beats_the_bound(synth(1200, seed=seed, duration_s=1800), seed=seed)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_policy_beats_the_bound_per_provider_kind(kind):
    _check_no_policy_beats_the_bound(kind_trace(kind, n=150, seed=4), seed=4)


def test_no_policy_beats_the_bound_on_real_traces(real_data):
    _check_no_policy_beats_the_bound(from_azure(real_data / "azure_llm_2023_code.csv", limit=1500))
    _check_no_policy_beats_the_bound(from_mooncake(real_data / "mooncake_conversation_trace.jsonl", limit=1500))


def test_bound_is_tight_enough_to_be_useful():
    # smart must be able to get most of the way to it; a loose bound would make this fail
    reqs = synth(1500, seed=3)
    lb = lower_bound(reqs).total_usd
    naive = simulate(reqs, load_policy("naive", CAT)).total_cost
    smart = simulate(reqs, load_policy("smart", CAT)).total_cost
    assert (naive - smart) / (naive - lb) > 0.8


def test_batch_eligibility_matches_brute_force():
    rng = np.random.default_rng(0)
    slot_s = 60.0
    slot_t = rng.uniform(30, 900, size=200)
    a = rng.uniform(0, 6000, size=500)
    d = a + rng.uniform(10, 3000, size=500)
    got = batch_eligible(a, d, slot_t, slot_s)
    for i in range(500):
        want = any(max(a[i], k * slot_s) + slot_t[k] <= d[i] and max(a[i], k * slot_s) <= d[i]
                   for k in range(slot_t.size) if (k + 1) * slot_s > a[i])
        assert got[i] == want, i


def test_max_overlap_matches_brute_force():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 100, 80)
    d = a + rng.uniform(0, 30, 80)
    got = _max_overlap(a, d)
    for i in range(80):
        pts = [x for x in a if a[i] <= x <= d[i]]
        assert got[i] == max(sum(1 for j in range(80) if a[j] <= x <= d[j]) for x in pts)


def test_relaxing_deadlines_never_raises_the_bound():
    reqs = synth(600, seed=9)
    lb = lower_bound(reqs).total_usd
    assert lower_bound(reqs, relax=np.ones(len(reqs), bool)).total_usd <= lb + 1e-12


def test_the_online_bound_prices_a_batch_at_its_chance_of_being_on_time():
    """... over two batches: the first sent at arrival and cancelled at the best checkpoint if still out, then a
    second with the time left (``BatchApi.second_batch``), as smart may try. The checkpoint is searched on a grid:
    a finer search finds at most 0.2 points more."""
    from engine.core.cost import price_alone
    from engine.core.request import Request

    # gpt-4o-mini: no flex tier, whose batch prices would come without a batch's doubt (the test below)
    r = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": "gpt-4o-mini", "input_tokens": 2000,
                                "output_tokens": 500, "deadline_s": 3 * 3600})
    ba = CAT.providers[r.provider].batch_api
    one = ba.turnaround_cdf(r.deadline_s)
    c, p = ba.second_batch(r.deadline_s)
    assert 0.05 < one < p < 0.999  # a deadline that leaves the batch in doubt, and room for a second one
    f = ba.turnaround_cdf(c)
    assert p == pytest.approx(f + (1 - f) * ba.turnaround_cdf(r.deadline_s - c), rel=1e-12)
    assert all(ba.turnaround_cdf(x) + (1 - ba.turnaround_cdf(x)) * ba.turnaround_cdf(r.deadline_s - x) <= p + 2e-3
               for x in np.linspace(ba.turnaround_min_s, r.deadline_s - ba.turnaround_min_s, 200))
    sync, batch = price_alone(r, CAT, "sync").total, price_alone(r, CAT, "batch_api").total
    online = lower_bound([r], online=True)
    assert online.total_usd == pytest.approx(p * batch + (1 - p) * sync, rel=1e-12)
    # Without hindsight it can only cost more than with it, when the drawn turnaround was on time.
    offline = lower_bound([r])
    assert offline.total_usd in (pytest.approx(batch), pytest.approx(sync))


def _without_flex(cat):
    return cat.model_copy(update={"providers": {n: p.model_copy(update={"flex": None})
                                                for n, p in cat.providers.items()}})


def test_the_online_bound_lies_between_the_offline_bound_and_naive():
    # The online bound is an expectation over turnaround draws; the offline bound, one draw's hindsight. A lucky
    # draw can take the offline bound above it on a trace where batches matter little, so: one trace, six draws.
    # Without the flex tier, whose batch prices need no turnaround (the synthetic text is OpenAI's flex models).
    seed, cat = 0, _without_flex(CAT)
    reqs = synth(1200, seed=seed, duration_s=1800)
    online = lower_bound(reqs, catalog=cat, seed=seed, online=True)
    offline = max(lower_bound(reqs, catalog=cat, seed=s).total_usd for s in range(6))
    naive = simulate(reqs, load_policy("naive", cat), catalog=cat, seed=seed).total_cost
    assert offline < online.total_usd < naive
    # With no deadline to meet, a batch is always on time: the two bounds are one.
    free = np.ones(len(reqs), dtype=bool)
    assert lower_bound(reqs, catalog=cat, seed=seed, relax=free, online=True).total_usd == pytest.approx(
        lower_bound(reqs, catalog=cat, seed=seed, relax=free).total_usd, rel=1e-12)
    # With it, a flex model's request is had at batch prices whatever the draws, and the bounds fall.
    assert lower_bound(reqs, seed=seed, online=True).total_usd < online.total_usd


def test_a_flex_model_is_bounded_at_flex_prices_whatever_its_deadline_and_a_model_without_the_tier_is_not():
    from engine.core.cost import price_alone

    def one(model: str, deadline_s: float) -> Request:
        return Request.model_validate({"id": "a", "arrival_s": 0.0, "model": model, "input_tokens": 2000,
                                       "output_tokens": 500, "deadline_s": deadline_s})
    for deadline_s in (30.0, 3 * 3600.0):  # no batch can meet 30 s; a flex call can
        r = one("gpt-5-mini", deadline_s)
        flex = price_alone(r, CAT, "flex").total
        assert flex == pytest.approx(price_alone(r, CAT, "batch_api").total)
        assert flex < price_alone(r, CAT, "sync").total
        for online in (False, True):
            assert lower_bound([r], online=online).total_usd == pytest.approx(flex, rel=1e-12)
    r = one("gpt-4o-mini", 30.0)
    assert lower_bound([r]).total_usd == pytest.approx(price_alone(r, CAT, "sync").total, rel=1e-12)


def test_a_cluster_pays_one_write_or_everyone_plain():
    """Per cluster of chained windows: the cheapest holder's write, or every holder plain, whichever is less."""
    assert _cluster_writes([(0.0, 10.0, 5.0, 2.0)]) == 2.0  # alone: sending it plain beats writing it
    assert _cluster_writes([(0.0, 10.0, 5.0, 2.0), (5.0, 20.0, 6.0, 2.0)]) == 4.0
    assert _cluster_writes([(0.0, 10.0, 5.0, 2.0), (5.0, 20.0, 6.0, 2.0), (19.0, 30.0, 7.0, 2.0)]) == 5.0
    assert _cluster_writes([(0.0, 10.0, 5.0, 2.0), (11.0, 20.0, 5.0, 2.0)]) == 4.0  # two clusters
    assert _cluster_writes([]) == 0.0


def _anthropic(i: int, blocks: list[int]) -> Request:
    return Request.model_validate({"id": f"a{i}", "arrival_s": 0.0, "provider": "anthropic",
                                   "model": "claude-sonnet-4-5", "prompt": f"turn {i}", "deadline_s": 86400.0,
                                   "priority": "background", "input_tokens": 4096, "output_tokens": 100,
                                   "prefix_blocks": blocks})


def test_an_explicit_cache_write_is_charged_at_its_write_price():
    """At Anthropic a block that is read must have been written at 1.25x by someone; alone, it goes plain. The
    bound is exact for the obvious schedules: one batch that writes once and reads once, and a lone request."""
    pair = [_anthropic(0, [1, 2, 3, 4]), _anthropic(1, [1, 2, 3, 4])]
    pair[1] = pair[1].model_copy(update={"prompt": "turn 1 differs"})
    best = sum(p.total for p in price_batch(pair, CAT, "batch_api"))
    assert lower_bound(pair, seed=0).total_usd == pytest.approx(best)
    alone = price_batch(pair[:1], CAT, "batch_api")[0].total
    assert lower_bound(pair[:1], seed=0).total_usd == pytest.approx(alone)


def test_a_read_shorter_than_the_models_minimum_is_no_read():
    """Conversations that share only a 512-token system block, under Sonnet's 1,024-token minimum: no provider
    reads that block alone, so the best schedule (one batch) sends every prompt plain, and so does the bound.
    Before it knew the minimum, it read the shared block for all but one of them."""
    convs = [_anthropic(i, [1, 10 * i + 2, 10 * i + 3, 10 * i + 4]) for i in range(3)]
    best = sum(p.total for p in price_batch(convs, CAT, "batch_api"))
    assert lower_bound(convs, seed=0).total_usd == pytest.approx(best)
    # Two shared blocks reach the minimum: the later turns read them, and the bound follows.
    turns = [_anthropic(i, [1, 2, 10 * i + 3, 10 * i + 4]) for i in range(3)]
    best = sum(p.total for p in price_batch(turns, CAT, "batch_api"))
    assert sum(p.cached_input for p in price_batch(turns, CAT, "batch_api")) > 0
    assert lower_bound(turns, seed=0).total_usd == pytest.approx(best)


def _req(rid: str, t: float, blocks: list[int], tokens: int, priority: str = "background", deadline_s: float = 86400.0,
         prompt: str | None = None, model: tuple[str, str] = ("anthropic", "claude-sonnet-4-5")) -> Request:
    return Request.model_validate({"id": rid, "arrival_s": t, "provider": model[0], "model": model[1],
                                   "prompt": prompt or f"prompt {rid}", "deadline_s": deadline_s, "priority": priority,
                                   "input_tokens": tokens, "output_tokens": 1, "prefix_blocks": blocks})


class _BackgroundBatched(Naive):
    """Background work in one batch of all its members once two wait, the rest sync; never reuses."""

    name = "background-batched"

    def group_key(self, req, compat, now, provider=None, budget=None):
        return req.priority

    def decide(self, group, now):
        if group.members[0].priority != "background":
            return Decision("dispatch", mode="sync")
        return Decision("dispatch", mode="batch_api") if len(group) >= 2 else Decision.wait(None)


def test_a_request_free_by_reuse_can_still_write_for_others():
    """A policy may send an exact duplicate the bound counts free, and its write is read by a later request:
    the bound counts it as a possible writer (a helper's counterexample: $0.008217 paid, bound $0.010260)."""
    gpt = ("openai", "gpt-5")
    first = _req("p", 0.0, list(range(1, 9)), 4096, "urgent", 60.0, prompt="doc", model=gpt)
    again = _req("n", 1000.0, list(range(1, 9)), 4096, prompt="doc", model=gpt)
    later = _req("r", 1400.0, list(range(1, 9)), 4096, "urgent", 60.0, prompt="question", model=gpt)
    company = _req("c", 1000.0, [99], 100, model=gpt)  # makes the background batch
    reqs = [first, again, company, later]
    res = simulate(reqs, _BackgroundBatched(CAT), seed=0)
    assert res.met.all()
    assert res.cost[3] < price_batch([later], CAT, "sync")[0].total  # it read the duplicate's write
    assert lower_bound(reqs, seed=0).exact_free == 1
    assert res.total_cost >= lower_bound(reqs, seed=0).total_usd - 1e-12
    assert res.total_cost >= lower_bound(reqs, seed=0, online=True).total_usd - 1e-12


def test_a_batch_member_warms_only_the_blocks_it_read_or_wrote():
    """A member's blocks past its input, or past what it read and marked, stay cold: only a prefix the provider
    cached is read by later requests (the emulator's caches work this way)."""
    short = _req("x", 0.0, [1, 2, 3, 4, 5, 6], 1100)  # blocks 3-6 lie beyond its 1,100 tokens
    long_ = _req("r", 0.0, [1, 2, 3, 4, 5, 6], 4096)
    prices = price_batch([short, long_], CAT, "batch_api")
    # It wrote 1,100 tokens, in blocks 1-3, and its entry ends at its last whole block (the live body renders a
    # partial block with the tail; docs/simulator.md, "Explicit caches"): the long one reads 1,024, not 3,072.
    assert prices[1].cached_input == pytest.approx(price_batch([long_], CAT, "batch_api")[0].input
                                                   * 0.1 * 2 * 512 / 4096)
    assert sum(p.total for p in prices) >= lower_bound([short, long_], seed=0).total_usd - 1e-12
    # One member reads blocks 1-2 and marks nothing (no later member shares more): blocks 3-4 stay cold for a
    # later urgent request with the same four blocks.
    a, x = _req("a", 0.0, [1, 2], 4096), _req("x", 0.0, [1, 2, 3, 4], 4096)
    r = _req("r", 4100.0, [1, 2, 3, 4], 4096, "urgent", 60.0)
    res = simulate([a, x, r], _BackgroundBatched(CAT), seed=0)
    assert res.met.all()
    assert res.total_cost >= lower_bound([a, x, r], seed=0).total_usd - 1e-12


def test_a_batch_uses_the_cache_when_it_ends_not_when_it_is_sent():
    """A simulated batch runs when it ends, as the emulator runs one that follows an engine's clock: a call made
    while it runs does not read the prefix it writes, and one made after it ended (within the TTL) does.
    Before, its blocks were warm from its submission, and a sync call during its run read them."""
    blocks = [1, 2, 3, 4, 5, 6]
    pair = [_req("a", 0.0, blocks + [7], 4096), _req("b", 0.0, blocks + [8], 4096)]
    ask = _req("q", 30.0, blocks + [9], 4096, "urgent", 60.0)
    alone = price_batch([ask], CAT, "sync")[0].total
    res = simulate(pair + [ask], _BackgroundBatched(CAT), seed=0)
    end = res.done_at[0]
    assert res.met.all() and end > 30.0 + 60.0
    assert res.cost[2] == pytest.approx(alone)  # sent while the batch ran: nothing to read yet
    after = ask.model_copy(update={"arrival_s": end + 10.0})
    res = simulate(pair + [after], _BackgroundBatched(CAT), seed=0)
    assert res.done_at[0] == end and res.met.all()
    assert res.cost[2] < alone  # the batch's prefix, written when it ended, is read


def _gpt_6_trace(seed: int, n: int = 40) -> list[Request]:
    """OpenAI's automatic cache with a write above plain input (1.25x) and a 30-minute TTL, beside gpt-5's 1x and
    5 minutes: four shared prefixes of one to seven blocks, arrivals over 5 minutes to 2.5 hours."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k, fam = int(rng.integers(1, 8)), int(rng.integers(0, 4))
        out.append(Request.model_validate({
            "id": f"g{i}", "arrival_s": float(rng.uniform(0, float(rng.choice([300, 3000, 9000])))),
            "provider": "openai", "model": str(rng.choice(["gpt-6.2-sol", "gpt-6-luna", "gpt-5"], p=[0.6, 0.2, 0.2])),
            "prompt": f"p{i}", "deadline_s": float(rng.choice([30.0, 600.0, 3600.0, 86400.0])),
            "priority": str(rng.choice(["urgent", "normal", "background"])),
            "input_tokens": int(rng.integers(200, 600 * (k + 1))), "output_tokens": int(rng.integers(1, 300)),
            "prefix_blocks": [1000 * fam + j for j in range(k)]}))
    return sorted(out, key=lambda r: r.arrival_s)


@pytest.mark.parametrize("seed", [0, 7])
def test_no_policy_beats_the_bound_where_an_automatic_cache_write_costs_more_than_plain_input(seed):
    _check_no_policy_beats_the_bound(_gpt_6_trace(seed), seed=seed)
