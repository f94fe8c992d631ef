"""Budgets: who may spend how much, per window, and what to do as the limit nears.

Pure and I/O-free (time is a parameter), so the simulator, the budget actor and the Redis-backed ledger share
one set of rules:

* A ``BudgetSpec`` covers the requests of one tenant, provider and/or model (a field left empty matches
  all) with a hard limit ``max_budget`` and an optional ``soft_budget`` (an alert), per ``budget_duration``
  window (names as in LiteLLM: ``30s``, ``1h``, ``1d``, ``30d``, ``1mo`` for the calendar month, UTC; none: one
  window forever).
* A reservation is checked against every spec that covers it: it passes only if, in each, what is spent plus
  what is reserved plus it stays within the limit scaled by the request's priority (``Throttle``):
  background work stops at 80 % of the limit, normal at 95 %, urgent at 100 %. Past its threshold a
  request *waits* when the spend alone leaves room (open reservations hold the rest, and settling releases
  what the upper-bound estimates overstated), is *deferred* to the next window when the window resets (never
  urgent work: that is what the last 5 % are for), and is otherwise rejected (``budget_exhausted``).
* Settling records the actual cost in the windows the reservation was made in and releases the rest.

The reference ledger that applies them in one process is ``engine.core.ledger.BudgetBook``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.core._budget_windows import parse_duration, window_bounds, window_label
from engine.core._budget_words import EPS, deferred_never, deferred_reason
from engine.core._masked_repr import MaskedRepr

__all__ = ["LEDGER", "BudgetSettings", "BudgetSpec", "Charge", "Claim", "Covering", "Refusal", "Throttle", "Verdict",
           "parse_duration", "usd", "verdict_of", "window_bounds", "window_label", "window_row"]

_QUOTED = re.compile(r"""[,=/@'"]|^\s|\s$""")  # a value a budget's name could not tell from its separators


@functools.lru_cache(maxsize=1024)
def _spec_name(tenant: str | None, provider: str | None, model: str | None, duration: str | None) -> str:
    # Quoted where it needs: tenant "a/1d" and tenant "a" per 1d were one name, so one ledger window (and key).
    parts = [f"{k}={v!r}" if _QUOTED.search(v) else f"{k}={v}"
             for k, v in (("tenant", tenant), ("provider", provider), ("model", model)) if v is not None]
    base = ",".join(parts) or "global"
    return f"{base}/{duration}" if duration else base


class BudgetSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str | None = None
    provider: str | None = None
    model: str | None = None
    max_budget: float = Field(ge=0, description="hard limit in USD per window")
    soft_budget: float | None = Field(default=None, ge=0, description="alert above this spend, USD")
    budget_duration: str | None = Field(default=None, description="30s, 1h, 1d, 30d, 1mo; None: never resets")
    horizon_s: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                    description="a budget that never resets is paced over this many seconds from "
                                    "the engine's start (e.g. a job's planned length); None: not paced")

    @model_validator(mode="after")
    def _check(self) -> BudgetSpec:
        parse_duration(self.budget_duration)
        if self.soft_budget is not None and self.soft_budget > self.max_budget:
            raise ValueError(f"soft_budget {self.soft_budget} must be <= max_budget {self.max_budget}")
        return self

    @property
    def name(self) -> str:
        return _spec_name(self.tenant, self.provider, self.model, self.budget_duration)

    def covers(self, tenant: str, provider: str, model: str) -> bool:
        return ((self.tenant is None or self.tenant == tenant) and (self.provider is None or self.provider == provider)
                and (self.model is None or self.model == model))

    def key(self, t: float) -> str:
        """The name of this spec's window at ``t`` (a ledger key)."""
        return f"{self.name}@{window_bounds(self.budget_duration, t)[0]:.0f}"

    def span(self, t: float, origin: float = 0.0) -> tuple[float, float] | None:
        """The stretch of time over which spend is paced at ``t``: the window, or [origin, origin + horizon_s),
        ``origin`` being the engine's start on the ledger's clock (a live engine at real speed budgets on the
        calendar: from time 0, its horizon had passed decades ago and nothing was paced; a helper's hunt)."""
        if self.budget_duration is not None:
            return window_bounds(self.budget_duration, t)
        return (origin, origin + self.horizon_s) if self.horizon_s is not None else None


class Throttle(BaseModel):
    """Fractions of a hard limit up to which each priority may reserve, and pacing.

    Thresholds alone are first come, first served: a budget that demand outruns is spent by whatever arrives
    first, and urgent work arriving later finds 5 % left. With ``pace``, non-urgent work may use its fraction
    of the limit only in step with time: at a share ``x`` of the window (or horizon) it may reach
    ``fraction * limit * min(1, x + pace_slack)``. Urgent work is never paced, so it finds the rest of the
    budget whenever it comes, and non-urgent work is spread over the window (as ad servers pace a daily
    budget). A paced-out request is deferred until the line reaches it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    background: float = Field(default=0.80, ge=0, le=1)
    normal: float = Field(default=0.95, ge=0, le=1)
    urgent: float = Field(default=1.0, ge=0, le=1)
    pace: bool = True
    pace_slack: float = Field(default=0.1, ge=0, le=1, description="share of the limit usable at the start")

    @model_validator(mode="after")
    def _ordered(self) -> Throttle:
        if not self.background <= self.normal <= self.urgent:
            raise ValueError(f"throttle fractions must grow with priority: background={self.background} <= "
                             f"normal={self.normal} <= urgent={self.urgent}")
        return self

    def of(self, priority: str) -> float:
        return getattr(self, priority)

    def pace_of(self, spec: BudgetSpec, priority: str, t: float, origin: float = 0.0) -> float:
        """The share of its fraction that ``priority`` may use at ``t`` (1: all of it)."""
        span = spec.span(t, origin) if self.pace and priority != "urgent" else None
        if span is None:
            return 1.0
        start, end = span
        return min(1.0, max(t - start, 0.0) / (end - start) + self.pace_slack)

    def paced_until(self, spec: BudgetSpec, priority: str, t: float, need: float,
                    origin: float = 0.0) -> float | None:
        """When the paced allowance of ``priority`` reaches ``need`` USD, if pacing is what holds it back."""
        span = spec.span(t, origin) if self.pace and priority != "urgent" else None
        full = spec.max_budget * self.of(priority)
        if span is None or need > full + EPS or full <= 0:
            return None
        start, end = span
        return min(max(start + (need / full - self.pace_slack) * (end - start), t), end)


class Claim(NamedTuple):
    """One reservation request: an id (settled later), who spends, at what priority, and an upper bound."""

    rid: str
    tenant: str
    provider: str
    model: str
    priority: Literal["urgent", "normal", "background"]
    amount: float


class Charge(NamedTuple):
    """Spend that no claim covers, e.g. a batch member the provider finished after it had been sent again sync
    (``paid_twice``): real money on the bill, so it counts against every budget covering it, past the limit if
    it must. Counted once per ``cid``, in the windows open when it is charged."""

    cid: str
    tenant: str
    provider: str
    model: str
    usd: float


LEDGER = "ledger"  # Verdict.budget of a claim the ledger could not decide (no spec has this name)


class Verdict(NamedTuple):
    ok: bool
    # "wait" (for reservations to settle), "deferred", "budget_exhausted", or "budget_unavailable" (the ledger
    # did not answer: its Redis is down or slow; nothing was reserved)
    reason: str | None = None
    retry_at: float | None = None  # deferred: when the blocking window resets
    remaining_usd: float | None = None  # of the tightest covering budget, for the rejection message
    budget: str | None = None  # the spec that refused (LEDGER when the ledger did not answer)
    detail: str | None = None  # budget_unavailable: what failed
    # budget_exhausted: the spec's limit and what the claim's priority may reach of it (``Throttle``), for a
    # reason that says why money left does not let it pass
    max_usd: float | None = None
    allowed_usd: float | None = None
    priority: str | None = None
    paced: bool = False  # deferred: pacing (``Throttle.pace``) cut what the claim's priority may reach now
    share_usd: float | None = None  # deferred: what the claim's priority may reach of the limit, paced or not, at most

    def why(self, claim_usd: float | None = None, model_max: bool = True) -> str:
        """The ``reason`` a request rejected on this verdict carries; ``claim_usd``, what it reserved, since a
        reservation is an upper bound a new user does not expect (a one-word request refused by a $0.05 budget
        reserved its model's whole output, $0.26: a helper's tour). ``model_max``: ``budgets.reserve_output``
        is ``model_max`` (else ``request``: its output_tokens are reserved)."""
        if self.reason == "deferred":
            return deferred_reason(self, claim_usd)
        if self.reason == "budget_unavailable":
            return f"the budget ledger did not answer: {self.detail}"
        left = f"budget {self.budget} has ${self.remaining_usd:.6f} left"
        if claim_usd is None or claim_usd <= self.remaining_usd:
            if self.allowed_usd is None or self.max_usd is None or self.allowed_usd >= self.max_usd - EPS:
                return left
            # The money left is the share kept for more urgent work: said bare, "$0.0077 left" read as a bug
            # beside 956 refused requests of $0.0001 each (a helper's tour).
            room = max(self.allowed_usd - (self.max_usd - self.remaining_usd), 0.0)
            return (f"{left}, but {self.priority} work may spend only ${self.allowed_usd:.6f} of its "
                    f"${self.max_usd:.6f} (budgets.throttle.{self.priority}): the rest is kept for more urgent work, "
                    f"and {self.priority} work has ${room:.6f} of its share left"
                    + ("" if claim_usd is None else f" where this request reserves up to ${claim_usd:.6f}")
                    + "; raise the budget, send it at a higher priority, or raise that fraction (docs/budgets.md)")
        without = "the model's maximum" if model_max else "its output_tokens (budgets.reserve_output: request)"
        return (f"{left}, and this request reserves up to ${claim_usd:.6f} (its output at its max_tokens, or "
                f"{without} without one: a lower max_tokens reserves less; docs/budgets.md)")

    def _reach(self) -> str:
        """What the claim's priority may reach of the limit, when that is less than the limit."""
        if self.allowed_usd is None or self.max_usd is None or self.allowed_usd >= self.max_usd - EPS:
            return ""
        return (f", of which {self.priority} work may reach ${self.allowed_usd:.6f} of its ${self.max_usd:.6f}"
                + (f" by now (budgets.throttle.{self.priority}, paced over the window by budgets.throttle.pace: "
                   "the share grows as the window goes)" if self.paced else
                   f" (budgets.throttle.{self.priority}: the rest is kept for more urgent work)"))

    def held(self, claim_usd: float | None = None) -> str:
        """What held a request back (``wait`` or ``deferred``) when it was last tried: the reason it carries
        once it can no longer finish by its deadline (it named the budget alone, one with $1.73 of $2 left; a
        tour, stop 64)."""
        said = f"budget {self.budget} has ${self.remaining_usd:.6f} left"
        said += (" beyond what requests under way reserve (each its upper bound, what it does not spend freed as "
                 "it ends)" if self.reason == "wait" else self._reach())
        if claim_usd is not None:
            said += f"; this request reserves up to ${claim_usd:.6f}"
        if self.reason == "deferred" and deferred_never(self, claim_usd):
            return deferred_reason(self, claim_usd)  # no window lets it pass: "could go at t=..." was untrue
        if self.reason == "deferred" and self.retry_at is not None:
            said += f" and could go at t={self.retry_at:.0f}s"
        return (f"{said}: a lower max_tokens reserves less; or send it urgent (it goes first), give it a later "
                "deadline or raise the budget (docs/budgets.md)")


class Refusal(NamedTuple):
    spec: BudgetSpec
    remaining: float  # limit - spent - reserved
    fits_settled: bool  # the claim would pass on the spend alone, were every open reservation released
    paced_until: float | None = None  # pacing holds it back until then
    allowed: float | None = None  # what the claim's priority may reach of the limit now (fraction, pace)
    paced: bool = False  # pacing cut that reach now (``Throttle.pace_of`` < 1)
    share: float | None = None  # what the claim's priority may reach of the limit at most (its fraction, unpaced)


_RANK = {"wait": 0, "deferred": 1, "budget_exhausted": 2}


def verdict_of(refusals: list[Refusal], priority: str, now: float) -> Verdict:
    """The verdict on a claim given the specs that refuse it. The worst refusal decides: a rejection outranks
    a deferral (waiting for a reset cannot help when some budget never resets), which outranks waiting for
    open reservations; among deferrals the latest reset wins."""
    worst: Verdict | None = None
    for s, remaining, fits_settled, paced, allowed, cut, share in refusals:
        end = window_bounds(s.budget_duration, now)[1]
        rem = max(remaining, 0.0)
        if fits_settled:
            v = Verdict(False, "wait", None, rem, s.name)
        elif paced is not None and paced > now:
            v = Verdict(False, "deferred", paced, rem, s.name, max_usd=s.max_budget, allowed_usd=allowed,
                        priority=priority, paced=cut, share_usd=share)
        elif priority != "urgent" and end < math.inf:
            v = Verdict(False, "deferred", end, rem, s.name, max_usd=s.max_budget, allowed_usd=allowed,
                        priority=priority, paced=cut, share_usd=share)
        else:
            v = Verdict(False, "budget_exhausted", None, rem, s.name, max_usd=s.max_budget,
                        allowed_usd=allowed, priority=priority)
        if worst is None or _RANK[v.reason] > _RANK[worst.reason] or (
                v.reason == worst.reason == "deferred" and v.retry_at > worst.retry_at):
            worst = v
    return worst or Verdict(True)


class Covering:
    """The specs that cover a (tenant, provider, model), in the specs' order, found by their fields rather than by
    asking every spec: with a budget per tenant, a scan of 10,000 specs cost 2.5 ms per reservation in the one
    budget actor, which then bounded the whole engine at a few hundred requests a second."""

    def __init__(self, specs: list[BudgetSpec]):
        self._by: dict[tuple, list[tuple[int, BudgetSpec]]] = {}
        for k, s in enumerate(specs):
            self._by.setdefault((s.tenant, s.provider, s.model), []).append((k, s))

    def __call__(self, tenant: str, provider: str, model: str) -> list[BudgetSpec]:
        found = [ks for t in (None, tenant) for p in (None, provider) for m in (None, model)
                 for ks in self._by.get((t, p, m), ())]
        return [s for _, s in sorted(found, key=lambda ks: ks[0])]


def usd(x: float) -> float:
    """A report's dollars, to the micro-dollar; a sum of reservations and releases that ends a hair below zero
    reads 0, not -0.0."""
    return round(x, 6) + 0.0


def window_row(s: BudgetSpec, key: str, spent: float, reserved: float) -> dict:
    return {"budget": s.name, "window": key.rsplit("@", 1)[1], "budget_duration": s.budget_duration,
            "max_budget": s.max_budget, "soft_budget": s.soft_budget, "spent_usd": usd(spent),
            "reserved_usd": usd(reserved), "remaining_usd": usd(s.max_budget - spent - reserved),
            "soft_exceeded": s.soft_budget is not None and spent > s.soft_budget}


class BudgetSettings(MaskedRepr, BaseModel):
    """Budgets of an engine or a simulation (``SMARTBATCH_BUDGETS__SPECS='[{"tenant": "acme",
    "max_budget": 50, "budget_duration": "1d"}]'``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    masked_urls: ClassVar[tuple[str, ...]] = ("redis_url",)  # its repr's: a password (``MaskedRepr``)
    specs: tuple[BudgetSpec, ...] = ()
    throttle: Throttle = Throttle()
    reserve_output: Literal["model_max", "request"] = Field(
        default="model_max",
        description="output tokens a reservation assumes: the model's maximum (the hard limit holds whatever "
                    "the output), or the request's output_tokens (only when it is sent as max_tokens)")
    redis_url: str | None = Field(default=None, description="the engines on this Redis share these budgets")
    redis_prefix: str = Field(default="smartbatch:budget", min_length=1)
    redis_cluster: bool = Field(default=False, description="redis_url is a node of a Redis Cluster: every key of the "
                                "ledger goes under one hash tag, {redis_prefix} (docs/budgets.md, Redis Cluster)")
    # Finite, and bounded: an infinite timeout blocked every claim while Redis was paused, an infinite retry
    # pause kept the ledger down for good after one blip (a helper's hunt).
    redis_timeout_s: float = Field(
        default=2.0, gt=0, le=60, allow_inf_nan=False,
        description="connect and read timeout of each call to the ledger's Redis: a call that takes longer counts "
                    "as Redis unavailable, so a paused Redis never blocks")
    redis_retry_s: float = Field(
        default=1.0, gt=0, le=3600, allow_inf_nan=False,
        description="after a failed call, claims are answered budget_unavailable at once for this long (real "
                    "seconds), then Redis is tried again")
    reservation_ttl_s: float = Field(
        default=172_800.0, gt=0, le=315_360_000, allow_inf_nan=False,
        description="a reservation in the Redis ledger still unsettled after this long (real seconds) is released, "
                    "so an engine that crashed holding it cannot keep it for good; keep it above the longest "
                    "dispatch (a batch API's window is 24 h). A settlement that comes later still counts its spend. "
                    "At most ten years: the ledger's scripts set Redis expiries from it, and 1e16 s, past what Redis "
                    "takes, had every reservation fail (before stop 77, every settlement dropped; a review)")

    @model_validator(mode="after")
    def _unique(self) -> BudgetSettings:
        names = [s.name for s in self.specs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"budgets.specs: two budgets cover {sorted(dup)}; merge them into one")
        return self
