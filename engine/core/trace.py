"""Reading and writing traces (JSONL, one request per line; the format is in README and docs/traces.md)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.core.catalog import Catalog, default_catalog
from engine.core.errors import ConfigError, RequestError, TraceError
from engine.core.request import FieldProblem, Request, validation_context
from engine.core.settings import Settings

__all__ = ["MAX_SPAN_S", "REBASE_UNIT_S", "Trace", "TraceRequests", "decode_lines", "load_trace",
           "parse_trace_lines", "read_lines", "request_error", "with_day_origin", "write_trace"]

# Arrivals are rebased by whole days (a trace in Unix-epoch seconds starts on its first day, keeping the time of
# day), and a trace may span at most a year: the lower bound keeps one value per batch slot up to the last
# deadline, so memory follows the span, never the absolute value of an arrival.
REBASE_UNIT_S = 86400.0
MAX_SPAN_S = 365 * 86400.0


@dataclass(frozen=True)
class Trace:
    """Validated requests in arrival order, plus what was skipped (only with ``skip_invalid``)."""

    name: str
    requests: list[Request]
    skipped: int = 0
    problems: list[tuple[str, int, str, str]] = field(default_factory=list)
    rebased_s: float = 0.0  # subtracted from every arrival at load (whole days)

    def __len__(self) -> int:
        return len(self.requests)


class TraceRequests(list):
    """A trace's requests, as the builders return them (a list), that also keep when the trace started:
    ``day_origin_s``, the time of day of arrival 0 in seconds after UTC midnight (``from_azure`` keeps its first
    timestamp's). The simulator, the lower bound and a replay take it as their ``day_origin_s`` (see
    ``with_day_origin``). A plain list of requests, a slice or a copy of this one has none: 0, midnight. So has a
    JSONL trace: one in Unix seconds is rebased by whole days and keeps the time of day in its arrivals."""

    def __init__(self, requests: Iterable[Request] = (), day_origin_s: float = 0.0):
        super().__init__(requests)
        self.day_origin_s = day_origin_s

    def __repr__(self) -> str:
        return f"TraceRequests({len(self)} requests, day_origin_s={self.day_origin_s})"


def with_day_origin(settings: Settings, requests: Sequence[Request]) -> Settings:
    """``settings`` with ``sim.day_origin_s`` set for a run of ``requests``: as given, else the trace's (a
    ``TraceRequests``), else 0. Resolved once per run, before the requests are sorted or copied, so the simulated
    world, the learned estimate, the lower bound and a live replay of one trace read one origin."""
    if settings.sim.day_origin_s is not None:
        return settings
    origin = requests.day_origin_s if isinstance(requests, TraceRequests) else 0.0
    return settings.model_copy(update={"sim": settings.sim.model_copy(update={"day_origin_s": origin})})


_JSON_TYPE_FIX = {"tuple_type": "a JSON list, e.g. [0, 1, 2]", "list_type": "a JSON list, e.g. [0, 1, 2]",
                  "dict_type": 'a JSON object, e.g. {"size": "1024x1024"}', "string_type": "a string",
                  "bool_type": "true or false"}


_BOUND_FIX = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "null" if value is None
                                                                    else type(value).__name__)


def _shown(value: object) -> str:
    """A value as a JSON line holds it (true, false and null, not Python's True, False and None, in a list or an
    object too: ``[True, None]`` was left, a review of stop 74), cut at 40. A string alone keeps its quotes."""
    if value is None or isinstance(value, (bool, list, dict)):
        try:
            text = json.dumps(value, ensure_ascii=False)
            text.encode("utf-8")  # a lone surrogate in it: escaped, or no log could print the message
        except UnicodeEncodeError:
            text = json.dumps(value)
        except (TypeError, ValueError):  # not JSON's (a request made in Python): as Python writes it
            text = repr(value)
        return f"{text:.40}"
    return f"{value!r:.40}"


def _problems_of(exc: ValidationError, where: str = "the line") -> list[tuple[str, str]]:
    """(field, message) per problem of a request's validation; a missing field is to be added to ``where``."""
    out = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblem):
            out.append((cause.field, str(cause)))
            continue
        loc = ".".join(str(x) for x in err["loc"]) or "line"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = f"is required; add it to {where}"
        elif err["type"] in _JSON_TYPE_FIX:  # pydantic's "a valid tuple": a JSON file has none
            got = err.get("input")
            msg = f"must be {_JSON_TYPE_FIX[err['type']]}, not {_json_kind(got)}" + (
                "" if got is None else f" ({_shown(got)})") + (
                "; write it in quotes" if err["type"] == "string_type" else "")
        elif err["type"] == "extra_forbidden":
            msg = "is not a trace field; remove it or fix its spelling (see docs/traces.md)"
        elif err["type"] == "literal_error":  # "Input should be 'a', 'b' or 'c'": the fix, said as one
            msg = f"{msg}, got {_shown(err.get('input'))}; give one of these"
        elif err["type"] == "string_too_short" and err.get("input") == "":
            msg = "must not be empty; give a name, or leave the field out for its default where it has one"
        elif err["type"] in _BOUND_FIX:  # pydantic's "Input should be greater than or equal to 0": no value, no fix
            bound = next(iter((err.get("ctx") or {}).values()), "?")
            bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
            msg = f"must be {_BOUND_FIX[err['type']]} {bound}, got {_shown(err.get('input'))}; give such a number"
        elif err["type"] == "string_too_long":
            msg = (f"is {len(err.get('input') or '')} characters long, over the limit of "
                   f"{(err.get('ctx') or {}).get('max_length')}; shorten it")
        elif err["type"] == "string_pattern_mismatch" and r"\x00" in str((err.get("ctx") or {}).get("pattern")):
            # the tenant's pattern: no control characters
            msg = f"holds a control character ({_shown(err.get('input'))}); use printable characters only"
        elif err["type"] == "int_from_float":
            msg = f"must be a whole number, got {_shown(err.get('input'))}"
        out.append((loc, msg))
    return out



def request_error(exc: ValidationError, data: Any, position: int | None = None) -> RequestError:
    """A request dict's refusal as ``submit`` and ``Request(**kw)`` give it: its first problem, by field and fix."""
    rid = data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else None
    field, msg = next(iter(_problems_of(exc, "the request")), ("request", str(exc)))
    return RequestError(rid, field, msg, position)


_PACKED = {b"\x1f\x8b": ("gzip", "gunzip"), b"\xfd7zXZ\x00": ("xz", "unxz"), b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
           b"PK\x03\x04": ("zip", "unzip")}  # a compressed file's first bytes: (its format, the tool that opens it)


def decode_lines(raw_lines: Iterable[bytes], source: str, problems: list[tuple[str, int, str, str]],
                 not_utf8: dict[int, str] | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of UTF-8 byte lines (a file's, or an upload's): a line that is not UTF-8 is
    reported in ``problems`` with its number and skipped, never a traceback (a byte-order mark on line 1 is
    dropped). Given ``not_utf8``, such a line is yielded with U+FFFD for its bad bytes and its problem goes there
    instead (a batch file answers it by its custom_id, when that reads whole)."""
    for no, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            why = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"
            if not_utf8 is None:
                problems.append((source, no, "line", why))
                continue
            not_utf8[no], text = why, raw.decode("utf-8", "replace")
        yield no, text


def read_lines(path: str | Path, problems: list[tuple[str, int, str, str]],
               not_utf8: dict[int, str] | None = None) -> Iterator[tuple[int, str]]:
    """``decode_lines`` of a file. An unreadable file raises ``TraceError``."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            # Peeked, not read then seeked back: a pipe (`<(gunzip -c trace.jsonl.gz)`, /dev/stdin) cannot seek.
            head = fh.peek(8)[:8]
            if packed := next((k for m, k in _PACKED.items() if head.startswith(m)), None):
                # Each of its lines was "not UTF-8 text ...; save the file as UTF-8" (a new user's tour).
                raise TraceError([(str(p), 0, "file", f"{packed[0]}-compressed, not text: decompress it "
                                                      f"first ({packed[1]} {p.name}) and give the file it writes")],
                                 hint="")
            yield from decode_lines(fh, str(p), problems, not_utf8)
    except OSError as exc:
        raise TraceError([(str(p), 0, "file", f"cannot read it: {exc.strerror}; pass an existing, readable file")],
                         hint="") from exc


def parse_trace_lines(lines: Iterable[str] | Iterable[tuple[int, str]], *, source: str = "<trace>",
                      catalog: Catalog | None = None, settings: Settings | None = None, skip_invalid: bool = False,
                      problems: list[tuple[str, int, str, str]] | None = None) -> Trace:
    """Validate JSONL lines (strings, or ``(line number, string)`` pairs). Every problem is collected (file,
    line, field, fix); without ``skip_invalid`` any problem raises ``TraceError`` listing them all, so nothing
    is silently dropped. A trace with no valid request is an error either way.

    Arrivals are rebased by whole days when the first one is a day or more (docs/traces.md), and a request
    arriving more than ``MAX_SPAN_S`` after that is refused."""
    ctx = validation_context(catalog or default_catalog(), settings)
    numbered: list[tuple[int, Request]] = []
    problems = problems if problems is not None else []
    seen: dict[str, tuple[int, str]] = {}  # id: its line and tenant
    head = ""  # the first non-empty line: what the file is, when no line of it is a request
    for no, line in _numbered(lines):
        if not line.strip():
            continue
        head = head or line.strip()
        try:
            raw = json.loads(line.rstrip("\r\n"))  # a cut-off line errs at its own end, not at column 1 of the next
        except json.JSONDecodeError as exc:
            problems.append((source, no, "line", f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except (ValueError, RecursionError) as exc:  # a number of over 4,300 digits; nesting past the stack
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            problems.append((source, no, "line", f"not valid JSON here ({why}); fix the line"))
            continue
        try:
            req = Request.model_validate(raw, context=ctx)
        except ValidationError as exc:
            problems.extend((source, no, f, m) for f, m in _problems_of(exc))
            continue
        if req.id in seen:
            first, other = seen[req.id]
            # The engine keys requests by (tenant, id), a trace by id alone (its results and bounds are per id).
            also = f" (under tenant {other!r} there: a trace's ids are unique across tenants too)" \
                if other != req.tenant else ""
            problems.append((source, no, "id", f"duplicate id {req.id!r} (first on line {first}{also}); "
                                                "ids are idempotency keys and must be unique"))
            continue
        seen[req.id] = (no, req.tenant)
        numbered.append((no, req))
    requests, shift = _rebase(numbered, source, problems)
    problems.sort(key=lambda p: p[1])  # stable: a line's problems stay in the order found
    bad_lines = len({(p[0], p[1]) for p in problems})
    fix = _what_it_is(head, source)
    if not requests and (skip_invalid or fix or not problems):
        # The headline comes first: listed after every bad line, it was cut from the message (a CSV of 50 rows
        # showed 20 "not valid JSON" lines, and "... and 31 more" hid why). --skip-invalid cannot help here.
        why = f"all {bad_lines} non-empty line(s) are invalid" if bad_lines else "it is empty"
        # A file known by its content (a recorded source, a file of the project's own) has that as its one
        # problem: its lines' ("not valid JSON", "'timestamp' is not a request field; remove it") are each
        # the same wrong fix. A guess ("reads like a CSV header") keeps them: the file may be a broken trace.
        kept = [] if fix.startswith("it is ") else problems
        raise TraceError([(source, 0, "file", f"trace {Path(source).name} has no requests ({why}); "
                                              + (fix or "give at least one valid line"))] + kept, hint="")
    if problems and not skip_invalid:
        raise TraceError(problems)
    requests.sort(key=lambda r: r.arrival_s)  # stable: equal arrivals keep file order
    return Trace(name=Path(source).stem, requests=requests, skipped=bad_lines, problems=problems, rebased_s=shift)


def _what_it_is(head: str, source: str) -> str:
    """The fix for a file that is no trace, from its first line (a recorded source names its builder), or ''."""
    name = Path(source).name
    try:
        first = json.loads(head)
    except (ValueError, RecursionError):  # reported as its line's problem already
        first = None
    if isinstance(first, dict) and {"timestamp", "input_length"} <= set(first):
        return (f"it is a Mooncake trace: convert it first, `smartbatch trace from-mooncake {name} "
                "--out trace.jsonl` (docs/traces.md)")
    # Files of the project's own that a trace argument may be given by mistake (a new user's tour).
    if isinstance(first, dict) and {"custom_id", "response"} <= set(first):
        return ("it is a batch output file (an answer per line): give the batch input file it answers, or a trace "
                "(docs/traces.md)")
    if isinstance(first, dict) and {"custom_id", "body"} <= set(first) and "arrival_s" not in first:
        return (f"it is an OpenAI Batch input file: convert it first, `smartbatch trace from-openai-batch {name} "
                f"--out trace.jsonl`, or send it with `smartbatch batch {name} --out output.jsonl`")
    if isinstance(first, dict) and {"status", "cost_usd"} <= set(first):
        return ("it is a results file (a result per line, as `smartbatch run` writes): give the trace the run "
                "replayed (docs/traces.md)")
    if first is None and head.startswith("variants:"):
        return (f"it is a variants file (YAML): give it with --variants, after a trace, e.g. `smartbatch bench "
                f"trace.jsonl --variants {name}` (README.md, 'Using it')")
    if head in ("{", "["):
        return ("line 1 opens a JSON document that spans lines (a results.json?); a trace is one JSON object per "
                "line (README.md, 'Trace format')")
    if first is None and "," in head and not head.startswith(("{", "[")):
        if {"TIMESTAMP", "ContextTokens"} <= {c.strip() for c in head.split(",")}:
            return (f"it is an Azure LLM trace (CSV): convert it first, `smartbatch trace from-azure {name} "
                    "--out trace.jsonl` (docs/traces.md)")
        return (f"line 1 reads like a CSV header ({head[:60]!r}); a trace is one JSON object per line "
                "(README.md, 'Trace format')")
    return ""


def _numbered(lines: Iterable[str] | Iterable[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    for no, item in enumerate(lines, start=1):
        yield item if isinstance(item, tuple) else (no, item)


def _rebase(numbered: list[tuple[int, Request]], source: str,
            problems: list[tuple[str, int, str, str]]) -> tuple[list[Request], float]:
    """Shift arrivals back by whole days so the first falls in day one, and refuse requests beyond the span
    (memory never follows the absolute value of an arrival)."""
    if not numbered:
        return [], 0.0
    head_no, head = min(numbered, key=lambda x: x[1].arrival_s)
    first = head.arrival_s
    shift = math.floor(first / REBASE_UNIT_S) * REBASE_UNIT_S
    kept = []
    for no, r in numbered:
        if r.arrival_s - first > MAX_SPAN_S:
            problems.append((source, no, "arrival_s",
                             f"arrival_s {r.arrival_s:,.3f} is {r.arrival_s - first:,.0f} s after the first arrival "
                             f"({first:,.3f}, line {head_no}); a trace spans at most "
                             f"{MAX_SPAN_S:,.0f} s (365 days): split it, or fix the outlier"))
            continue
        # r.arrival_s - shift is exact: shift is a whole number below it, a multiple of its float spacing.
        kept.append(r if shift == 0 else r.model_copy(update={"arrival_s": r.arrival_s - shift}))
    return kept, shift


def load_trace(path: str | Path, *, catalog: Catalog | None = None, settings: Settings | None = None,
               skip_invalid: bool = False) -> Trace:
    """Read and validate a JSONL trace file (see ``parse_trace_lines``); bytes that are not UTF-8 are a
    problem of their line, like any other."""
    problems: list[tuple[str, int, str, str]] = []
    return parse_trace_lines(read_lines(path, problems), source=str(Path(path)), catalog=catalog,
                             settings=settings, skip_invalid=skip_invalid, problems=problems)


def write_trace(requests: Iterable[Request], path: str | Path) -> int:
    """Write requests as JSONL with every default resolved; returns the number of lines. Written beside ``path``
    and renamed over it once whole: a Ctrl-C or a full disk midway leaves the file that was there (it was cut
    short, and a shorter trace loaded without a word: a helper's hunt). A stream (/dev/null, a FIFO, a pipe) is
    written as it is: renamed over, it became a regular file (/dev/null so, for every later writer, when run as
    root); a link keeps being one, the trace renamed over its target."""
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():
        return _write_stream(requests, p)
    p = p.resolve() if p.is_symlink() else p
    n, tmp = 0, None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as a file opened for writing would be, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            n = _dump(requests, fh)
        os.replace(tmp, p)
        tmp = None
    except OSError as exc:  # a full disk, a directory, a path under a file: the cause, not a traceback
        raise ConfigError(f"cannot write the trace to {p}: {exc.strerror or exc}; give a writable file path") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return n


def _dump(requests: Iterable[Request], fh) -> int:
    n = 0
    for r in requests:
        fh.write(json.dumps(r.model_dump(mode="json"), separators=(",", ":")) + "\n")
        n += 1
    return n


def _write_stream(requests: Iterable[Request], p: Path) -> int:
    try:
        with p.open("w", encoding="utf-8") as fh:
            return _dump(requests, fh)
    except OSError as exc:
        raise ConfigError(f"cannot write the trace to {p}: {exc.strerror or exc}; give a writable file path") from None
