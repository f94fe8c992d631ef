"""Background loops end at their owner's close, also when the close's cancel lands in a client read that answers
it with the client's own error (taken for a blip, the cancel was spent and the loop ran on: see
``test_journal_keeper``). Each wait is bounded, so a loop that runs on fails its test, never hangs it."""

from __future__ import annotations

import asyncio

import redis.exceptions

from actors.budget import BudgetController
from engine.core.budgets import BudgetSettings


def _cut_once(reading: asyncio.Event, cuts: list):
    """A Redis call under way that answers the first cancel with redis-py's own TimeoutError (its read cut)."""
    async def call(*_args, **_kwargs):
        reading.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if cuts:  # only the first (so that a loop that runs on still ends with the test's loop)
                raise
            cuts.append(1)
            raise redis.exceptions.TimeoutError("Timeout reading from socket") from None
    return call


def test_a_ledger_flusher_whose_cancel_comes_back_as_a_redis_error_still_ends_at_close():
    """The outbox flusher replays settlements while Redis is away; a close's cancel spent in its Redis read left
    it replaying for good, every ``redis_retry_s``, on a closed ledger."""
    async def go():
        ctl = BudgetController(BudgetSettings(redis_url="redis://127.0.0.1:1", redis_retry_s=0.001))
        reading, cuts = asyncio.Event(), []
        ctl.book.settle_many = _cut_once(reading, cuts)  # never reaches the URL: the call is replaced
        ctl._outbox.append(("claim-1", 0.25))
        ctl._arm_flush()
        flusher = ctl._flusher
        await asyncio.wait_for(reading.wait(), 5.0)
        await ctl.close()
        done, _ = await asyncio.wait([flusher], timeout=5.0)  # a bound, not a wait for time to pass
        assert flusher in done, "the flusher ran on after close"
        assert cuts, "the cancel did not land in the Redis call"
        ctl._arm_flush()  # a closed ledger starts no flusher again
        assert ctl._flusher is flusher
    asyncio.run(go())


def test_a_delete_tried_again_ends_with_its_journal_also_when_its_cancel_comes_back_as_a_redis_error(monkeypatch):
    """``delete_later`` tries a failed delete again for days while it fails: a cancel spent in its Redis read (the
    end of the loop it runs on cancels it) left it trying on a closed journal, and that end waiting on it."""
    from actors import journal as jmod

    monkeypatch.setattr(jmod, "DELETE_BASE_S", 0.001)
    monkeypatch.setattr(jmod, "DELETE_MAX_S", 0.002)

    async def go():
        j, tasks = jmod.RedisJournal("redis://127.0.0.1:1", "sbtest", "retries"), set()
        reading, cuts = asyncio.Event(), []
        j.delete = _cut_once(reading, cuts)  # never reaches the URL: the call is replaced
        jmod.delete_later(j, "sync:openai", ["k1"], tasks)
        (task,) = tasks
        await asyncio.wait_for(reading.wait(), 5.0)
        await j.close()
        task.cancel()  # as the end of its loop does
        done, _ = await asyncio.wait([task], timeout=5.0)  # a bound, not a wait for time to pass
        assert task in done, "the retries ran on after their journal's close"
        assert cuts, "the cancel did not land in the Redis call"

        calls = []

        async def failing(space, keys):
            calls.append(keys)
            raise redis.exceptions.ConnectionError("Redis is away")

        asleep = jmod.RedisJournal("redis://127.0.0.1:1", "sbtest", "asleep")
        await asleep.close()
        asleep.delete = failing
        jmod.delete_later(asleep, "sync:openai", ["k2"], tasks)
        (task,) = tasks
        done, _ = await asyncio.wait([task], timeout=5.0)
        assert task in done and not calls, "a closed journal's retry still called Redis"
    asyncio.run(go())


class _Hub:
    """The hub as the controller's gauges use it: told, never answering."""

    def observe_budget(self, *_args) -> None:
        pass


def test_a_budget_controller_s_close_ends_its_gauges_report_before_its_ledger_s_client_closes():
    """The gauges' report reads the ledger every ``METRICS_EVERY_S`` while it moves (on a ``ManualClock`` its
    window timer fires at once, so for good). ``close`` left it running: woken after the client's close, it
    opened a connection on it that nothing closed, collected later as an ``unclosed Connection`` ResourceWarning
    that failed an unrelated test of the worker (a CI run, stop 80). Now nothing of the controller runs on."""
    from engine.core.budgets import BudgetSpec
    from engine.core.clock import ManualClock

    async def go():
        b = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),),
                           redis_url="redis://127.0.0.1:1")
        ctl = BudgetController(b, _Hub(), ManualClock(100.0))
        read, closed, after = asyncio.Event(), [], []

        async def report(now):  # never reaches the URL: the call is replaced
            (after if closed else []).append(now)
            read.set()
            return []
        ctl.book.report = report
        aclose = ctl.book.client.aclose

        async def closing():
            closed.append(1)
            await aclose()
        ctl.book.client.aclose = closing
        ctl._changed(journal=False)  # the ledger moved: the gauges are sent
        await asyncio.wait_for(read.wait(), 5.0)
        await ctl.close()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not left, f"still running after close: {left}"
        ctl._changed(journal=False)  # a call finishing after the close starts no report
        assert ctl._reported is None or ctl._reported.done()
        assert not after
    asyncio.run(go())
