"""A driver's share of the engine's record of whose each response id is (a mixin of ``Engine``;
``actors._hub_owners`` keeps it in the result hub shards).

``Engine.responses`` stays the record the checks read (``Admitting._owned``, the endpoint's): it learns from the
answers this driver gets, and, before a submission naming an id it does not know is judged, from the hub shards,
asked once for all the submission's unknown ids (a call per shard; none when every id is known here, or was
asked before and no shard knew it). An id never changes hands, and a shard learns the ids it pushes before any
driver can hold them, so an owner, once answered, is kept for good. "Nobody's" is kept only ``NOBODY_FOR_S``
(``engine.core.response_owners``): a shard is also taught ids it never pushed (an endpoint started on its state
directory, after a script had asked), and a driver that kept that answer let another tenant continue the id. A shard
Ray restarted (not ``whole``) knows only what the drivers rewired since gave back, so its "nobody's" is not kept at
all. A rewired shard that did not take this driver's record (it timed out, or was busy) is given it again, alone, at
each health check until it does (``_share_owed``): it counts as recovered only then, and its answers stay not
``whole`` meanwhile (before, the whole rewire was made again, journal reads and re-admission with it, so a slow
shard got more work at every check). A hub that
does not answer in ``OWNERS_WAIT_S`` (restarting) leaves the record as it was: a driver lets an unknown id go, as
it did alone; the endpoint answers a 503 for a request it would refuse only for want of that answer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from engine.core._logkeys import get_logger
from engine.core._within import within
from engine.core.request import Request
from engine.core.response_owners import ResponseOwners, refs_of

__all__ = ["OWNERS_WAIT_S", "SharedOwners", "body_of"]

log = get_logger("smartbatch")

OWNERS_WAIT_S = 5.0  # real seconds a submission waits for the hub shards' answer about ids it does not know


class SharedOwners:
    """Mixed into ``Engine``; uses its ``_ray``, ``_h`` (the hub shards), ``responses`` and, for the restarted
    shards, ``_count_recovered`` (``Supervised``)."""

    responses: ResponseOwners
    owner_asks = 0  # calls made to the hub shards about unknown ids (each a whole submission's)

    def _unknown_ids(self, bodies: Iterable[Any]) -> list[tuple[str, str]]:
        refs = [(kind, ident) for b in bodies if isinstance(b, Mapping) for _, kind, ident in refs_of(b)]
        return self.responses.unknown(refs) if refs else []  # most bodies name none: no lock taken

    def _ask_owners(self, requests: Iterable[Request | Mapping]) -> bool:
        """Learn from the hub shards the owners of the ids ``requests`` name that this driver does not know. False
        when some shard did not answer (the record is as it was)."""
        refs = self._unknown_ids(body_of(r) for r in requests)
        if not refs:
            return True
        self.owner_asks += 1
        try:
            answers = self._ray.get([h.owners_of.remote(refs) for h in self._h["hubs"]], timeout=OWNERS_WAIT_S)
        except Exception as exc:  # noqa: BLE001 (a shard restarting or gone: the record stays as it was)
            return self._not_asked(exc)
        return self._took(refs, answers)

    async def know_owners(self, bodies: Iterable[Mapping[str, Any]]) -> bool:
        """``_ask_owners`` for asyncio (the endpoint, before its check): the owners of the ids ``bodies`` name
        that this driver does not know, from the engine's hub shards. False when some shard did not answer."""
        refs = self._unknown_ids(bodies)
        if not refs:
            return True
        self.owner_asks += 1
        try:
            # (within: wait_for swallowed a cancel that came with the answers, and the cancelled submission queued on)
            answers = await within(asyncio.gather(*(_awaited(h.owners_of.remote(refs)) for h in self._h["hubs"])),
                                   OWNERS_WAIT_S)
        except Exception as exc:  # noqa: BLE001 (as _ask_owners)
            return self._not_asked(exc)
        return self._took(refs, answers)

    def share_owners(self, hubs: list[Any] | None = None, timeout_s: float = OWNERS_WAIT_S) -> bool:
        """Give this driver's record to ``hubs`` (default: shard 0): a shard Ray restarted knows nothing, and an
        endpoint's record read back from its state directory is known to the other drivers. False if not taken."""
        rows = self.responses.rows()
        if not rows:
            return True
        try:
            self._ray.get([h.teach_owners.remote(rows) for h in hubs or self._h["hubs"][:1]], timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 (it restarted again: the next rewire gives it again)
            log.warning("smartbatch: the result hub did not take this driver's %d response id owner(s) (%s)",
                        len(rows), type(exc).__name__)
            return False
        return True

    def _init_owed(self) -> None:
        self._owed: set[str] = set()  # kinds of rewired hub shards that have not taken this driver's record yet
        self._sharing = threading.Lock()  # one giving at a time: a check never piles calls on a slow shard

    def _share_owed(self, held: bool = False, owe: Iterable[str] = ()) -> list[str]:
        """Give this driver's record to each rewired hub shard that has not taken it yet, ``owe`` (just rewired)
        with them; the kinds that took it now. ``held``: the caller took ``_sharing`` (released here)."""
        if not held:
            self._sharing.acquire()
        # Marked under the lock: marked while a retry was giving the shard's last incarnation its record, the
        # retry's success took the mark away, and the new incarnation was never given it (a review).
        self._owed.update(owe)
        try:  # an engine stopped meanwhile gets no more calls: each may wait ``OWNERS_WAIT_S`` past the stop
            taught = [kind for kind in sorted(self._owed)
                      if self._running and self.share_owners([self._h["named"][kind]])]
            self._owed.difference_update(taught)
        finally:
            self._sharing.release()
        return taught

    def _retry_owed(self) -> None:
        """At a health check: ``_share_owed`` in a thread of its own (a shard may take ``OWNERS_WAIT_S`` to
        answer), unless one still runs. The shards that take it count as recovered (``Supervised``)."""
        if self._owed and self._sharing.acquire(blocking=False):
            try:
                threading.Thread(target=self._reshare, name="smartbatch-share", daemon=True).start()
            except BaseException:  # not started (out of threads): held for good, every recovery waited on it
                self._sharing.release()
                raise

    def _reshare(self) -> None:
        self._count_recovered(self._share_owed(held=True))

    def _took(self, refs: list[tuple[str, str]], answers: list[tuple[list[tuple[str, str, str]], bool]]) -> bool:
        self.responses.load(row for rows, _ in answers for row in rows)
        if all(whole for _, whole in answers):  # those no shard knew: not asked again
            self.responses.asked(refs)
        return True

    def _not_asked(self, exc: BaseException) -> bool:
        log.info("smartbatch: the result hub did not say whose response ids are (%s); judged on this driver's "
                 "record alone", type(exc).__name__)
        return False


def body_of(r: Any) -> Any:
    """The body of a submitted request (a ``Request`` or a dict), or None."""
    return r.body if isinstance(r, Request) else r.get("body") if isinstance(r, Mapping) else None


async def _awaited(ref: Any) -> Any:
    return await ref
