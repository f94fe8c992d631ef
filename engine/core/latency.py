"""The catalog's latency model, shared by the simulator (which draws from it) and policies (which plan with
its quantiles)."""

from __future__ import annotations

import math

from engine.core.catalog import ModelSpec, ProviderSpec
from engine.core.cost import gpu_unit_seconds
from engine.core.request import Request

__all__ = ["Z99", "flex_room", "flex_timeout_s", "gpu_batch_seconds", "sync_latency_median"]

Z99 = 2.3263478740408408
_INF = float("inf")


def sync_latency_median(provider: ProviderSpec, spec: ModelSpec, req: Request) -> float:
    """Median seconds of one synchronous call (for GPU-priced models: one job with its warm-up)."""
    if spec.kind == "text":
        lat = provider.sync_latency
        return lat.base_s + lat.per_output_token_s * req.output_tokens
    if spec.gpu_priced:
        gb = provider.gpu_batching
        assert gb is not None
        return provider.sync_latency.base_s + gb.runtime_s(gpu_unit_seconds(spec, req.params), 1)
    ml = provider.media_latency
    assert ml is not None
    if spec.kind == "image":
        return ml.image_s
    return ml.video_base_s + ml.video_per_second_s * float(req.params.get("duration_s", spec.default_duration_s))


def gpu_batch_seconds(provider: ProviderSpec, spec: ModelSpec, reqs: list[Request]) -> float:
    """Wall seconds of one GPU dispatch of ``reqs`` (warm-up plus the batch at its speed-up)."""
    gb = provider.gpu_batching
    assert gb is not None
    units = sum(gpu_unit_seconds(spec, r.params) for r in reqs)
    return provider.sync_latency.base_s + gb.setup_s + units / gb.speedup_at(len(reqs))


def flex_room(provider: ProviderSpec, spec: ModelSpec, req: Request) -> float:
    """Seconds before its deadline a flex call of ``req`` must start: its 99th-percentile latency at the flex tier
    and then a standard call's (the one sent if the tier refuses it). Infinite where the model has no flex tier,
    or a flex call's p99 passes the tier's client timeout (a live client would give it up)."""
    fx = provider.flex
    if fx is None or spec.kind != "text" or req.model not in fx.models:
        return _INF
    p99 = _text_p99(provider, spec, req)
    return p99 * fx.slowdown + p99 if p99 * fx.slowdown <= fx.timeout_s else _INF


def flex_timeout_s(provider: ProviderSpec, req: Request, now: float) -> float:
    """Engine seconds a flex call of ``req`` started at ``now`` may run before it is given up and sent at the
    standard tier: the tier's ``timeout_s``, and no more than leaves a standard call its 99th-percentile latency
    before the deadline (<= 0: no room for a flex call, it goes standard). The room smart's ``flex_fits`` plans."""
    assert provider.flex is not None
    spec = provider.models[req.model]
    return min(provider.flex.timeout_s, req.deadline_at - now - _text_p99(provider, spec, req))


def _text_p99(provider: ProviderSpec, spec: ModelSpec, req: Request) -> float:
    """The 99th-percentile seconds of one standard text call (the catalog's lognormal latency)."""
    return sync_latency_median(provider, spec, req) * math.exp(Z99 * provider.sync_latency.sigma)
