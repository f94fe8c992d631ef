"""Reading and writing traces (JSONL, one request per line; the format is in README and docs/traces.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from engine.catalog import Catalog, default_catalog
from engine.errors import TraceError
from engine.request import FieldProblem, Request, validation_context
from engine.settings import Settings

__all__ = ["Trace", "load_trace", "parse_trace_lines", "write_trace"]


@dataclass(frozen=True)
class Trace:
    """Validated requests in arrival order, plus what was skipped (only with ``skip_invalid``)."""

    name: str
    requests: list[Request]
    skipped: int = 0
    problems: list[tuple[str, int, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)


def _problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldProblem):
            out.append((cause.field, str(cause)))
            continue
        loc = ".".join(str(x) for x in err["loc"]) or "line"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required; add it to the line"
        elif err["type"] == "extra_forbidden":
            msg = "is not a trace field; remove it or fix its spelling (see docs/traces.md)"
        out.append((loc, msg))
    return out


def parse_trace_lines(lines: Iterable[str], *, source: str = "<trace>", catalog: Catalog | None = None,
                      settings: Settings | None = None, skip_invalid: bool = False) -> Trace:
    """Validate JSONL lines. Every problem is collected (file, line, field, fix); without ``skip_invalid``
    any problem raises ``TraceError`` listing them all, so nothing is silently dropped."""
    ctx = validation_context(catalog or default_catalog(), settings)
    requests: list[Request] = []
    problems: list[tuple[str, int, str, str]] = []
    seen: dict[str, int] = {}
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((source, no, "line", f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        try:
            req = Request.model_validate(raw, context=ctx)
        except ValidationError as exc:
            problems.extend((source, no, f, m) for f, m in _problems_of(exc))
            continue
        if req.id in seen:
            problems.append((source, no, "id", f"duplicate id {req.id!r} (first on line {seen[req.id]}); "
                                                "ids are idempotency keys and must be unique"))
            continue
        seen[req.id] = no
        requests.append(req)
    if problems and not skip_invalid:
        raise TraceError(problems)
    requests.sort(key=lambda r: r.arrival_s)  # stable: equal arrivals keep file order
    bad_lines = len({(p[0], p[1]) for p in problems})
    return Trace(name=Path(source).stem, requests=requests, skipped=bad_lines, problems=problems)


def load_trace(path: str | Path, *, catalog: Catalog | None = None, settings: Settings | None = None,
               skip_invalid: bool = False) -> Trace:
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as fh:
            return parse_trace_lines(fh, source=str(p), catalog=catalog, settings=settings,
                                     skip_invalid=skip_invalid)
    except OSError as exc:
        raise TraceError([(str(p), 0, "file", f"cannot read the trace: {exc.strerror}")]) from exc


def write_trace(requests: Iterable[Request], path: str | Path) -> int:
    """Write requests as JSONL with every default resolved; returns the number of lines."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps(r.model_dump(mode="json"), separators=(",", ":")) + "\n")
            n += 1
    return n
