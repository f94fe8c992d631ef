"""The videos an engine cut off (a kill, or a stop without drain) had made, read back by the rescue of its journal
(``engine.app._batch_rescue``), as it reads the provider batches it names.

A video's create was answered and its record journaled (``jobs:<provider>``, ``actors._dispatch_jobs``) beside its
call's body record (``sync:<provider>``): the video goes on at the provider and is billed when it completes. Before,
the rescue counted its call as a sync call cut off, and the new engine asked again made (and paid for) a second
video. Now each is polled to its end (never made again): a completed one answers its request (kept as a batch's
finished member is, and charged once, at the cost its answer reports); a failed one billed nothing and its request
is sent again; one that cannot be read is an error that keeps the journal (strict), as a batch's is. A create that
was cut before its answer (an intent record, its video id unknown) is counted as a call cut off: possibly billed.
At Veo, which has no listing to find that video in, its request fails instead, not made again (``lost_creates``),
unless its endpoint's ``remake_lost_veo_creates`` (or a server that honours Idempotency-Key) says to make it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.app._batch_ended import brief
from engine.core.clock import ScaledClock
from engine.core.cost import reserve_bound
from engine.core.errors import CatalogError
from engine.core.provider_api import CallJob
from engine.runtime.outcomes import failed_result, ok_result

__all__ = ["VIDEO_REASON", "VideoUnread", "fail_lost", "lost_creates", "made_videos", "read_video"]

VIDEO_REASON = "answered by a video an earlier run made (its create billed once), not made again"


class VideoUnread(Exception):
    """A video of the earlier run that could not be read (its provider unreachable, or no end in time)."""


def made_videos(spaces: dict[str, dict]) -> dict[tuple[str, str], tuple[tuple, dict]]:
    """The journaled calls whose video was made (its id journaled), by (their ``sync:`` space, call key): the
    call's body record and its job's record."""
    out = {}
    for space, recs in spaces.items():
        if not space.startswith("jobs:"):
            continue
        calls_space = "sync:" + space.removeprefix("jobs:")
        calls = spaces.get(calls_space, {})
        for key, rec in recs.items():
            if isinstance(rec, dict) and rec.get("job") is not None and key in calls:
                out[(calls_space, key)] = (calls[key], rec)
    return out


def lost_creates(spaces: dict[str, dict], settings) -> dict[tuple[str, str], tuple[tuple, dict]]:
    """The journaled calls whose Veo create was cut before its answer (its intent journaled, no operation named),
    by (their ``sync:`` space, call key), where their endpoint does not make such a create again: the video may
    have been made, and nothing finds it (no listing of Veo operations)."""
    out = {}
    for space, recs in spaces.items():
        if not space.startswith("jobs:"):
            continue
        ep = settings.providers.endpoints.get(space.removeprefix("jobs:"))
        if ep is not None and (ep.remake_lost_veo_creates or ep.honours_idempotency_key):
            continue
        calls = spaces.get("sync:" + space.removeprefix("jobs:"), {})
        for key, rec in recs.items():
            if (isinstance(rec, dict) and rec.get("api") == "veo" and rec.get("job") is None
                    and not rec.get("refused") and key in calls):
                out[("sync:" + space.removeprefix("jobs:"), key)] = (calls[key], rec)
    return out


def fail_lost(spaces: dict[str, dict], settings, catalog, got, *, wanted: set[str] | None,
              say: Callable[[str], None]) -> set[tuple[str, str]]:
    """The calls of ``lost_creates``, their requests failed into ``got`` (not made again: each may be billed, at
    the call's bound, as the live engine keeps for a create whose answer is lost); returns their (space, call
    key)."""
    lost = lost_creates(spaces, settings)
    for (space, _), (call, _) in lost.items():
        _fail(space, call, catalog, got, wanted, say)
    return set(lost)


def _fail(space: str, call: tuple, catalog, got, wanted: set[str] | None, say: Callable[[str], None]) -> None:
    name = space.split(":", 1)[1]
    b, j, _, _ = call
    if wanted is not None and j.req.id not in wanted:  # (``--overwrite``): sent again, as a call cut off
        got.cut_calls += 1
        return
    field = f"providers.endpoints.{name}.remake_lost_veo_creates"
    error = (f"{name}: a create of this Veo video was under way when the earlier engine was cut off, its answer "
             "lost; Google may have made the video and will bill it, and documents no listing of Veo operations "
             "to find it by, so it was not made again (that would pay for two videos); to make it again all the "
             f"same, set {field} true")
    say(f"request {j.req.id}: {error}")
    was = getattr(j, "asked", None)
    req = j.req.model_copy(update={"provider": was[0], "model": was[1]}) if was else j.req
    try:
        bound = reserve_bound(j.req, catalog, "sync", None)
    except (ValueError, CatalogError):  # its model gone from the catalog since: the failure is said all the same
        bound = 0.0
    # Marked possibly billed, and its claim settled at that bound: left a plain failure (the journal removed
    # after this), the next ``--resume`` sent its line again and Google made and billed a second video; and a
    # Redis ledger left its claim to expire unspent, an in-process one counted $0 (a review).
    res = failed_result(j.req, at=0.0, batch_id=b.bid, recommendation=b.recommendation, tries=j.attempts + 1,
                        max_attempts=j.attempts + 1, error=error, real=True, possibly_billed_usd=bound)
    if getattr(j, "claim", None) and bound:
        got.claims[j.claim] = bound
    got.members.setdefault(j.req.uid, (req, res))
    got.results.setdefault(j.req.id, res)


async def read_video(provider: Callable, space: str, key: str, call: tuple, rec: dict, got, *, speed: float,
                     wanted: set[str] | None, say: Callable[[str], None]) -> Exception | None:
    """One journaled video polled to its end at its provider (``provider(name, clock)`` makes it); a completed
    one's answer into ``got`` (``Rescued``). Returns the error that kept it from being read, if one did."""
    name = space.split(":", 1)[1]
    b, j, _, body = call
    if wanted is not None and j.req.id not in wanted:  # (``--overwrite``): billed when it completes, not read
        got.cut_calls += 1
        return None
    try:  # a clock of its own: the polls wait engine seconds, and give up at the provider's poll limit
        p = provider(name, ScaledClock(time.time(), speed))
    except Exception as exc:
        return exc
    poll = getattr(p, "poll_job", None)
    if poll is None:
        return VideoUnread(f"{name} makes no video in this run (its endpoint changed since): give it its endpoint "
                           "again")
    cj = CallJob(key, j.req, 0.0, j.attempts, j.seq, body=body)
    try:
        out = await poll(cj, rec)
    except Exception as exc:
        return VideoUnread(f"{name} video {rec.get('job')}: {brief(exc)}")
    got.videos += 1
    if not out.ok:
        if out.maybe_billed:  # gone, or not ended at the poll limit: billed if it completes, and asked again
            got.cut_calls += 1
            say(f"a video of the earlier run could not be read to its end ({out.error}): if it completes it is "
                "billed, and its request is made again")
        return None  # (else it failed: billed nothing, and its request is made again)
    if not rec.get("covers", True):  # earlier creates of its request got no answer: each may have made one
        got.cut_calls += 1
    if getattr(j, "claim", None):  # billed: left open in a Redis ledger, it expired unspent (a review)
        got.claims[j.claim] = out.cost
    was = getattr(j, "asked", None)  # the request as its driver asked it, not as rerouted
    req = j.req.model_copy(update={"provider": was[0], "model": was[1]}) if was else j.req
    res = ok_result(j.req, at=0.0, cost=out.cost, mode="sync", batch_id=b.bid, recommendation=b.recommendation,
                    reason=VIDEO_REASON, out=out)
    got.members.setdefault(j.req.uid, (req, res))
    if (wanted is None or j.req.id in wanted) and j.req.id not in got.results:
        got.results[j.req.id] = res
    return None
