"""What the engine's stop does itself for a dispatcher that died in its cancel and that Ray did not bring back in
time (``actors._stop_dispatchers._stop_restarted``): it reads the dispatcher's open provider batches from its journal,
cancels each at the provider by its id, settles each member's claim at its bound with the budget controller, and
names at ERROR each batch it could not cancel.

A restart is a new worker process that imports Ray, the package and the provider's SDK, then builds the
dispatcher: about 2 s of CPU. A normal-priority process on a machine at load 12 on 2 cores got that in 37 s and
more (stop 81: 14 s to import, the constructor not done 23 s later, where it takes 8 s in a start at that load),
past the stop's 27 s; the stop then said only that the dispatcher's batches "may run on", and they did: billed,
counted by no ledger, their claims held until ``reservation_ttl_s``. The stopping process reads the same journal
(the copy it took of the hub's memory, or ``journal.dir``, or Redis) and cancels with the key of its own
environment (the endpoint's ``api_key_env``), which a driver that started the engine has (it read it then)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.core._logkeys import get_logger, scrub

__all__ = ["Left", "cancel_left"]

log = get_logger("smartbatch.engine")
LEFT_CANCEL_S = 15.0  # real seconds for the stop's own run, its cancels' bound (each bounded by its provider's too)
SIMULATED = "a simulated provider (nothing runs anywhere)"  # (``_client``'s: nothing to cancel)
LEFT_CUT_S = LEFT_CANCEL_S + 5.0  # its thread is not waited for longer (a loop blocked, a journal read hung)


@dataclass
class Left:
    """What the stop did for one dispatcher not back: batch ids cancelled, and those it could not cancel (id, or
    the journal key of one being created, with why); claims settled (USD at their bounds)."""

    cancelled: list[str] = field(default_factory=list)
    not_cancelled: list[tuple[str, str]] = field(default_factory=list)
    settled: list[tuple[str, float]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # request ids of its sync calls (videos too) under way: no cancel
    unread: str | None = None  # why the journal could not be read (nothing is known of its batches then)


def cancel_left(engine: str, name: str, layout: dict | None, copy: Any, settle: Callable[[list], bool],
                journal: str | None = None, going: Callable[[], Any] | None = None) -> Left:
    """For dispatcher ``name`` (``dispatcher-<provider>``) of ``engine``, not back from its restart: cancel the
    open batches its journal names, settle their members' claims (``settle(items) -> taken``), and log it, each
    batch by its id. ``layout``: the engine's (its settings and catalog); ``copy``: the hub journal's copy (a
    dict by space, or a Ray reference to one); ``journal``: the journal's name (files and Redis). Bounded by
    ``LEFT_CANCEL_S`` (its cancels), cut at ``LEFT_CUT_S``; never raises. ``going()`` (the dispatcher's kill for
    good) is called once its journal is read, where this process can cancel what it names: the stop's call Ray
    held for it was still queued, and brought back meanwhile it cancelled and settled the same work again, the
    kept report counting its claims twice (a review of stop 81). Without the key here it is left to come back
    until the stop's end: it cancels with its own."""
    box: dict[str, Any] = {}
    provider = name.removeprefix("dispatcher-")

    def run() -> None:
        if provider == name:  # (named by its actor id: a stop given handles alone)
            box["left"] = Left(unread="its provider is not known to this stop")
            return
        try:
            box["left"] = asyncio.run(_cancel_left(provider, layout, copy, journal, box, going))
        except Exception as exc:  # said below, with what is known (its words may quote a URL: scrubbed)
            box["left"] = Left(unread=scrub(f"{type(exc).__name__}: {exc}")[:200])

    # In a thread of its own: the caller may run an event loop (an endpoint's stop), and a hung provider is cut
    # at the bound rather than holding the stop.
    worker = threading.Thread(target=run, name="smartbatch-stop-left", daemon=True)
    worker.start()
    worker.join(LEFT_CUT_S)
    left = box.get("left") or _cut(box)
    taken = bool(left.settled) and _settled(settle, left.settled)
    _say(engine, name, left, taken)
    return left


def _cut(box: dict) -> Left:
    """What a cut run had done: once it had read the journal, its claims are settled all the same and each batch
    whose cancel had no answer yet is named. Taken for a journal it could not read, they held their room until
    ``reservation_ttl_s`` and the log said nothing was known, its cancels maybe sent (a review of stop 81)."""
    read = box.get("read")
    if read is None:
        return Left(unread=f"not read within {LEFT_CUT_S:.0f} s")
    got, open_ = read
    done = {*got.cancelled, *(b for b, _ in got.not_cancelled)}
    why = f"its cancel not answered within {LEFT_CUT_S:.0f} s"
    return Left(list(got.cancelled), [*got.not_cancelled, *((k, why) for k in open_ if k not in done)],
                list(got.settled), list(got.calls))


def _settled(settle: Callable[[list], bool], items: list) -> bool:
    try:
        return bool(settle(items))
    except Exception:  # the controller gone: said below
        return False


async def _cancel_left(provider: str, layout: dict | None, copy: Any, journal: str | None, box: dict,
                       going: Callable[[], Any] | None) -> Left:
    from actors._types import BatchJob

    deadline = time.monotonic() + LEFT_CANCEL_S

    if not layout or "settings" not in layout or "catalog" not in layout:
        return Left(unread="the engine's layout (its settings and catalog) is gone")
    settings, catalog = layout["settings"], layout["catalog"]
    if layout.get("journal_in_memory") and not settings.journal.in_memory:
        # The engine's start kept it in the hub's memory (the cache's Redis may evict): the driver's settings,
        # published, still named that Redis, where the stop found nothing under way (a review of stop 81).
        settings = settings.model_copy(update={"journal": settings.journal.model_copy(update={"in_memory": True})})
    if copy is not None and not isinstance(copy, dict):  # a reference this process holds: read once
        import ray

        copy = await asyncio.to_thread(ray.get, copy, timeout=LEFT_CANCEL_S / 3)
    records = await _records(settings, provider, copy, journal, f"batches:{provider}")
    left = Left()
    # Its sync calls under way (a video's too, billed when it completes): no cancel exists; each claim is settled
    # at its bound, as the dispatcher's own stop settles them (``_settle_cut_short``), and each is named.
    for rec in (await _records(settings, provider, copy, journal, f"sync:{provider}")).values():
        b, j = rec[0], rec[1]
        left.calls.append(j.req.id)
        if j.claim is not None:
            left.settled.append((j.claim, _bound(j.req, catalog, b.mode)))
    # A batch whose members went again (a hedge, ``_batch_watch``) still runs, billed: cancelled too; its
    # members' claims went with their sync calls (above), as the dispatcher's recovery reads it.
    watches = await _records(settings, provider, copy, journal, f"batches:{provider}:watch")
    open_: list[tuple[str, Any]] = [(key, rec[1]) for key, rec in watches.items()]
    for key, rec in records.items():
        b, jobs, handle = rec[0], rec[1], rec[4]
        if not isinstance(b, BatchJob) or not jobs or key in watches:
            continue
        open_.append((key, handle))
        for j in jobs:
            if j.claim is not None:
                left.settled.append((j.claim, _bound(j.req, catalog, b.mode)))
    # (what a cut reads: each batch by its id, or its journal key while it was being created)
    box["read"] = (left, [getattr(h, "id", None) or k for k, h in open_])
    client = _client(provider, settings, catalog) if open_ else None
    if going is not None and (not isinstance(client, str) or client is SIMULATED):
        await asyncio.to_thread(going)
    if not open_:
        return left
    try:
        async def one(key: str, handle: Any) -> None:
            bid = getattr(handle, "id", None)
            if handle is None or bid is None:  # its create may have gone out: no id to cancel it by
                left.not_cancelled.append((key, "being created (no provider id journaled yet)"))
                return
            if isinstance(client, str):
                left.not_cancelled.append((bid, client))
                return
            try:
                # (the bound is the run's: a slow read left the cancels their 15 s, and the cut came first)
                await asyncio.wait_for(client.cancel(handle), max(1.0, deadline - time.monotonic()))
                left.cancelled.append(bid)
            except Exception as exc:
                left.not_cancelled.append((bid, scrub(f"the cancel failed: {type(exc).__name__}: {exc}")[:140]))

        await asyncio.gather(*(one(key, handle) for key, handle in open_))
    finally:
        if client is not None and not isinstance(client, str):
            await client.close()
    return left


async def _records(settings, provider: str, copy: Any, journal: str | None, space: str) -> dict:
    """The records of ``space`` where the restarted dispatcher would read them."""
    from actors.journal import HubJournal, make_journal

    if settings.journal.dir is None and not settings.journal_redis_url():
        j = HubJournal(None)
        if copy is None:
            raise LookupError("no copy of the hub's journal was taken (the hub did not answer in time)")
        j.hold(copy)
        return await j.items(space)
    if journal is None:
        raise LookupError("the engine's journal name is not known to this stop")
    j = make_journal(settings, journal, None)
    where = getattr(j, "dir", None)  # (a ``FileJournal``'s, made at its first write)
    if settings.journal.dir is not None and where is not None and not where.is_dir():
        # Read as empty, it said "nothing under way" (a stop from another machine: journal.dir is the node's).
        raise LookupError(f"no journal directory {where} on this machine (another node's, or nothing journaled)")
    try:
        return await j.items(space)
    finally:
        await j.close()


def _bound(req, catalog, mode: str) -> float:
    from engine.core.cost import reserve_bound
    from engine.core.errors import CatalogError

    try:
        return reserve_bound(req, catalog, mode, None)
    except (ValueError, CatalogError):  # a mode its model no longer offers (as ``_settle_cut_short``)
        return reserve_bound(req, catalog, "sync", None)


def _client(provider: str, settings, catalog) -> Any:
    """The provider over HTTP with this process's key, or why there is none (a str)."""
    from actors.providers import make_provider
    from engine.core.clock import ManualClock
    from engine.core.provider_api import Secret

    if provider not in settings.providers.http_providers(catalog.providers):
        return SIMULATED
    ep = settings.providers.endpoints[provider]
    key = Secret(os.environ.get(ep.api_key_env, ""))  # never a raw local (``Secret``'s docstring)
    if key.empty():
        return f"no key in this process's environment ({ep.api_key_env})"
    return make_provider(provider, catalog, settings, None, ManualClock(0.0), key)


def _say(engine: str, name: str, left: Left, taken: bool) -> None:
    if left.unread is not None:
        log.error("engine %s: %s died in the stop's cancel and was not back in time, and its journal could not be "
                  "read (%s): its provider batches under way may run on at the provider, billed and counted by no "
                  "ledger, and its claims hold their room until reservation_ttl_s", engine, name, left.unread)
        return
    usd = sum(u for _, u in left.settled)
    if not (left.cancelled or left.not_cancelled or left.calls):
        log.warning("engine %s: %s died in the stop's cancel and was not back in time; its journal names nothing "
                    "under way", engine, name)
    if left.cancelled:
        log.warning("engine %s: %s died in the stop's cancel and was not back in time: the stop cancelled its "
                    "provider batch(es) itself: %s", engine, name, ", ".join(left.cancelled))
    if left.not_cancelled:
        log.error("engine %s: %s died in the stop's cancel and was not back in time: %d provider batch(es) it had "
                  "under way were NOT cancelled and may run on, billed: %s", engine, name, len(left.not_cancelled),
                  "; ".join(f"{b} ({why})" for b, why in left.not_cancelled))
    if left.calls:
        log.warning("engine %s: %s had %d sync call(s) under way at its death (no cancel exists; a video is billed "
                    "when it completes), settled at their bounds below: request(s) %s", engine, name,
                    len(left.calls), ", ".join(left.calls[:20]) + (" ..." if len(left.calls) > 20 else ""))
    if left.settled:
        say = log.warning if taken else log.error
        say("engine %s: the %d claim(s) of %s's batches %s at their bounds ($%.6f, possibly billed)", engine,
            len(left.settled), name, "settled" if taken else "could NOT be settled (they hold their room until "
            "reservation_ttl_s)", usd)
