"""Injectable faults: scripted answers per route, seeded random error rates, and batch faults.

No fault answer is billed: a fault is decided before the call reaches the model. Three faults are answers
cut short instead, of calls that ran and are billed: ``FaultSpec.cut_body``, ``FaultSpec.cut_connection`` and
``garble_members``; and one answered without its key: ``keyless_members``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.core.errors import ConfigError

__all__ = ["FaultPlan", "FaultSpec"]


class FaultSpec(BaseModel):
    """One scripted answer. ``status``: answer that error (429 carries ``retry-after``). ``timeout_s``: hold the
    connection that many *real* seconds first (to trip a client timeout); alone, the connection is then closed
    without an answer, so a client that waits longer sees a dropped connection, never a free result.
    ``cut_body``: the call runs and is billed, and its answer's body is cut in half (not JSON; a stream's
    connection is closed halfway through its events). ``cut_connection``: the call runs and is billed, then the
    connection is closed with no answer (a client sees the server disconnect after it sent the request: httpx's
    ``RemoteProtocolError``). ``trickle_s``: the call is answered as usual, its
    body sent a byte every ``trickle_s`` real seconds (a server alive but slow: a byte inside a client's timeout
    between chunks keeps its read going for the body's length times that, a results file's for hours). ``code`` and
    ``type``: the error body's ``error.code`` and ``error.type`` in place of the status's own, e.g. OpenAI's
    out-of-credit 429 ``{'status': 429, 'code': 'insufficient_quota', 'type': 'insufficient_quota'}`` (sent
    without ``retry-after``: no wait lifts it) or Anthropic's ``{'status': 402, 'type': 'billing_error'}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: int | None = Field(default=None, ge=400, le=599)
    retry_after_s: float | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, ge=0)
    message: str | None = None
    code: str | None = None
    type: str | None = None
    cut_body: bool = False
    cut_connection: bool = False
    trickle_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> FaultSpec:
        if (self.status is None and self.timeout_s is None and not self.cut_body and not self.cut_connection
                and self.trickle_s is None):
            raise ValueError("a fault needs 'status' (e.g. 429, 500, 529), 'timeout_s', 'cut_body', "
                             "'cut_connection' or 'trickle_s'")
        cut = [f for f in ("cut_body", "cut_connection", "trickle_s") if getattr(self, f)]
        if cut and (self.status is not None or self.timeout_s is not None or len(cut) > 1):
            raise ValueError(f"{cut[0]!r} answers the call itself: give it alone")
        return self


def _specs(specs: Iterable[FaultSpec | Mapping[str, Any]]) -> list[FaultSpec]:
    out = []
    for s in specs:
        try:
            out.append(s if isinstance(s, FaultSpec) else FaultSpec.model_validate(dict(s)))
        except ValidationError as exc:
            raise ConfigError(f"bad fault spec {s!r}: {exc.errors()[0]['msg']}; e.g. "
                              "{'status': 429, 'retry_after_s': 2} or {'timeout_s': 5}") from exc
    return out


def _rate(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {v!r}")
    return float(v)


class FaultPlan:
    """Faults of one emulator. Thread-safe; set from Python or by ``POST /_emulator/faults`` (see ``configure``).

    ``rate_429``/``rate_5xx`` apply to the generating routes only (chat.completions, responses,
    images.generations, messages); 5xx is 500 on OpenAI routes and 529 (overloaded) on Anthropic routes.
    ``fail_members``: custom_ids that fail with a server error inside any batch, until cleared.
    ``garble_members``: custom_ids that run (billed) inside any batch, their result line cut short, until cleared.
    ``keyless_members``: custom_ids (Google's ``metadata.key``) that run inside any batch, their result written
    without the key they were sent with (no ``custom_id``; Google's response without its ``metadata``, as
    googleapis python-genai #2008 and js-genai #1191 report), until cleared.
    ``retry_after_header``: False answers an OpenAI-route 429 without ``retry-after``, its wait only in
    ``x-ratelimit-reset-requests``/``-tokens`` (``"1m40s"``) beside ``x-ratelimit-remaining-requests: 0``, as OpenAI's
    429s may come (openai-node issue 1477). True (the default): a ``retry-after`` header, as Anthropic's always has.
    Google's layer (``compat: gemini``) says the wait in its error body, never in a header: a ``google.rpc.RetryInfo``
    detail, or with ``retry_after_header`` False nothing at all (its bare "Resource has been exhausted").
    ``fail_videos``: the next that many video jobs (OpenAI's ``POST /v1/videos``, Google's Veo
    ``:predictLongRunning``) are accepted and end failed, billed nothing, as a video the provider could not make
    does: a number counts the jobs of any provider, ``{"google": 1}`` those of one provider.
    ``refuse_flex``: the next that many flex calls (``service_tier: "flex"``) are refused with OpenAI's 429
    "Resource Unavailable", billed nothing (a number: of any provider; ``{"openai": 2}``: of one provider).
    ``batch_queue_limits``: per model, the input tokens an OpenAI batch queue holds (OpenAI's "batch queue limit",
    90,000 for gpt-4o at tier 1): a batch that would pass it, counting the batches of that model not yet ended,
    fails at validation with ``token_limit_exceeded``, as OpenAI's does. Empty (the default): no limit.
    """

    def __init__(self, seed: int, routes: Iterable[str], providers: Iterable[str]):
        self._lock = threading.Lock()
        self._seed = seed
        self._routes = frozenset(routes)
        self._providers = frozenset(providers)
        self._rng = np.random.default_rng([seed, 7])
        self._scripts: dict[tuple[str, str], deque[FaultSpec]] = {}
        self._expiries: deque[float] = deque()
        self._rate_429 = 0.0
        self._rate_5xx = 0.0
        self._retry_after_s = 1.0
        self.fail_members: set[str] = set()
        self.garble_members: set[str] = set()
        self.keyless_members: set[str] = set()
        self.batch_queue_limits: dict[str, int] = {}
        self.retry_after_header = True
        self._video_failures: dict[str | None, int] = {}  # by provider; None: any provider
        self._flex_refusals: dict[str | None, int] = {}  # the same, for flex calls

    # -- settings ------------------------------------------------------------------------------------------
    @property
    def rate_429(self) -> float:
        return self._rate_429

    @rate_429.setter
    def rate_429(self, v: float) -> None:
        self._rate_429 = _rate("rate_429", v)

    @property
    def rate_5xx(self) -> float:
        return self._rate_5xx

    @rate_5xx.setter
    def rate_5xx(self, v: float) -> None:
        self._rate_5xx = _rate("rate_5xx", v)

    @property
    def retry_after_s(self) -> float:
        return self._retry_after_s

    @retry_after_s.setter
    def retry_after_s(self, v: float) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"retry_after_s must be a number of seconds >= 0, got {v!r}")
        self._retry_after_s = float(v)

    def script(self, provider: str, route: str, specs: Iterable[FaultSpec | Mapping[str, Any]]) -> None:
        """The next calls to ``route`` of ``provider`` get these answers in order, then normal service."""
        if provider not in self._providers:
            raise ConfigError(f"unknown provider {provider!r}; the catalog has {sorted(self._providers)}")
        if route not in self._routes:
            raise ConfigError(f"unknown route {route!r}; routes are {sorted(self._routes)}")
        parsed = _specs(specs)
        with self._lock:
            self._scripts.setdefault((provider, route), deque()).extend(parsed)

    def expire_batches(self, n: int = 1, finished_fraction: float = 0.0) -> None:
        """The next ``n`` batches (of any provider) expire once ``finished_fraction`` of their members finished."""
        if n < 1:
            raise ConfigError(f"expire_batches needs n >= 1, got {n}")
        f = _rate("finished_fraction", finished_fraction)
        with self._lock:
            self._expiries.extend([f] * n)

    def _counts(self, name: str, what: str, n: int | Mapping[str, int]) -> dict[str | None, int]:
        counts = dict(n) if isinstance(n, Mapping) else {None: n}
        for provider, k in counts.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ConfigError(f"{name} must be a whole number of {what} >= 0, or a map of provider to "
                                  f"such a number (e.g. {{'google': 1}}), got {n!r}")
            if provider is not None and provider not in self._providers:
                raise ConfigError(f"{name}: unknown provider {provider!r}; the catalog has "
                                  f"{sorted(self._providers)}")
        return counts

    def _take(self, counts: dict[str | None, int], provider: str | None) -> bool:
        with self._lock:
            for who in (provider, None):
                if counts.get(who, 0) > 0:
                    counts[who] -= 1
                    return True
            return False

    def fail_videos(self, n: int | Mapping[str, int]) -> None:
        """The next ``n`` video jobs end failed (unbilled): of any provider, or per provider (``{"google": 1}``)."""
        counts = self._counts("fail_videos", "video jobs", n)
        with self._lock:
            self._video_failures = counts

    def take_video_failure(self, provider: str | None = None) -> bool:
        """Whether the video job ``provider`` is creating is to fail (its own count first, then any provider's)."""
        return self._take(self._video_failures, provider)

    def refuse_flex(self, n: int | Mapping[str, int]) -> None:
        """The next ``n`` flex calls are refused (429 "Resource Unavailable", unbilled): of any provider, or per
        provider (``{"openai": 2}``)."""
        counts = self._counts("refuse_flex", "flex calls", n)
        with self._lock:
            self._flex_refusals = counts

    def take_flex_refusal(self, provider: str | None = None) -> bool:
        """Whether the flex call ``provider`` is answering is to be refused (its own count first, then any's)."""
        return self._take(self._flex_refusals, provider)

    def clear(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._expiries.clear()
            self._rate_429 = self._rate_5xx = 0.0
            self._retry_after_s = 1.0
            self.fail_members = set()
            self.garble_members = set()
            self.keyless_members = set()
            self.batch_queue_limits = {}
            self.retry_after_header = True
            self._video_failures = {}
            self._flex_refusals = {}
            self._rng = np.random.default_rng([self._seed, 7])

    def configure(self, cfg: Mapping[str, Any]) -> None:
        """Apply a JSON plan: ``{"clear": true, "rate_429": 0.1, "rate_5xx": 0.05, "retry_after_s": 2,
        "fail_members": ["a"], "expire_batches": {"n": 1, "finished_fraction": 0.5},
        "batch_queue_limits": {"gpt-4o-mini": 2000000},
        "script": [{"provider": "openai", "route": "chat.completions", "specs": [{"status": 429}]}]}``."""
        known = {"clear", "rate_429", "rate_5xx", "retry_after_s", "fail_members", "garble_members", "keyless_members",
                 "expire_batches", "script", "batch_queue_limits", "retry_after_header", "fail_videos",
                 "refuse_flex"}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"unknown fault settings {sorted(unknown)}; known: {sorted(known)}")
        if cfg.get("clear"):
            self.clear()
        for name in ("rate_429", "rate_5xx", "retry_after_s"):
            if name in cfg:
                setattr(self, name, cfg[name])
        for name in ("fail_members", "garble_members", "keyless_members"):
            if name in cfg:
                ids = cfg[name]
                if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                    raise ConfigError(f"{name} must be a list of custom_id strings")
                setattr(self, name, set(ids))
        if "retry_after_header" in cfg:
            if not isinstance(cfg["retry_after_header"], bool):
                raise ConfigError("retry_after_header must be true or false")
            self.retry_after_header = cfg["retry_after_header"]
        if "fail_videos" in cfg:
            self.fail_videos(cfg["fail_videos"])
        if "refuse_flex" in cfg:
            self.refuse_flex(cfg["refuse_flex"])
        if "batch_queue_limits" in cfg:
            lim = cfg["batch_queue_limits"]
            if not isinstance(lim, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                    for k, v in lim.items()):
                raise ConfigError("batch_queue_limits must map model names to token counts >= 1, e.g. "
                                  "{'gpt-4o-mini': 2000000}")
            self.batch_queue_limits = dict(lim)
        if "expire_batches" in cfg:
            e = cfg["expire_batches"]
            if not isinstance(e, Mapping):
                raise ConfigError("expire_batches must be an object like {'n': 1, 'finished_fraction': 0.5}")
            self.expire_batches(int(e.get("n", 1)), e.get("finished_fraction", 0.0))
        for entry in cfg.get("script", []):
            if not isinstance(entry, Mapping) or not {"provider", "route", "specs"} <= set(entry):
                raise ConfigError("each script entry needs 'provider', 'route' and 'specs'")
            self.script(entry["provider"], entry["route"], entry["specs"])

    # -- used by the emulator ----------------------------------------------------------------------------
    def next_fault(self, provider: str, route: str, generating: bool, status_5xx: int = 500) -> FaultSpec | None:
        """The scripted answer of this call, else a random one under the rates (generating routes only)."""
        with self._lock:
            queue = self._scripts.get((provider, route))
            if queue:
                return queue.popleft()
            if not generating or (self._rate_429 == 0 and self._rate_5xx == 0):
                return None
            u = float(self._rng.random())  # drawn only under a rate, so scripted runs draw nothing
            if u < self._rate_429:
                return FaultSpec(status=429, retry_after_s=self._retry_after_s)
            if u < self._rate_429 + self._rate_5xx:
                return FaultSpec(status=status_5xx)
            return None

    def take_expiry(self) -> float | None:
        """The finished fraction of the next batch if it is set to expire, else None."""
        with self._lock:
            return self._expiries.popleft() if self._expiries else None

    def queue_limit(self, model: str | None) -> int | None:
        """The batch queue limit of ``model`` in input tokens, if one is set."""
        with self._lock:
            return self.batch_queue_limits.get(model) if model is not None else None

    def member_fails(self, custom_id: str) -> bool:
        with self._lock:
            return custom_id in self.fail_members

    def result_line(self, custom_id: str | None, line: str) -> str:
        """A batch member's result line as written: cut in half for a member of ``garble_members``."""
        with self._lock:
            garbled = custom_id in self.garble_members
        return line[:len(line) // 2] if garbled else line

    def keyed(self, custom_id: str | None, rec: dict, field: str) -> dict:
        """A batch member's result as written: without ``field`` (its key) for a member of ``keyless_members``."""
        with self._lock:
            keyless = custom_id in self.keyless_members
        return {k: v for k, v in rec.items() if k != field} if keyless else rec

    def __repr__(self) -> str:
        with self._lock:
            scripted = sum(len(q) for q in self._scripts.values())
            return (f"FaultPlan(scripted={scripted}, rate_429={self._rate_429}, rate_5xx={self._rate_5xx}, "
                    f"fail_members={len(self.fail_members)}, garble_members={len(self.garble_members)}, "
                    f"keyless_members={len(self.keyless_members)}, "
                    f"batch_queue_limits={self.batch_queue_limits}, "
                    f"expiring_batches={len(self._expiries)})")
