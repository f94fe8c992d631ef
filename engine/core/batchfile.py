"""OpenAI Batch files: read an input file into requests, write the output and error files, and report cost.

The input format is OpenAI's (one ``{"custom_id", "method": "POST", "url", "body"}`` per line). Every line
arrives at once (``arrival_s`` 0) and must finish within the batch's completion window (``deadline_s``).

Lines are sorted into three kinds, so that every ``custom_id`` of the input ends up once in the output or errors:

* a valid line becomes a ``Request`` (``custom_id`` is its id, ``body`` is sent unchanged);
* a line with a usable ``custom_id`` that is not a valid request is *invalid*: the trace builder reports it
  (file, line, field, fix), ``smartbatch batch`` answers it in the error file (code ``invalid_request``);
* a line with no usable ``custom_id`` (not JSON, not an object, a missing or repeated ``custom_id``) cannot be
  answered by id: it is a problem of the file, refused unless ``skip_invalid``.

The output lines are OpenAI's (``{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id",
"body"}, "error": null}``, or ``"response": null`` and an ``error``). No I/O but the files given; never starts Ray.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from engine.core.answer_body import response_body
from engine.core.budgets import parse_duration
from engine.core.catalog import Catalog, default_catalog
from engine.core.cost import price_alone
from engine.core.errors import ConfigError, TraceError
from engine.core.files import write_atomic
from engine.core.request import Request, validation_context
from engine.core.result import CANCELLED, Result, why_not
from engine.core.settings import MAX_DEADLINE_S, Settings
from engine.core.trace import Trace, _problems_of, decode_lines, read_lines

__all__ = ["BatchFile", "BatchLine", "answered_lines", "error_line", "from_openai_batch", "list_price_usd", "output_line",
           "parse_batch_file", "parse_window", "provider_status", "read_batch_file", "report", "response_body",
           "result_rows", "write_results"]

Problem = tuple[str, int, str, str]  # (file, line, field, message), as in engine.core.trace
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Error codes of the error file, by the status of the request's result.
ERROR_CODES = {"failed": "request_failed", "rejected": "request_rejected", "expired": "batch_expired"}
_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")  # how a provider's refusal reads in Result.error


def parse_window(text: str) -> float:
    """A completion window (``24h``, ``90m``, ``1d``, ``3600s``) in seconds."""
    try:
        parsed = parse_duration(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed[1] not in _UNIT_S:
        raise ConfigError(f"--window {text!r}: use a positive number and a unit s, m, h or d, e.g. 24h (OpenAI's "
                          "completion window)")
    seconds = parsed[0] * _UNIT_S[parsed[1]]
    if seconds > MAX_DEADLINE_S:
        raise ConfigError(f"--window {text!r} is {seconds:,.0f} s; a deadline is at most {MAX_DEADLINE_S:,.0f} s "
                          "(366 days)")
    return seconds


@dataclass(frozen=True)
class BatchLine:
    """One answerable line: its number, ``custom_id`` and ``url``, and either its request or its problem."""

    no: int
    custom_id: str
    url: str
    request: Request | None = None
    problem: tuple[str, str] | None = None  # (field, message) when the line is not a valid request


@dataclass(frozen=True)
class BatchFile:
    """The lines of an input file in file order, plus the problems of lines that cannot be answered by id."""

    source: str
    lines: list[BatchLine]
    file_problems: list[Problem] = field(default_factory=list)

    @property
    def requests(self) -> list[Request]:
        return [ln.request for ln in self.lines if ln.request is not None]

    @property
    def invalid(self) -> list[BatchLine]:
        return [ln for ln in self.lines if ln.request is None]

    def problems(self) -> list[Problem]:
        """Every problem, file-level and per line, in line order (as ``TraceError`` shows them)."""
        per_line = [(self.source, ln.no, *ln.problem) for ln in self.invalid if ln.problem is not None]
        return sorted(self.file_problems + per_line, key=lambda p: p[1])


def read_batch_file(path: str | Path, *, window_s: float, tenant: str = "default", catalog: Catalog | None = None,
                    settings: Settings | None = None, live: bool = False) -> BatchFile:
    """Read and validate an OpenAI Batch input file (see the module docstring); raises ``TraceError`` only when
    the file cannot be read. ``live``: its lines go to an engine (``validation_context``)."""
    problems: list[Problem] = []
    not_utf8: dict[int, str] = {}
    return _parse(read_lines(path, problems, not_utf8), problems, str(Path(path)), window_s, tenant, catalog,
                  settings, not_utf8, live)


def parse_batch_file(data: bytes, *, source: str, window_s: float, tenant: str = "default",
                     catalog: Catalog | None = None, settings: Settings | None = None, live: bool = False
                     ) -> BatchFile:
    """``read_batch_file`` of a file's bytes (an upload), named ``source`` in problems; never raises."""
    problems: list[Problem] = []
    not_utf8: dict[int, str] = {}
    lines = decode_lines(io.BytesIO(data), source, problems, not_utf8)  # split as a file is: on \n only
    return _parse(lines, problems, source, window_s, tenant, catalog, settings, not_utf8, live)


def _parse(numbered: Iterable[tuple[int, str]], problems: list[Problem], src: str, window_s: float, tenant: str,
           catalog: Catalog | None, settings: Settings | None, not_utf8: Mapping[int, str],
           live: bool = False) -> BatchFile:
    """A line that is not UTF-8 (``not_utf8``: its problem by line number) is answered by its custom_id, an error
    line of its own, when the custom_id reads whole; else it is a problem of the file, as a line without one."""
    ctx = validation_context(catalog or default_catalog(), settings, live=live)
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    for no, text in numbered:
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deep or too long a number"
            problems.append((src, no, "line", not_utf8.get(no) or f"not valid JSON ({why}); fix the line"))
            continue
        if not isinstance(raw, dict):
            problems.append((src, no, "line", 'a batch line is a JSON object {"custom_id", "method", "url", "body"}'))
            continue
        cid = raw.get("custom_id")
        if not isinstance(cid, str) or not cid.strip():
            problems.append((src, no, "custom_id", "is required and must be a non-empty string: the id that pairs "
                                                   "the line with its output"))
            continue
        if no in not_utf8 and "\ufffd" in cid:  # its bytes are not UTF-8: written back, it would name no line
            problems.append((src, no, "custom_id", not_utf8[no]))
            continue
        if not cid.isprintable() or any("\ud800" <= c <= "\udfff" for c in cid):
            # A lone surrogate ("\ud800" in JSON) cannot be written back in UTF-8: its output line failed the
            # whole run after every line was sent.
            problems.append((src, no, "custom_id", f"{cid!r} holds a character that cannot be written back "
                                                   "(a lone surrogate or a control character); use plain text"))
            continue
        if cid in seen:
            problems.append((src, no, "custom_id", f"duplicate custom_id {cid!r} (first on line {seen[cid]}); "
                                                   "every line needs a custom_id of its own"))
            continue
        seen[cid] = no
        url = raw.get("url", "/v1/chat/completions")
        url = url if isinstance(url, str) else "/v1/chat/completions"
        if no in not_utf8:
            lines.append(BatchLine(no, cid, url, problem=("line", not_utf8[no])))
            continue
        fixed = next((k for k in ("arrival_s", "deadline_s", "tenant") if k in raw), None)
        if fixed is not None:
            lines.append(BatchLine(no, cid, url, problem=(fixed, f"{fixed} is set for the whole batch (its completion "
                                                                 "window, its tenant), not per line: remove it from "
                                                                 "the line")))
            continue
        try:
            # A file is read whole: nothing more comes to batch with its lines, so none is held for company.
            req = Request.model_validate({"gather": False, **raw, "arrival_s": 0.0, "deadline_s": window_s,
                                          "tenant": tenant}, context=ctx)
        except ValidationError as exc:
            first = next(iter(_problems_of(exc)), ("line", str(exc)))
            lines.append(BatchLine(no, cid, url, problem=first))
            continue
        lines.append(BatchLine(no, cid, url, request=req))
    return BatchFile(src, lines, problems)


def from_openai_batch(path: str | Path, *, window_s: float = 86400.0, tenant: str = "default",
                      catalog: Catalog | None = None, settings: Settings | None = None,
                      skip_invalid: bool = False) -> Trace:
    """An OpenAI Batch input file as a trace: every line arrives at 0 with the window as its deadline. Any bad
    line raises one ``TraceError`` naming every one (file, line, field, fix), unless ``skip_invalid``."""
    bf = read_batch_file(path, window_s=window_s, tenant=tenant, catalog=catalog, settings=settings)
    problems = bf.problems()
    if problems and not skip_invalid:
        raise TraceError(problems)
    if not bf.requests:
        why = f"all {len({p[1] for p in problems})} non-empty line(s) are invalid" if problems else "it is empty"
        raise TraceError(problems + [(bf.source, 0, "file", f"{Path(path).name} has no requests ({why}); give at "
                                                            "least one valid line")], hint="")
    return Trace(name=Path(path).stem, requests=bf.requests, skipped=len({p[1] for p in problems}),
                 problems=problems)


# --- the output and error files -----------------------------------------------------------------------------

def _req_id(tenant: str, custom_id: str) -> str:  # deterministic: a rerun of the file names its lines alike
    text = f"{len(tenant)}:{tenant}/{custom_id}".encode("utf-8", "surrogatepass")
    return "batch_req_" + hashlib.sha256(text).hexdigest()[:32]


def output_line(line: BatchLine, res: Result, *, created: int = 0, raw: dict | None = None,
                request_id: str | None = None) -> dict:
    """A line of the output file for a succeeded (or reused) request; ``raw`` and ``request_id`` stand in for a
    reused result's, which carries neither (the response of the line it reused)."""
    assert line.request is not None
    if res.raw is None and raw is not None:  # the borrowed body, in the route's shape like any other
        res = res.model_copy(update={"raw": raw})
    body = response_body(line.url, line.request, res, created)
    # A line the cache answered names no call of its own: its id says so, and a resumed run counts it at 0
    # (``kept_charges``), as a line that shares the id of the call it reused counts that call once.
    own = "smartbatch_reused_" if res.status == "reused" else "smartbatch_"
    rid = res.provider_request_id or request_id or own + _req_id(res.tenant, line.custom_id)[10:]
    return {"id": _req_id(line.request.tenant, line.custom_id), "custom_id": line.custom_id,
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def error_line(custom_id: str, code: str, message: str, *, tenant: str = "default") -> dict:
    """A line of the error file."""
    return {"id": _req_id(tenant, custom_id), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _content_key(req: Request) -> str:
    return json.dumps([req.provider, req.model, req.prompt, req.body], sort_keys=True, default=str)


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
    called = {_content_key(r): by_id[r.id] for r in reqs if by_id[r.id].raw is not None}
    rows = []
    for ln in bf.lines:
        if ln.request is None:
            fld, msg = ln.problem or ("line", "invalid")
            rows.append(error_line(ln.custom_id, "invalid_request", f"{bf.source}:{ln.no}: field '{fld}': {msg}"))
            continue
        res = by_id[ln.request.id]
        if res.status in ("ok", "reused"):
            src = called.get(_content_key(ln.request)) if res.raw is None else None
            rows.append(output_line(ln, res, created=created, raw=src.raw if src else None,
                                    request_id=src.provider_request_id if src else None))
        else:
            cancelled = (res.error or "").startswith(CANCELLED)
            code = "batch_cancelled" if cancelled else ERROR_CODES.get(res.status, "request_failed")
            row = error_line(ln.custom_id, code, why_not(res), tenant=ln.request.tenant)
            status = provider_status(res)
            if status is not None:
                # The provider answered with an HTTP error: OpenAI's error file gives such a line its response
                # (status and error body), which readers look up as line["response"]["status_code"].
                row["response"] = {"status_code": status, "request_id": res.provider_request_id,
                                   "body": {"error": {"message": row["error"]["message"], "type": "api_error",
                                                      "param": None, "code": code}}}
            rows.append(row)
    return rows


def provider_status(res: Result) -> int | None:
    """The HTTP status (4xx, 5xx) a provider answered a failed request with, as its error reads, or None."""
    m = _HTTP_STATUS.search(res.error or "") if res.status == "failed" else None
    return int(m.group(1)) if m and 400 <= int(m.group(1)) <= 599 else None


def answered_lines(path: str | Path) -> dict[str, dict]:
    """The answered lines (``error`` null) of an output file an earlier run wrote, by ``custom_id``; none when
    the file is absent. A line that is not such a row is passed over (it is not an answer)."""
    p = Path(path)
    found: dict[str, dict] = {}
    if not p.is_file():
        return found
    with p.open(encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                row = json.loads(text)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("error") is None and isinstance(row.get("custom_id"), str) \
                    and isinstance(row.get("response"), dict):
                found[row["custom_id"]] = row
    return found


def write_results(bf: BatchFile, results: Sequence[Result], out: str | Path, errors: str | Path | None = None, *,
                  created: int = 0, kept: Mapping[int, dict] | None = None) -> tuple[int, int]:
    """Write ``result_rows`` to the output file and the error file (beside ``out`` as ``<stem>.errors.jsonl``
    when not given). ``kept``: rows of an earlier run to write again, by input line number, in input order
    among the new ones. Returns (output lines, error lines)."""
    rows = result_rows(bf, results, created=created)
    if kept:
        order = [(ln.no, row) for ln, row in zip(bf.lines, rows, strict=True)] + list(kept.items())
        rows = [row for _, row in sorted(order, key=lambda x: x[0])]
    out_p = Path(out)
    err_p = Path(errors) if errors is not None else out_p.with_name(out_p.stem + ".errors.jsonl")
    for p in (out_p, err_p):
        p.parent.mkdir(parents=True, exist_ok=True)
    out_lines = [json.dumps(row, separators=(",", ":")) + "\n" for row in rows if row["error"] is None]
    err_lines = [json.dumps(row, separators=(",", ":")) + "\n" for row in rows if row["error"] is not None]
    # Each written whole beside its name, then put in place (the answers first): opened "w", a full disk left OUT
    # cut short, and answers an earlier run had paid for were lost (a helper's hunt). A stream is written as it is.
    for p, lines in ((out_p, out_lines), (err_p, err_lines)):
        data = "".join(lines).encode()
        if p.is_symlink() or (p.exists() and not p.is_file()) or not os.access(p.parent, os.W_OK):
            p.write_bytes(data)  # a stream (/dev/stdout), a link (written through), a directory it cannot add to
        else:
            write_atomic(p, data, durable=True, mode=_mode(p))
    return len(out_lines), len(err_lines)



def _mode(p: Path) -> int:
    """The permissions a rewritten file keeps: its own, or a new file's under the process's umask."""
    if p.exists():
        return p.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask

def list_price_usd(req: Request, res: Result, catalog: Catalog) -> float:
    """What an answered request would have cost sent alone and synchronously (0 for an unanswered one): the
    price a saving is measured against."""
    return price_alone(req, catalog, "sync").total if res.status in ("ok", "reused") else 0.0


def report(bf: BatchFile, results: Sequence[Result], catalog: Catalog, *, window_s: float, policy: str) -> dict:
    """What each line cost against its list price (sent alone, synchronously), the totals and the modes used.
    ``list_price_usd`` and ``saving_usd`` count the answered lines (succeeded or reused); ``cost_usd`` is every
    line's cost, so ``saving_usd = list_price_usd - cost_usd``; ``late`` the lines answered after the window."""
    by_id = {r.id: r for r in results}
    rows = []
    for ln in bf.lines:
        if ln.request is None:
            rows.append({"line": ln.no, "custom_id": ln.custom_id, "status": "invalid", "mode": None, "hit": None,
                         "provider": None, "model": None, "cost_usd": 0.0, "list_price_usd": 0.0, "saving_usd": 0.0,
                         "deadline_met": None})
            continue
        res = by_id[ln.request.id]
        listed = list_price_usd(ln.request, res, catalog)
        rows.append({"line": ln.no, "custom_id": ln.custom_id, "status": res.status, "mode": res.mode,
                     "hit": res.hit, "provider": ln.request.provider, "model": ln.request.model,
                     "cost_usd": res.cost_usd, "list_price_usd": listed, "saving_usd": listed - res.cost_usd,
                     "deadline_met": res.deadline_met})
    cost = sum(r["cost_usd"] for r in rows)
    listed = sum(r["list_price_usd"] for r in rows)
    return {"input": bf.source, "window_s": window_s, "policy": policy,
            "totals": {"lines": len(rows),
                       "succeeded": sum(r["status"] in ("ok", "reused") for r in rows),
                       "failed": sum(r["status"] not in ("ok", "reused") for r in rows),
                       "statuses": dict(collections.Counter(r["status"] for r in rows)),
                       "modes": dict(collections.Counter(r["mode"] for r in rows if r["mode"])),
                       # Answered after the window: in the output all the same (paid for), and counted here.
                       # (a failed or refused line carries deadline_met False too: not a late answer)
                       "late": sum(r["deadline_met"] is False and r["status"] in ("ok", "reused") for r in rows),
                       "cost_usd": cost, "list_price_usd": listed, "saving_usd": listed - cost},
            "lines": rows}
