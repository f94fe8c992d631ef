"""What the budget ledgers take as spend, and for how long a settlement stays counted once (a helper's fault hunt
of the Redis ledger): a NaN, infinite or negative amount is counted as 0 instead of poisoning the ledger or giving
spend back; a settlement's marker lives as long as the controller may send it again; a horizon is paced from the
engine's start at real speed too; timeouts are finite."""

import asyncio
import itertools
import math

import pytest
from pydantic import ValidationError

from actors.budget import BudgetController
from actors.budget_redis import MARKER_SLACK_S
from actors.providers.anthropic_http import _usage as anthropic_usage
from actors.providers.openai_http import _usage_chat, _usage_responses
from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim
from engine.core.clock import ManualClock

_prefix = itertools.count()
EPOCH = 1_780_000_000.0  # a live engine at real speed budgets on the calendar: its ledger's clock starts here


def _redis_budgets(url, **kw):
    return BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),), redis_url=url,
                          redis_prefix=f"sbtest-amounts{next(_prefix)}", redis_timeout_s=2.0, redis_retry_s=0.3, **kw)


def _claims(*ids, usd=1.0, priority="urgent"):
    return [Claim(i, "acme", "openai", "gpt-5-mini", priority, usd) for i in ids]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -3.0])
def test_a_settlement_of_nan_inf_or_negative_spend_counts_zero_and_the_redis_ledger_stays_up(redis_server, bad):
    async def go():
        ctl = BudgetController(_redis_budgets(redis_server.url), None, ManualClock(100.0))
        await ctl.check_ledger()
        try:
            assert all(v.ok for v in await ctl.reserve_many(_claims("c0", "c1")))
            await ctl.settle_many([("c0", bad)])
            await ctl.settle_many([("c1", 0.4)])
            await ctl.charge_many([Charge("k0", "acme", "openai", "gpt-5-mini", bad)])
            (v,) = await ctl.reserve_many(_claims("c2", usd=9.0))
            rep = await ctl.report()
        finally:
            await ctl.close()
        return v, rep
    v, rep = asyncio.run(go())
    assert v.ok, v  # before: the NaN kept Redis "down" for good, every claim budget_unavailable
    assert rep["ledger"]["up"] and not rep["ledger"].get("unsettled")
    (b,) = rep["budgets"]
    assert b["spent_usd"] == pytest.approx(0.4)  # the bad amount counted as 0, the good one as given


def test_a_negative_settlement_gives_no_spend_back_in_the_memory_ledger():
    async def go():
        b = BudgetSettings(specs=(BudgetSpec(max_budget=1.0, budget_duration="1d"),))
        ctl = BudgetController(b, None, ManualClock(100.0))
        assert all(v.ok for v in await ctl.reserve_many(_claims("a", "b", usd=0.5)))
        await ctl.settle_many([("a", 0.5), ("b", -0.8)])
        return await ctl.reserve_many(_claims("c", "d", usd=0.5))
    assert [v.ok for v in asyncio.run(go())] == [True, False]  # $0.5 left, not $1.3


def test_a_settlements_marker_lives_as_long_as_the_controller_may_replay_it(redis_server):
    """The marker that makes a replayed settlement count once lived an hour, while the controller keeps an
    unsent settlement (and who spent it) for the claim's life and a day: a replay after a longer outage, whose
    first try Redis had run, counted the spend twice."""
    import redis

    b = _redis_budgets(redis_server.url, reservation_ttl_s=7200.0)

    async def go():
        ctl = BudgetController(b, None, ManualClock(100.0))
        await ctl.check_ledger()
        try:
            assert all(v.ok for v in await ctl.reserve_many(_claims("m0")))
            await ctl.settle_many([("m0", 0.25)])
        finally:
            await ctl.close()
    asyncio.run(go())
    with redis.Redis.from_url(redis_server.url) as client:
        ttl = client.ttl(f"{b.redis_prefix}:s:m0")
    assert 7200 + MARKER_SLACK_S - 60 <= ttl <= 7200 + MARKER_SLACK_S


def test_a_horizon_is_paced_from_the_engines_start_on_the_calendar_clock():
    """At real speed the ledger's clock is the calendar (``base``: the epoch of the engine's start); the horizon
    counted from time 0 had passed decades ago, and non-urgent work was not paced at all."""
    async def go():
        b = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, horizon_s=3600.0),))
        ctl = BudgetController(b, None, ManualClock(0.0))
        await ctl.set_clock(ManualClock(60.0), EPOCH)  # one minute into the engine's run
        return await ctl.reserve_many(_claims("p0", usd=5.0, priority="background"))
    (v,) = asyncio.run(go())
    assert not v.ok and v.reason == "deferred", v  # 80 % of $10 paced over the hour: $1.0 now, not $5


@pytest.mark.parametrize("field", ["redis_timeout_s", "redis_retry_s", "reservation_ttl_s"])
def test_infinite_redis_timings_are_refused_naming_the_setting(field):
    with pytest.raises(ValidationError, match=field):
        BudgetSettings(**{field: math.inf})


def test_a_providers_negative_token_counts_are_read_as_zero():
    assert _usage_chat({"prompt_tokens": 10, "completion_tokens": -2_000_000}).output_tokens == 0
    assert _usage_responses({"input_tokens": -5, "output_tokens": 7}).input_tokens == 0
    u = anthropic_usage({"input_tokens": 3, "output_tokens": -1, "cache_read_input_tokens": -9})
    assert (u.input_tokens, u.output_tokens, u.cache_read) == (3, 0, 0)


def test_a_redis_that_crashes_back_to_its_last_snapshot_gets_the_settlements_since_again(own_redis):
    """Claims settled after Redis's last snapshot came back as open reservations, their spend gone, when it
    crashed and restarted from that snapshot: the budget was held for two days, unseen (the client re-made its
    connection without an error). The book sees another Redis process answer and sends them again."""
    b = _redis_budgets(own_redis.url)

    async def go():
        ctl = BudgetController(b, None, ManualClock(100.0))
        await ctl.check_ledger()
        try:
            assert all(v.ok for v in await ctl.reserve_many(_claims(*(f"a{k}" for k in range(5)), usd=2.0)))
            own_redis.client().save()  # Redis's periodic snapshot happens to run now
            await ctl.settle_many([(f"a{k}", 1.5) for k in range(5)])
            await ctl.charge_many([Charge("late", "acme", "openai", "gpt-5-mini", 0.5)])
            own_redis.crash()
            own_redis.start()  # back from the snapshot: the five claims open, $10 reserved, nothing spent
            ctl.book._server_read = -math.inf  # (a second passed: the book looks at which Redis answers)
            for k in range(20):  # the pooled connection the crash cut may fail one call: its retry pause, then on
                (v,) = await ctl.reserve_many(_claims(f"n{k}", usd=1.0))
                if v.reason != "budget_unavailable":
                    break
                await asyncio.sleep(b.redis_retry_s)
            rep = await ctl.report()
        finally:
            await ctl.close()
        return v, rep
    v, rep = asyncio.run(go())
    assert v.ok, v  # before: "wait" for two days, the five settled claims holding $10
    (row,) = rep["budgets"]
    assert row["spent_usd"] == pytest.approx(8.0) and row["reserved_usd"] == pytest.approx(1.0)
    assert rep["ledger"]["replayed_after_restart"] == 6


def test_a_settlement_the_ledgers_script_refuses_is_dropped_alone_and_the_ledger_stays_up(redis_server):
    """A key of another type under the ledger's prefix (another program's) makes the script fail on that one
    settlement: kept at the head of the outbox, it failed every later call and kept the ledger down."""
    b = _redis_budgets(redis_server.url)

    async def go():
        ctl = BudgetController(b, None, ManualClock(100.0))
        await ctl.check_ledger()
        try:
            assert all(v.ok for v in await ctl.reserve_many(_claims("w0", "w1")))
            redis_server.client().set(f"{b.redis_prefix}:c:w0", "not a claim record")
            await ctl.settle_many([("w0", 0.3), ("w1", 0.4)])
            (v,) = await ctl.reserve_many(_claims("w2"))
            rep = await ctl.report()
        finally:
            await ctl.close()
        return v, rep
    v, rep = asyncio.run(go())
    assert v.ok, v
    assert rep["ledger"]["up"] and rep["ledger"]["rejected_settlements"] == 1 and not rep["ledger"]["unsettled"]
    assert rep["budgets"][0]["spent_usd"] == pytest.approx(0.4)  # the other settlement counted
