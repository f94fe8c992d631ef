"""Parts of a catalog entry that hold prices or terms of one kind: a provider's prompt cache and a model's own terms
of it, a model's long-prompt tier, a GPU provider's batching, a provider's batch API and its turnaround.
``engine.core.catalog`` names them; the one way to read the prompt cache a model is billed under is
``ProviderSpec.cache_of``."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["BatchApi", "FlexTier", "GpuBatching", "Kind", "LongContext", "ModelCache", "PromptCache",
           "check_gemini_batches", "merged_cache", "respelt_cache_terms", "respelt_catalog"]


Kind = Literal["text", "image", "video"]
_CHECKPOINTS = 16  # candidate checkpoints of a second batch (``BatchApi.second_batch``)


class _Frozen(BaseModel):
    # No infinity nor NaN anywhere: a price of .inf billed inf and printed a saving of nan % (a hunt).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class PromptCache(_Frozen):
    automatic: bool
    min_tokens: int = Field(ge=0)
    block_tokens: int = Field(ge=1)
    ttl_s: float = Field(gt=0)
    read_multiplier: float = Field(ge=0, le=1)
    write_multiplier: float = Field(ge=1)
    stacks_with_batch: bool
    # Anthropic's one-hour entry (``cache_control.ttl: "1h"``), written at 2x where the 5-minute one is 1.25x.
    # None: the provider has no such entry. The engine refuses the TTL at validation (every estimate and bound
    # is at ``write_multiplier``); the emulator bills a caller that sends it as the provider does.
    write_1h_multiplier: float | None = Field(default=None, ge=1)


class ModelCache(_Frozen):
    """A model's own terms of its provider's prompt cache, where the provider-wide ones do not hold (OpenAI
    bills a cache write at 1.25x from the GPT-5.6 family on and at 1x before it; a model's cached input may be
    0.05x where its provider's is 0.1x). A field left out is the provider's."""

    min_tokens: int | None = Field(default=None, ge=0, description="the shortest prefix cached for the model")
    ttl_s: float | None = Field(default=None, gt=0, description="how long a prefix stays warm after its call")
    read_multiplier: float | None = Field(default=None, ge=0, le=1, description="a cache read, times the input price")
    write_multiplier: float | None = Field(default=None, ge=1, description="a cache write, times the input price")


@functools.lru_cache(maxsize=256)
def merged_cache(pc: PromptCache, own: ModelCache) -> PromptCache:
    """``pc`` with the fields ``own`` gives (both frozen, so one merge serves every call of the model)."""
    return pc.model_copy(update=own.model_dump(exclude_none=True))


_OLD_TERMS = (("cache_read_multiplier", "read_multiplier"), ("cache_min_tokens", "min_tokens"))


def respelt_cache_terms(model: object) -> object:
    """A model's mapping with the older spelling of its cache terms (``cache_read_multiplier``,
    ``cache_min_tokens``, as overlays may still give them) moved into its ``prompt_cache``; one mapping that
    gives a term both ways, with two values, is refused (which of them holds would be a guess)."""
    if not isinstance(model, dict) or not any(old in model for old, _ in _OLD_TERMS):
        return model
    out = dict(model)
    own = dict(out.get("prompt_cache") or {})
    for old, new in _OLD_TERMS:
        if old not in out:
            continue
        value = out.pop(old)
        if new in own and own[new] != value:
            raise ValueError(f"{old} {value} and prompt_cache.{new} {own[new]} both given: keep "
                             f"prompt_cache.{new} alone")
        own[new] = value
    out["prompt_cache"] = own
    return out


def respelt_catalog(raw: dict) -> dict:
    """A catalog's or overlay's mapping with every model's older cache terms respelt, before an overlay is
    merged: respelt after, an overlay's ``cache_read_multiplier`` lost to the ``prompt_cache`` the default
    catalog gives the same model (gpt-4o-mini's reads stayed at 0.5x where an overlay said 0.25x, a review).
    ``ValueError`` names the provider and model of a term given both ways."""
    providers = raw.get("providers")
    if not isinstance(providers, dict):
        return raw
    out = dict(raw, providers=dict(providers))
    for pname, prov in providers.items():
        models = prov.get("models") if isinstance(prov, dict) else None
        if not isinstance(models, dict):
            continue
        respelt = {}
        for mname, model in models.items():
            try:
                respelt[mname] = respelt_cache_terms(model)
            except ValueError as exc:
                raise ValueError(f"providers.{pname}.models.{mname}: {exc}") from None
        out["providers"][pname] = dict(prov, models=respelt)
    return out


class LongContext(_Frozen):  # a whole call's prices once its prompt passes above_input_tokens (Gemini 2.5 Pro)
    above_input_tokens: int = Field(ge=1)
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class GpuBatching(_Frozen):
    price_per_gpu_s: float = Field(gt=0)
    setup_s: float = Field(ge=0)
    max_batch: int = Field(ge=1)
    speedup: tuple[tuple[int, float], ...]

    @field_validator("speedup")
    @classmethod
    def _physical(cls, v: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        # The cost model's "a batch never costs more than its items alone" rests on these three facts.
        if not v or v[0] != (1, 1.0):
            raise ValueError("speedup must start at [1, 1.0] (a batch of one runs at base speed)")
        for (b0, s0), (b1, s1) in zip(v, v[1:]):
            if b1 <= b0 or s1 < s0:
                raise ValueError(f"speedup must increase in batch size and never fall: {b0}->{s0}, {b1}->{s1}")
        for b, s in v:
            if s > b:
                raise ValueError(f"speedup {s} at batch size {b} is faster than linear; at most {b}")
        return v

    def speedup_at(self, b: int) -> float:
        """Throughput multiplier at batch size ``b``, linear between the catalog's points."""
        pts = self.speedup
        if b <= pts[0][0]:
            return pts[0][1]
        for (b0, s0), (b1, s1) in zip(pts, pts[1:]):
            if b <= b1:
                return s0 + (s1 - s0) * (b - b0) / (b1 - b0)
        return pts[-1][1]

    def runtime_s(self, unit_gpu_s: float, b: int) -> float:
        """GPU seconds of one dispatch of ``b`` jobs of ``unit_gpu_s`` each (one warm-up)."""
        return self.setup_s + unit_gpu_s * b / self.speedup_at(b)


def _lognormal_cdf(t: float, lo: float, window: float, median: float, den: float) -> float:
    """P(turnaround <= t) of a lognormal of ``median`` (``den`` = sigma x sqrt 2), clipped to [lo, window]."""
    if t < lo:
        return 0.0
    if t >= window:
        return 1.0
    return 0.5 * (1.0 + math.erf(math.log(max(t, 1e-9) / median) / den))



def check_gemini_batches(ba: BatchApi | None, kinds: Mapping[str, str]) -> None:
    """A ``compat: gemini`` provider's media batches (``kinds``: its models' kinds by name). Its OpenAI layer's Batch
    API documents chat completions only, so a media model rides Google's native batchGenerateContent or no batch, and
    that takes generateContent's image models (gemini-2.5-flash-image), not Imagen's ``:predict`` nor Veo's
    ``:predictLongRunning``. Before, images in ``kinds`` without ``media_models`` planned every image model as
    batched, Imagen too, at half price: each such batch was refused when sent, and its members went sync at the full
    price. Refused at load, naming the models that have a batch route."""
    media = [k for k in ba.kinds if k != "text"] if ba is not None else []
    if not media:
        return
    images = ", ".join(m for m, kind in kinds.items() if kind == "image") or "none"
    if ba.media_models is None:
        listed = ", ".join(m for m, kind in kinds.items() if kind in media)
        raise ValueError(
            f"batch_api.kinds lists {media} but batch_api.media_models is not set, so every such model ({listed}) "
            "is planned as batched, at the batch price; a compat: gemini provider batches media only through "
            "Google's native batchGenerateContent, which takes generateContent's image models (not Imagen's "
            ":predict, nor Veo), so the others' batches are refused when sent and go sync at the full price. Set "
            "batch_api.media_models to the models that have a batch route, e.g. [gemini-2.5-flash-image] (this "
            f"provider's image models: {images}), or take {media} out of batch_api.kinds")
    if wrong := [m for m in ba.media_models if kinds.get(m) != "image"]:
        raise ValueError(f"batch_api.media_models names {wrong}: a compat: gemini provider's native batch takes "
                         f"image models only (Veo is called at :predictLongRunning, which no batch takes); list "
                         f"image models with a batch route among: {images}")

class FlexTier(_Frozen):
    """A synchronous tier billed at batch prices (OpenAI's ``service_tier: "flex"``): a call answers in seconds
    to minutes, not a batch's hours, and is sometimes refused (a 429 "Resource Unavailable", not billed), after
    which the engine sends it at the standard tier at once."""

    discount: float = Field(gt=0, lt=1, description="share off list prices (OpenAI: the Batch API's rates)")
    models: tuple[str, ...] = Field(min_length=1, description="the provider's models that take the tier")
    slowdown: float = Field(default=3.0, ge=1, description="a flex call's latency over a standard call's")
    unavailable_rate: float = Field(default=0.05, ge=0, lt=1, description=(
        "share of flex calls refused for want of capacity (billed nothing; sent again at the standard tier)"))
    timeout_s: float = Field(default=900.0, gt=0, description=(
        "the engine's client timeout for a flex call; a call still out then is given up and sent standard"))


class BatchApi(_Frozen):
    kinds: tuple[Kind, ...] = ("text",)
    media_models: tuple[str, ...] | None = Field(default=None, description=(
        "the image and video models that ride it, where only some of the kinds' models do (Google's native batch "
        "takes generateContent's image models, not Imagen's predict); None: every model of the kinds listed"))
    media_max_mb: float | None = Field(default=None, gt=0, description=(
        "the most one batch of media_models may weigh, in MiB, where they ride another route than max_file_mb's "
        "(Google's inline batchGenerateContent: 20 MB); None: max_file_mb"))
    discount: float = Field(gt=0, lt=1)
    completion_window_s: float = Field(gt=0)
    turnaround_median_s: float = Field(gt=0)
    turnaround_p95_s: float = Field(gt=0)
    turnaround_min_s: float = Field(ge=0)
    max_requests: int = Field(ge=1)
    max_file_mb: float | None = Field(default=None, gt=0, description=(
        "the most one batch's requests may weigh (OpenAI's input file, Anthropic's create body), in MiB; the "
        "engine sends a larger dispatch as several batches (None: no limit)"))
    max_enqueued_tokens: float = Field(gt=0)
    cancel_s: float = Field(default=0.0, ge=0, description=(
        "seconds a cancel may take before the finished members are known (a real batch sits in 'cancelling' "
        "for up to 10 min); the hedge falls back this much earlier. Simulated batches cancel at once (0); "
        "the engine sets it from providers.endpoints.<name>.cancel_s for providers it calls over HTTP"))

    @model_validator(mode="after")
    def _ordered(self) -> BatchApi:
        if not (self.turnaround_min_s <= self.turnaround_median_s <= self.turnaround_p95_s
                <= self.completion_window_s):
            raise ValueError(
                "need turnaround_min_s <= turnaround_median_s <= turnaround_p95_s <= completion_window_s, got "
                f"{self.turnaround_min_s} / {self.turnaround_median_s} / {self.turnaround_p95_s} / "
                f"{self.completion_window_s}"
            )
        return self

    @property
    def turnaround_sigma(self) -> float:
        """Lognormal sigma that puts the 95th percentile at ``turnaround_p95_s``."""
        return max(math.log(self.turnaround_p95_s / self.turnaround_median_s) / 1.6448536, 1e-9)

    def turnaround_cdf(self, t: float) -> float:
        """P(turnaround <= t) under the catalog's lognormal, clipped to [min, completion window]."""
        return _lognormal_cdf(t, self.turnaround_min_s, self.completion_window_s, self.turnaround_median_s,
                              self._cdf_den())

    def _cdf_den(self) -> float:
        # Computed per call: a property or private attribute of a pydantic model costs more than the arithmetic.
        return max(math.log(self.turnaround_p95_s / self.turnaround_median_s) / 1.6448536, 1e-9) * 1.4142135623730951

    def second_batch(self, usable: float) -> tuple[float | None, float]:
        """The best checkpoint for a second batch within ``usable`` seconds, and the chance that one of two is
        back in time: the first, cancelled at the checkpoint if still out, then a fresh one with the time left
        once the cancel is through (``cancel_s``). (None, P of one batch) when two do not fit.

        The turnaround's tail is heavy (lognormal): a batch still out at the checkpoint is likely to stay out,
        and a fresh batch draws a fresh turnaround. Checked on an even grid of the room between two minimal
        turnarounds; the best lies near its middle."""
        p_one = self.turnaround_cdf(usable)
        room = usable - self.cancel_s
        lo = self.turnaround_min_s
        if room < 2 * lo or p_one >= 1.0:
            return None, p_one
        # A policy asks this on most decisions of a batch: the lognormal's constants once, not per point.
        window, med, den = self.completion_window_s, self.turnaround_median_s, self._cdf_den()
        best, p_best = None, p_one
        for i in range(1, _CHECKPOINTS):
            c = lo + (room - 2 * lo) * i / _CHECKPOINTS
            f = _lognormal_cdf(c, lo, window, med, den)
            p_two = f + (1.0 - f) * _lognormal_cdf(room - c, lo, window, med, den)
            if p_two > p_best:
                best, p_best = c, p_two
        return best, p_best

    def turnaround_quantile(self, p: float) -> float:
        """Smallest t with P(turnaround <= t) >= p (the inverse of ``turnaround_cdf``)."""
        if p <= 0.0:
            return self.turnaround_min_s
        if p >= 1.0:
            return self.completion_window_s
        t = self.turnaround_median_s * math.exp(self.turnaround_sigma * NormalDist().inv_cdf(p))
        return min(max(t, self.turnaround_min_s), self.completion_window_s)
