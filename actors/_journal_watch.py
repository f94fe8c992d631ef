"""Which Redis process holds a Redis journal's records (``actors.journal.RedisJournal``), and its holder's records
written again where they may be gone: a Redis restarted without persistence, or back from a snapshot older than
them, has lost the records of the batches and calls under way, unseen (the client re-makes its connections), and a
write that failed (Redis full under ``noeviction``, or away) left a batch or call unjournaled. Either way a restart
of the holder then sent their members again, paid twice (a helper's hunt)."""

from __future__ import annotations

import asyncio

from actors._journal_seal import SEAL
from actors._redis_cluster import server_info
from engine.core._logkeys import get_logger

__all__ = ["SERVER_CHECK_S", "RecordsWatch", "refuses_info"]

log = get_logger("smartbatch.journal")

SERVER_CHECK_S = 1.0  # real seconds between reads of which Redis process holds a journal's records (``run_id``)


class RecordsWatch:
    """Mixed into ``RedisJournal``, which provides ``_use`` (its client, for one command), ``_base``, ``_closed``, ``_rewrite`` (writes the
    holder's records again, raising if one failed), ``_server`` (the ``run_id`` last seen), ``_unwritten`` (a
    write failed, or another Redis process answered, since they were last written), ``_checking`` (a lock),
    ``seal`` (``actors._journal_seal``, None for a holder with none), ``_sealed`` (this incarnation sealed it),
    ``seal_held`` (its holder holds the seal back) and ``_spaces`` (those its keeper refreshes)."""

    async def _watch(self) -> None:
        # Once a second while the holder runs: a batch lives up to 24 h, and a restart any time in it needs its record.
        while not self._closed:
            try:
                if await self.check_server() is None:
                    return
            except Exception as exc:  # Redis away, or a write failed: the next check tries them all again
                if self._closed:  # (a close's cancel that lands in a Redis read can come back as its error)
                    return
                log.debug("journal %s: server check failed (%s: %s)", self._base, type(exc).__name__, exc)
            if self._closed:  # closed in the check, its cancel spent there (a Redis read cut, caught as its error by a
                return        # write of the holder's): it slept on, up to a second (an hour in tests), cancelled
            await asyncio.sleep(SERVER_CHECK_S)

    async def check_server(self) -> str | None:
        """The ``run_id`` of the Redis process that holds this journal's records, written there again first if
        another one answers than before, or a write failed since the last check; None if Redis refuses ``INFO``
        for good (an ACL, a renamed command: a restart then goes unnoticed)."""
        from redis.exceptions import ResponseError

        async with self._checking:
            try:
                async with self._use() as client:
                    sid = str((await server_info(client, self._base)).get("run_id", ""))
            except ResponseError as exc:
                if not refuses_info(exc):  # BUSY (a long script), MASTERDOWN: for a while, tried at the next check
                    raise
                log.warning("journal %s: Redis refuses INFO (%s): a restart of it that loses the records of work "
                            "under way goes unnoticed", self._base, exc)
                return None
            if self._server is None:
                # Its first read comes after the first write (the watch starts with it): a restart between them left
                # the new process's id read as the one that holds the records, and went unseen (a rehearsal's
                # failure). So the first check writes the records under way again, once.
                self._unwritten = True
            elif sid != self._server:
                log.warning("journal %s: another Redis process answers (run_id %s, was %s): the records of the work "
                            "under way are written again", self._base, sid[:8], self._server[:8])
                self._unwritten = True  # written below, or at a later check until they are
            self._server = sid
            if self._unwritten:
                # Cleared after the INFO and before the writes, with no wait between: a write that failed while
                # the INFO was out marked them and the mark was then cleared unread, the batch left unjournaled for
                # good (a review); one that fails while they are written marks them again for the next check.
                self._unwritten = False
                try:
                    if not await self._takes_writes():
                        # Full or read-only: the records would be refused whole, and were sent each second while it
                        # lasted, by every dispatcher (a review: 24 MB in 5 checks for a 4 MB record).
                        self._unwritten = True
                        return sid
                    await self._rewrite()
                    await self._reseal()
                except BaseException:  # (a write that fails marks them so too)
                    self._unwritten = True
                    raise
            return sid

    def _seal_in(self, pipe) -> None:
        """Add the holder's seal to ``pipe`` (a transaction writing its records)."""
        from actors.journal import JOURNAL_TTL_S

        if self.seal is not None:
            self._spaces.add(SEAL)  # its expiry pushed on with the records'
            pipe.hset(self._base + SEAL, self.seal.holder, b"1")
            pipe.expire(self._base + SEAL, JOURNAL_TTL_S)

    async def lost_records(self) -> bool:
        """Whether this Redis lost records its holder wrote (``actors._journal_seal``): asked by a restarted
        holder after it read them, which then reads an empty journal as lost records, not as nothing written."""
        if self.seal is None:
            return False
        async with self._use() as client:
            sealed = bool(await client.hexists(self._base + SEAL, self.seal.holder))
        return await self.seal.lost(self._base, sealed)

    async def _reseal(self) -> None:
        # Its holder's records, written again, may be none (all ended): the seal too, or a restart of the holder
        # read the loss that came before as one of records it no longer had (a false alarm). Not while the holder
        # holds it (``release_seal``): its records are not all here.
        if self.seal is not None and not self.seal_held:
            async with self._use() as client, client.pipeline(transaction=True) as pipe:
                self._seal_in(pipe)
                await pipe.execute()
            self._sealed = True

    async def release_seal(self) -> None:
        """The holder's records are all here again (the batches a restart took from the hub's index journaled, or
        ended): sealed now; if this fails, by the watch's next rewrite of every record, never by a record's write."""
        self.seal_held = False
        try:
            await self._reseal()
        except BaseException:
            # A Redis that fails the seal may be restarting empty: the next record written after it, sealing, put the
            # seal back beside that record alone, the loss of the others unseen by a restart (a review)
            self._sealed = self._unwritten = True
            raise

    async def _takes_writes(self) -> bool:
        """Whether Redis takes a write now: a full Redis (``noeviction``) refuses every write that may grow its
        memory whatever its size, a replica or one failing its snapshots every write; a one-field write tells
        (with the journal's own commands: an ACL that lets it write its records lets it)."""
        from redis.exceptions import NoPermissionError, ResponseError

        try:
            async with self._use() as client, client.pipeline(transaction=False) as pipe:
                pipe.hset(self._base + "~takes-writes", "w", b"")
                pipe.pexpire(self._base + "~takes-writes", 1000)
                await pipe.execute()
        except NoPermissionError:  # (not this key, say): the records' own write tells
            return True
        except ResponseError as exc:
            log.debug("journal %s: Redis takes no writes yet (%s)", self._base, exc)
            return False
        return True


def refuses_info(exc: BaseException) -> bool:
    """Whether Redis's answer to ``INFO`` refuses it for good (an ACL without it, a managed service that renamed or
    disabled it), not for a while: ``BUSY`` (another client's long script) was taken for a refusal, and the watch
    of which Redis process answers ended for good, a later restart unseen (a review)."""
    from redis.exceptions import NoPermissionError

    text = str(exc).lower()
    return isinstance(exc, NoPermissionError) or "unknown command" in text or text.startswith("noperm")
