"""The baselines every result is judged against: what users do without smartbatch."""

from __future__ import annotations

from collections.abc import Hashable

from pydantic import Field

from engine.core.grouping import Decision, Group, ReuseSettings
from engine.core.request import Request
from policies.base import Policy, PolicyParams, register

__all__ = ["BatchAll", "CacheOnly", "Fixed", "Naive"]


@register
class Naive(Policy):
    """Every request alone, synchronously, on arrival; no reuse. The bill smartbatch must beat."""

    name = "naive"

    def group_key(self, req: Request, compat: tuple, now: float) -> Hashable:
        return req.uid

    def decide(self, group: Group, now: float) -> Decision:
        return Decision("dispatch", mode="sync", recommendation="process_individually",
                        reason="naive: each request alone on arrival")


class CacheOnlyParams(PolicyParams):
    in_flight: bool = Field(default=False, description="also attach to an identical request in flight")


@register
class CacheOnly(Naive):
    """Naive plus exact-duplicate reuse of finished results (a LiteLLM-style response cache)."""

    name = "cache-only"
    Params = CacheOnlyParams

    @property
    def reuse(self) -> ReuseSettings:
        return ReuseSettings(exact=True, in_flight=self.params.in_flight)

    def decide(self, group: Group, now: float) -> Decision:
        return Decision("dispatch", mode="sync", recommendation="process_individually",
                        reason="cache-only: alone on arrival after an exact-cache miss")


class FixedParams(PolicyParams):
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.5, ge=0)


@register
class Fixed(Policy):
    """Ray Serve-style dynamic batching: flush a group of compatible requests at ``max_batch_size`` or after
    ``batch_wait_timeout_s``. A GPU-priced model runs the flush as one GPU batch; a token- or unit-priced
    model sends its members as back-to-back calls. No similarity, no reuse, no batch API."""

    name = "fixed"
    Params = FixedParams

    def group_key(self, req: Request, compat: tuple, now: float) -> Hashable:
        return compat

    def decide(self, group: Group, now: float) -> Decision:
        p = self.params
        limit = p.max_batch_size
        gpu = group.spec.gpu_priced
        if gpu and group.provider.gpu_batching is not None:
            limit = min(limit, group.provider.gpu_batching.max_batch)
        if len(group) >= limit or now >= group.oldest_arrival_s + p.batch_wait_timeout_s:
            n = min(len(group), limit)
            return Decision("dispatch", mode="gpu_batch" if gpu else "sync", take=n,
                            recommendation="process_as_batch" if n > 1 else "process_individually",
                            reason=f"fixed: flush {n} at size {limit} or {p.batch_wait_timeout_s}s")
        return Decision.wait(group.oldest_arrival_s + p.batch_wait_timeout_s, "fixed: gathering")


class BatchAllParams(PolicyParams):
    batch_wait_s: float = Field(default=60.0, ge=0, description="gather this long before submitting a batch")


@register
class BatchAll(Policy):
    """Everything through the provider batch API where the provider has one, ignoring deadlines; requests
    the batch API cannot take go alone on arrival."""

    name = "batch-all"
    Params = BatchAllParams

    def group_key(self, req: Request, compat: tuple, now: float) -> Hashable:
        prov = self.catalog.provider(req.provider)
        return compat if prov.supports_batch_api(req.kind, req.model) else req.uid

    def decide(self, group: Group, now: float) -> Decision:
        ba = group.provider.batch_api
        if ba is None or not group.provider.supports_batch_api(group.spec.kind, group.spec):
            return Decision("dispatch", mode="sync", recommendation="process_individually",
                            reason="batch-all: no batch API for this model")
        if len(group) >= ba.max_requests or now >= group.oldest_arrival_s + self.params.batch_wait_s:
            n = min(len(group), ba.max_requests)
            return Decision("dispatch", mode="batch_api", take=n, recommendation="process_as_batch",
                            reason=f"batch-all: {n} requests to the batch API, no hedge")
        return Decision.wait(group.oldest_arrival_s + self.params.batch_wait_s, "batch-all: gathering")
