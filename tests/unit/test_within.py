"""``within``: a bounded await that passes a cancel on (``asyncio.wait_for`` before Python 3.12 does not)."""

import asyncio

import pytest

from actors.providers._wire import within


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

