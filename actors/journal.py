"""The engine's journal: the little state that must outlive the actor that holds it.

Two records only, because everything else is either held by the driver (every accepted, unfinished request:
it re-admits them after a restart) or rebuilt from them:

- a dispatcher's **open provider batches** (batch id, members, hedge time), so a restarted dispatcher
  re-attaches to them by id and never submits their members again;
- the **in-memory budget ledger** (a snapshot), so a restarted budget controller does not start from zero.
  A ledger on Redis is its own journal: the settlements and charges waiting for a Redis that is away go to Ray's
  key-value store instead (``actors._budget_outbox``, ``actors._kv_journal``), which outlives the hub too.

Where it lives: in Redis when the engine has one (``journal.redis_url``, else the budgets' or the cache's
URL), under ``<prefix>:journal:<engine>:<space>``; otherwise in the result hub's memory, which survives the
death of any other actor. When the hub itself restarts, each holder writes its records again
(``rejournal``), so one death at a time loses nothing; so does a dispatcher when another Redis process answers
for its Redis journal, or a write to it failed (``actors._journal_watch``). docs/reliability.md lists what survives what.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from actors._hub_journal import HubJournal, MemoryJournalStore
from actors._journal_seal import JournalSeal
from actors._journal_watch import RecordsWatch
from actors._redis_gate import CLOSE_WAIT_S
from engine.core._logkeys import get_logger
from engine.core.resilience import retry_delay

__all__ = ["HubJournal", "JournalWriter", "MemoryJournalStore", "RedisJournal", "delete_later",
           "make_journal", "read_patiently", "redis_journal"]

log = get_logger("smartbatch.journal")

DELETE_TRIES = 8  # a failed delete, tried again 0.2 s later, then doubling: about 50 s, then an error is logged
DELETE_BASE_S, DELETE_MAX_S = 0.2, 60.0  # real seconds between a failed delete's tries: doubling, then every minute
JOURNAL_TTL_S = 8 * 86400  # a Redis journal's space outlives its last write by this long: a batch's 24 h and more
JOURNAL_REFRESH_S = 86400.0  # real seconds between pushes of the expiry of the spaces a running journal holds
T = TypeVar("T")


async def read_patiently(read: Callable[[], Awaitable[T]], who: str, wait_s: float) -> T:
    """``await read()``, tried again for ``wait_s`` real seconds while it fails (``journal.recover_wait_s``): after
    a restart, giving up on the journal at once costs money (members of open batches sent again, a budget ledger
    from zero). Raises the last error past ``wait_s``."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait_s
    for attempt in itertools.count(1):
        try:
            return await read()
        except Exception as exc:
            delay = retry_delay(attempt, 0.05, 2.0, 1.0)
            if loop.time() + delay > give_up:
                raise
            log.warning("%s: journal unreadable after a restart (%s: %s); trying again", who,
                        type(exc).__name__, str(exc)[:200])
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def delete_later(journal, space: str, keys: list[str], tasks: set, pending: set[str] | None = None) -> None:
    """Delete ``keys`` of ``space`` again, in the background (``tasks`` holds the task while it runs), after the
    journal failed to (a Redis blip). A record of ended work left in the journal is work a restart takes up again:
    a batch re-attached to, whose cancelled members are handed back to be sent again, or a call made again, which
    a provider that no longer holds its key (a failed call's key holds nothing) bills again."""
    async def run() -> None:
        # Until it is done, however long the journal is away: given up after ~50 s, a record of an answered call
        # outlived a Redis outage, and a restart once the hub had forgotten the call made it again (a helper's
        # fault hunt). Given up after JOURNAL_TTL_S: a stopped engine's space is gone by then (a running one keeps
        # its spaces, ``RedisJournal._keep``, and a record it could not clear for that long stays).
        give_up = asyncio.get_running_loop().time() + JOURNAL_TTL_S
        for attempt in itertools.count(1):
            await asyncio.sleep(retry_delay(attempt, DELETE_BASE_S, DELETE_MAX_S, 1.0))
            if journal.closed:  # its holder is done with it: nothing tries again for it, nothing cancels this
                return
            # ``pending``: those not written anew since (the same key, a request sent again under its id): a late
            # try must not delete a newer record (a review).
            todo = keys if pending is None else [k for k in keys if k in pending]
            try:
                if todo:
                    await journal.delete(space, todo)
                if pending is not None:
                    pending.difference_update(todo)
                return
            except Exception as exc:
                # A cancel that lands in a Redis read can come back as the client's own error: caught here, the
                # cancel was spent and the retries ran on for days (a loop's end waited on them, hung).
                if journal.closed:
                    return
                if attempt == DELETE_TRIES:
                    log.error("journal %s: %d record(s) of ended work could not be cleared yet (%s: %s); trying "
                              "again every %.0f s (until then a restart would take them up again)", space,
                              len(keys), type(exc).__name__, exc, DELETE_MAX_S)
            if asyncio.get_running_loop().time() > give_up:
                return

    task = asyncio.get_running_loop().create_task(run())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class RedisJournal(RecordsWatch):
    """Journal records in a Redis hash per space: they survive every actor and the driver."""

    durable = True

    def __init__(self, url: str, prefix: str, engine: str, timeout_s: float = 1.0,
                 rewrite: Callable[[], Awaitable[Any]] | None = None, cluster: bool = False,
                 seal: JournalSeal | None = None):
        from actors._redis_cluster import async_client, namespace
        from actors._redis_gate import gate_of

        # On a Redis Cluster, every space of the engine's journal under one hash tag: one node holds them, and the
        # watch reads that node's run_id (a restart of it loses them all, or none). Named as before on one Redis.
        self._base = namespace(f"{prefix}:journal:{engine}", cluster) + ":"
        self._client = async_client(url, cluster=cluster, timeout_s=timeout_s, name=f"journal {self._base}")
        # Counts the commands out (``_use``), which the close waits for, and refuses any after it: see ``close``
        self._gate = gate_of(self._client)
        self._spaces: set[str] = set()  # those this journal wrote, read or cleared: its keeper pushes their expiry
        self._keeper: asyncio.Task | None = None
        self._closed = False
        # Writes its holder's records again (raising if one failed) where another Redis process answers.
        self._rewrite, self._watcher, self._server = rewrite, None, None
        self._unwritten = False  # a write failed (Redis full, away), or another Redis answers: written again
        self._checking = asyncio.Lock()
        # Written with the records, so a restarted holder tells a Redis that lost them from one it never wrote to
        # (``actors._journal_seal``): None for a holder that need not (its records are read back as they are).
        self.seal = seal
        # Sealed by this incarnation's first write, then by the watch's rewrites alone: a seal each write carried put
        # it back with the first record written after a Redis that restarted empty (a busy dispatcher writes within
        # the watch's second: a batch, a call's body, its tally), and a restart then read the loss as none (a review)
        self._sealed = False
        # Held by a restarted holder while batches it took from the hub's index are journaled nowhere: sealed then, a
        # second restart read no loss and sent their members again (``actors._batch_index``, ``release_seal``)
        self.seal_held = False

    def _hold(self, space: str) -> None:
        self._spaces.add(space)
        if self._keeper is None and not self._closed:
            self._keeper = asyncio.get_running_loop().create_task(self._keep())
        if self._watcher is None and self._rewrite is not None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _keep(self) -> None:
        # While this journal's holder runs, its spaces do not expire: a request accepted on an engine that then
        # accepts nothing for 8 days kept its record only until then, and a driver that lost its memory could not
        # read it back (docs/reliability.md). Once the holder stops, the last push expires JOURNAL_TTL_S later.
        while not self._closed:
            await asyncio.sleep(JOURNAL_REFRESH_S)
            try:
                await self.refresh()
            except Exception as exc:  # a Redis blip: the expiry is days away, the next push is in a day
                # A close's cancel that lands in a Redis read can come back as the client's own error (its read
                # cut): caught here, the cancel was spent and the keeper ran on for good (a hung test).
                if self._closed:
                    return
                log.warning("journal %s: expiry not pushed on (%s: %s)", self._base, type(exc).__name__, exc)

    async def refresh(self) -> None:
        """Push the expiry of every space this journal holds to ``JOURNAL_TTL_S`` from now."""
        if self._spaces:
            async with self._use() as client, client.pipeline(transaction=False) as pipe:
                for space in self._spaces:
                    pipe.expire(self._base + space, JOURNAL_TTL_S)
                await pipe.execute()

    async def put(self, space: str, key: str, value: Any) -> None:
        await self.put_many(space, {key: value})

    async def put_many(self, space: str, values: dict[str, Any]) -> None:
        # Each write pushes the space's expiry on: an engine that stopped leaves nothing behind for good (its
        # records name one run of it, ``start_actors``), while a running one keeps what it writes to.
        self._hold(space)
        try:
            async with self._use() as client, client.pipeline(transaction=True) as pipe:
                pipe.hset(self._base + space, mapping={k: pickle.dumps(v) for k, v in values.items()})
                pipe.expire(self._base + space, JOURNAL_TTL_S)
                sealing = not (self._sealed or self.seal_held)
                if sealing:
                    self._seal_in(pipe)
                await pipe.execute()
            self._sealed = self._sealed or sealing
        except Exception:
            # Its batch or call goes on unjournaled (full under noeviction: a batch created then was sent again by
            # a restart of its dispatcher, a helper's hunt): the watch writes them again once Redis takes writes.
            self._unwritten = True
            raise
        if self.seal is not None:
            self.seal.witness(self._base)

    async def delete(self, space: str, keys: list[str]) -> None:
        if keys:
            self._hold(space)
            async with self._use() as client:
                await client.hdel(self._base + space, *keys)

    async def items(self, space: str) -> dict[str, Any]:
        self._hold(space)
        async with self._use() as client:
            raw = await client.hgetall(self._base + space)
        return {k.decode(): pickle.loads(v) for k, v in raw.items()}

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.asynccontextmanager
    async def _use(self):
        """The client, for one command (or pipeline) counted as out until it ends; refused once closed."""
        async with self._gate.use():
            yield self._client

    async def close(self) -> None:
        self._closed = True
        left = self._gate.begin(CLOSE_WAIT_S)  # a command after this is refused (``_use``); one bound for the close
        tasks = [t for t in (self._keeper, self._watcher) if t is not None and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks and left > 0:  # ended first: a connection one was making as the pool closed was left open (a
            # test's warning). Within the close's bound, not 1 s: a watch's unwinding (its check's pipeline reset)
            # outlasted 1 s at load ~21 and the close returned with the watch still running (leak85's hunt)
            await asyncio.wait(tasks, timeout=left)
        self._keeper = self._watcher = None
        # The commands other tasks have out end first: the pool's close cut a connection under one, and the client's
        # retry connected it again on a pool nothing closes any more, left open for the collector (a ResourceWarning
        # that failed stop 84's CI, an ingest's read in test_journal_redis_restart.py). A command after the close is
        # refused (``_use``), and a connection after it too (``actors._redis_gate``: a command no ``_use`` counts).
        # Drained before the seal closes, not by the gate's close alone: a write that ended after it would start
        # the seal's telling of the hub again (``JournalSeal.witness``), a task nothing cancels.
        await self._gate.drain(CLOSE_WAIT_S)
        if self.seal is not None:
            self.seal.close()
        await self._gate.close(self._client)


class JournalWriter:
    """Coalesces journal writes of one space: ``await put(k, v)`` returns once a write holding it is done; all
    puts made while one write is under way go in the next, so a burst of calls costs one round trip, not one
    each. Deletes are sent with the next write (or on their own, later): a stale record costs nothing but a
    look when recovering. ``on_put``: told of each write's records before it is sent (the hub's index of a
    dispatcher's sync calls, ``actors._sync_index``: one message per write, not per record)."""

    def __init__(self, journal, space: str, on_put: Callable[[dict], Any] | None = None):
        self.journal, self.space, self.on_put = journal, space, on_put
        self._puts: dict[str, Any] = {}
        self._dels: list[str] = []
        self._done: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self.retries: set[asyncio.Task] = set()  # deletes tried again (``delete_later``)
        self._retrying: set[str] = set()  # their keys, until written anew

    async def put(self, key: str, value: Any) -> bool:
        """Whether the write holding it landed (one that failed is logged)."""
        self._retrying.discard(key)
        self._puts[key] = value
        fut = self._arm()
        return await asyncio.shield(fut)

    def put_soon(self, key: str, value: Any) -> None:
        """``put`` without waiting for its write (from code that cannot await)."""
        self._retrying.discard(key)
        self._puts[key] = value
        self._arm()

    def delete(self, key: str) -> None:
        self._puts.pop(key, None)
        self._dels.append(key)
        self._arm()

    def _arm(self) -> asyncio.Future:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._done

    async def _run(self) -> None:
        while self._puts or self._dels:
            puts, self._puts = self._puts, {}
            dels, self._dels = self._dels, []
            done, self._done = self._done, None
            if dels:  # apart from the puts: a delete that failed kept them from the journal, and their calls went
                try:
                    await self.journal.delete(self.space, dels)
                except Exception as exc:
                    log.warning("journal %s: delete failed, trying again (%s: %s)", self.space, type(exc).__name__,
                                exc)
                    # Not those written anew since (here, while the delete was out): a retry would delete them.
                    failed = [k for k in dels if k not in self._puts and k not in puts]
                    self._retrying.update(failed)
                    delete_later(self.journal, self.space, failed, self.retries, self._retrying)
            landed = True
            if puts:
                try:
                    if self.on_put is not None:
                        self.on_put(puts)
                except Exception as exc:  # (never the write's: its call waits for it)
                    log.warning("journal %s: on_put failed (%s: %s)", self.space, type(exc).__name__, exc)
                try:
                    await self.journal.put_many(self.space, puts)
                except Exception as exc:  # the call goes on unjournaled: only a restart just now would lose it
                    log.warning("journal %s: write failed (%s: %s)", self.space, type(exc).__name__, exc)
                    landed = False
            if done is not None and not done.done():
                done.set_result(landed)


def redis_journal(settings, engine: str, rewrite: Callable[[], Awaitable[Any]] | None = None,
                  seal: JournalSeal | None = None) -> RedisJournal | None:
    """The Redis journal of an engine named ``engine``, if Redis is configured."""
    url = settings.journal_redis_url()
    return RedisJournal(url, settings.cache.redis_prefix, engine, settings.cache.redis_timeout_s,
                        rewrite, settings.journal_redis_cluster(), seal) if url else None


def make_journal(settings, engine: str, hub: Any, rewrite: Callable[[], Awaitable[Any]] | None = None,
                 holder: str | None = None):
    """The journal for an engine named ``engine``: files under ``journal.dir`` when it is set, else Redis when one is
    configured (``rewrite`` writes the holder's records again where another Redis process answers; ``holder``
    names it for the seal that tells its restart a Redis that lost them, ``actors._journal_seal``), else the
    hub's memory."""
    if settings.journal.dir is not None:
        from actors._file_journal import FileJournal

        files = FileJournal(settings.journal.dir, engine, settings.journal.archive_s)
        if holder is not None:  # its writer, from its start: a resume then waits for it, a killed run's survivor
            files.hold()
        return files
    seal = JournalSeal(hub, holder) if holder is not None else None
    return redis_journal(settings, engine, rewrite, seal) or HubJournal(hub)
