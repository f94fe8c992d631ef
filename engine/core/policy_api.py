"""What a policy is, for a policy author: the ``Policy`` protocol and the values it reads and returns.

A policy is pure: ``group_key`` names the open group a request joins and ``decide`` says whether a group waits
or is dispatched, from the request or group and the time given, with no I/O and no change to the policy's own
state (anything that changes with the traffic, such as which prompt prefixes were sent lately, is the
runtime's and reaches the policy through the ``Group``). So the simulator and the live actors run the same
object and a decision can be replayed. ``policies.base.Policy`` is a base class that implements the protocol;
a policy loaded as ``module:Class`` need not subclass it, but is checked against this protocol when built.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable
from typing import Protocol, runtime_checkable

from engine.core.errors import RegistryError
from engine.core.grouping import Decision, Group, PrefixSightings, ReuseSettings
from engine.core.request import Request
from engine.core.scheduling import Scheduling

__all__ = ["Decision", "Group", "Policy", "PrefixSightings", "ReuseSettings", "Scheduling", "check_policy"]


@runtime_checkable
class Policy(Protocol):
    name: str

    @property
    def reuse(self) -> ReuseSettings:
        """Which reuse (exact, in-flight, near) the runtime may apply before grouping."""

    @property
    def scheduling(self) -> Scheduling:
        """How a rate-limited provider orders this policy's ready work."""

    def group_key(self, req: Request, compat: tuple, now: float) -> Hashable:
        """The open group ``req`` joins (requests with equal keys may be dispatched together). Optional keyword
        arguments, passed by the runtime only to a policy that declares it reads them: ``budget=`` (its
        ``BudgetPressure``, ``reads_budget_pressure = True``), ``warmth=`` (its ``PrefixWarmth``, the prompt-cache
        warmth its results showed, ``reads_warmth = True``), ``returned=`` (whether ``req`` comes back from a
        batch cancelled late, ``reads_returned = True``) and ``provider=`` (the provider with its learned batch
        turnaround, with ``turnaround_learning`` enabled)."""

    def decide(self, group: Group, now: float) -> Decision:
        """Wait (until a time, or the next arrival) or dispatch some of ``group``. Pure: no I/O, and the policy
        is the same object after the call (the runtime records ``Decision.prefix``)."""


_METHODS = {"group_key": 3, "decide": 2}


def check_policy(obj: object, where: str) -> None:
    """Raise ``RegistryError`` naming what ``obj`` (built from ``where``) lacks to be a ``Policy``."""
    missing = [a for a in ("name", "reuse", "scheduling", *_METHODS) if not hasattr(obj, a)]
    if missing:
        raise RegistryError(f"policy {where!r} is missing {', '.join(missing)}: a policy has a name, reuse and "
                            "scheduling properties, group_key(req, compat, now) and decide(group, now) "
                            "(see engine.core.policy_api.Policy)")
    for meth, n in _METHODS.items():
        fn = getattr(obj, meth)
        try:
            inspect.signature(fn).bind(*range(n))
        except TypeError:
            raise RegistryError(f"policy {where!r}: {meth} must take {n} arguments "
                                f"({'req, compat, now' if meth == 'group_key' else 'group, now'})") from None
        except ValueError:  # no signature to read (a builtin): trust it
            pass
    if not isinstance(getattr(obj, "reuse"), ReuseSettings):
        raise RegistryError(f"policy {where!r}: reuse must be a ReuseSettings")
    if not isinstance(getattr(obj, "scheduling"), Scheduling):
        raise RegistryError(f"policy {where!r}: scheduling must be a Scheduling")
