"""Every error smartbatch raises on purpose.

    SmartbatchError
    ├── ConfigError          a setting or catalog entry is wrong (names the field and the fix)
    │   └── CatalogError     the provider/model catalog is invalid or lacks a model
    ├── TraceError           a trace line is invalid (file, line, field, fix)
    ├── RegistryError        unknown or doubly registered policy name
    ├── PolicyError          a policy returned something the engine cannot carry out
    └── ProviderError        a (simulated or real) provider call failed for good

Library errors are wrapped with ``raise X(...) from exc`` so callers only catch ours.
"""

from __future__ import annotations

__all__ = [
    "CatalogError",
    "ConfigError",
    "PolicyError",
    "ProviderError",
    "RegistryError",
    "SmartbatchError",
    "TraceError",
]


class SmartbatchError(Exception):
    """Base of every smartbatch error."""


class ConfigError(SmartbatchError):
    """A setting is wrong; the message names the setting and what to change."""


class CatalogError(ConfigError):
    """The provider/model catalog is invalid or lacks what a request asks for."""


class TraceError(SmartbatchError):
    """One or more trace lines are invalid.

    ``problems`` holds ``(path, line_no, field, message)`` tuples, one per bad line, so a caller
    can show them all at once instead of making the user fix one line per run.
    """

    def __init__(self, problems: list[tuple[str, int, str, str]]):
        self.problems = problems
        head = "\n".join(f"{p}:{n}: field '{f}': {m}" for p, n, f, m in problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(
            f"{len(problems)} invalid trace line(s):\n{head}{more}\n"
            "Fix these lines, or pass --skip-invalid to skip and count them."
        )


class RegistryError(SmartbatchError):
    """A policy name is unknown or registered twice."""


class PolicyError(SmartbatchError):
    """A policy's decision cannot be carried out."""


class ProviderError(SmartbatchError):
    """A provider call failed after all retries."""
