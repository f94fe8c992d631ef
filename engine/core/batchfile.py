"""OpenAI Batch files: read an input file into requests, write the output and error files, and report cost.

The input format is OpenAI's (one ``{"custom_id", "method": "POST", "url", "body"}`` per line). Every line
arrives at once (``arrival_s`` 0) and must finish within the batch's completion window (``deadline_s``).

Lines are sorted into three kinds, so that every ``custom_id`` of the input ends up once in the output or errors:

* a valid line becomes a ``Request`` (``custom_id`` is its id, ``body`` is sent unchanged); a chat completions
  line whose body asks for ``n`` > 1 choices becomes n requests, each without ``n``, answered as one output line
  of n choices (``engine.core._choices``, ``engine.core._batch_rows``);
* a line with a usable ``custom_id`` that is not a valid request is *invalid*: the trace builder reports it
  (file, line, field, fix), ``smartbatch batch`` answers it in the error file (code ``invalid_request``);
* a line with no usable ``custom_id`` (not JSON, not an object, a missing or repeated ``custom_id``) cannot be
  answered by id: it is a problem of the file, refused unless ``skip_invalid``.

The output lines are OpenAI's (``{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id",
"body"}, "error": null}``, or ``"response": null`` and an ``error``). No I/O but the files given; never starts Ray.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from engine.core._batch_rows import (
    BILLED_KEY,
    CHOICES_KEY,
    bound_of,
    error_line,
    list_price_usd,
    output_line,
    provider_status,
    report,
    result_rows,
)
from engine.core._checks import FieldProblem
from engine.core._choices import fan_out_request, line_choices
from engine.core.answer_body import response_body
from engine.core.budgets import parse_duration
from engine.core.catalog import Catalog, default_catalog
from engine.core.errors import ConfigError, TraceError
from engine.core.files import write_atomic
from engine.core.request import Request, validation_context
from engine.core.result import Result
from engine.core.settings import MAX_DEADLINE_S, Settings
from engine.core.trace import Trace, _problems_of, _what_it_is, decode_lines, read_lines

__all__ = ["BILLED_KEY", "CHOICES_KEY", "BatchFile", "BatchLine", "answered_choices", "answered_lines", "error_line",
           "from_openai_batch", "list_price_usd", "not_a_batch_file", "output_line", "parse_batch_file",
           "possibly_billed_lines",
           "parse_window", "provider_status", "read_batch_file", "report", "response_body", "result_rows",
           "write_results"]

Problem = tuple[str, int, str, str]  # (file, line, field, message), as in engine.core.trace
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


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
    """One answerable line: its number, ``custom_id`` and ``url``, and either its request or its problem. A chat
    line whose body asks for ``n`` > 1 choices is n requests (``engine.core._choices``): ``request`` is choice 0,
    ``more`` the others."""

    no: int
    custom_id: str
    url: str
    request: Request | None = None
    problem: tuple[str, str] | None = None  # (field, message) when the line is not a valid request
    more: tuple[Request, ...] = ()  # choices 1 to n-1, ``<custom_id>/n<k>``
    kept: Mapping[int, dict] = field(default_factory=dict)  # choices an earlier run answered, by index (--resume)
    # What earlier runs' calls of it that got no answer may have billed (a line --resend-possibly-billed sends
    # again): its row carries it on (``BILLED_KEY``), so that no later resume counts it less.
    billed: float = 0.0

    @property
    def choices(self) -> list[Request]:
        """The request of every choice, in choice order (none for an invalid line)."""
        return [] if self.request is None else [self.request, *self.more]

    @property
    def to_send(self) -> list[Request]:
        """The choices still to answer: all but those an earlier run answered."""
        return [q for k, q in enumerate(self.choices) if k not in self.kept]


@dataclass(frozen=True)
class BatchFile:
    """The lines of an input file in file order, plus the problems of lines that cannot be answered by id."""

    source: str
    lines: list[BatchLine]
    file_problems: list[Problem] = field(default_factory=list)

    @property
    def requests(self) -> list[Request]:
        """What goes to the engine: every choice of every valid line that is still to answer, in line order."""
        return [q for ln in self.lines for q in ln.to_send]

    @property
    def invalid(self) -> list[BatchLine]:
        return [ln for ln in self.lines if ln.request is None]

    def problems(self) -> list[Problem]:
        """Every problem, file-level and per line, in line order (as ``TraceError`` shows them)."""
        per_line = [(self.source, ln.no, *ln.problem) for ln in self.invalid if ln.problem is not None]
        return sorted(self.file_problems + per_line, key=lambda p: p[1])


def read_batch_file(path: str | Path, *, window_s: float, tenant: str = "default", catalog: Catalog | None = None,
                    settings: Settings | None = None, live: bool = False, api_fields: bool = False) -> BatchFile:
    """Read and validate an OpenAI Batch input file (see the module docstring); raises ``TraceError`` only when
    the file cannot be read. ``live``, ``api_fields``: as ``validation_context``'s."""
    problems: list[Problem] = []
    not_utf8: dict[int, str] = {}
    return _parse(read_lines(path, problems, not_utf8), problems, str(Path(path)), window_s, tenant, catalog,
                  settings, not_utf8, live, api_fields)


def not_a_batch_file(path: str | Path) -> Problem | None:
    """What a file none of whose lines could be answered is instead, as one problem of the file naming the command
    that takes it (the project's own trace, a Mooncake or Azure trace), or None for a file of no shape known.
    A trace given to ``batch`` was refused with "custom_id is required" once per line and "pass --skip-invalid",
    which skips every line (a helper's tour of the README)."""
    name = Path(path).name
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = next((ln.strip() for ln in f if ln.strip()), "")
    except OSError:  # the read that found no line said why already
        return None
    try:
        first = json.loads(head)
    except (ValueError, RecursionError):
        first = None
    if isinstance(first, dict) and "id" in first and "custom_id" not in first:
        fix = (f"it is a smartbatch trace (lines with an id, not a custom_id): replay it with `smartbatch run {path}`"
               f", or price it with `smartbatch bench {path}`")
    elif first is None and "," in head and not head.startswith(("{", "[")):
        fix = _what_it_is(head, str(path))
        fix = fix if "smartbatch trace from-" in fix else f"line 1 reads like a CSV header ({head[:60]!r})"
    else:
        fix = _what_it_is(head, str(path))
    if not fix:
        return None
    return (str(path), 0, "file", f"{name} is not an OpenAI Batch input file (one {{\"custom_id\", \"method\", "
                                  f"\"url\", \"body\"}} per line): {fix}")


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
           live: bool = False, api_fields: bool = False) -> BatchFile:
    """A line that is not UTF-8 (``not_utf8``: its problem by line number) is answered by its custom_id, an error
    line of its own, when the custom_id reads whole; else it is a problem of the file, as a line without one."""
    ctx = validation_context(catalog or default_catalog(), settings, live=live, api_fields=api_fields)
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    for no, text in numbered:
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as exc:
            # Where, as a trace's line says it; the fix is the hint's ("fix the line; fix the lines named" was doubled).
            why = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else \
                "too deep or too long a number"
            problems.append((src, no, "line", not_utf8.get(no) or f"not valid JSON ({why})"))
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
            n, raw = line_choices(raw, url)  # body.n > 1: n requests, none with n in its body
            # A file is read whole: nothing more comes to batch with its lines, so none is held for company.
            req = Request.model_validate({"gather": False, **raw, "arrival_s": 0.0, "deadline_s": window_s,
                                          "tenant": tenant}, context=ctx)
        except FieldProblem as exc:
            lines.append(BatchLine(no, cid, url, problem=(exc.field, str(exc))))
            continue
        except ValidationError as exc:
            first = next(iter(_problems_of(exc)), ("line", str(exc)))
            lines.append(BatchLine(no, cid, url, problem=first))
            continue
        lines.append(BatchLine(no, cid, url, request=req, more=fan_out_request(req, n)))
    return BatchFile(src, [_own_ids(ln, seen) for ln in lines], problems)


def _own_ids(ln: BatchLine, custom_ids: Mapping[str, int]) -> BatchLine:
    """A line of n choices whose choice id (``<custom_id>/n<k>``) is another line's custom_id is an error of its
    own: the two would be one request in the engine, and one line would get the other's answer."""
    clash = next((k for k, q in enumerate(ln.more, 1) if q.id in custom_ids), None)
    if clash is None:
        return ln
    other = ln.more[clash - 1].id
    return replace(ln, request=None, more=(), problem=(
        "custom_id", f"choice {clash} of this line (its body.n is {len(ln.more) + 1}) is sent as {other!r}, the "
        f"custom_id of line {custom_ids[other]}: give one of the two lines another custom_id"))


def from_openai_batch(path: str | Path, *, window_s: float = 86400.0, tenant: str = "default",
                      catalog: Catalog | None = None, settings: Settings | None = None,
                      skip_invalid: bool = False) -> Trace:
    """An OpenAI Batch input file as a trace: every line arrives at 0 with the window as its deadline. Any bad
    line raises one ``TraceError`` naming every one (file, line, field, fix), unless ``skip_invalid``. A body field
    the provider's server does not know is refused whatever the mode of ``settings`` (``api_fields``): the file is
    written for the providers, and in a simulated run ``body.temprature`` was taken here that ``smartbatch batch``
    refuses (a user's walkthrough). Not the rest of an HTTP run's checks (the engine's route to the model): judged
    as one, a /v1/responses line with ``reasoning`` for a model the catalog calls through chat completions was
    refused, which OpenAI and a simulated run take (a review)."""
    bf = read_batch_file(path, window_s=window_s, tenant=tenant, catalog=catalog, settings=settings,
                         api_fields=True)
    shape = None if bf.lines else not_a_batch_file(path)
    if shape is not None:
        raise TraceError([shape], hint="")
    problems = bf.problems()
    if problems and not skip_invalid:  # a batch file's lines, not a trace's (as `smartbatch batch` says)
        raise TraceError(problems, what="batch file")
    if not bf.requests:
        why = f"all {len({p[1] for p in problems})} non-empty line(s) are invalid" if problems else "it is empty"
        raise TraceError(problems + [(bf.source, 0, "file", f"{Path(path).name} has no requests ({why}); give at "
                                                            "least one valid line")], hint="", what="batch file")
    return Trace(name=Path(path).stem, requests=bf.requests, skipped=len({p[1] for p in problems}),
                 problems=problems)


# --- the output and error files (their rows: ``engine.core._batch_rows``) ---------------------------------------

def answered_lines(path: str | Path) -> dict[str, dict]:
    """The answered lines (``error`` null) of an output file an earlier run wrote, by ``custom_id``; none when
    the file is absent. A line that is not such a row is passed over (it is not an answer)."""
    return {row["custom_id"]: row for row in _rows(path) if row.get("error") is None
            and isinstance(row.get("custom_id"), str) and isinstance(row.get("response"), dict)}


def answered_choices(path: str | Path | list[dict]) -> dict[str, dict[int, dict]]:
    """The choices answered of the lines of n choices that an error file an earlier run wrote holds (a line one of
    whose choices was not answered: ``CHOICES_KEY``), by ``custom_id``, then by choice index; none when the file
    is absent. What is not such a choice is passed over."""
    found: dict[str, dict[int, dict]] = {}
    for row in _rows(path):
        got = {c["index"]: c for c in row.get(CHOICES_KEY) or () if isinstance(c, dict)
               and type(c.get("index")) is int and c["index"] >= 0 and isinstance(c.get("body"), dict)
               and isinstance(c.get("request_id"), str)}
        if got and row.get("error") is not None and isinstance(row.get("custom_id"), str):
            found[row["custom_id"]] = got
    return found


def possibly_billed_lines(path: str | Path | list[dict]) -> dict[str, dict]:
    """The lines of an error file an earlier run wrote that failed possibly billed (``BILLED_KEY``: a positive
    bound, or a value that is no bound, edited by hand: kept back all the same, never sent again unasked), by
    ``custom_id``; none when the file is absent."""
    return {row["custom_id"]: row for row in _rows(path) if row.get("error") is not None
            and isinstance(row.get("custom_id"), str) and bound_of(row) != 0}


def _rows(path: str | Path | list[dict]) -> Iterable[dict]:
    if isinstance(path, list):  # rows about to be written (``write_results``'s ``before``)
        yield from path
        return
    p = Path(path)
    if not p.is_file():
        return
    with p.open(encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                row = json.loads(text)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


def write_results(bf: BatchFile, results: Sequence[Result], out: str | Path, errors: str | Path | None = None, *,
                  created: int = 0, kept: Mapping[int, dict] | None = None,
                  before: Callable[[list[dict]], None] | None = None) -> tuple[int, int]:
    """Write ``result_rows`` to the output file and the error file (beside ``out`` as ``<stem>.errors.jsonl``
    when not given). ``kept``: rows of an earlier run to write again, by input line number, in input order
    among the new ones. ``before``: called with the error rows before either file is written. Returns (output
    lines, error lines)."""
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
    if before is not None:
        before([row for row in rows if row["error"] is not None])
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
