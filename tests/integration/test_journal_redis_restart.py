"""A journal's Redis that restarts and comes back without the records (no persistence, or back from a snapshot
older than them): the dispatcher writes what it has under way again, so a restart of it later follows its
batches and makes its cut calls again under their keys rather than send their members again, paid twice.

The dispatcher runs as a plain object on one event loop (no Ray), as in ``test_journal.py``."""

from __future__ import annotations

import asyncio
import contextlib

from actors import Dispatcher
from actors._types import BatchJob, Job
from engine.core.settings import CacheSettings, JournalSettings, Settings
from tests.integration.test_journal import die, dispatcher_args, past_the_end, req, until_async


def test_a_batch_under_way_when_the_journals_redis_restarts_empty_is_followed_by_the_dispatchers_restart(
        own_redis):
    settings = Settings().model_copy(update={"journal": JournalSettings(redis_url=own_redis.url),
                                             "cache": CacheSettings(redis_timeout_s=5.0)})

    async def go():
        hub, clock, args = dispatcher_args(settings)
        d1 = Dispatcher(*args)
        jobs = [Job(i, req(i), f"fp{i}") for i in range(3)]
        await d1.run_many([BatchJob("b1", "batch_api", None, False, "process_as_batch", "cheap", jobs)])
        await until_async(lambda: d1.journal.items(d1._space), "the batch submitted and journaled")
        own_redis.stop()
        own_redis.start()  # no persistence: the journal is empty, the batch still runs at the provider
        with contextlib.suppress(Exception):
            await d1.journal.items(d1._space)  # the connection the restart cut fails once
        assert await d1.journal.items(d1._space) == {}

        async def written_again():
            return list(await d1.journal.items(d1._space)) == list(d1._open)
        # The journal's watch of which Redis process answers (once a second): before, nothing wrote them again
        await until_async(written_again, "the records written again in the Redis that came back empty")
        await die(d1)

        d2 = Dispatcher(*args)
        submitted = []
        real_submit = d2.provider.submit_batch
        d2.provider.submit_batch = lambda *a: submitted.append(a) or real_submit(*a)
        assert await d2.recover() == 1  # followed: before, 0, and the driver's re-admission sent its members again
        got = await past_the_end(clock, hub, 3)
        assert sorted(r.id for r in got) == ["r0", "r1", "r2"] and {r.batch_id for r in got} == {"b1"}
        assert submitted == []
        await d2.journal.close()
    asyncio.run(go())
