"""What every trace builder of ``engine.core.tracegen`` shares: the text models' mix, the tenants' and priorities'
draws, a model named on the command line, and the rows' validation into requests (all or nothing)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from engine.core.catalog import Catalog
from engine.core.errors import CatalogError, TraceError
from engine.core.request import Request, validation_context
from engine.core.settings import Settings
from engine.core.trace import MAX_SPAN_S, _problems_of

__all__ = ["TEXT_MIX", "Problems"]

TEXT_MIX: tuple[tuple[str, str, float], ...] = (
    ("openai", "gpt-5-mini", 0.30),
    ("openai", "gpt-5", 0.15),
    ("anthropic", "claude-sonnet-4-5", 0.25),
    ("anthropic", "claude-haiku-4-5", 0.10),
    ("google", "gemini-2.5-flash", 0.20),
)
_TENANTS = ("tenant-a", "tenant-b", "tenant-c", "tenant-d")
_TENANT_P = (0.4, 0.3, 0.2, 0.1)
_PRIOS = ("urgent", "normal", "background")
_PRIO_P = (0.10, 0.60, 0.30)
_HINT = "fix or remove the rows named (every row must be valid: a builder writes all of them or nothing)"
Problems = list[tuple[str, int, str, str]]


def _parse_model(model: str | None, catalog: Catalog) -> tuple[str, str] | None:
    if model is None:
        return None
    if "/" in model:
        prov, name = model.split("/", 1)
    else:  # a model one provider offers names its provider, as a trace line's model does
        offers = [f"{pn}/{model}" for pn, p in catalog.providers.items() if model in p.models]
        if len(offers) > 1:
            raise TraceError([("--model", 0, "model", f"{model!r} is offered by several providers: write it as "
                               f"provider/model, one of {offers}")], hint="")
        try:
            prov, name = catalog.find_model(model)[0], model
        except CatalogError as exc:
            raise TraceError([("--model", 0, "model", f"{exc}")], hint="") from None
    try:
        spec = catalog.model(prov, name)
    except CatalogError as exc:
        raise TraceError([("--model", 0, "model", f"{model!r}: {exc}")], hint="") from None
    if spec.kind != "text":
        raise TraceError([("--model", 0, "model", f"{model!r} makes {spec.kind}s; the traces' rows are text "
                           f"requests, so pick a text model such as {'/'.join(TEXT_MIX[0][:2])}")], hint="")
    return prov, name


def _current(catalog: Catalog, prov: str, name: str, today: date | None) -> tuple[str, str]:
    return prov, name if today is None else catalog.current(prov, name, today)


def _served(options: tuple[tuple[str, str, float], ...], catalog: Catalog,
            today: date | None) -> tuple[tuple[str, str, float], ...]:
    """``options`` with each model written as its successor on ``today``; a model shut down with none (sora-2) is
    left out, its weight spread over the others (a trace of the models it stands for cannot be run anywhere)."""
    if today is None:
        return options
    mapped = [(p, catalog.current(p, m, today), w) for p, m, w in options]
    kept = [(p, m, w) for p, m, w in mapped if (d := catalog.model(p, m).shutdown) is None or d > today]
    if not kept:  # a catalog of the user's, every one of them retired
        raise TraceError([("--current-models", 0, "model", f"{[m for _, m, _ in mapped]} are all shut down by "
                           f"{today} with no successor: name one in a catalog overlay")], hint="")
    total = sum(w for _, _, w in kept)
    return tuple((p, m, w / total) for p, m, w in kept)


def _common(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    tenants = rng.choice(len(_TENANTS), size=n, p=_TENANT_P)
    prios = rng.choice(len(_PRIOS), size=n, p=_PRIO_P)
    return tenants, prios


def _build(rows: list[tuple[int, dict]], catalog: Catalog, settings: Settings | None, source: str,
           problems: Problems) -> list[Request]:
    """Validate the rows (each with its line in the source); any problem, here or found while reading, is
    raised as one ``TraceError`` naming every bad row, its field and the fix."""
    ctx = validation_context(catalog, settings)
    out, nos = [], []
    for no, row in rows:
        try:
            out.append(Request.model_validate(row, context=ctx))
            nos.append(no)
        except ValidationError as exc:
            problems.extend((source, no, f, m) for f, m in _problems_of(exc))
    first = min((r.arrival_s for r in out), default=0.0)
    # The loader's rule, checked here too: a trace written past it was refused by the bench it was built for.
    problems.extend((source, no, "arrival_s", f"arrives {r.arrival_s - first:,.0f} s after the first row; a trace "
                     f"spans at most {MAX_SPAN_S:,.0f} s (365 days): split the file, or fix the outlier")
                    for no, r in zip(nos, out) if r.arrival_s - first > MAX_SPAN_S)
    if problems:
        raise TraceError(sorted(problems, key=lambda p: p[1]), hint=_HINT)
    if not out:
        raise TraceError([(source, 0, "file", f"{Path(source).name} has no rows; give a file with at least one")],
                         hint="")
    return out


def _count(value: object, source: str, no: int, field: str, problems: Problems, *, cell: bool = False) -> int | None:
    """A whole number >= 0 (from a CSV ``cell``'s text, or a JSON number); a problem (and None) otherwise."""
    if cell and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append((source, no, field, f"must be a whole number >= 0, got {value!r:.60}"))
        return None
    return value


def _cap_output(catalog: Catalog, prov: str, model: str, out: int) -> int:
    return min(out, catalog.model(prov, model).max_output_tokens)
