"""The route table's types: what a handler receives and how a route is declared."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from engine.emulator._core import Core
from engine.emulator._faults import FaultPlan
from engine.emulator._wire import ApiError, Family, Reply

__all__ = ["Ctx", "Route", "route"]


@dataclass(frozen=True)
class Ctx:
    """One request as a handler sees it. Headers are lower-cased; secrets in them are never copied out."""

    core: Core
    faults: FaultPlan
    provider: str
    route: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes
    request_id: str
    family: Family
    origin: str  # "http://127.0.0.1:PORT", for absolute URLs in answers

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return obj


class Route(NamedTuple):
    method: str
    pattern: re.Pattern[str]
    family: Family
    name: str
    handler: Callable[[Ctx], Reply]
    generating: bool  # a model call: random fault rates apply
    idempotent: bool  # an Idempotency-Key is honoured: model calls and batch creates


def route(method: str, path: str, family: Family, name: str, handler: Callable[[Ctx], Reply],
          generating: bool = False, idempotent: bool | None = None) -> Route:
    """``path`` below the provider prefix, with ``{name}`` segments, e.g. ``/v1/files/{file_id}/content``."""
    regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"
    return Route(method, re.compile(regex), family, name, handler, generating,
                 generating if idempotent is None else idempotent)
