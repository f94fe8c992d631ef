"""The Redis journal's keeper (it pushes the expiry of the spaces it holds on, once a day) ends when the journal
is closed, also when the close's cancel lands in a Redis read that answers it with the client's own error."""

from __future__ import annotations

import asyncio

import redis.exceptions

from actors import journal as jmod


def test_a_keeper_whose_cancel_comes_back_as_a_redis_error_still_ends_at_close(monkeypatch):
    """A cancel landing in a read came back as the client's TimeoutError, which the keeper took for a Redis blip:
    the cancel was spent, and the keeper ran on for good (a test of the parallel pass hung 300 s on it)."""
    monkeypatch.setattr(jmod, "JOURNAL_REFRESH_S", 0.0)

    async def go():
        j = jmod.RedisJournal("redis://127.0.0.1:1", "sbtest", "keeper")  # never reached: refresh is replaced
        reading = asyncio.Event()
        cuts = []

        async def refresh() -> None:
            reading.set()
            try:
                await asyncio.Event().wait()  # a read under way
            except asyncio.CancelledError:
                if cuts:  # only the first (so that a keeper that runs on still ends with the test's loop)
                    raise
                cuts.append(1)
                raise redis.exceptions.TimeoutError("Timeout reading from socket") from None

        j.refresh = refresh
        j._hold("accepted")
        keeper = j._keeper
        await reading.wait()
        await j.close()
        done, _ = await asyncio.wait([keeper], timeout=5.0)  # a bound, not a wait for time to pass
        assert keeper in done, "the keeper ran on after close"
        j._hold("accepted")  # a closed journal starts no keeper again
        assert j._keeper is None
    asyncio.run(go())


def test_a_redis_blip_does_not_stop_a_running_keeper(monkeypatch):
    monkeypatch.setattr(jmod, "JOURNAL_REFRESH_S", 0.0)

    async def go():
        j = jmod.RedisJournal("redis://127.0.0.1:1", "sbtest", "blip")
        calls = 0
        third = asyncio.Event()

        async def refresh() -> None:
            nonlocal calls
            calls += 1
            if calls >= 3:
                third.set()
            raise redis.exceptions.ConnectionError("Redis is away")

        j.refresh = refresh
        j._hold("accepted")
        await asyncio.wait_for(third.wait(), 5.0)
        assert not j._keeper.done()
        await j.close()
    asyncio.run(go())


def test_a_journal_close_with_a_command_held_out_waits_one_bound_not_two():
    """A command another task holds out (a Redis that does not answer) is waited for within the close's one bound
    (``CLOSE_WAIT_S``, 10 s): the close waited for it in ``drain`` and again in the gate's ``close``, 20 s (fails on
    the code before: 20.0 virtual seconds). In the loop's virtual time: its seconds, never the machine's."""
    from actors._redis_gate import CLOSE_WAIT_S
    from tests.unit.helpers import in_virtual_time

    async def go():
        j = jmod.RedisJournal("redis://127.0.0.1:1", "sbtest", "held")  # no command is sent: none reaches it
        out = asyncio.Event()

        async def held() -> None:
            async with j._use():
                out.set()
                await asyncio.Event().wait()  # its answer never comes
        cmd = asyncio.create_task(held())
        await out.wait()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await j.close()
        took = loop.time() - start
        cmd.cancel()
        return took
    assert in_virtual_time(go) == CLOSE_WAIT_S


def test_a_journal_close_waits_within_its_bound_for_a_watch_whose_unwinding_outlasts_a_second():
    """The close cancels its watch and waits for it to end before it closes the pool (a connection the watch was
    making was left open otherwise): 1 s of real time, which a watch's unwinding outlasted at load ~21
    (``test_journal_redis_restart.py::test_a_closed_journal_s_watch_has_ended_when_its_close_returns`` failed so).
    Now the close's bound, 10 s (fails on the code before: the close returned after 1 s, the watch still running)."""
    from tests.unit.helpers import in_virtual_time

    async def go():
        async def rewrite() -> None:  # (the watch runs only for a journal that writes its records again)
            pass

        j = jmod.RedisJournal("redis://127.0.0.1:1", "sbtest", "watch", rewrite=rewrite)
        checking = asyncio.Event()

        async def check_server() -> str:
            checking.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(3.0)  # its unwinding: 3 virtual seconds
                raise
            return "never"

        j.check_server = check_server
        j._hold("accepted")
        watch = j._watcher
        await checking.wait()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await j.close()
        return watch.done(), loop.time() - start
    assert in_virtual_time(go) == (True, 3.0)
