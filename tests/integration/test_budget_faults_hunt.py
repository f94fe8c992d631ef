"""Budgets across restarts (a helper's fault hunt): a Redis ledger that crashes and comes back from an older state
(its last snapshot, or empty) forgot the claims granted since, still under way; their room went to new claims, and
their spend came on top when they settled. The book reserves them again, before anything else is granted."""

import asyncio
import itertools
import math

import pytest

from actors.budget import BudgetController
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.clock import ManualClock

_prefix = itertools.count()


def _budgets(url):
    return BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),), redis_url=url,
                          redis_prefix=f"sbtest-hunt{next(_prefix)}", redis_timeout_s=2.0, redis_retry_s=0.3)


def _claims(*ids, usd):
    return [Claim(i, "acme", "openai", "gpt-5-mini", "urgent", usd) for i in ids]


def _crash_and_restart(srv) -> None:
    srv.proc.kill()  # a crash: no save on the way out
    srv.proc.wait(10)
    srv.proc.stdout.close()
    srv.start()  # back from its last snapshot (RDB)


async def _until_answered(ctl, b, claims):
    """Reserve ``claims`` once Redis answers again: the pooled connection the crash cut may fail one call."""
    ctl.book._server_read = -math.inf  # (a second passed: the book looks at which Redis answers)
    for _ in range(20):
        verdicts = await ctl.reserve_many(claims)
        if verdicts[0].reason != "budget_unavailable":
            return verdicts
        await asyncio.sleep(b.redis_retry_s)
    raise AssertionError("the ledger's Redis did not answer again")


def test_claims_under_way_when_redis_crashes_back_to_an_older_state_keep_their_room(own_redis):
    """$1 settled before the snapshot, $8 reserved after it by four claims under way. Before: after the crash, four
    new claims of $2 were granted too, and all settled at cost: $17 billed under a $10 hard limit."""
    b = _budgets(own_redis.url)

    async def go():
        ctl = BudgetController(b, None, ManualClock(100.0))
        await ctl.check_ledger()
        try:
            assert (await ctl.reserve_many(_claims("s0", usd=1.0)))[0].ok
            await ctl.settle_many([("s0", 1.0)])
            own_redis.client().save()  # Redis's periodic snapshot happens to run now
            assert all(v.ok for v in await ctl.reserve_many(_claims(*(f"a{k}" for k in range(4)), usd=2.0)))
            _crash_and_restart(own_redis)
            late = await _until_answered(ctl, b, _claims(*(f"n{k}" for k in range(4)), usd=2.0))
            granted = [f"n{k}" for k, v in enumerate(late) if v.ok]
            await ctl.settle_many([(f"a{k}", 2.0) for k in range(4)] + [(rid, 2.0) for rid in granted])
            (last,) = await ctl.reserve_many(_claims("z", usd=1.0))
            rep = await ctl.report()
        finally:
            await ctl.close()
        return granted, last, rep
    granted, last, rep = asyncio.run(go())
    (row,) = rep["budgets"]
    assert granted == [], f"granted {granted} into the room of claims under way: ${row['spent_usd']} spent of $10"
    assert row["spent_usd"] == pytest.approx(9.0) and row["reserved_usd"] == pytest.approx(1.0)
    assert last.ok  # the $1 left is there, no more and no less
    assert rep["ledger"]["reopened_after_restart"] == 4 and rep["ledger"]["lost_records"] == 0


def test_a_call_that_comes_while_the_claims_go_back_waits_for_them(own_redis, monkeypatch):
    """A call that came while the book was reserving its lost claims again saw the server checked and went on: its
    claim was granted the room they were about to take back."""
    b = _budgets(own_redis.url)

    async def go():
        ctl = BudgetController(b, None, ManualClock(100.0))
        await ctl.check_ledger()
        entered, resume = asyncio.Event(), asyncio.Event()
        reopen = type(ctl.book)._reopen

        async def held(self, rids):
            entered.set()
            await resume.wait()
            return await reopen(self, rids)
        monkeypatch.setattr(type(ctl.book), "_reopen", held)
        try:
            assert all(v.ok for v in await ctl.reserve_many(_claims(*(f"a{k}" for k in range(4)), usd=2.0)))
            _crash_and_restart(own_redis)
            first = asyncio.ensure_future(_until_answered(ctl, b, _claims("n0", usd=2.0)))
            await entered.wait()
            second = asyncio.ensure_future(ctl.reserve_many(_claims("n1", usd=2.0)))
            await asyncio.wait([second], timeout=0.5)  # bounded: it must not be answered before the claims are back
            answered_early = second.done()
            resume.set()
            (v0,), (v1,) = await first, await second
        finally:
            await ctl.close()
        return answered_early, v0, v1
    answered_early, v0, v1 = asyncio.run(go())
    assert not answered_early and not v1.ok, v1
    assert v0.ok  # $8 back under way, $2 left: the first one fits, not the second
