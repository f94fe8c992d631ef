"""What a Redis budget book settled or charged lately, sent again when another Redis process answers than the one
that took it (``RedisBudgetBook``): a Redis that crashes and comes back from its last snapshot (RDB, or AOF's last
second) has lost them, its connections re-made unseen by the client, and the claims they settled came back as
open reservations, their spend gone, held until ``reservation_ttl_s`` (two days by default; a helper's hunt).
Each counts once when sent again: a settlement through its claim's record or the marker it left, a charge
through its id. The claims it granted and has not settled yet are reserved again first, where that Redis lost
them: forgotten, their room went to new claims, and their spend came on top when they settled (a helper's hunt:
$19 billed under a $10 limit)."""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from collections import Counter, OrderedDict

from actors._budget_scripts import BOOK_SEQ
from actors._journal_watch import refuses_info
from actors._redis_cluster import server_info, serving_node, slot_left
from engine.core._logkeys import get_logger

__all__ = ["REPLAY_KEEP_MAX", "REPLAY_KEEP_S", "SERVER_CHECK_S", "ScriptRefused", "ServerWatch"]

log = get_logger("smartbatch.budget")

# What this book settled or charged lately, kept to be sent again should Redis come back from an older state (a
# crash restored from a snapshot: its claims settled since are open again, their spend gone). Snapshots are taken
# up to an hour apart by Redis's defaults.
REPLAY_KEEP_S, REPLAY_KEEP_MAX = 7200.0, 200_000
CHUNK = 1000  # settlements sent again per script, so one script never runs long
SERVER_CHECK_S = 1.0  # real seconds between reads of which Redis process answers (``INFO server`` run_id)
# A book's sequence (``BOOK_SEQ``) outlives its last script by its claims' expiry and a day. Gone after that, it is
# taken for lost writes once (nothing of them left to put back: the claims expired, the replays older than
# REPLAY_KEEP_S are dropped first), and taken again from there.
SEQ_SLACK_S = 86400
SEQ_TRIES = 3  # a script that still finds this book's writes lost after so many put-backs: an outage


# Reserve again, past the limit if it comes to that (the money is under way), the claims a Redis that restarted lost:
# neither its record nor the marker of its settlement is there. Its expiry is kept; a window already gone is skipped.
_REOPEN = """
if redis.replicate_commands then redis.replicate_commands() end
""" + BOOK_SEQ + """
local seq = book_seq()
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local i, back = 3, 0
for c = 1, tonumber(ARGV[2]) do
  local rid, amount, left, who, nk = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], tonumber(ARGV[i + 4])
  local claim = prefix .. ':c:' .. rid
  if redis.call('EXISTS', claim) == 0 and redis.call('EXISTS', prefix .. ':s:' .. rid) == 0 then
    back = back + 1
    redis.call('HSET', claim, '_who', who)
    for j = 0, nk - 1 do
      local k, ttl = ARGV[i + 5 + 2 * j], tonumber(ARGV[i + 6 + 2 * j])
      if ttl >= 0 then
        local h = prefix .. ':w:' .. k
        redis.call('HINCRBYFLOAT', h, 'reserved', amount)
        if ttl > 0 then redis.call('EXPIRE', h, ttl) end
        redis.call('HINCRBYFLOAT', claim, k, amount)
      end
    end
    redis.call('ZADD', prefix .. ':exp', now + left, rid)
  end
  i = i + 5 + 2 * nk
end
return {seq, back}
"""


class ScriptRefused(Exception):
    """The ledger's script refused what it was given (a value it cannot read, a key of another type under the
    ledger's prefix): not an outage, and settled apart (``BudgetController._settle_apart``)."""


class ServerWatch:
    """Mixed into ``RedisBudgetBook``, which provides ``client``, ``prefix``, ``route`` (the key its scripts name),
    ``reservation_ttl_s``, ``_open``, ``_looked``, ``_guard`` (``on_cluster`` or ``str``), ``_settle_items``,
    ``_charge_items``."""

    def __init__(self) -> None:
        self._reopen_script = self.client.register_script(self._guard(_REOPEN))
        self._watch = asyncio.Lock()
        self.reopened = 0  # open claims reserved again after such a restart
        # rid -> (when, actual, who, windows); cid -> (when, charge, its now): taken in the last REPLAY_KEEP_S
        self._settled: OrderedDict[str, tuple] = OrderedDict()
        self._charged: OrderedDict[str, tuple] = OrderedDict()
        self.server: str | None = None  # the run_id of the Redis process that took them
        self._server_at: str | None = None  # where it was read (a cluster node's host:port), and the last read's
        self._read_at: str | None = None
        self._server_read = -math.inf
        self.replayed = 0  # settlements and charges sent again after such a restart
        self._watcher: asyncio.Task | None = None  # reads the server while claims are open (``_arm_watch``)
        self._unwatched = False
        # This book's sequence in the ledger's slot (``BOOK_SEQ``), a key of its own: a book expects nothing of a
        # ledger until its first script answers, so one written before it (or by a version without it) is read as
        # it is, never taken for a ledger that lost writes.
        self._seq_key = f"{self.prefix}:seq:{secrets.token_hex(8)}"
        self._seq = -1  # the highest its scripts answered since its writes were last put back; -1: none yet
        self._epoch = 0  # bumped when they were: what answers a script sent before says nothing of the Redis now
        self._putting_back = False
        # The numbers its scripts answered in this epoch above the lowest one a script in flight was sent with, and
        # those sent ones (want -> scripts): one answered twice tells writes lost under a script in flight (``_run``).
        self._seen: set[int] = set()
        self._flying: Counter[int] = Counter()
        self._prune_at = 1024
        self.lost_writes = 0  # times a script found writes of this book gone (they were put back before it ran)

    def _arm_watch(self) -> None:
        """While this book holds open claims, read which Redis process answers once a second, calls or not: an
        engine sharing the ledger whose claims wait hours for a provider batch, with no call meanwhile, had them
        reserved again only at their settlement, and the other engines were granted their room first (a helper's
        hunt: $13 spent under a $10 limit after a restart without persistence)."""
        if (self._watcher is None or self._watcher.done()) and not self._unwatched:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_open())

    async def _watch_open(self) -> None:
        # Not once ``INFO`` is refused for good (no check left to make: it woke each second to do nothing, a review).
        while self._open and not self._unwatched and self._server_read != math.inf:
            await asyncio.sleep(SERVER_CHECK_S)
            try:
                await self._same_server()
            except Exception as exc:  # Redis away (the controller's calls say so): the next check tries again
                self.doubt_server()
                log.debug("budget ledger: server check failed (%s: %s)", type(exc).__name__, exc)

    def doubt_server(self) -> None:
        """A call to the ledger's Redis failed: read which process answers before the next call is decided, not a
        second after the last read. What answers after an outage may be another process (a Redis restarted, a
        replica promoted on a cluster, at another address) that lacks the last writes; a failover taken over at
        once, or a restart under a second, ended the outage within that second, and the first calls there were
        decided before the claims it lost were reserved again (a $4.50 claim granted under a $10 limit with $6 spent
        or held, ``tests/integration/test_redis_cluster_failover.py``)."""
        if self._server_read != math.inf:  # INFO refused for good: nothing to read
            self._server_read = -math.inf

    def stop_watch(self) -> None:
        """No more checks (the ledger is closed)."""
        self._unwatched = True
        if self._watcher is not None:
            self._watcher.cancel()

    async def _same_server(self) -> None:
        """Every ``SERVER_CHECK_S`` at most: if another Redis process answers than the one that took this book's
        recent settlements and charges, reserve again the open claims it lost, and send those again (each counts
        once: a settlement through its claim's record or its marker, a charge through its id)."""
        async with self._watch:  # a call meanwhile waits: let through, it was granted the room of claims not back yet
            await self._check_server()

    async def _run(self, script, args: list, check: bool = True):
        """Run one of the scripts that write for this book (``BOOK_SEQ``) and return its answer. ``check``: should
        the Redis answering lack writes of this book, the script refuses, they are put back and it runs again. The
        watch reads ``run_id`` once a second, and a failover seen as a redirect (no call failed: the old master
        demoted alive) or a restart within that second had a claim granted on the promoted replica 3.5 ms after the
        takeover, over the limit (a scratch run of stop 75; ``test_redis_cluster_failover.py``)."""
        for _ in range(SEQ_TRIES if check else 1):
            epoch = self._epoch
            # While they are put back (or owed: a put-back stopped midway), a call that passed the watch before is
            # refused and waits for all of them.
            want = -2 if not check else 2**53 if self._putting_back else self._seq
            self._flying[want] += 1
            try:
                tag, value = await script(keys=[self.route[0], self._seq_key],
                                          args=[*args, int(self.reservation_ttl_s) + SEQ_SLACK_S, want])
            finally:
                self._flying[want] -= 1
                if not self._flying[want]:
                    del self._flying[want]
            if tag not in (b"lost", "lost"):
                if check and epoch == self._epoch and self._numbered(int(tag)):
                    # A script sent before this book saw the writes lost passed the check (its number taken then)
                    # and took a number answered already: its answer stands, what was lost is put back before
                    # the next decision. Before (a review), no later script was refused: forgotten for good.
                    await self._writes_lost(epoch, int(tag), twice=True)
                return value
            await self._writes_lost(epoch, int(value))
        from redis.exceptions import RedisError

        raise RedisError(f"the ledger's Redis lost this book's writes again each time they were put back "
                         f"({SEQ_TRIES} times; its key {self._seq_key} evicted or deleted?)")

    def _numbered(self, n: int) -> bool:
        """Take ``n``, a number a script of this epoch answered; True when one answered it already (a Redis that
        kept its writes never does). Only numbers above the lowest a script in flight was sent with can come again
        (a script refused below them), so only those are kept."""
        twice = n in self._seen
        self._seen.add(n)
        self._seq = max(self._seq, n)
        if len(self._seen) > self._prune_at:  # at twice what was kept last time: linear in the numbers answered
            low = min(self._flying, default=self._seq)
            self._seen = {k for k in self._seen if k > low}
            self._prune_at = max(1024, 2 * len(self._seen))
        return twice

    async def _writes_lost(self, epoch: int, have: int, twice: bool = False) -> None:
        async with self._watch:
            if epoch != self._epoch:  # put back meanwhile, by another call or the watch
                return
            owed = self._putting_back  # a put-back stopped midway: made again (``_check_server``), not a new find
            self.lost_writes += not owed
            found = (f"the book's sequence {have} answered twice" if twice else
                     f"the book's sequence there {have}, {self._seq} seen")
            await self._check_server(lost="" if owed else found)

    async def _check_server(self, lost: str = "") -> None:
        """``lost``: a script found writes of this book gone (what it found); they are put back whichever process
        answers (a Redis rolled back keeps its run_id: ``DEBUG RELOAD``, or one refusing ``INFO``)."""
        t = time.monotonic()
        lost = lost or ("a put-back stopped midway, made again" if self._putting_back else "")
        if not lost and t - self._server_read < SERVER_CHECK_S:
            return
        sid = await self._read_server(t)
        if lost or (sid is not None and self.server is not None and sid != self.server):
            # The ledger's slot moved to another node (a reshard), its keys with it: nothing to put back. Taken for a
            # restart, each reshard sent the last two hours' settlements and charges again, with a WARNING of a
            # Redis that lost them (stop 78's hunt; each counted once). Only if the new node holds this book's
            # sequence as high as it saw: one that lost the slot's keys after the move (a restart, a replica
            # promoted) was taken for the move, and an engine waiting on its claims with no call had them lost until
            # its next call ($5 granted under a $10 limit with a $6 claim lost, a review).
            if not lost and await slot_left(self.client, self._server_at, self.server, self.route[0]) \
                    and await self._book_kept():
                log.info("budget ledger: its slot moved from %s to %s (a reshard): its keys went with it",
                         self._server_at, self._read_at)
                self.server, self._server_at = sid, self._read_at
                return
            await self._put_back(sid, lost)
        elif sid is not None:
            self.server, self._server_at = sid, self._read_at

    async def _book_kept(self) -> bool:
        """Whether the Redis serving the ledger's slot now holds every write of this book it saw answered: its
        sequence there as high (a Redis keeps or loses writes in their order; a key moves whole)."""
        return int(await self.client.get(self._seq_key) or 0) >= self._seq

    async def _read_server(self, t: float) -> str | None:
        """The run_id of the Redis process serving the ledger's slot, or None when it cannot be read now."""
        if self._server_read == math.inf:
            return None
        from redis.exceptions import ResponseError

        try:
            self._read_at = await serving_node(self.client, self.route[0])  # read first: a mismatch puts back
            sid = str((await server_info(self.client, self.route[0])).get("run_id", ""))
        except ResponseError as exc:  # INFO refused (an ACL, a managed service): not watched, never an outage
            if not refuses_info(exc):  # BUSY (a long script) for a while: checked again (a review: never again)
                self._server_read = t
                log.debug("budget ledger: server check failed (%s)", exc)
                return None
            log.warning("budget ledger: Redis refuses INFO (%s): a restart of it from an older state goes "
                        "unnoticed but by the scripts' sequence of each book", exc)
            self._server_read = math.inf
            return None
        self._server_read = t
        return sid

    async def _put_back(self, sid: str | None, lost: str) -> None:
        """Reserve again the open claims the Redis now answering lost, send again the settlements and charges of the
        last ``REPLAY_KEEP_S`` (each counts once), then take its sequence of this book as the one to expect. Stopped
        midway (Redis away again, the call cancelled), it stays owed (``_putting_back``): every script refuses until
        one goes through whole. Before (a review), the next claim passed the check with a lost settlement not sent
        again yet: $3 granted with $6 of spend uncounted under a $10 limit (``test_budget_faults_hunt.py``)."""
        self._putting_back = True
        t = time.monotonic()
        for kept in (self._settled, self._charged):  # older ones' markers may be gone: sent again, counted twice
            while kept and next(iter(kept.values()))[0] < t - REPLAY_KEEP_S:
                kept.popitem(last=False)
        settled, charged = list(self._settled.items()), list(self._charged.values())
        back = await self._reopen([rid for rid in self._open if rid not in self._settled])
        for rid, (at, _, who, windows) in settled:
            self._open.setdefault(rid, (at, who, windows, 0.0))
        for k in range(0, len(settled), CHUNK):
            await self._settle_items([(rid, rec[1]) for rid, rec in settled[k:k + CHUNK]], check=False)
        for now, group in itertools.groupby(charged, key=lambda x: x[2]):
            await self._charge_items([c for _, c, _ in group], now, check=False)
        # Bumped once, after its own writes above, which bumped nothing: a script whose sequence was taken before the
        # put-back began, and that reached Redis during it, found there what the book saw once the reopen had run
        # and was granted on a ledger still missing a settlement sent again after (a review). A loss after this
        # is seen by the next script.
        self._seq = int((await self._reopen_script(keys=[self.route[0], self._seq_key],
                                                   args=[self.prefix, 0, int(self.reservation_ttl_s) + SEQ_SLACK_S,
                                                         -1]))[0])
        self._epoch += 1
        self._seen.clear()  # the numbers of the epoch before may be answered again: the Redis now lacked them
        self._putting_back = False
        old = (self.server or "?")[:8]
        what = ([f"another Redis process answers (run_id {sid[:8]}, was {old})"] if sid and sid != self.server else [])
        what += [f"the Redis answering lacks writes this book made ({lost})"] if lost else []
        log.warning("budget ledger: %s: restarted from an older state, or a replica promoted without them? %d open "
                    "claim(s) it had lost reserved again; %d settlement(s) and %d charge(s) of the last %.0f min sent "
                    "again, each counted once", "; ".join(what), back, len(settled), len(charged), REPLAY_KEEP_S / 60)
        if sid is not None:  # only once all went: a failure midway tries them all again (each counts once)
            self.server, self._server_at = sid, self._read_at
        self._looked.clear()  # a move of a window's old key (``_take_legacy``) may be among what it lost
        self.replayed += len(settled) + len(charged)
        self.reopened += back

    async def _reopen(self, rids: list[str]) -> int:
        """Reserve again, in the Redis that now answers, the claims of ``rids`` (granted by this book, not settled)
        that it lost; returns how many it had lost. Each keeps its expiry, and a window whose hash has expired
        since is not made again."""
        t, back = time.monotonic(), 0
        for k in range(0, len(rids), CHUNK):
            args: list = [self.prefix, 0]
            for rid in rids[k:k + CHUNK]:
                at, who, windows, amount = self._open.get(rid, (-math.inf, "", [], 0.0))
                elapsed = t - at
                if elapsed >= self.reservation_ttl_s:  # settled meanwhile, or the sweep would have released it
                    continue
                args[1] += 1
                args += [rid, repr(float(amount)), repr(self.reservation_ttl_s - elapsed), who, len(windows)]
                for key, ttl in windows:  # its hash's life left: 0, a window that never ends; -1, gone
                    left = ttl - int(elapsed)
                    args += [key, 0 if ttl == 0 else left if left > 0 else -1]
            if args[1]:
                back += int(await self._run(self._reopen_script, args, check=False))
        return back

    def _kept(self, book: OrderedDict, key: str, value: tuple) -> None:
        book.pop(key, None)
        book[key] = value
        cutoff = value[0] - REPLAY_KEEP_S
        while book and (len(book) > REPLAY_KEEP_MAX or next(iter(book.values()))[0] < cutoff):
            book.popitem(last=False)
