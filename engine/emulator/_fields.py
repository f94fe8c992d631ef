"""The refusal of a top-level body field a route does not take, in its API's own words.

The real APIs refuse a field they do not know: OpenAI's chat completions with "Unrecognized request argument
supplied: foo" (``param`` and ``code`` null, as its answers are reported from 2023 to 2026), its newer routes
(Responses, images, videos, files, batches) with "Unknown parameter: 'foo'." (``param`` the field, ``code``
``unknown_parameter``; reported for Responses and images, ASSUMPTION for files and batches, whose refusals are not
reported), Anthropic with "foo: Extra inputs are not permitted". An emulator that took them let a field the engine
sent wrongly (a typo, a field of another route or of the other provider) pass every test and fail only against the
real API. The fields each route takes are the installed SDKs' (``engine.core._sdk_fields``).
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.core._sdk_fields import sdk_fields
from engine.emulator._wire import ApiError, Family

__all__ = ["check_fields"]

# The routes that answer an unknown field in the newer words (the older chat completions route has its own).
_UNKNOWN_PARAMETER = frozenset({"responses", "images.generations", "videos", "files.create", "batches.create"})


def check_fields(route: str, fields: Iterable[str], family: Family, where: str = "") -> None:
    """Raise the route's 400 for the first field (in sorted order) it does not take. ``where``: the path of the
    object at Anthropic (``requests.0.``), which its message names before the field."""
    known = sdk_fields(route)
    if known is None:
        return
    extra = sorted(k for k in fields if k not in known)
    if not extra:
        return
    key = extra[0]
    if family == "anthropic":
        raise ApiError(400, f"{where}{key}: Extra inputs are not permitted", param=f"{where}{key}")
    if route in _UNKNOWN_PARAMETER:
        raise ApiError(400, f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter")
    raise ApiError(400, f"Unrecognized request argument supplied: {key}")
