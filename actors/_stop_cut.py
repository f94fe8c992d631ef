"""What an engine's stop cut unsent: the requests its groupers held, waiting in a group for a batch or held back by
a budget, that no provider ever saw, and since stop 82 what waited at its dispatchers' gates, never let start
(``actors._stop_cut_dispatch``). The stop asks the groupers first (``cut_at_stop``: they send nothing more from
then on), then the dispatchers, and publishes their ids in Ray's store under the engine's name before it removes
the layout, so a driver that sees its engine gone (``serve``'s, at a ``smartbatch stop --name``) can tell them from
the calls it cut under way at a provider, possibly billed. Before, it could not: every call a stop ended was a final
502 "may have been billed" at the endpoint, the ones that only waited too (a user's tour, stop 79: 9 of 20).

Only what is known for sure is named: a request the grouper held that was never tried, hedged, rerouted or taken
back from a batch (``never_sent``), by a grouper Ray never restarted that never took a re-admitted copy (the
original of such a copy may have been sent). The rest stays "may have been billed"."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterable

from actors._types import OWN_ROWS, Job
from engine.core._logkeys import get_logger
from engine.core.errors import SmartbatchError

__all__ = ["CUT_WAIT_S", "cut_unsent", "drop_cut", "end_at_stop", "never_called", "never_sent", "read_cut",
           "stop_began"]

log = get_logger("smartbatch.engine")

CUT_WAIT_S = 2.0  # real seconds the stop waits for its groupers' and dispatchers' lists (one silent names nothing)
# The groupers' part of it at most; the dispatchers have the rest, at least half, however long a grouper is silent
GROUPERS_SHARE = 0.5
_NS = "smartbatch"  # (``actors._peer``'s namespace of what an engine publishes)


def _key(engine: str) -> str:
    return f"{engine}:cut"


def _mark(engine: str) -> str:
    # (not the stop's claim, ``<engine>:stopping``: a driver stopping its own engine asks before it takes that)
    return f"{engine}:cut-begun"


def never_called(job: Job) -> bool:
    """Whether ``job``'s fields say no call of it was ever made, its claim aside: its first dispatch, not a
    re-admitted copy, never tried, hedged, rerouted, throttled or gone standard from a flex call."""
    return (job.seq < OWN_ROWS and job.attempts == 0 and job.hedges == 0 and job.standard is None
            and job.asked is None and not job.billed_usd and not job.throttled and not job.called)


def never_sent(job: Job) -> bool:
    """Whether ``job`` was never sent to any provider in any form: its first dispatch, not a re-admitted copy (its
    original may have been sent), never tried, hedged back from a batch or rerouted, and no earlier call of it
    possibly billed. A claim marks a flex call gone standard while it waits here with it (``SyncCalls._back_standard``:
    its grouper clears ``standard`` as it takes it); once a budget holds it back, its claim let go in that
    reservation call, it is named only if its flex call was never made: one refused (billed nothing, yet it reached
    the provider) carries ``called`` since stop 82, one given up unanswered ``billed_usd``."""
    return never_called(job) and job.claim is None


def end_at_stop(grouper, jobs: list[Job], why: str, reserved: bool = False) -> list[str]:
    """The grouper's side of the stop (``Grouper.cut_at_stop``): of ``jobs``, taken out of ``grouper`` and sent
    nowhere now, those known never sent end ``why`` (a cancel's "billed nothing", a retryable 503 at the endpoint),
    their results sent out after this returns their ids. The others get no result from here: their drivers fail
    them as the engine goes, "may have been billed" (the final 502); ended "cancelled" here, a driver that pulled
    that first answered them a retryable 503 (a review: a re-admitted copy whose original may have been billed).
    Their claims go at 0 all the same (a hedged member's, a flex call's refused: nothing of them ran). ``reserved``:
    ``jobs`` hold the claims the grouper just made for them (a reservation the stop came in), let go at 0 first."""
    if reserved:
        if claims := [(j.claim, 0.0) for j in jobs if j.claim is not None]:
            grouper.budget.deliver("settle_many", claims)
        jobs = [j._replace(claim=None) for j in jobs]
    sure = not (grouper._reborn or grouper._copies)
    named = [j for j in jobs if sure and never_sent(j)]
    rest = [(j.claim, 0.0) for j in jobs if j.claim is not None and not (sure and never_sent(j))]
    if rest:
        grouper.budget.deliver("settle_many", rest)
    if named:
        task = asyncio.get_running_loop().create_task(grouper._resolve([(j, grouper._failed(j, why)) for j in named]))
        grouper._tasks.add(task)
        task.add_done_callback(grouper._tasks.discard)
    return [j.req.uid for j in named]


def cut_unsent(engine: str, groupers: Iterable, wait_s: float = CUT_WAIT_S,
               dispatchers: Iterable = ()) -> frozenset[str]:
    """Have ``groupers`` (actor handles) end what they hold, unsent, then ``dispatchers`` what waits at their gates
    (``actors._stop_cut_dispatch``: the groupers first, so none sends them more), and publish the ids they name as
    never sent (``read_cut``). Each kind has its own share of ``wait_s``: the dispatchers are asked once every
    grouper answered or at ``GROUPERS_SHARE`` of it, and the rest of it is theirs, a grouper's late answer still
    counted. Before (stop 82's review), one grouper not answering (its Ray restarting) took the whole wait, and the
    dispatchers, asked with none left, named nothing. Those that do not answer in time name nothing: their
    requests stay "may have been billed". Returns the ids they named; the whole stop waits ``wait_s`` at most.
    First, before any is asked, it marks the engine's stop begun (``stop_began``)."""
    import time

    import ray

    t0 = time.monotonic()
    # Before anyone is asked: a dispatcher Ray restarts from now on makes no create its journal resumes, only looks
    # for it (``CutDispatches._stop_began``). Guarded by the published list alone (a review, ``rvcut2_82``), it made
    # one when its restart read the journal before this stop published, up to ``wait_s`` later: a batch of members
    # told never sent. Not written (no Ray answering), it raises: the stop names nothing, and nothing is told so;
    # the error says which key, which Ray, what follows and the fix (``_unwritten``).
    _put(engine, _mark(engine), b"1", "its mark", "it names nothing as never sent: every request it ends is told")
    cut: set[str] = set()
    out: list[tuple[object, str]] = []  # (call, its actor's kind) of the calls not answered yet

    def ask(kind: str, actors: Iterable) -> None:
        for a in actors:
            try:
                out.append((a.cut_at_stop.remote(), kind))
            except Exception as exc:  # (Ray refusing the call: that one names nothing, the others still do)
                log.warning("engine %s: a %s was not asked what the stop cut unsent (%s)", engine, kind,
                            type(exc).__name__)

    def gather(until: float) -> None:
        if not out:
            return
        ready, _ = ray.wait([r for r, _ in out], num_returns=len(out), timeout=max(until - time.monotonic(), 0.0))
        for ref in ready:  # (Ray answers with refs equal to those asked, not the same objects)
            kind = out.pop(next(i for i, (r, _) in enumerate(out) if r == ref))[1]
            try:
                cut.update(ray.get(ref))
            except Exception as exc:  # (one dying in the stop: its requests stay "may have been billed")
                log.warning("engine %s: a %s did not say what the stop cut unsent (%s)", engine, kind,
                            type(exc).__name__)

    ask("grouper", groupers)
    gather(t0 + wait_s * GROUPERS_SHARE)
    ask("dispatcher", dispatchers)
    gather(t0 + wait_s)
    for kind in ("grouper", "dispatcher"):
        if late := sum(k == kind for _, k in out):
            log.warning("engine %s: %d %s(s) did not say within %.0f s what the stop cut unsent: their requests "
                        "are told they may have been billed", engine, late, kind, wait_s)
    # With what this engine's stop named already (its driver's, before ``kill_engine``'s): the next start of the
    # name drops the list, so it holds this engine's ids alone.
    _put(engine, _key(engine), pickle.dumps(frozenset(cut) | read_cut(engine)),
         f"the {len(cut)} id(s) it named never sent", "a driver that sees the engine gone tells each of those")
    return frozenset(cut)


def _put(engine: str, key: str, value: bytes, what: str, so: str) -> None:
    """Write ``key`` of the stop of ``engine`` in Ray's store, or raise ``SmartbatchError`` saying where it goes and
    what to do (``_unwritten``). Before (stop 82's "left"), the stop's caller logged the Ray error's type alone
    ("could not say what it cut unsent (AttributeError)"): nothing said which key, which Ray, nor what followed."""
    from ray.experimental import internal_kv

    try:
        internal_kv._internal_kv_put(key, value, overwrite=True, namespace=_NS)
    except Exception as exc:
        raise SmartbatchError(_unwritten(engine, key, what, so, exc)) from exc


def _unwritten(engine: str, key: str, what: str, so: str, exc: BaseException) -> str:
    """The words of a stop that could not write ``key``: the key, the store and the Ray it asked, what follows for
    the requests it ends, and the fix. Of the Ray error, its type only (its words are Ray's, not ours to show)."""
    import ray

    try:  # (never ``get_runtime_context`` unconnected: it starts a local Ray)
        ray_of = (f"the Ray cluster whose GCS is at {ray.get_runtime_context().gcs_address}" if ray.is_initialized()
                  else "Ray: this process is not connected to one (`RAY_ADDRESS`, `ray.init(address=...)`)")
    except Exception:
        ray_of = "the Ray cluster this process is connected to"
    return (f"engine {engine!r}: the stop could not write {what} ({key!r}, namespace {_NS!r} of Ray's internal KV "
            f"store) in {ray_of} ({type(exc).__name__}). So {so} it may have been billed (the endpoint's final "
            "502 `engine_stopped`). Fix: stop the engine from a process connected to its Ray cluster while that "
            "cluster's head answers (`ray status --address <head>`; `RAY_ADDRESS` naming it); of the requests this "
            "stop ended, send again only those the provider's usage shows were not billed")


def read_cut(engine: str) -> frozenset[str]:
    """The ids the last stop of ``engine`` published as cut unsent (empty: none, or no Ray answering). Kept after
    the stop, for a driver that sees it late; the next start of the name drops it (``drop_cut``)."""
    try:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(_key(engine), namespace=_NS)
    except Exception:  # no Ray answering: nothing known for sure
        return frozenset()
    return pickle.loads(raw) if raw else frozenset()


def stop_began(engine: str) -> bool:
    """Whether a stop of ``engine`` began naming what it cut unsent (``cut_unsent``'s mark, written before it asks
    anyone). False when Ray's store does not answer (no Ray, or Ray going down): a resumed create is made, as before
    the mark; a read that fails while the stop's mark is there is the one case the mark does not cover."""
    try:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(_mark(engine), namespace=_NS) is not None
    except Exception:
        return False


def drop_cut(engine: str) -> None:
    """Forget what an earlier stop of ``engine`` cut, and its mark (a new engine of the name starts: its ids may be
    reused, and its dispatchers' resumed creates are made)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_key(engine), namespace=_NS)
    internal_kv._internal_kv_del(_mark(engine), namespace=_NS)
