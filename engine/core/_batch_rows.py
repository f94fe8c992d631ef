"""The lines of a batch file's output and error files, and its report (``engine.core.batchfile`` names them):
one row a line, a line whose chat body asks for ``n`` > 1 merged from its n choices (``engine.core._choices``).

A line of n choices is answered when every choice is: one output line, a ``chat.completion`` of n choices whose
``usage`` adds the n calls', as the endpoint's chat route answers ``n``. One choice not answered fails the line, as
it fails the endpoint's call: the line is in the error file with that choice's error, and the choices that were
answered (billed all the same) go with it in ``smartbatch_choices`` (each its index, request id and one-choice
body), so that nothing paid for is lost and ``smartbatch batch --resume`` sends only the others."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from engine.core._choices import joined, merged_body
from engine.core._list_price import list_price
from engine.core.answer_body import response_body
from engine.core.catalog import Catalog
from engine.core.request import Request
from engine.core.result import ANSWERED, CANCELLED, Result, why_not

if TYPE_CHECKING:
    from engine.core.batchfile import BatchFile, BatchLine

__all__ = ["BILLED_KEY", "CHOICES_KEY", "ERROR_CODES", "billed_of", "bound_of", "error_line", "list_price_usd",
           "output_line", "provider_status", "report", "result_rows"]

# Error codes of the error file, by the status of the request's result.
ERROR_CODES = {"failed": "request_failed", "rejected": "request_rejected", "expired": "batch_expired"}
CHOICES_KEY = "smartbatch_choices"  # an error line's answered choices (a line of n choices, one not answered)
# An error line's bound, in USD, of calls that may have been billed (they ran and their answer could not be read,
# or got none): ``smartbatch batch --resume`` keeps such a line back instead of paying for it again. On an output
# line (and an answered choice of ``CHOICES_KEY``), the bound of its earlier calls that got no answer (a flex call
# given up at its timeout): a resume counts it beside the answer's cost, as the first run's ledger did. A key of our
# own beside OpenAI's at the line's top level, as on the error line: readers of OpenAI's shape pass it over.
BILLED_KEY = "smartbatch_possibly_billed_usd"
_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")  # how a provider's refusal reads in Result.error
# A report's dollars, to 1e-10 USD: the decimals of the endpoint's X-Smartbatch-Cost-Usd, well under the cheapest
# token the catalog prices (a few 1e-9 USD), so a line's figure is its cost. Unrounded, a sum of prices read
# "cost_usd": 0.0011542500000000001 (a user's walkthrough). The totals are the sums of the rounded lines, rounded:
# a reader adding up the lines finds the total, and it is off the unrounded sum by at most 5e-11 a line.
_USD_PLACES = 10


def bound_of(row: Mapping[str, Any]) -> float | None:
    """A row's (or an answered choice's) ``BILLED_KEY``: 0 where it has none (or null), None where it holds no
    number of dollars >= 0 (edited by hand, or hostile: a string, negative, NaN, Infinity, a bool)."""
    v = row.get(BILLED_KEY)
    if v is None:
        return 0.0
    try:  # (an integer of 400 digits is JSON, and no float: read, it raised and ended the resume of every line)
        usd = float(v) if type(v) in (int, float) else math.nan
    except OverflowError:
        return None
    return usd if math.isfinite(usd) and usd >= 0 else None


def billed_of(row: Mapping[str, Any]) -> float:
    """``bound_of``, 0 where it holds none (``engine.app._batch_kept`` mends such a value before it is read)."""
    return bound_of(row) or 0.0


def _with_bound(row: dict, usd: float) -> dict:
    if usd > 0:
        row[BILLED_KEY] = usd
    return row


def _usd(x: float) -> float:
    return round(x, _USD_PLACES) + 0.0  # (+ 0.0: a -0.0 reads 0)


def _req_id(tenant: str, custom_id: str) -> str:  # deterministic: a rerun of the file names its lines alike
    text = f"{len(tenant)}:{tenant}/{custom_id}".encode("utf-8", "surrogatepass")
    return "batch_req_" + hashlib.sha256(text).hexdigest()[:32]


def _answer(url: str, req: Request, res: Result, created: int, raw: dict | None,
            request_id: str | None) -> tuple[str, dict]:
    """(request id, response body) of one answered request; ``raw`` and ``request_id`` stand in for a reused
    result's, which carries neither (those of the call it reused)."""
    if res.raw is None and raw is not None:  # the borrowed body, in the route's shape like any other
        res = res.model_copy(update={"raw": raw})
    # A line the cache answered names no call of its own: its id says so, and a resumed run counts it at 0
    # (``kept_charges``), as a line that shares the id of the call it reused counts that call once.
    own = "smartbatch_reused_" if res.status == "reused" else "smartbatch_"
    rid = res.provider_request_id or request_id or own + _req_id(res.tenant, req.id)[10:]
    return rid, response_body(url, req, res, created)


def output_line(line: BatchLine, res: Result, *, created: int = 0, raw: dict | None = None,
                request_id: str | None = None) -> dict:
    """A line of the output file for a succeeded (or reused) request; ``raw`` and ``request_id`` stand in for a
    reused result's, which carries neither (the response of the line it reused). ``BILLED_KEY``: its calls' and
    its earlier runs' (``BatchLine.billed``) that got no answer, when any."""
    assert line.request is not None
    rid, body = _answer(line.url, line.request, res, created, raw, request_id)
    return _with_bound({"id": _req_id(line.request.tenant, line.custom_id), "custom_id": line.custom_id,
                        "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None},
                       res.possibly_billed_usd + line.billed)


def error_line(custom_id: str, code: str, message: str, *, tenant: str = "default") -> dict:
    """A line of the error file."""
    return {"id": _req_id(tenant, custom_id), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _failed_line(custom_id: str, tenant: str, res: Result, say: str = "{}", billed: float | None = None) -> dict:
    """The error line of a request that was not answered; ``say``: its message around ``why_not``; ``billed``:
    the bound of its calls that may have been billed (``BILLED_KEY``), when not the result's own."""
    cancelled = (res.error or "").startswith(CANCELLED)
    code = "batch_cancelled" if cancelled else ERROR_CODES.get(res.status, "request_failed")
    row = _with_bound(error_line(custom_id, code, say.format(why_not(res)), tenant=tenant),
                      res.possibly_billed_usd if billed is None else billed)
    status = provider_status(res)
    if status is not None:
        # The provider answered with an HTTP error: OpenAI's error file gives such a line its response (status
        # and error body), which readers look up as line["response"]["status_code"].
        row["response"] = {"status_code": status, "request_id": res.provider_request_id,
                           "body": {"error": {"message": row["error"]["message"], "type": "api_error",
                                              "param": None, "code": code}}}
    return row


def _content_key(req: Request) -> str:
    return json.dumps([req.provider, req.model, req.prompt, req.body], sort_keys=True, default=str)


def _source(req: Request, res: Result, called: Mapping[str, list[Result]]) -> Result | None:
    """The called result a result without a raw body borrows its body and request id from: one of the same
    content and the same answer (the choices of a line share its content, each with an answer of its own),
    else the first of that content."""
    same = called.get(_content_key(req)) or []
    return next((c for c in same if c.output == res.output), same[0] if same else None)


def result_rows(bf: BatchFile, results: Sequence[Result], *, created: int = 0) -> list[dict]:
    """The lines of the output file (succeeded and reused lines, ``error`` None) and of the error file
    (invalid, failed, rejected and expired lines), in input order. ``results`` pair with ``bf.requests`` one to
    one."""
    reqs = bf.requests
    if len(results) != len(reqs):
        raise ValueError(f"{len(results)} results for {len(reqs)} requests; they must pair one to one")
    by_id = {}
    for req, res in zip(reqs, results, strict=True):
        if res.id != req.id:
            raise ValueError(f"result {res.id!r} answers request {req.id!r}; results must be in request order")
        by_id[req.id] = res
    # A reused result carries no raw body: give it the raw body of a line with the same content that was called.
    called: dict[str, list[Result]] = {}
    for r in reqs:
        if by_id[r.id].raw is not None:
            called.setdefault(_content_key(r), []).append(by_id[r.id])
    rows = []
    for ln in bf.lines:
        if ln.request is None:
            fld, msg = ln.problem or ("line", "invalid")
            rows.append(error_line(ln.custom_id, "invalid_request", f"{bf.source}:{ln.no}: field '{fld}': {msg}"))
        elif ln.more or ln.kept:
            rows.append(_choices_row(ln, by_id, called, created))
        elif (res := by_id[ln.request.id]).status in ANSWERED:
            src = _source(ln.request, res, called) if res.raw is None else None
            rows.append(output_line(ln, res, created=created, raw=src.raw if src else None,
                                    request_id=src.provider_request_id if src else None))
        else:
            rows.append(_failed_line(ln.custom_id, ln.request.tenant, res, billed=res.possibly_billed_usd + ln.billed))
    return rows


def _choices_row(ln: BatchLine, by_id: Mapping[str, Result], called: Mapping[str, list[Result]],
                 created: int) -> dict:
    """The row of a line of n choices (see the module docstring). A choice an earlier run answered
    (``ln.kept``) comes as that run wrote it."""
    assert ln.request is not None
    n, answered, failed = len(ln.choices), [], None
    for k, q in enumerate(ln.choices):
        if k in ln.kept:
            answered.append(_with_bound({"index": k, "request_id": ln.kept[k]["request_id"],
                                         "body": ln.kept[k]["body"]}, billed_of(ln.kept[k])))
            continue
        res = by_id[q.id]
        if res.status not in ANSWERED:
            failed = failed or (k, res)
            continue
        src = _source(q, res, called) if res.status == "reused" and res.raw is None else None
        rid, body = _answer(ln.url, q, res, created, src.raw if src else None,
                            src.provider_request_id if src else None)
        # An answered choice's earlier calls (a flex call given up): kept with it, as its line's would be.
        answered.append(_with_bound({"index": k, "request_id": rid, "body": body}, res.possibly_billed_usd))
    if failed is None:
        return _with_bound({"id": _req_id(ln.request.tenant, ln.custom_id), "custom_id": ln.custom_id,
                            "response": {"status_code": 200, "request_id": answered[0]["request_id"],
                                         "body": merged_body([a["body"] for a in answered])}, "error": None},
                           math.fsum(billed_of(a) for a in answered) + ln.billed)
    k, res = failed
    kept = (f"; {len(answered)} of the {n} choices were answered (paid for, unless the cache answered them): "
            f"they are in this line's {CHOICES_KEY}, and smartbatch batch --resume sends only the others"
            if answered else "")
    # Every failed choice's bound: the line goes back whole or not at all, and any of them may be on the bill.
    billed = sum(by_id[q.id].possibly_billed_usd for k2, q in enumerate(ln.choices) if k2 not in ln.kept
                 and by_id[q.id].status not in ANSWERED) + ln.billed
    row = _failed_line(ln.custom_id, ln.request.tenant, res, f"choice {k} of {n}: {{}}{kept}", billed)
    if answered:
        row[CHOICES_KEY] = answered
    return row


def provider_status(res: Result) -> int | None:
    """The HTTP status (4xx, 5xx) a provider answered a failed request with, as its error reads, or None."""
    m = _HTTP_STATUS.search(res.error or "") if res.status == "failed" else None
    return int(m.group(1)) if m and 400 <= int(m.group(1)) <= 599 else None


def list_price_usd(req: Request, res: Result, catalog: Catalog) -> float:
    """What an answered request would have cost sent alone and synchronously (0 for an unanswered one): the
    price a saving is measured against, at the tokens its answer counted where its own model made it, as the
    engine's report prices it (``engine.core._list_price``)."""
    if res.status not in ANSWERED:
        return 0.0
    return list_price(req, catalog, res.usage if (res.provider, res.model) == (req.provider, req.model) else None)


def report(bf: BatchFile, results: Sequence[Result], catalog: Catalog, *, window_s: float, policy: str) -> dict:
    """What each line cost against its list price (sent alone, synchronously), the totals and the modes used.
    ``list_price_usd`` and ``saving_usd`` count the answered lines (succeeded or reused); ``cost_usd`` is every
    line's cost, so ``saving_usd = list_price_usd - cost_usd``; ``late`` the lines answered after the window.
    A line of n choices: its choices sent in this run, each a request (its cost, its list price); ``modes``
    counts requests, each choice's mode. Dollars to 1e-10 USD, a total the sum of its rounded lines (``_USD_PLACES``)."""
    by_id = {r.id: r for r in results}
    rows = []
    for ln in bf.lines:
        if ln.request is None:
            rows.append({"line": ln.no, "custom_id": ln.custom_id, "status": "invalid", "mode": None, "hit": None,
                         "provider": None, "model": None, "cost_usd": 0.0, "list_price_usd": 0.0, "saving_usd": 0.0,
                         "possibly_billed_usd": 0.0, "deadline_met": None})
            continue
        if ln.more or ln.kept:
            rows.append(_choices_report(ln, by_id, catalog))
            continue
        res = by_id[ln.request.id]
        listed = list_price_usd(ln.request, res, catalog)
        rows.append({"line": ln.no, "custom_id": ln.custom_id, "status": res.status, "mode": res.mode,
                     "hit": res.hit, "provider": ln.request.provider, "model": ln.request.model,
                     "cost_usd": res.cost_usd, "list_price_usd": listed, "saving_usd": listed - res.cost_usd,
                     "possibly_billed_usd": res.possibly_billed_usd, "deadline_met": res.deadline_met})
    for r in rows:
        r["cost_usd"], r["list_price_usd"] = _usd(r["cost_usd"]), _usd(r["list_price_usd"])
        r["saving_usd"] = _usd(r["list_price_usd"] - r["cost_usd"])
        r["possibly_billed_usd"] = _usd(r["possibly_billed_usd"])
    cost = _usd(math.fsum(r["cost_usd"] for r in rows))
    listed = _usd(math.fsum(r["list_price_usd"] for r in rows))
    modes = [m for r in rows for m in r.get("modes", [r["mode"]]) if m]
    return {"input": bf.source, "window_s": window_s, "policy": policy,
            "totals": {"lines": len(rows),
                       "succeeded": sum(r["status"] in ANSWERED for r in rows),
                       "failed": sum(r["status"] not in ANSWERED for r in rows),
                       "statuses": dict(collections.Counter(r["status"] for r in rows)),
                       "modes": dict(collections.Counter(modes)),
                       # Answered after the window: in the output all the same (paid for), and counted here.
                       # (a failed or refused line carries deadline_met False too: not a late answer)
                       "late": sum(r["deadline_met"] is False and r["status"] in ANSWERED for r in rows),
                       "cost_usd": cost, "list_price_usd": listed, "saving_usd": _usd(listed - cost),
                       # Beside cost_usd, an upper bound: calls that got no answer and may be on the bill (a flex
                       # call given up at its timeout, then answered standard; a failed line's last call).
                       "possibly_billed_usd": _usd(math.fsum(r["possibly_billed_usd"] for r in rows))},
            "lines": rows}


def _choices_report(ln: BatchLine, by_id: Mapping[str, Result], catalog: Catalog) -> dict[str, Any]:
    """The report's row of a line of n choices: its status is its first unanswered choice's (else ok); its cost
    what this run's choices cost, billed whether the line was answered or not; its list price theirs, each a
    request sent alone (the input n times, as the endpoint's saving header counts it), once every choice is
    answered. Choices an earlier run answered (``kept_choices``) count in neither: that run's report had them."""
    assert ln.request is not None
    sent = [by_id[q.id] for q in ln.to_send]
    bad = next((r for r in sent if r.status not in ANSWERED), None)
    status = bad.status if bad else "reused" if sent and all(r.status == "reused" for r in sent) else "ok"
    cost = sum(r.cost_usd for r in sent)
    listed = 0.0 if bad else sum(list_price_usd(q, r, catalog) for q, r in zip(ln.to_send, sent, strict=True))
    modes = [r.mode for r in sent if r.mode]
    met = [r.deadline_met for r in sent]
    first = by_id.get(ln.request.id) if 0 not in ln.kept else None  # the one choice the cache may answer
    return {"line": ln.no, "custom_id": ln.custom_id, "status": status, "mode": joined(modes) if modes else None,
            "hit": first.hit if first else None, "provider": ln.request.provider, "model": ln.request.model,
            "cost_usd": cost, "list_price_usd": listed, "saving_usd": listed - cost,
            "possibly_billed_usd": math.fsum(r.possibly_billed_usd for r in sent),
            "deadline_met": False if False in met else True if met and all(met) else None,
            "choices": len(ln.choices), "kept_choices": len(ln.kept), "modes": modes}
