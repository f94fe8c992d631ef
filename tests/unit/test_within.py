"""``within``: a bounded await that passes a cancel on (``asyncio.wait_for`` before Python 3.12 does not)."""

import asyncio

import pytest

from engine.core._within import within


def test_a_cancel_that_comes_as_the_awaited_call_ends_is_not_swallowed():
    # A dispatcher's follow-up cancelled (a death, a stop) just as its bounded poll answered: with wait_for the
    # poll's answer was returned and the task read its batch to the end, as if never cancelled (a flaky test).
    async def go():
        answer = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(within(answer, 60.0))
        await asyncio.sleep(0)  # (one turn of the loop: the task now awaits the answer)
        answer.set_result("ended")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(go())


def test_an_answer_in_time_is_returned_and_one_past_the_bound_is_a_timeout():
    async def go():
        assert await within(asyncio.sleep(0, result=7), 60.0) == 7
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(TimeoutError):
            await within(never, 0.01)
    asyncio.run(go())


def test_a_follow_up_cancelled_as_the_engine_cancel_wakes_it_ends_there_and_polls_nothing_more():
    # A batch's follow-up sleeps between polls on the dispatcher's wake event (``_sleep``). A stop's cancel sets
    # it, and a death (or the stop's own end) cancels the follow-up in the same loop turn: with wait_for the
    # wake's answer was returned, the cancel swallowed, and the follow-up went on to its next poll, cancel or
    # read of its batch after it was ended.
    from actors._cancel import CancelDispatches

    class Clock:
        def real_delay(self, engine_s: float) -> float:
            return engine_s

    class Dispatcher(CancelDispatches):
        clock = Clock()

    async def go():
        d, went_on = Dispatcher(), []

        async def follow_up() -> None:
            await d._sleep(60.0)
            went_on.append("its next poll")

        task = asyncio.create_task(follow_up())
        await asyncio.sleep(0)  # (one turn of the loop: the follow-up now sleeps on the wake event)
        d._woken().set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert went_on == []
    asyncio.run(go())


def test_a_loop_over_as_completed_cancelled_as_a_result_arrives_ends_and_does_not_wait_on_for_the_rest():
    # A driver's task reading ``engine.as_completed(futures, timeout=...)``, cancelled (its app stopping, a
    # request handler whose client left) in the loop turn that woke its wait for the next result: wait_for (an
    # inner task, given a timeout) swallowed the cancel, and the task took that result and waited on for the rest,
    # its own stop waiting on with it. (The endpoint's collectors give no timeout: wait_for awaits in the task.)
    import concurrent.futures

    from engine.app._driver_async import AsyncSubmit

    async def go():
        lines = [concurrent.futures.Future() for _ in range(2)]
        taken: list = []

        async def collect() -> None:
            async for res in AsyncSubmit.as_completed(None, lines, timeout=3600.0):  # (wait_for's inner task)
                taken.append(res)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0)  # (the collector now waits for its first line)
        lines[0].set_result("line 1")  # its arrival is put in the collector's queue in the next turn...
        await asyncio.sleep(0)  # ...which wakes the collector's wait; the stop's cancel comes in that turn
        collector.cancel()
        try:
            done, _ = await asyncio.wait([collector], timeout=5.0)  # (a safety net: it ends in a turn or two)
            assert collector in done and collector.cancelled(), f"the collector ran on, having taken {taken}"
        finally:
            lines[1].set_result("line 2")  # (a collector that ran on ends here)
            await asyncio.gather(collector, return_exceptions=True)
    asyncio.run(go())


def test_a_submission_cancelled_as_the_hubs_say_whose_ids_are_is_cancelled_not_queued_on():
    # ``asubmit`` first asks the hub shards whose response ids its body names (``know_owners``), then queues. A
    # cancel (the caller's client left, its app stopping) in the turn the answer came was swallowed by wait_for:
    # ``know_owners`` answered True and the cancelled submission went on to queue its requests, billed, unread.
    from engine.app._driver_owners import SharedOwners
    from engine.core.response_owners import ResponseOwners

    async def go():
        answer = asyncio.get_running_loop().create_future()

        class Shard:
            class owners_of:
                @staticmethod
                def remote(refs):
                    return answer

        engine = SharedOwners()
        engine.responses, engine._h = ResponseOwners(), {"hubs": [Shard()]}
        asking = asyncio.create_task(engine.know_owners([{"previous_response_id": "resp_1"}]))
        await asyncio.sleep(0)  # (the ask is out)
        answer.set_result(([], True))
        await asyncio.sleep(0)  # (the shard's answer is taken: the gather of the shards' answers ends next turn)
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
    asyncio.run(go())
