"""Rate gates, retries, circuit breaking and fair scheduling: as units and through the simulator."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.catalog import Catalog, RateLimits, default_catalog
from engine.core.errors import ConfigError
from engine.core.request import Request, validation_context
from engine.core.resilience import CircuitBreaker, Resilience, retry_delay
from engine.core.scheduling import FairQueue, Scheduling, Unit
from engine.core.settings import Settings
from engine.runtime.ratelimit import EnqueuedTokens, RateGate
from engine.sim.simulator import simulate
from policies import load_policy

# Providers count requests and tokens per minute over a sliding minute. Stated here, not imported from the
# module under test: a test that reads the window from the gate would check the gate against itself.
MINUTE_S = 60.0


def catalog_with(provider="openai", **update) -> Catalog:
    """The default catalog with one provider's fields replaced (models: {name: {field: value}} merged)."""
    base = default_catalog().model_dump()
    models = update.pop("models", {})
    base["providers"][provider].update(update)
    for name, fields in models.items():
        base["providers"][provider]["models"][name].update(fields)
    return Catalog.model_validate(base)


def assert_within_limits(history, rl: RateLimits):
    """No window [x, x + MINUTE_S) holds more than rpm starts or tpm tokens; never more than max_concurrency
    calls run at once."""
    assert history, "no call was recorded"
    starts = np.array([h[0] for h in history])
    assert np.all(np.diff(starts) >= 0)
    tokens = np.minimum(np.array([h[1] for h in history], dtype=float), rl.tpm)
    ends = np.array([h[2] for h in history])
    upto = np.searchsorted(starts, starts + MINUTE_S, side="left")  # the window opening at each start
    counts = upto - np.arange(len(starts))
    csum = np.concatenate([[0.0], np.cumsum(tokens)])
    window_tokens = csum[upto] - csum[np.arange(len(starts))]
    assert counts.max() <= rl.rpm, f"{counts.max()} requests in one minute, limit {rl.rpm}"
    assert window_tokens.max() <= rl.tpm + 1e-6, f"{window_tokens.max()} tokens in one minute, limit {rl.tpm}"
    events = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends], key=lambda x: (x[0], x[1]))
    running = np.cumsum([d for _, d in events])
    assert running.max() <= rl.max_concurrency
    return counts.max(), window_tokens.max()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(0, 3000), st.floats(0.01, 30)), min_size=1, max_size=300))
def test_the_gate_never_lets_a_sliding_minute_pass_its_limits(calls):
    rl = RateLimits(rpm=20, tpm=10_000, max_concurrency=3)
    gate, t, history = RateGate(rl, history=[]), 0.0, None
    for gap, tok, dur in calls:
        t += gap
        s = gate.earliest(t, tok)
        assert s >= t
        gate.take(s, tok, dur)
    history = gate.history
    assert_within_limits(history, rl)


@pytest.mark.parametrize("rpm,tpm,tokens", [(20, 10**9, 1), (10**6, 30_000, 10_000)])
def test_the_call_past_a_minutes_quota_starts_a_minute_after_the_first(rpm, tpm, tokens):
    """Calls all ready at t=0: the quota (rpm calls, or tpm tokens) starts within the first minute, the next
    call exactly when the first leaves the sliding minute (60 s, not sooner and not later), and the quota after
    that a minute later again."""
    quota = min(rpm, tpm // tokens)
    gate = RateGate(RateLimits(rpm=rpm, tpm=tpm, max_concurrency=10_000), history=[])
    for _ in range(2 * quota + 1):
        gate.take(gate.earliest(0.0, tokens), tokens, 0.01)
    starts = [h[0] for h in gate.history]
    assert starts[0] == 0.0 and starts[quota - 1] < MINUTE_S
    assert starts[quota] == starts[0] + MINUTE_S
    assert starts[2 * quota - 1] < 2 * MINUTE_S and starts[2 * quota] == starts[quota] + MINUTE_S


def test_a_burst_of_10000_requests_never_exceeds_a_limit_in_any_minute():
    """Per provider and per model (gpt-4o-mini has limits of its own here), through the simulator."""
    cat = catalog_with(rate_limits={"rpm": 3000, "tpm": 1_500_000, "max_concurrency": 400},
                       models={"gpt-4o-mini": {"rate_limits": {"rpm": 500, "tpm": 200_000, "max_concurrency": 100}}})
    rng = np.random.default_rng(4)
    ctx = validation_context(cat, Settings())
    reqs = [Request.model_validate({
        "id": f"b{i}", "arrival_s": float(rng.uniform(0, 10)), "model": str(rng.choice(["gpt-5-mini", "gpt-4o-mini"],
                                                                                      p=[0.8, 0.2])),
        "input_tokens": int(rng.integers(100, 1500)), "output_tokens": int(rng.integers(20, 400)),
        "priority": str(rng.choice(["urgent", "normal", "background"])), "deadline_s": 120.0,
        "prompt": f"burst {i}"}, context=ctx) for i in range(10_000)]
    for policy in ("naive", "smart"):
        res = simulate(reqs, load_policy(policy, cat), catalog=cat, record_calls=True)
        calls = res.extra["calls"]["openai"]
        provider_peak = assert_within_limits(calls[None], cat.providers["openai"].rate_limits)
        model_peak = assert_within_limits(calls["gpt-4o-mini"], cat.providers["openai"].models["gpt-4o-mini"].rate_limits)
        # The limits were what held the burst back: each gate ran at its limit.
        assert provider_peak[0] == 3000 or provider_peak[1] > 0.95 * 1_500_000
        assert model_peak[0] == 500 or model_peak[1] > 0.95 * 200_000
        assert res.summary()["completed"] + res.summary()["failed"] == len(reqs)


def test_batches_wait_for_the_enqueued_token_limit():
    q = EnqueuedTokens(1000)
    assert q.earliest(0, 600) == 0
    q.take(0, 600, 50)
    assert q.earliest(1, 600) == 50  # waits until the first batch ends
    q.take(50, 600, 80)
    assert q.held == 600


def test_retry_after_is_honoured_and_backoff_is_jittered_and_capped():
    assert retry_delay(1, 1.0, 60.0, 0.3, retry_after_s=12.0) == 12.0
    assert retry_delay(3, 1.0, 60.0, 0.0) == 2.0 and retry_delay(3, 1.0, 60.0, 1.0) == 4.0
    assert retry_delay(20, 1.0, 60.0, 1.0) == 60.0


def test_the_circuit_opens_after_allowed_fails_and_closes_after_the_cooldown():
    b = CircuitBreaker(allowed_fails=3, window_s=60, cooldown_s=30)
    b.failure("m", 0)
    b.failure("m", 61)  # the first one has left the window
    b.failure("m", 62)
    assert b.open_until("m", 62) is None
    b.failure("m", 63)
    assert b.open_until("m", 70) == 93 and b.open_until("other", 70) is None
    assert b.open_until("m", 93) is None and b.opened == 1


def test_fallbacks_are_checked_against_the_catalog():
    with pytest.raises(ValueError, match="provider/model"):
        Resilience(fallbacks={"gpt-5": "anthropic/claude-haiku-4-5"})
    bad = Settings(resilience=Resilience(fallbacks={"openai/gpt-5": "openai/gpt-image-1"}))
    with pytest.raises(ConfigError, match="text models cannot fall back to image models"):
        simulate([], load_policy("naive", default_catalog()), settings=bad)


def failing_trace(cat, n=400):
    ctx = validation_context(cat, Settings())
    return [Request.model_validate({"id": f"f{i}", "arrival_s": i * 0.5, "model": "gpt-5-mini", "input_tokens": 500,
                                    "output_tokens": 100, "priority": "urgent", "deadline_s": 600.0},
                                   context=ctx) for i in range(n)]


def test_a_failing_model_opens_its_circuit_and_work_goes_to_the_fallback():
    cat = catalog_with(failure_rate=0.6)
    reqs = failing_trace(cat)
    plain = simulate(reqs, load_policy("naive", cat), catalog=cat)
    assert plain.extra["circuit_opened"]["openai"] > 0 and plain.extra["rerouted"] == 0
    fb = Settings(resilience=Resilience(fallbacks={"openai/gpt-5-mini": "anthropic/claude-haiku-4-5"}))
    res = simulate(reqs, load_policy("naive", cat), catalog=cat, settings=fb)
    moved = [r for r in res.requests if r.model == "claude-haiku-4-5"]
    assert res.extra["rerouted"] > 0 and len(moved) > 0
    assert res.summary()["failed"] < plain.summary()["failed"]  # the fallback's provider does not fail as often
    assert res.summary()["cost_by_provider"]["anthropic"] > 0


def unit(tenant, prio="normal", deadline=1000.0, arrival=0.0, tokens=100, item=None):
    return Unit(item, tenant, prio, deadline, arrival, tokens, 0.001, 0, 1.0)


def test_fair_share_interleaves_a_flooding_tenant_with_a_quiet_one():
    q = FairQueue(Scheduling())
    for k in range(1000):
        q.push(unit("flood", "background", deadline=86400, item=("flood", k)))
    for k in range(5):
        q.push(unit("quiet", "normal", item=("quiet", k)))
    first = [q.pop(0.0).item[0] for _ in range(10)]
    assert first.count("quiet") == 5  # served within the first ten, not after a thousand
    fifo = FairQueue(Scheduling(order="fifo", fair_share=False))
    for k in range(1000):
        fifo.push(unit("flood", "background", deadline=86400, item=("flood", k)))
    fifo.push(unit("quiet", "normal", item=("quiet", 0)))
    assert [fifo.pop(0.0).item[0] for _ in range(10)] == ["flood"] * 10


def test_a_near_deadline_is_promoted_ahead_of_everything():
    q = FairQueue(Scheduling(promote_s=30, fair_share=False, w_urgency=0))  # priority alone orders the rest
    for k in range(50):
        q.push(unit("a", "urgent", deadline=5000, item=k))
    q.push(unit("a", "background", deadline=100, item="late"))
    assert q.pop(0.0).item != "late"  # 100 s of slack: not yet
    assert q.pop(75.0).item == "late"  # 25 s left: it goes first
    assert len(q) == 49 and all(q.pop(80.0) is not None for _ in range(49)) and q.pop(80.0) is None


def test_score_weighs_priority_against_deadline():
    """Priority levels are w_priority/2 = 2 points apart, a point is time_scale_s = 600 s of deadline: the same
    deadline goes by priority, the same priority by deadline, and a normal request due over 20 minutes before an
    urgent one goes first."""
    q = FairQueue(Scheduling(fair_share=False, promote_s=0))
    q.push(unit("a", "background", deadline=3000, item="bg"))
    q.push(unit("a", "normal", deadline=3000, item="normal"))
    q.push(unit("a", "urgent", deadline=3000, item="urgent"))
    q.push(unit("a", "urgent", deadline=2000, item="earlier urgent"))
    q.push(unit("a", "normal", deadline=600, item="much earlier normal"))
    assert [q.pop(0.0).item for _ in range(5)] == ["much earlier normal", "earlier urgent", "urgent", "normal", "bg"]


def flood_trace(cat):
    rng = np.random.default_rng(9)
    ctx = validation_context(cat, Settings())
    flood = [{"id": f"flood{i}", "tenant": "flood", "arrival_s": float(rng.uniform(0, 20)), "priority": "background",
              "deadline_s": 86400.0} for i in range(6000)]
    quiet = [{"id": f"quiet{i}", "tenant": "quiet", "arrival_s": 5.0 + 10.0 * i, "priority": "normal",
              "deadline_s": 120.0} for i in range(60)]
    return sorted((Request.model_validate({**d, "model": "gpt-5-mini", "input_tokens": 800, "output_tokens": 200,
                                           "prompt": d["id"]}, context=ctx)
                   for d in flood + quiet), key=lambda r: r.arrival_s)


def test_a_flooding_tenant_does_not_make_another_miss_its_deadlines():
    # No batch API here, so the flood is sync work queued at a provider allowing 600 calls a minute: it takes
    # ten minutes to drain, far past the quiet tenant's two-minute deadlines.
    cat = catalog_with(batch_api=None, rate_limits={"rpm": 600, "tpm": 10_000_000, "max_concurrency": 64})
    reqs = flood_trace(cat)
    quiet = np.array([r.tenant == "quiet" for r in reqs])
    fair = simulate(reqs, load_policy("smart", cat), catalog=cat)
    assert fair.met[quiet].all()
    fifo = simulate(reqs, load_policy("smart", cat, {"scheduling": {"order": "fifo", "fair_share": False}}),
                    catalog=cat)
    assert fifo.met[quiet].mean() < 0.3  # the same trace in arrival order: the quiet tenant waits behind
    assert fair.summary()["completed"] == fifo.summary()["completed"] == len(reqs)


# -- calls of unknown length (real providers): booked open, finished when their answer arrives ---------------

def test_a_call_of_unknown_length_holds_its_slot_until_it_finishes():
    gate = RateGate(RateLimits(rpm=1000, tpm=1e9, max_concurrency=1))
    gate.take(0.0, 10, math.inf)  # a real call: its end is known only when it answers
    assert gate.earliest(100.0, 10) == math.inf and gate.running == 1  # the one slot is held, however long
    gate.finish(7.5)
    assert gate.earliest(1.0, 10) == 7.5  # the slot frees when the call ended, not before
    assert gate.earliest(9.0, 10) == 9.0
    gate.finish(8.0)  # nothing open any more: no effect
    assert gate.earliest(9.0, 10) == 9.0


def test_tokens_a_call_used_beyond_its_estimate_count_in_the_minute_it_ended():
    def gate_after(extra):
        g = RateGate(RateLimits(rpm=1000, tpm=1000, max_concurrency=10))
        g.take(0.0, 400, math.inf)
        g.finish(10.0, extra_tokens=extra)
        return g

    # The estimate was 400 of the minute's 1,000 tokens; the answer showed 900 (500 more), counted at t=10.
    assert gate_after(500).earliest(10.0, 200) == 60.0  # 900 + 200 > 1,000 until the 400 of t=0 leave
    assert gate_after(500).earliest(10.0, 700) == 70.0  # ... and the 500 counted at t=10 leave at t=70
    assert gate_after(0).earliest(10.0, 200) == 10.0
    # A usage below the estimate is not given back: the windows only grow (over-counting is the safe side).
    assert gate_after(-300).earliest(10.0, 600) == 10.0 and gate_after(-300).earliest(10.0, 700) == 60.0


def test_a_batch_of_unknown_end_holds_its_enqueued_tokens_until_it_finishes():
    q = EnqueuedTokens(1000)
    q.take(0.0, 800, math.inf)
    assert q.earliest(50.0, 300) == math.inf  # held until the batch ends, whenever that is
    q.finish(800, 40.0)
    assert q.earliest(30.0, 300) == 40.0 and q.earliest(50.0, 300) == 50.0
    q.finish(800, 60.0)  # not open any more: no effect
    assert q.earliest(41.0, 1000) == 41.0 and q.held == 0.0


def test_a_rerouted_requests_fallback_output_is_no_exact_hit_for_the_original_model():
    # The live cache does the same (tests/unit/test_cache.py): a fallback model's output, stored under the
    # original request's fingerprint, would be served to later requests for the original model.
    cat = catalog_with(failure_rate=0.99)
    ctx = validation_context(cat, Settings())

    def r(i, prompt, at):
        return Request.model_validate({"id": f"r{i}", "arrival_s": at, "model": "gpt-5-mini", "prompt": prompt,
                                       "output_tokens": 50, "priority": "urgent", "deadline_s": 600.0}, context=ctx)
    reqs = [r(i, f"filler {i}", 0.0) for i in range(5)] + [r(5, "the question", 0.0), r(6, "the question", 400.0)]
    fb = Settings(resilience=Resilience(fallbacks={"openai/gpt-5-mini": "anthropic/claude-haiku-4-5"}))
    res = simulate(reqs, load_policy("cache-only", cat), catalog=cat, settings=fb)
    first, again = res.requests[5], res.requests[6]
    assert first.model == "claude-haiku-4-5" and res.done_at[5] < again.arrival_s  # rerouted, done before r6
    assert int(res.hit[6]) != 1  # not served the fallback's output as an exact hit for gpt-5-mini
