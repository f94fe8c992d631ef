"""What a catalog that does not validate is told: the first problem's field, pydantic's words, and the fix where a
close name tells it. A typo in an overlay reads otherwise as something else: a misspelt provider or model is a new
one missing its fields ("providers.opnai.models.gpt-5.kind: Field required"), and a misspelt field is only "Extra
inputs are not permitted" (a new user's tour, stop 79)."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from importlib import resources

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["catalog_problem"]


def catalog_problem(exc: ValidationError, where: str, root: type[BaseModel], base: Mapping,
                    extra: Mapping | None) -> str:
    """The message of ``exc`` raised validating the catalog ``where`` (``root``): ``base`` is the catalog read and
    ``extra`` the overlay merged on it (None: no overlay)."""
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")  # a check of ours: its message is whole
    hint = _new_name(loc, base, extra) if extra is not None else _as_overlay(loc, first["type"])
    if not hint and first["type"] == "extra_forbidden":
        known = _fields(root, loc[:-1])
        close = _closest(str(loc[-1]), known)
        hint = f"; did you mean '{close}'?" if close else (f"; its fields: {', '.join(known)}" if known else "")
    dotted = ".".join(str(x) for x in loc)
    return f"catalog {where}: field '{dotted}': {msg}{hint} ({exc.error_count()} error(s))"


def _new_name(loc: tuple, base: Mapping, extra: Mapping) -> str:
    """Where the problem lies under a provider or model the overlay adds, and the catalog has one of a close name:
    that the overlay adds it as new, and the name it may mean."""
    if len(loc) < 2 or loc[0] != "providers":
        return ""
    have, added = base.get("providers") or {}, extra.get("providers") or {}
    name = str(loc[1])
    if name not in have and name in added:
        return _said("provider", name, "", list(have))
    if len(loc) >= 4 and loc[2] == "models" and isinstance(have.get(name), Mapping):
        models, model = have[name].get("models") or {}, str(loc[3])
        if model not in models and model in ((added.get(name) or {}).get("models") or {}):
            return _said("model", model, f" to {name}", list(models))
    return ""


def _as_overlay(loc: tuple, kind: str) -> str:
    """A whole catalog that lacks a field of a provider or model the packaged one has: most likely a file of
    changes given as the catalog, which the overlay flag takes (a helper's tour: it was told "Field required"
    alone, and no word of that flag)."""
    if kind != "missing" or len(loc) < 3 or loc[0] != "providers":
        return ""
    packaged = (yaml.safe_load(resources.files("engine").joinpath("data/catalog.yaml").read_text(encoding="utf-8"))
                .get("providers") or {})
    have = packaged.get(str(loc[1]))
    if not isinstance(have, Mapping) or (loc[2] == "models" and len(loc) > 3
                                         and str(loc[3]) not in (have.get("models") or {})):
        return ""
    return ("; --catalog takes a whole catalog: to change some fields of the packaged one, give this file as "
            "--catalog-overlay")


def _said(what: str, name: str, to: str, names: list[str]) -> str:
    close = _closest(name, names)
    if not close:
        return ""
    return (f"; the overlay adds a new {what} '{name}'{to}, as the catalog has none of that name: did you mean "
            f"'{close}'? (a new {what} needs the fields named)")


def _closest(name: str, names: list[str]) -> str | None:
    """The name of ``names`` that ``name`` may mean, letter case aside: a name as its brand writes it ("OpenAI",
    "Anthropic", "GPT-5") is the likeliest slip, and difflib, which minds case, told it nothing (a review)."""
    folded = {n.casefold(): n for n in names}
    close = difflib.get_close_matches(name.casefold(), list(folded), n=1)
    return folded[close[0]] if close else None


def _fields(root: type[BaseModel], path: tuple) -> list[str]:
    """The fields of the model at ``path`` under ``root`` (mappings' keys skipped), or [] where it is none."""
    tp: object = root
    for part in path:
        tp = _model_or_mapping(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return []
            tp = field.annotation
        elif typing.get_origin(tp) in (dict, Mapping):
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _model_or_mapping(tp)
    return sorted(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _model_or_mapping(tp: object) -> object:
    """``tp`` with ``Optional``/``Annotated``/unions read down to its model or mapping (the first one)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = next((a for a in args if (isinstance(a, type) and issubclass(a, BaseModel))
                       or typing.get_origin(a) in (dict, Mapping)), args[0])
        else:
            return tp
