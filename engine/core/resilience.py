"""What to do when a provider answers 429 or 5xx: when to retry, and when to stop sending for a while.

* ``retry_delay``: a 429's ``Retry-After`` is honoured as given; otherwise exponential backoff
  ``base * 2**(k-1)`` capped at ``max_s``, with "equal jitter" (half fixed, half drawn), so that the calls of
  one failing burst do not retry in lockstep and hit the provider again together.
* ``CircuitBreaker``: per provider and model, at least ``allowed_fails`` failures within ``window_s`` that
  are also at least ``failure_share`` of the calls that ended there open the circuit for ``cooldown_time``
  seconds (the names are LiteLLM's; a count alone would keep a busy model's circuit open at a normal 1 %
  error rate, which is why LiteLLM added a failure percentage too). While open, work goes to the fallback
  model when one is mapped, else waits for the circuit to close. After the cool-down, calls flow again; a
  failure that keeps on opens it again.

Pure: time and the jitter draw are parameters, so the simulator and the dispatchers decide alike.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.core.errors import CatalogError, ConfigError

if TYPE_CHECKING:
    from engine.core.catalog import Catalog

__all__ = ["CircuitBreaker", "Resilience", "check_fallbacks", "retry_delay"]


class Resilience(BaseModel):
    """Retries, circuit breaking and fallbacks (``SMARTBATCH_RESILIENCE__ALLOWED_FAILS=5`` and so on)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    backoff_max_s: float = Field(default=60.0, gt=0, description="cap on one backoff wait")
    allowed_fails: int = Field(default=5, ge=1, description="failures within window_s that open the circuit")
    window_s: float = Field(default=60.0, gt=0, description="how far back failures count")
    failure_share: float = Field(default=0.5, gt=0, le=1, description="and at least this share of the calls "
                                 "that ended within window_s failed")
    cooldown_time: float = Field(default=30.0, ge=0, description="seconds a circuit stays open")
    fallbacks: dict[str, str] = Field(
        default_factory=dict,
        description="provider/model -> provider/model to send to while the first one's circuit is open")

    @field_validator("fallbacks")
    @classmethod
    def _pairs(cls, v: dict[str, str]) -> dict[str, str]:
        for a, b in v.items():
            for name in (a, b):
                if name.count("/") != 1 or not all(name.split("/")):
                    raise ValueError(f"fallbacks entry {a!r}: {b!r}: write each side as provider/model")
            if a == b:
                raise ValueError(f"fallbacks maps {a!r} to itself")
        return v


def retry_delay(attempt: int, base_s: float, max_s: float, jitter_u: float,
                retry_after_s: float | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` after attempt ``attempt`` (1-based) failed."""
    if retry_after_s is not None:
        return max(retry_after_s, 0.0)
    d = min(base_s * 2 ** (attempt - 1), max_s)
    return d * (0.5 + 0.5 * min(max(jitter_u, 0.0), 1.0))


class CircuitBreaker:
    def __init__(self, allowed_fails: int, window_s: float, cooldown_s: float, failure_share: float = 0.5):
        self.allowed_fails = allowed_fails
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.failure_share = failure_share
        self._fails: dict[str, deque[float]] = {}
        self._oks: dict[str, deque[float]] = {}
        self._open_until: dict[str, float] = {}
        self.opened = 0  # times a circuit opened, for reports

    def __repr__(self) -> str:
        return f"CircuitBreaker(open={sorted(self._open_until)}, opened={self.opened})"

    def _trim(self, q: deque[float], t: float) -> None:
        while q and q[0] <= t - self.window_s:
            q.popleft()

    def success(self, model: str, t: float) -> None:
        q = self._oks.setdefault(model, deque())
        q.append(t)
        self._trim(q, t)

    def failure(self, model: str, t: float) -> None:
        q = self._fails.setdefault(model, deque())
        q.append(t)
        self._trim(q, t)
        oks = self._oks.get(model, deque())
        self._trim(oks, t)
        if (len(q) >= self.allowed_fails and len(q) >= self.failure_share * (len(q) + len(oks))
                and self._open_until.get(model, -1.0) <= t):
            self._open_until[model] = t + self.cooldown_s
            self.opened += 1
            q.clear()

    def open_until(self, model: str, t: float) -> float | None:
        """When the circuit of ``model`` closes, if it is open at ``t``."""
        until = self._open_until.get(model)
        if until is None:
            return None
        if until <= t:
            del self._open_until[model]
            return None
        return until


def check_fallbacks(catalog: Catalog, res: Resilience) -> None:
    """Every fallback names models of the catalog that generate the same kind."""
    for a, b in res.fallbacks.items():
        specs = []
        for name in (a, b):
            p, m = name.split("/", 1)
            try:
                specs.append(catalog.model(p, m))
            except CatalogError as exc:
                raise ConfigError(f"resilience.fallbacks {a!r} -> {b!r}: {exc}") from None
        if specs[0].kind != specs[1].kind:
            raise ConfigError(f"resilience.fallbacks {a!r} -> {b!r}: {specs[0].kind} models cannot fall back to "
                              f"{specs[1].kind} models; map it to one of the same kind")
