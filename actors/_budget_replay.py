"""What a Redis budget book settled or charged lately, sent again when another Redis process answers than the one
that took it (``RedisBudgetBook``): a Redis that crashes and comes back from its last snapshot (RDB, or AOF's last
second) has lost them, its connections re-made unseen by the client, and the claims they settled came back as
open reservations, their spend gone, held until ``reservation_ttl_s`` (two days by default; a helper's hunt).
Each counts once when sent again: a settlement through its claim's record or the marker it left, a charge
through its id."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import OrderedDict

__all__ = ["REPLAY_KEEP_MAX", "REPLAY_KEEP_S", "SERVER_CHECK_S", "ScriptRefused", "ServerWatch"]

log = logging.getLogger("smartbatch.budget")

# What this book settled or charged lately, kept to be sent again should Redis come back from an older state (a
# crash restored from a snapshot: its claims settled since are open again, their spend gone). Snapshots are taken
# up to an hour apart by Redis's defaults.
REPLAY_KEEP_S, REPLAY_KEEP_MAX = 7200.0, 200_000
CHUNK = 1000  # settlements sent again per script, so one script never runs long
SERVER_CHECK_S = 1.0  # real seconds between reads of which Redis process answers (``INFO server`` run_id)


class ScriptRefused(Exception):
    """The ledger's script refused what it was given (a value it cannot read, a key of another type under the
    ledger's prefix): not an outage, and settled apart (``BudgetController._settle_apart``)."""


class ServerWatch:
    """Mixed into ``RedisBudgetBook``, which provides ``client``, ``_open``, ``_settle_items``, ``_charge_items``."""

    def __init__(self) -> None:
        # rid -> (when, actual, who, windows); cid -> (when, charge, its now): taken in the last REPLAY_KEEP_S
        self._settled: OrderedDict[str, tuple] = OrderedDict()
        self._charged: OrderedDict[str, tuple] = OrderedDict()
        self.server: str | None = None  # the run_id of the Redis process that took them
        self._server_read = -math.inf
        self.replayed = 0  # settlements and charges sent again after such a restart

    async def _same_server(self) -> None:
        """Every ``SERVER_CHECK_S`` at most: if another Redis process answers than the one that took this book's
        recent settlements and charges, send them again (each counts once: a settlement through its claim's
        record or its marker, a charge through its id)."""
        t = time.monotonic()
        if t - self._server_read < SERVER_CHECK_S:
            return
        from redis.exceptions import ResponseError

        try:
            sid = str((await self.client.info("server")).get("run_id", ""))
        except ResponseError as exc:  # INFO refused (an ACL, a managed service): not watched, never an outage
            log.warning("budget ledger: Redis refuses INFO (%s): a restart of it from an older state goes "
                        "unnoticed", exc)
            self._server_read = math.inf
            return
        self._server_read = t
        if self.server is None or sid == self.server:
            self.server = sid
            return
        settled, charged = list(self._settled.items()), list(self._charged.values())
        for rid, (at, _, who, windows) in settled:
            self._open.setdefault(rid, (at, who, windows))
        for k in range(0, len(settled), CHUNK):
            await self._settle_items([(rid, rec[1]) for rid, rec in settled[k:k + CHUNK]])
        for now, group in itertools.groupby(charged, key=lambda x: x[2]):
            await self._charge_items([c for _, c, _ in group], now)
        log.warning("budget ledger: another Redis process answers (run_id %s, was %s): restarted from an older "
                    "state? %d settlement(s) and %d charge(s) of the last %.0f min sent again, each counted once",
                    sid[:8], self.server[:8], len(settled), len(charged), REPLAY_KEEP_S / 60)
        self.server = sid  # only once all went: a failure midway tries them all again (each counts once)
        self.replayed += len(settled) + len(charged)

    def _kept(self, book: OrderedDict, key: str, value: tuple) -> None:
        book.pop(key, None)
        book[key] = value
        cutoff = value[0] - REPLAY_KEEP_S
        while book and (len(book) > REPLAY_KEEP_MAX or next(iter(book.values()))[0] < cutoff):
            book.popitem(last=False)
