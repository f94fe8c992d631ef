"""The reuse and budget rules, each stated once and checked directly (no "as good as naive" comparisons):

* two prompts that differ only in a number are never near duplicates;
* a claim between the soft and the hard limit is admitted, and the report flags the soft limit as exceeded;
* a request follows an identical (or near-duplicate) request in flight only when that one is due no later
  than it, in both runtimes: the simulator and the cache actor (driven as a plain class, without Ray).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import BudgetController, ResultCache, ResultHub
from actors._types import Job
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim, Throttle
from engine.core.catalog import Catalog, default_catalog
from engine.core.clock import ManualClock
from engine.core.features import NEAR_DIM, featurize_texts, fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.ledger import BudgetBook
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings
from engine.core.similarity import guard_reason
from engine.runtime.reuse import ReuseIndex
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
SMART_THRESHOLD = load_policy("smart", CAT).reuse.near_threshold


# -- the numbers guard -----------------------------------------------------------------------------------------

# Long prompts whose only difference is the number(s): the vectors lie far above the threshold, so only the
# guard stands between them and a wrong hit.
NUMBER_PAIRS = [
    ("Write a short executive summary of the quarterly sales figures and customer churn in region 3",
     "Write a short executive summary of the quarterly sales figures and customer churn in region 7"),
    ("List the top 10 reasons for customer churn in region 12 during 2024, with one example each",
     "List the top 10 reasons for customer churn in region 12 during 2025, with one example each"),
    ("Draw 3 red boats moored in a quiet harbour at dawn, watercolour", "Draw 4 red boats moored in a quiet "
     "harbour at dawn, watercolour"),
    ("Give me a one-page summary of the customer churn in region three",
     "Give me a one-page summary of the customer churn in region seven"),
]


def near_lookup(source: str, query: str, threshold: float = SMART_THRESHOLD):
    """The index's answer for ``query`` with ``source`` stored, and the cosine of the two."""
    vecs = featurize_texts([source, query], dim=NEAR_DIM)
    idx = ReuseIndex(NEAR_DIM)
    idx.add_near("class", vecs[:1], ["src"], [source], [0.0])
    return idx.near("class", vecs[1], query, threshold), float(vecs[0] @ vecs[1])


@pytest.mark.parametrize("a,b", NUMBER_PAIRS)
def test_prompts_that_differ_only_in_a_number_are_never_near_duplicates(a, b):
    reason = guard_reason(a, b)
    assert reason is not None and reason.startswith("numbers differ"), reason
    hit, cosine = near_lookup(a, b)
    assert hit is None, f"served {a!r} for {b!r} (cosine {cosine:.3f})"


def test_the_index_would_serve_these_pairs_but_for_the_numbers_guard():
    """The pairs above are a real test of the guard: above the threshold, and served with the guard off."""
    from engine.core.similarity import Guards

    a, b = NUMBER_PAIRS[0]
    vecs = featurize_texts([a, b], dim=NEAR_DIM)
    assert float(vecs[0] @ vecs[1]) >= SMART_THRESHOLD
    idx = ReuseIndex(NEAR_DIM)
    idx.add_near("class", vecs[:1], ["src"], [a], [0.0])
    assert idx.near("class", vecs[1], b, SMART_THRESHOLD, Guards.of(())) is not None
    assert idx.near("class", vecs[1], b, SMART_THRESHOLD, Guards.of(["numbers"])) is None


_TEMPLATES = [
    "Write a short executive summary of the quarterly sales figures and customer churn in region {}",
    "Render {} identical paper lanterns floating over a calm lake at night",
    "How many calories are in {} grams of cooked brown rice?",
    "Translate the sentence 'the train leaves at {} o'clock' into French",
]
_FORMATS = ["{:d}", "{:,d}", "{:.1f}", "{:.2f}"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_TEMPLATES), st.sampled_from(_FORMATS), st.integers(0, 10**6), st.integers(0, 10**6))
def test_any_two_numbers_make_two_different_prompts(template, fmt, x, y):
    """Whatever the numbers (same count of digits or not, integers, decimals, thousands separators)."""
    a, b = template.format(fmt.format(x if "d" in fmt else x / 7)), template.format(fmt.format(y if "d" in fmt
                                                                                                else y / 7))
    if a == b:
        assert guard_reason(a, b) is None
        return
    assert guard_reason(a, b) is not None, (a, b)
    hit, cosine = near_lookup(a, b)
    assert hit is None, f"served {a!r} for {b!r} (cosine {cosine:.3f})"


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_TEMPLATES),
       st.lists(st.sampled_from("one two three four five six seven eight nine ten twelve twenty hundred".split()),
                min_size=2, max_size=2, unique=True))
def test_number_words_count_as_numbers(template, words):
    a, b = (template.format(w) for w in words)
    assert guard_reason(a, b) is not None, (a, b)


# A shared context of the kind real prompts carry (a document after the ask).
_REPORT = ("The quarterly report covers revenue, costs and hiring across the European and Asian offices. "
           "Revenue rose in every region except the north, where a warehouse fire closed two sites. ") * 3

# Each row: the guard, two prompts that differ only in what it guards, and what the reason must name. Each pair
# is refused by its guard alone and passes all the others, so a broken guard cannot hide behind another one.
GUARD_CASES = [
    ("numbers", "Summarise the churn in region 3 for the board", "Summarise the churn in region 7 for the board",
     ["numbers", "3", "7"]),
    ("negation", "Write a poem about the sea that rhymes", "Write a poem about the sea that doesn't rhyme",
     ["negation"]),
    ("negation", "We mightn't finish the quarterly report today", "We might finish the quarterly report today",
     ["negation"]),  # any word ending in n't
    ("negation", "It is not true that the old bridge is not safe", "It is not true that the old bridge is safe",
     ["negation"]),  # two negations are not one
    ("colours", "Draw a red car parked on a wet street at night", "Draw a blue car parked on a wet street at night",
     ["colours", "red", "blue"]),
    ("entities", "Visit Paris in spring on a budget", "Visit Rome in spring on a budget",
     ["entities", "paris", "rome"]),
    ("entities", "Ship the parcel to the UK by Friday", "Ship the parcel to the US by Friday",
     ["entities", "uk", "us"]),  # acronyms are entities
    ("word_order", "A photo of a dog chasing a cat in the park", "A photo of a cat chasing a dog in the park",
     ["order"]),
    ("qualifiers", "What are the best ways to lose weight?", "What are the best ways to lose weight fast?",
     ["fast"]),
    ("context", "List the risks in the report below.\n" + _REPORT,
     "List the opportunities in the report below.\n" + _REPORT, ["context", "risks", "opportunities"]),
    ("context", "Write a poem about this report:\n" + _REPORT,
     "Write an essay about this report:\n" + _REPORT, ["context", "poem", "essay"]),
    ("contrast", "Sort the customers by signup date in ascending order", "Sort the customers by signup date in "
     "descending order", ["opposites", "ascend", "descend"]),
    ("contrast", "Is it legal to record a call without consent?", "Is it illegal to record a call without consent?",
     ["prefix", "legal", "illegal"]),
    ("contrast", "Draft an email to my landlord about the heating", "Draft an email from my landlord about the "
     "heating", ["direction", "to", "from", "landlord"]),
    ("contrast", "Why did the Roman Empire fall?", "When did the Roman Empire fall?", ["question", "why", "when"]),
]


@pytest.mark.parametrize("guard,a,b,named", GUARD_CASES)
def test_each_guard_refuses_a_pair_that_differs_only_in_what_it_guards(guard, a, b, named):
    from engine.core.similarity import GUARDS, Guards

    for x, y in ((a, b), (b, a)):
        reason = guard_reason(x, y)
        assert reason is not None and all(w in reason for w in named), (reason, named)
        assert guard_reason(x, y, Guards.of([guard])) == reason
        assert guard_reason(x, y, Guards.of([g for g in GUARDS if g != guard])) is None
        assert guard_reason(x, y, Guards.of(())) is None  # with no guard on, nothing is refused


@pytest.mark.parametrize("a,b", [
    ("Can I get a refund for my order", "Can we get a refund for my order"),  # the pronoun I is no entity
    ("Visit PARIS in spring", "Visit Paris in spring"),  # the same entity in other capitals
    ("draw a red car parked on a wet street at night", "draw a red car parked on a damp street at night"),
    ("How do I learn Python quickly?", "How can I learn Python quickly?"),
    ("How do I summarise the report below?\n" + _REPORT, "How can I summarise the report below?\n" + _REPORT),
])
def test_look_alikes_that_change_nothing_guarded_pass_every_guard(a, b):
    assert guard_reason(a, b) is None and guard_reason(b, a) is None


# -- soft and hard limits ------------------------------------------------------------------------------------

def soft_spec(**kw) -> BudgetSpec:
    return BudgetSpec(tenant="acme", max_budget=10.0, soft_budget=5.0, budget_duration="1d", **kw)


def claim(rid: str, amount: float, priority: str = "normal") -> Claim:
    return Claim(rid, "acme", "openai", "gpt-5", priority, amount)


@pytest.mark.parametrize("priority", ["urgent", "normal", "background"])
def test_a_claim_between_the_soft_and_the_hard_limit_is_admitted_and_flagged(priority):
    """The soft limit is an alert, never a limit: spend past it is admitted up to each priority's share of the
    hard limit, and the report says the soft limit was passed."""
    spec = soft_spec()
    book = BudgetBook([spec], Throttle(pace=False))
    th = book.throttle
    amount = (spec.soft_budget + spec.max_budget * th.of(priority)) / 2  # strictly between the two
    assert spec.soft_budget < amount < spec.max_budget * th.of(priority)
    (row,) = book.report(0.0)
    assert row["soft_exceeded"] is False
    (v,) = book.reserve_many([claim("a", amount, priority)], 0.0)
    assert v.ok, v
    book.settle_many([("a", amount)])
    (row,) = book.report(0.0)
    assert row["spent_usd"] == pytest.approx(amount) and row["soft_exceeded"] is True
    assert row["soft_budget"] == spec.soft_budget and row["max_budget"] == spec.max_budget
    # ... and the hard limit still holds.
    (v,) = book.reserve_many([claim("b", spec.max_budget * th.of(priority) - amount + 0.01, priority)], 0.0)
    assert not v.ok


def test_spend_at_the_soft_limit_is_not_flagged_and_one_cent_past_it_is():
    spec = soft_spec()
    book = BudgetBook([spec], Throttle(pace=False))
    assert book.reserve_many([claim("a", spec.soft_budget)], 0.0)[0].ok
    book.settle_many([("a", spec.soft_budget)])
    assert book.report(0.0)[0]["soft_exceeded"] is False  # "alert above this spend"
    assert book.reserve_many([claim("b", 0.01)], 0.0)[0].ok
    book.settle_many([("b", 0.01)])
    assert book.report(0.0)[0]["soft_exceeded"] is True


def test_the_budget_controller_admits_past_the_soft_limit_and_reports_it():
    async def go():
        ctl = BudgetController(BudgetSettings(specs=(soft_spec(),), throttle=Throttle(pace=False)), None,
                               ManualClock(0.0))
        (v,) = await ctl.reserve_many([claim("a", 8.0)])
        assert v.ok
        await ctl.settle_many([("a", 8.0)])
        rep = await ctl.report()
        (row,) = rep["budgets"]
        assert row["soft_exceeded"] is True and row["spent_usd"] == pytest.approx(8.0)
        assert not any(rep["refusals"].values())  # nothing refused
    asyncio.run(go())


def test_the_simulator_spends_past_a_soft_limit_without_refusing_anything():
    """A soft limit far below what the trace costs and a hard limit far above it: nothing is held back."""
    reqs = [Request.model_validate({"id": f"s{i}", "arrival_s": float(i), "model": "gpt-5-mini", "tenant": "acme",
                                    "input_tokens": 2000, "output_tokens": 300, "priority": "urgent",
                                    "deadline_s": 300.0, "max_output_tokens": 300})
            for i in range(40)]
    naive = simulate(reqs, load_policy("naive", CAT)).total_cost
    spec = BudgetSpec(tenant="acme", max_budget=100 * naive, soft_budget=naive / 10)
    s = Settings().model_copy(update={"budgets": BudgetSettings(specs=(spec,), throttle=Throttle(pace=False))})
    res = simulate(reqs, load_policy("naive", CAT), settings=s)
    assert res.summary()["rejected"] == {} and res.extra["budget"]["waits"] == 0
    (window,) = res.extra["budget"]["windows"]
    assert window["spent_usd"] == pytest.approx(naive) and window["soft_exceeded"] is True


# -- the in-flight rule in the simulator ------------------------------------------------------------------------

_HIT = {"none": 0, "exact": 1, "in_flight": 2, "near": 3}


def no_failures(provider: str) -> Catalog:
    raw = CAT.model_dump()
    raw["providers"][provider]["failure_rate"] = 0.0
    return Catalog.model_validate(raw)


def two(model: str, first_deadline: float, second_deadline: float, prompts=("a koi pond at dawn",) * 2,
        reuse: str = "exact") -> list[Request]:
    """The same (or a near-duplicate) prompt twice: the second one second later."""
    return [Request.model_validate({"id": f"q{k}", "arrival_s": float(k), "model": model, "prompt": prompts[k],
                                    "deadline_s": d, "reuse": reuse})
            for k, d in enumerate((first_deadline, second_deadline))]


# (model, why the first request is still in flight when the second arrives)
IN_FLIGHT_CASES = {
    "sent": "imagen-4",  # sent at once, generating for seconds
    "pending": "flux-1-dev",  # held by the policy gathering a GPU batch until its latest safe start
}


@pytest.mark.parametrize("case", sorted(IN_FLIGHT_CASES))
def test_in_the_simulator_a_request_follows_an_identical_one_due_no_later(case):
    model = IN_FLIGHT_CASES[case]
    cat = no_failures(CAT.find_model(model)[0])
    for second_deadline in (3600.0, 7200.0):  # due at 3601 and 7201, the first at 3600: it may follow
        res = simulate(two(model, 3600.0, second_deadline), load_policy("smart", cat), catalog=cat)
        assert res.hit[1] == _HIT["in_flight"] and res.cost[1] == 0.0
        assert res.done_at[1] == res.done_at[0] and res.met.all()


def test_in_the_simulator_a_request_without_a_batch_lever_follows_one_due_later_until_its_release_time():
    """Images have no batch-API lever: the copy due first waits for the first's result, which comes long before
    its release time (its deadline minus twice its own call's p99 and ``in_flight_margin_s``). With the margin
    off it never follows one due later (the rule on deadlines alone), and neither when it is due too soon to
    wait."""
    model, case = IN_FLIGHT_CASES["sent"], "sent"
    cat = no_failures(CAT.find_model(model)[0])
    off = load_policy("smart", cat, {"in_flight_margin_s": None})
    for second_deadline in (300.0, 3598.0):  # due at 301 and 3599, the first at 3600
        reqs = two(model, 3600.0, second_deadline)
        res = simulate(reqs, load_policy("smart", cat), catalog=cat)
        assert res.hit[1] == _HIT["in_flight"] and res.cost[1] == 0.0 and res.done_at[1] == res.done_at[0]
        assert res.met.all()
        res = simulate(reqs, off, catalog=cat)
        assert res.hit[1] == _HIT["none"] and res.cost[1] > 0.0 and res.met.all(), f"followed ({case})"
    res = simulate(two(model, 3600.0, 60.0), load_policy("smart", cat), catalog=cat)  # lead > 60 s: no time
    assert res.hit[1] == _HIT["none"] and res.cost[1] > 0.0 and res.met.all()


@pytest.mark.parametrize("model", ["gpt-5-mini", IN_FLIGHT_CASES["pending"]])
def test_in_the_simulator_a_request_with_a_batch_or_gpu_lane_never_follows_one_due_later(model):
    """Text at OpenAI: sent on its own late, it would lose the discount of its own batch (here both go sync at
    once, a lone request's batch being worth no wait). A GPU-priced image: released late, it would join a lane
    whose backlog no release time sees. Both keep the rule on deadlines alone."""
    cat = no_failures(CAT.find_model(model)[0])
    for second_deadline in (300.0, 3598.0):
        res = simulate(two(model, 3600.0, second_deadline), load_policy("smart", cat), catalog=cat)
        assert res.hit[1] == _HIT["none"] and res.cost[1] > 0.0 and res.met.all()


NEAR_PAIR = ("Draw a red car parked on a wet street at night", "draw a red car parked on a wet street at night.")


def test_in_the_simulator_a_near_duplicate_follows_a_source_in_flight_under_the_in_flight_rule():
    cat = no_failures("google")
    for second in (900.0, 300.0):  # due after the source, and before it (under a release time: an image)
        follows = simulate(two("imagen-4", 600.0, second, NEAR_PAIR, "near"), load_policy("smart", cat), catalog=cat)
        assert follows.hit[1] == _HIT["near"] and follows.done_at[1] == follows.done_at[0]
        assert follows.done_at[0] > 1.0  # the source was still in flight when the near duplicate arrived
    off = load_policy("smart", cat, {"in_flight_margin_s": None})
    alone = simulate(two("imagen-4", 600.0, 300.0, NEAR_PAIR, "near"), off, catalog=cat)
    assert alone.hit[1] == _HIT["none"] and alone.cost[1] > 0.0 and alone.met.all()


# -- the in-flight rule in the cache actor (a plain class, no Ray) ------------------------------------------

NEAR = ReuseSettings(exact=True, in_flight=True, near=True, near_threshold=SMART_THRESHOLD)


def job(i: int, prompt: str, deadline_s: float, reuse: str = "near") -> Job:
    r = Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "imagen-4", "prompt": prompt,
                                "tenant": "acme", "reuse": reuse, "deadline_s": deadline_s})
    return Job(i, r, fingerprint(r))


def make_cache(tmp_path) -> tuple[ResultHub, ResultCache]:
    hub = ResultHub()
    settings = Settings().model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")})
    return hub, ResultCache(NEAR, hub, ManualClock(0.0), settings=settings)


def done(j: Job) -> tuple[str, Result]:
    return (j.fp, Result(id=j.req.id, tenant=j.req.tenant, status="ok", output="img://out", cost_usd=0.04, mode="sync",
                         provider=j.req.provider, model=j.req.model, done_s=8.0))


@pytest.mark.parametrize("reuse,second,hit", [("exact", NEAR_PAIR[0], "in_flight"), ("near", NEAR_PAIR[1], "near")])
@pytest.mark.parametrize("deadline_s,follows", [(300.0, False), (599.0, False), (600.0, True), (900.0, True)])
def test_in_the_cache_a_request_follows_one_in_flight_only_if_it_is_due_no_later(tmp_path, reuse, second, hit,
                                                                                 deadline_s, follows):
    """Across lookups: the leader (due at 600 s) is generating when the other is looked up."""
    async def go():
        hub, cache = make_cache(tmp_path)
        leader = job(0, NEAR_PAIR[0], 600.0, reuse)
        assert await cache.lookup([leader]) == [0]
        other = job(1, second, deadline_s, reuse)
        assert await cache.lookup([other]) == ([] if follows else [0])
        assert await hub.pull(0.01) == []  # nothing is served before the leader is done
        await cache.complete([done(leader)])
        got = await hub.pull(0.01)
        if follows:
            (res,) = got
            assert (res.id, res.hit, res.done_s, res.cost_usd) == ("r1", hit, 8.0, 0.0)
        else:
            assert got == [] and cache.stats["in_flight"] == cache.stats["near"] == 0
    asyncio.run(go())


def test_in_the_cache_near_duplicates_in_one_lookup_follow_only_one_due_no_later(tmp_path):
    """Within one lookup batch the earlier near duplicate leads, and a later one follows it only if the leader
    is due no later."""
    async def go(first_deadline, second_deadline):
        hub, cache = make_cache(tmp_path)
        a, b = job(0, NEAR_PAIR[0], first_deadline), job(1, NEAR_PAIR[1], second_deadline)
        return await cache.lookup([a, b])

    assert asyncio.run(go(600.0, 900.0)) == [0]  # b follows a
    assert asyncio.run(go(600.0, 600.0)) == [0]
    assert asyncio.run(go(600.0, 300.0)) == [0, 1]  # b is due first: both are generated


def test_the_near_pair_is_a_near_duplicate_and_not_an_exact_one():
    a, b = job(0, NEAR_PAIR[0], 600.0), job(1, NEAR_PAIR[1], 600.0)
    assert a.fp != b.fp and guard_reason(*NEAR_PAIR) is None
    vecs = featurize_texts(list(NEAR_PAIR), dim=NEAR_DIM)
    assert float(np.dot(vecs[0], vecs[1])) >= SMART_THRESHOLD
