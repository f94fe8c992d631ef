"""The watches of which Redis process answers (``actors._journal_watch``, ``actors._budget_replay``) under faults a
review found: a Redis busy with a long script answers ``INFO`` with ``BUSY`` for a while, which is no refusal of
``INFO`` for good; and a journal write that fails while the watch's ``INFO`` is out is still written again.
Each test starts its own redis-server; no Ray."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import redis

from engine.core.budgets import BudgetSpec, Claim


@contextlib.contextmanager
def busy(srv):
    """Redis busy running a script (another client's, past ``busy-reply-threshold``): every other command is answered
    ``BUSY`` until ``SCRIPT KILL``. Waited for on Redis's own answer, bounded."""
    r = srv.client()
    r.config_set("busy-reply-threshold", 10)  # ms (the default, 5 s, would make the test wait that long)
    spinner = redis.Redis(port=srv.port)
    t = threading.Thread(target=_spin, args=(spinner,), daemon=True)
    t.start()
    # Bounded in time, not in pings: 5000 pings were about half a second, which a loaded machine may take to start
    # the spinner's thread and its script.
    give_up = time.monotonic() + 30
    while True:
        try:
            r.ping()
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith("BUSY"):
                break
            raise
        assert time.monotonic() < give_up, "Redis never busy"
    try:
        yield
    finally:
        r.script_kill()
        t.join(10)
        spinner.close()


def _spin(client) -> None:
    with contextlib.suppress(redis.RedisError):
        client.eval("while true do end", 0)


def test_a_journal_s_watch_outlives_a_busy_redis_and_still_sees_its_restart(own_redis, monkeypatch):
    """``INFO`` answered ``BUSY`` (a long script) was taken for a Redis that refuses ``INFO``: the watch ended for
    good, with a WARNING saying a restart would go unnoticed, and a later restart that lost the records was not seen
    (before: no rewrite within 10 s). Now it tries again at its next check."""
    import actors._journal_watch as jw
    from actors.journal import RedisJournal

    monkeypatch.setattr(jw, "SERVER_CHECK_S", 0.01)

    async def go():
        rewrites = asyncio.Event()
        met_busy = asyncio.Event()

        async def rewrite():
            rewrites.set()

        j = RedisJournal(own_redis.url, "sbtest-watch", "e1", 5.0, rewrite)
        real_info = j._client.info

        async def info(*a, **kw):
            try:
                return await real_info(*a, **kw)
            except redis.exceptions.ResponseError:
                met_busy.set()
                raise

        j._client.info = info
        await j.put("s", "k", 1)  # the watch starts
        await asyncio.wait_for(_until(lambda: j._server is not None), 10)
        with busy(own_redis):
            await asyncio.wait_for(met_busy.wait(), 10)
        own_redis.stop()
        own_redis.start()  # without the records
        try:
            await asyncio.wait_for(rewrites.wait(), 10)
        finally:
            await j.close()
    asyncio.run(go())


def test_a_journal_write_that_fails_while_the_watch_reads_info_is_written_again(own_redis):
    """A write refused (Redis full) while the watch's ``INFO`` was out marked the records for a rewrite, and the
    check then cleared the mark it had not read: the batch stayed unjournaled for good (before: no rewrite)."""
    from actors.journal import RedisJournal

    r = own_redis.client()

    async def go():
        rewrites = []

        async def rewrite():
            rewrites.append(1)

        j = RedisJournal(own_redis.url, "sbtest-watch", "e2", 5.0, rewrite)
        await j.check_server()  # its Redis seen
        real_info = j._client.info

        async def info(*a, **kw):  # a batch journaled while the INFO is out, Redis full
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
            with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                await j.put("batches:x", "b1", ("the batch",))
            return await real_info(*a, **kw)

        j._client.info = info
        try:
            await j.check_server()
            j._client.info = real_info
            r.config_set("maxmemory", 0)  # room again
            await j.check_server()
            assert rewrites, "the write that failed was never made again"
        finally:
            await j.close()
    asyncio.run(go())


def test_a_budget_book_s_watch_outlives_a_busy_redis_and_reserves_its_claims_again_after_a_restart(own_redis,
                                                                                                monkeypatch):
    """A ``BUSY`` answer to the book's ``INFO`` stopped its checks for good (as if an ACL refused ``INFO``): a later
    restart without persistence was never seen, its open claims never reserved again, and other engines were
    granted their room (before: 0 claims reserved again)."""
    import redis.asyncio as aioredis

    import actors._budget_replay as replay
    from actors.budget_redis import RedisBudgetBook

    monkeypatch.setattr(replay, "SERVER_CHECK_S", 0.0)  # each check below is due (the test makes them itself)

    prefix = "sbtest-watch-book"
    spec = BudgetSpec(max_budget=10.0)

    async def go():
        client = aioredis.Redis.from_url(own_redis.url, socket_timeout=5.0)
        book = RedisBudgetBook(client, [spec], prefix=prefix)
        try:
            assert (await book.reserve_many([Claim("c1", "acme", "openai", "gpt-4o-mini", "urgent", 6.0)], 0.0))[0].ok
            book.stop_watch()  # its task's checks: made here instead, in order
            with busy(own_redis):
                await book._same_server()
            own_redis.stop()
            own_redis.start()  # no persistence: the claim is gone
            for _ in range(3):  # the first command after a restart may meet the connection it cut
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    await book._same_server()
                    break
            assert book.reopened == 1
            reserved = float(own_redis.client().hget(f"{prefix}:w:{spec.key(0.0)}", "reserved") or 0)
            assert reserved == 6.0
        finally:
            book.stop_watch()
            await client.aclose()
    asyncio.run(go())


async def _until(probe) -> None:
    while not probe():
        await asyncio.sleep(0.002)


def test_a_full_redis_is_not_sent_the_whole_journal_again_every_second(own_redis):
    """While the journal's Redis stays full, each check (once a second) sent every open record of its dispatcher
    again, to be refused whole (before: 5 checks with a 4 MB record, 20 MB into the full Redis, per dispatcher). Now
    a one-key write tells first whether Redis takes writes (a full Redis refuses every growing write alike, whatever
    its size); the records go once it does."""
    from actors.journal import RedisJournal

    r = own_redis.client()
    big = {"b1": "x" * (4 << 20)}  # a provider batch's record holds its body

    async def go():
        tries = []

        async def rewrite():
            tries.append(1)
            await j.put_many("batches:x", big)

        j = RedisJournal(own_redis.url, "sbtest-watch", "e3", 5.0, rewrite)
        await j.check_server()
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)
        with contextlib.suppress(redis.exceptions.OutOfMemoryError):
            await j.put_many("batches:x", big)  # the batch's own write, refused
        sent = int(r.info("stats")["total_net_input_bytes"])
        for _ in range(5):
            with contextlib.suppress(redis.exceptions.OutOfMemoryError):
                await j.check_server()
        sent = int(r.info("stats")["total_net_input_bytes"]) - sent
        r.config_set("maxmemory", 0)
        try:
            await j.check_server()
            assert list(await j.items("batches:x")) == ["b1"]  # written once Redis takes writes
        finally:
            await j.close()
        return sent
    sent = asyncio.run(go())
    assert sent < 1 << 20, f"{sent / 2**20:.1f} MB sent to a full Redis"


def test_a_redis_that_refuses_info_for_good_is_said_once_and_its_watches_end(own_redis, monkeypatch, caplog):
    """A managed Redis whose ACL leaves out ``INFO``: one WARNING per journal and per book, and no task left
    checking. Before (a review), the book's watch woke every second for as long as it held claims, to do nothing."""
    import logging

    import redis.asyncio as aioredis

    import actors._budget_replay as replay
    import actors._journal_watch as jw
    from actors.budget_redis import RedisBudgetBook
    from actors.journal import RedisJournal

    monkeypatch.setattr(jw, "SERVER_CHECK_S", 0.01)
    monkeypatch.setattr(replay, "SERVER_CHECK_S", 0.01)
    own_redis.client().acl_setuser("sb", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                                   commands=["+@all", "-info"])
    url = f"redis://sb:pw@127.0.0.1:{own_redis.port}/0"

    async def go():
        async def rewrite():
            return None

        j = RedisJournal(url, "sbtest-acl", "e4", 5.0, rewrite)
        client = aioredis.Redis.from_url(url, socket_timeout=5.0)
        book = RedisBudgetBook(client, [BudgetSpec(max_budget=10.0)], prefix="sbtest-acl-book")
        try:
            await j.put("s", "k", 1)
            assert (await book.reserve_many([Claim("c1", "acme", "openai", "gpt-4o-mini", "urgent", 1.0)], 0.0))[0].ok
            await asyncio.wait_for(asyncio.gather(j._watcher, book._watcher), 10)
        finally:
            book.stop_watch()
            await client.aclose()
            await j.close()
    with caplog.at_level(logging.WARNING):
        asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if "refuses INFO" in r.getMessage()]
    assert len(said) == 2, said
