"""Which drivers hold which ids at an ingest, and the forget of the ids only a departed driver held."""

from __future__ import annotations

import asyncio
import time

from engine.core._logkeys import get_logger

__all__ = ["DROPPED_FORGET_S", "DROPS_CHECK_S", "REBORN_GRACE_S", "UNKNOWN_HOLDER", "Holders"]

log = get_logger("smartbatch.ingest")

# A driver killed without ``stop()`` never forgets its ids nor leaves: the hub drops it once it has not pulled for
# ``hub.CLIENT_IDLE_S``; ingest asks the hub at most every DROPS_CHECK_S (real seconds, on a submit) and forgets
# the ids only it held DROPPED_FORGET_S later (the default ``retention_s``). Before, they stayed for good.
DROPS_CHECK_S = 60.0
DROPPED_FORGET_S = 3600.0
REBORN_GRACE_S = 60.0  # real seconds after a restart in which an ingest's holders may still be rebuilding
UNKNOWN_HOLDER = "\x00unknown"  # ``others``: any other driver may hold it (no driver's name has a NUL)


class Holders:
    """The driver-holding methods of ``Ingest`` (``holders``, ``_leaving`` and the drops read are its state)."""

    def _release(self, uid: str, client: str) -> bool:
        """``client`` no longer holds ``uid``: whether no driver does any more."""
        h = self.holders.get(uid)
        if h is None or h == client:
            self.holders.pop(uid, None)
            return True
        if isinstance(h, set):
            h.discard(client)
            return not h and self.holders.pop(uid) is not None
        return False

    async def others(self, uids: list[str], client: str) -> list[list[str]]:
        """For each of ``uids``, the drivers but ``client`` that hold it here (their copy must run on). For
        ``REBORN_GRACE_S`` after Ray restarted this ingest, ``UNKNOWN_HOLDER`` too: its holders are rebuilt as each
        driver re-admits its requests, and one that has not yet would have had its copy withdrawn with another's
        (a review); the asking driver takes that for every other driver still pulling."""
        held = [self.holders.get(u) for u in uids]
        out = [sorted(h - {client}) if isinstance(h, set) else [] if h in (None, client) else [h] for h in held]
        born = getattr(self, "_reborn_at", None)
        if born is not None and time.monotonic() - born < REBORN_GRACE_S:
            out = [[*o, UNKNOWN_HOLDER] for o in out]
        return out

    async def leave(self, client: str, after_s: float, dropped: bool = False) -> int:
        """Driver ``client`` left the engine: the ids only it held are forgotten ``after_s`` (real) seconds from
        now, its retention window, as it would have done (another driver submitting one meanwhile still gets
        its result). ``dropped``: the hub dropped it as idle; forgotten if it is still gone then. Returns how many."""
        mine = [u for u, h in self.holders.items() if h == client or (isinstance(h, set) and client in h)]
        if mine and client not in self._leaving:
            def go() -> None:
                self._leaving.pop(client, None)
                asyncio.ensure_future(self._forget_left(mine, client, dropped))

            self._leaving[client] = asyncio.get_running_loop().call_later(after_s, go)
        return len(mine)

    async def _forget_left(self, uids: list[str], client: str, dropped: bool) -> None:
        try:  # one dropped yet only paused pulls again once back, but may never again submit here (``_sort``)
            if dropped and await self.hubs.first.call("knows", client):
                return  # back: it still holds its ids
        except Exception:  # the hub did not answer: asked again later
            await self.leave(client, DROPPED_FORGET_S, dropped)
            return
        await self.forget(uids, client)

    def _check_drops(self) -> None:
        """At most every ``DROPS_CHECK_S``: ask hub shard 0 (every driver pulls from it) which drivers it dropped
        as gone since the last ask, and let each leave (see ``DROPPED_FORGET_S``)."""
        now = time.monotonic()
        if now < self._drops_check_at or not self.hubs or (self._drops_task and not self._drops_task.done()):
            return
        self._drops_check_at = now + DROPS_CHECK_S
        self._drops_task = asyncio.ensure_future(self._take_drops())

    async def _take_drops(self) -> None:
        try:
            gone, self._drops_seen = await self.hubs.first.call("dropped_since", self._drops_seen)
        except Exception as exc:  # asked again at the next check
            log.warning("ingest: could not ask the hub for dropped drivers (%s)", type(exc).__name__)
            return
        for client in gone:
            await self.leave(client, DROPPED_FORGET_S, dropped=True)
