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
