"""Policy base class and registry.

A policy is a pure decision object: ``group_key`` says which open group a request joins, ``decide`` says
whether a group waits or is dispatched and how. It does no I/O and makes no Ray call, so the simulator and the
live actors run the same objects. Policies are registered by name (registering a name twice is an error) and
can also be loaded as ``module:Class``.
"""

from __future__ import annotations

import difflib
import importlib
import types
import typing
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from engine.core.catalog import Catalog
from engine.core.errors import ConfigError, RegistryError
from engine.core.grouping import Decision, Group, ReuseSettings
from engine.core.policy_api import check_policy
from engine.core.request import Request
from engine.core.scheduling import Scheduling

__all__ = ["Policy", "PolicyParams", "available_policies", "load_policy", "register"]


class PolicyParams(BaseModel):
    """Typed, validated, frozen parameters of a policy; each policy subclasses this. No infinity nor NaN: a wait
    of .inf woke a group at infinity and submitted its batch there (a hunt); "never" is a parameter's None."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, value: Any, info: ValidationInfo) -> Any:
        """A boolean is true or false and a number a number, as in a trace: lax mode read "yes" as true and
        ``min_on_time_p: true`` as 1.0 (a helper's tour), and results.json kept what was written."""
        why = _json_type_problem(cls.model_fields[info.field_name].annotation, value, info.field_name, top=True)
        if why:
            raise ValueError(why)
        return value


def _json_type_problem(annotation: Any, value: Any, path: str, top: bool = False) -> str | None:
    """What is wrong with ``value``'s JSON type for ``annotation``, or None; into nested settings models (smart's
    ``turnaround``, ``scheduling``) too, naming the key by its path."""
    at = "" if top else f"{path} "  # a top-level parameter is named by the error's own prefix
    kinds = _scalar_kinds(annotation)
    if value is None:
        return None
    if kinds == {bool} and not isinstance(value, bool):
        return f"{at}must be true or false, not {type(value).__name__} {value!r:.40}"
    if kinds and kinds != {bool} and isinstance(value, (bool, str, bytes)):
        what = "a boolean" if isinstance(value, bool) else "a string"
        return f"{at}must be a number, not {what} ({value!r:.40}); write it bare, unquoted"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, Mapping):
        for key, item in value.items():
            field = annotation.model_fields.get(key)
            why = field and _json_type_problem(field.annotation, item, f"{path}.{key}")
            if why:
                return why
    return None


class Policy:
    """Base of all policies. Subclasses set ``name``, ``Params`` and implement ``group_key``/``decide``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[PolicyParams]] = PolicyParams

    def __init__(self, catalog: Catalog, params: PolicyParams | Mapping[str, Any] | None = None):
        self.catalog = catalog
        if params is None or isinstance(params, Mapping):
            try:
                params = self.Params.model_validate(dict(params or {}))
            except ValidationError as exc:
                raise ConfigError(_param_error(self.name, self.Params, exc)) from exc
        elif not isinstance(params, self.Params):  # a list read as parameters raised AttributeError at its first use
            raise ConfigError(f"policy {self.name!r}: params must be a mapping of its parameters (or a "
                              f"{self.Params.__name__}), got {type(params).__name__}; `smartbatch policies` lists them")
        self.params = params

    @property
    def reuse(self) -> ReuseSettings:
        return ReuseSettings()

    @property
    def scheduling(self) -> Scheduling:
        """How provider queues order this policy's ready work; the base is plain arrival order."""
        return Scheduling(order="fifo", fair_share=False)

    def group_key(self, req: Request, compat: tuple, now: float) -> Hashable:
        raise NotImplementedError

    def decide(self, group: Group, now: float) -> Decision:
        raise NotImplementedError

    def arrival_key(self, key: Hashable) -> Hashable | None:
        """The key under which the runtime counts the arrivals of group ``key`` (``Group.arrival_rate``), or
        None for none. The base counts none: a policy that reads rates names its keys here, so one-request keys
        do not crowd the bounded table, and may count several groups as one lane. A policy object not built on
        this base, without the method, gets every key counted under itself."""
        return None

    def riders(self, group: Group, others: list[Group], now: float) -> list[Group]:
        """Which of ``others`` (the other open groups counted in ``group``'s lane, ``arrival_key``) go along
        in the provider batch ``group`` is about to be sent in: the runtime moves their members into ``group``
        and decides it again, so one batch carries what would have been several. The base sends none."""
        return []

    def prefix_run(self, key: Hashable) -> tuple | None:
        """The prompt prefix run (leading block hashes) that every member of group ``key`` starts with, or None.
        The runtime indexes such groups, and offers them to ``warm_pull`` when a call leaves that run warm at
        the provider (for a policy that declares ``reads_warmth``). The base names none."""
        return None

    def warm_pull(self, group: Group, now: float, warmth) -> tuple[Decision, set[str]] | None:
        """Members of ``group`` (its ``prefix_run`` now warm, ``warmth`` the runtime's ``PrefixWarmth``) to send
        sync at once, with the sync ``Decision`` to send them by, or None; the runtime then decides the group
        again. The base pulls none."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


# The registry is filled once, at import of the policy modules, by their @register decorators.
_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    if not cls.name:
        raise RegistryError(f"{cls.__qualname__} has no 'name'; set name = '...' on the class")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RegistryError(f"policy name {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    import policies  # noqa: F401  (registers the built-in policies)

    return sorted(_REGISTRY)


def _scalar_kinds(annotation: Any) -> set[type]:
    """The scalar types a field takes ({bool}, {float}, ... through ``| None``), or none for any other field."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = {a for a in (typing.get_args(annotation) if union else (annotation,)) if a is not type(None)}
    return kinds if kinds and kinds <= {bool, int, float} else set()


def _param_error(policy: str, params: type[BaseModel], exc: ValidationError) -> str:
    """One line: an unknown parameter with the near name and the list (the list alone hid the fix among 29
    names), a bad value with the value given (a helper's tour)."""
    first = exc.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    if first["type"] == "extra_forbidden":
        # A nested key (turnaround.epoch) is matched among its own setting's keys, not the policy's parameters.
        model, owner = params, "its parameters"
        for part in first["loc"][:-1]:
            ann = model.model_fields[part].annotation if part in model.model_fields else None
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                break
            model, owner = ann, f"{part}'s keys"
        names = sorted(model.model_fields)
        close = difflib.get_close_matches(str(first["loc"][-1]), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"policy {policy!r} has no parameter {loc!r}; {hint}{owner}: {', '.join(names)}"
    got = first.get("input")
    shown = f" = {got!r:.60}" if isinstance(got, (str, int, float, bool)) else ""
    msg = first["msg"].removeprefix("Value error, ")
    return f"policy {policy!r}: parameter {loc}{shown}: {msg} (`smartbatch policies` shows its default)"


def load_policy(spec: str, catalog: Catalog, params: Mapping[str, Any] | None = None) -> Policy:
    """A policy by registered name (``smart``) or import path (``mypkg.mod:MyPolicy``)."""
    import policies  # noqa: F401

    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"cannot load policy {spec!r}: {exc}; use module.path:ClassName") from exc
        except Exception as exc:  # the user's module raised on import: its error, not smartbatch's
            raise RegistryError(f"cannot load policy {spec!r}: importing {mod_name} raised "
                                f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(cls, type):
            raise RegistryError(f"{spec!r} is not a class; give module:Class of a policy "
                                "(see engine.core.policy_api.Policy)")
    else:
        try:
            cls = _REGISTRY[spec]
        except KeyError:
            close = difflib.get_close_matches(spec, sorted(_REGISTRY), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RegistryError(f"unknown policy {spec!r}; {hint}choose one of {sorted(_REGISTRY)} "
                                "or give module:Class") from None
    try:
        policy = cls(catalog, params)
    except TypeError as exc:
        if ":" not in spec:
            raise
        raise RegistryError(f"{spec!r} is not a policy class: {cls.__name__}(catalog, params) raised {exc}; give "
                            "module:Class of a policy (see engine.core.policy_api.Policy)") from exc
    check_policy(policy, spec)
    return policy
