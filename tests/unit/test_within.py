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
