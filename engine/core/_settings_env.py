"""How a setting's problem is told in terms of the ``SMARTBATCH_*`` variables the user wrote."""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel

from engine.core.errors import ConfigError

ENV_PREFIX = "SMARTBATCH_"


def check_env_names(fields: Collection[str]) -> None:
    """Refuse a ``SMARTBATCH_*`` variable that looks meant for a setting and names none. pydantic-settings drops
    a variable whose first part is no setting without a word, so ``SMARTBATCH_BUDGET__SPECS`` (one letter short)
    ran with no budget at all, and ``SMARTBATCH_PROVIDER__MODE=http`` stayed simulated (a helper's tour). A
    nested name (``__``) is always meant for a setting; a flat one only when it is close to a setting's name,
    since the family also holds keys and switches of the tests (``SMARTBATCH_HTTP_KEY``, ``SMARTBATCH_DATA_DIR``)."""
    known = {f.upper() for f in fields}
    for var in sorted(os.environ):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        name = var.upper()[len(ENV_PREFIX):]
        head, nested, rest = name.partition("__")
        if head in known:
            continue
        near = difflib.get_close_matches(head, known, n=1, cutoff=0.6 if nested else 0.8)
        if not nested and not near:
            continue
        meant = f"did you mean {ENV_PREFIX}{near[0]}{'__' + rest if nested else ''}? " if near else ""
        raise ConfigError(f"{var}: there is no setting {head.lower()}; {meant}rename or unset it (the settings: "
                          f"{', '.join(sorted(f.lower() for f in known))})")


_BOUND_FIX = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_NUMBER_FIX = {"int_parsing": "must be a whole number", "int_type": "must be a whole number",
               "int_from_float": "must be a whole number", "float_parsing": "must be a number",
               "float_type": "must be a number", "finite_number": "must be a finite number"}


def explain(err: Any, model: type | None = None) -> str:
    """One pydantic error as a line naming the setting, the variable it came from and the fix. ``model``: the
    settings class, whose fields a misspelt setting is matched against ("did you mean ...?")."""
    loc = [str(x) for x in err["loc"]]
    setting = ".".join(loc) or "settings"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("bool_parsing", "bool_type"):  # pydantic's "unable to interpret input" named no value it takes
        msg = "must be true or false"
    if err["type"] == "extra_forbidden":
        near = difflib.get_close_matches(loc[-1], _beside(model, loc), n=1, cutoff=0.6) if loc else []
        meant = f"did you mean {'.'.join([*loc[:-1], near[0]])}? " if near else ""
        return f"{env_names(loc)}: there is no setting {setting}; {meant}remove it or fix its spelling"
    if err["type"] == "missing":
        return f"setting {setting} is required: {_how_to_add(loc)}"
    value = err.get("input")
    got = f" = {value!r:.60}" if isinstance(value, (str, int, float)) else ""
    if err["type"] in ("tuple_type", "list_type"):  # pydantic's "a valid tuple": JSON has lists only
        msg = _list_fix(value, _item_type(model, loc))
        got = ""
    if err["type"] in _NUMBER_FIX:  # pydantic's "Input should be a valid integer, unable to parse string as ..."
        msg = _NUMBER_FIX[err["type"]]
    if err["type"] in _BOUND_FIX:  # pydantic's "Input should be greater than 0": the value said once, after the rule
        bound = next(iter((err.get("ctx") or {}).values()), "?")
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        msg = f"must be {_BOUND_FIX[err['type']]} {bound}" + (f", got {value!s:.60}" if got else "")
        got = ""
    env = env_names(loc)
    return f"setting {setting}{got} (from {env}): {msg}; fix or unset {env}"


def _list_fix(value: Any, item: Any) -> str:
    """What a list setting given something else takes: one object (a budget written alone) is shown in brackets,
    where the list's items (``item``) are objects; for a list of numbers the brackets around an object are no fix."""
    if isinstance(value, dict):
        shown = json.dumps(value)
        if item in (int, float):
            return "must be a JSON list of numbers, not an object, e.g. '[1.0, 0.8]'"
        if not ((isinstance(item, type) and issubclass(item, BaseModel)) or typing.get_origin(item) is dict):
            return "must be a JSON list, not an object"
        return "must be a JSON list, not an object: write it in [ ]" + (f", e.g. '[{shown}]'" if len(shown) <= 120 else "")
    return f"must be a JSON list, e.g. '[...]', not {'null' if value is None else repr(value):.60}"


def _item_type(model: Any, loc: list[str]) -> Any:
    """The type of the items of the list setting at ``loc`` (None where unknown)."""
    args = [a for a in typing.get_args(_type_at(model, loc)) if a is not Ellipsis]
    return _unwrap(args[0]) if args else None


def _beside(model: Any, loc: list[str]) -> list[str]:
    """The names of the settings beside ``loc``'s last part: the fields of the model that holds it (a list's or
    a mapping's items are their element's), or none when the path leaves the models."""
    tp = _type_at(model, loc[:-1])
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _type_at(model: Any, loc: list[str]) -> Any:
    """The type of the setting at ``loc`` under ``model`` (None when the path leaves the models)."""
    tp = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            tp = field.annotation if field is not None else None
        else:  # list[X], tuple[X, ...] or dict[str, X]: the part is an index or a key
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[-1] if args else None
    return _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    """``X`` of ``X | None`` (the one argument of a union that is not None)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    is_union = typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)
    return _unwrap(args[0]) if is_union and len(args) == 1 else tp


def env_names(loc: list[str]) -> str:
    """The environment variable(s) a setting came from: the longest prefix of its path that is set."""
    keys = {k.upper(): k for k in os.environ if k.upper().startswith(ENV_PREFIX)}
    for n in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(loc[:n]).upper()
        hits = sorted(v for k, v in keys.items() if k == name or k.startswith(name + "__"))
        if hits:
            return ", ".join(hits)
    return ENV_PREFIX + "__".join(loc).upper() if loc else "the arguments"


def _how_to_add(loc: list[str]) -> str:
    """Where a missing setting goes: into the variable whose JSON holds its parent, else a variable of its own."""
    keys = {k.upper(): k for k in os.environ if k.upper().startswith(ENV_PREFIX)}
    for n in range(len(loc) - 1, 0, -1):
        var = keys.get(ENV_PREFIX + "__".join(loc[:n]).upper())
        if var is not None:
            path = ".".join(f"item {x}" if x.isdigit() else x for x in loc[n:-1])
            inside = f" (in its {path})" if path else ""
            return f"add {loc[-1]!r} to the JSON of {var}{inside}"
    return f"set {ENV_PREFIX}{'__'.join(loc).upper()}"
