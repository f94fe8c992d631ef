"""``submit_many(..., on_invalid="reject")``: a bad request of a bulk submission is its own rejected result, and
its neighbours are queued.

By default (``on_invalid="raise"``) one bad request raises ``RequestError`` and nothing of the call is queued: a
job of 3,000 requests read from a file with three bad lines queued none, and named only the first, so its user
fixed one line a run (a helper's tour). Rejected here, each bad request's future is resolved at once with a
``Result`` of status ``rejected``, ``error`` ``invalid_request`` and the ``RequestError``'s message (the field and
the fix) as its ``reason``, so a loop over the futures writes it out with the answers.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from engine.core.errors import ConfigError, RequestError
from engine.core.request import Request
from engine.core.result import ID_TAKEN, Result

__all__ = ["INVALID", "OnInvalid", "check_ids", "check_on_invalid", "count_refused", "listed", "reject_taken", "rejected",
           "validated", "with_refused", "with_rejected"]

INVALID = "invalid_request"  # the ``error`` of a request ``on_invalid="reject"`` refused
OnInvalid = Literal["raise", "reject"]


def check_on_invalid(on_invalid: object) -> None:
    if on_invalid not in ("raise", "reject"):
        raise ConfigError(f"on_invalid must be 'raise' (a bad request raises RequestError, nothing is queued) or "
                          f"'reject' (a bad request is its own rejected result, the others are queued), got "
                          f"{on_invalid!r}")


def listed(requests: Any, call: str) -> list:
    """``requests`` as a list; one request given alone (a dict, a ``Request``), a string or what is not iterable is
    refused whole, naming ``requests``. A dict was read as its keys: a ``RequestError`` "a request is a dict (or a
    Request), got str" for the dict the user gave, and with ``on_invalid="reject"`` one rejected result per key
    (``#0``, ``#1``, ...) and no error at all; None raised a bare TypeError (a helper's hunt, stop 77)."""
    if isinstance(requests, (Mapping, Request, str, bytes)) or not isinstance(requests, Iterable):
        got = "one request" if isinstance(requests, (Mapping, Request)) else f"a {type(requests).__name__}"
        raise RequestError(None, "requests", f"{call}() takes an iterable of requests (a list of dicts or Requests), "
                           f"got {got}: put it in a list, or give one request to submit()")
    return list(requests)


def rejected(given: Any, exc: RequestError) -> concurrent.futures.Future:
    """A future already resolved with the rejection of ``given`` (a dict or a ``Request``): named by its id, or by
    its place (``#k``) when it has no usable one."""
    get = given.get if isinstance(given, Mapping) else lambda k, d=None: getattr(given, k, d)
    rid, tenant = get("id"), get("tenant", "default")
    res = Result(id=rid if isinstance(rid, str) and rid else f"#{exc.position}",
                 tenant=tenant if isinstance(tenant, str) and tenant else "default",
                 status="rejected", error=INVALID, reason=str(exc))
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_result(res)
    return fut


def validated(as_request, requests: Iterable[Any], now: float, on_invalid: str
              ) -> tuple[list[Request], list[int], dict[int, concurrent.futures.Future]]:
    """The valid requests, their places, and the rejections by place (``on_invalid="raise"``: the first error
    raises)."""
    reqs: list[Request] = []
    at: list[int] = []
    refused: dict[int, concurrent.futures.Future] = {}
    for k, r in enumerate(requests):
        try:
            reqs.append(as_request(r, k, now))
            at.append(k)
        except RequestError as exc:
            if on_invalid == "raise":
                raise
            refused[k] = rejected(r, exc)
    return reqs, at, refused


def reject_taken(reqs: list[Request], at: list[int], futs: Mapping[str, Any],
                 refused: dict[int, concurrent.futures.Future]) -> tuple[list[Request], list[int]]:
    """Take out of ``reqs`` (into ``refused``) each whose (tenant, id) names other content: a future of this driver
    (``futs``, by uid) or an earlier request of the same call. Call it holding the driver's lock."""
    first: dict[str, Request] = {}
    keep_r: list[Request] = []
    keep_k: list[int] = []
    for r, k in zip(reqs, at, strict=True):
        if (exc := _taken(r, k, futs, first)) is not None:
            refused[k] = rejected(r, exc)
            continue
        first.setdefault(r.uid, r)
        keep_r.append(r)
        keep_k.append(k)
    return keep_r, keep_k


def check_ids(reqs: list[Request], futs: Mapping[str, Any]) -> None:
    """Raise what ``reject_taken`` would refuse first (``reqs`` in the order given: the position is theirs)."""
    first: dict[str, Request] = {}
    for k, r in enumerate(reqs):
        if (exc := _taken(r, k, futs, first)) is not None:
            raise exc
        first.setdefault(r.uid, r)


def _taken(r: Request, k: int, futs: Mapping[str, Any], first: dict[str, Request]) -> RequestError | None:
    known = futs.get(r.uid)
    earlier = known._req if known is not None else first.get(r.uid)
    if earlier is None or r.model_copy(update={"arrival_s": earlier.arrival_s}) == earlier:
        return None
    where = "already submitted" if known is not None else "gave it earlier in this submission"
    return RequestError(r.id, "id", f"tenant {r.tenant!r} {where} id {r.id!r} with other content; an id names one "
                        "request: use a new id for a new request", k, ID_TAKEN)


def with_rejected(futs: list, at: list[int], refused: dict[int, concurrent.futures.Future]) -> list:
    """The futures in the order the requests were given: the queued ones' at their places, the rejections at
    theirs."""
    if not refused:
        return futs
    out: list = [None] * (len(futs) + len(refused))
    for k, f in zip(at, futs, strict=True):
        out[k] = f
    for k, f in refused.items():
        out[k] = f
    return out


def count_refused(owner: Any, refused: Mapping[int, concurrent.futures.Future]) -> None:
    """Count the rejections ``refused`` in the driver ``owner``'s tally (``with_refused``). Call it holding the
    driver's lock (submissions from several threads)."""
    tally: dict[tuple[str, str], int] = owner.__dict__.setdefault("_refused", {})
    for f in refused.values():
        r = f.result()
        tally[(r.tenant, r.error or INVALID)] = tally.get((r.tenant, r.error or INVALID), 0) + 1


def with_refused(rep: dict, owner: Any) -> dict:
    """``rep`` (an engine's report) with the rejections ``owner``'s ``submit_many(..., on_invalid="reject")``
    made, by their ``error`` (``invalid_request``, ``id_taken``): resolved at the driver, they never reached the
    engine, whose report said ``rejected: {}`` after 9 of them, though docs/budgets.md has it give every reason
    (a walkthrough, stop 79). Counted as the engine counts its rejected results: in ``requests``, ``by_status``,
    ``rejected`` and ``by_tenant`` (at $0). Those of this driver alone: another attached to the engine has its own."""
    for (tenant, why), n in dict(owner.__dict__.get("_refused") or {}).items():
        rep["requests"] = rep.get("requests", 0) + n
        for part, key in (("by_status", "rejected"), ("rejected", why)):
            rep.setdefault(part, {})[key] = rep.setdefault(part, {}).get(key, 0) + n
        row = rep.setdefault("by_tenant", {}).setdefault(tenant, {"requests": 0, "cost_usd": 0.0})
        row["requests"] += n
    return rep
