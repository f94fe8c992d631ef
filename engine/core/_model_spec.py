"""A model's entry in the catalog: its prices, limits and the API's rules for it, checked on load. Split from
``catalog`` (the providers and the catalog that hold the models, and the loading)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import Field, model_validator

from engine.core._catalog_parts import Kind, LongContext, ModelCache, _Frozen, respelt_cache_terms
from engine.core.body_tokens import ImageInput, ToolPrompt

__all__ = ["Effort", "ModelSpec", "RateLimits"]

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class RateLimits(_Frozen):
    rpm: float = Field(gt=0, description="requests per minute")
    tpm: float = Field(gt=0, description="tokens per minute (input + output)")
    max_concurrency: int = Field(ge=1)


_Price = Annotated[float, Field(ge=0)]  # USD a unit: 0 is free, never below
_GpuSeconds = Annotated[float, Field(gt=0)]


class ModelSpec(_Frozen):
    kind: Kind
    input_per_mtok: float | None = Field(default=None, ge=0)  # text
    output_per_mtok: float | None = Field(default=None, ge=0)
    max_output_tokens: int = Field(default=4096, ge=1)
    prompt_cache: ModelCache | None = Field(default=None, description="the model's own terms of its provider's "
                                            "prompt cache (None: the provider's); read through ProviderSpec.cache_of")
    long_context: LongContext | None = None  # the dearer tier of a long prompt (None: one price at any length)
    per_image: dict[str, _Price] | None = None  # hosted media priced per unit
    per_image_quality: dict[str, dict[str, _Price]] | None = None  # by quality, then size (per_image: the default)
    # a hosted image model's text prompt, per million input tokens, on top of the image's price (gpt-image-1)
    prompt_per_mtok: float | None = Field(default=None, ge=0)
    per_second: dict[str, _Price] | None = None
    # self-hosted media priced by GPU time
    gpu_s_per_image: dict[str, _GpuSeconds] | None = None
    gpu_s_per_video_second: dict[str, _GpuSeconds] | None = None
    default_size: str | None = None
    default_resolution: str | None = None
    default_duration_s: float = Field(default=5.0, gt=0)
    durations_s: tuple[float, ...] | None = Field(default=None, description="the only video lengths the "
                                                  "provider accepts, in seconds (None: any in (0, 600])")
    output_ttl_s: float | None = Field(default=None, gt=0, description="how long the provider keeps a media "
                                       "output at the address it answers (None: no limit known)")
    durations_at: dict[str, tuple[float, ...]] | None = Field(default=None, description="the only lengths made at "
                                                              "a resolution, where fewer than durations_s")
    # GPU seconds grow with the sampler steps a job runs: the tables above are at this many (None: steps not priced)
    gpu_steps: int | None = Field(default=None, ge=1)
    # limits of this model alone (providers such as OpenAI limit per model); None: it shares the provider's
    rate_limits: RateLimits | None = None
    # which endpoint of an OpenAI-compatible provider serves the model over HTTP
    api: Literal["chat", "responses"] = "chat"
    context_window: int | None = Field(default=None, ge=1, description="input + output tokens the model "
                                       "accepts (None: not checked)")
    max_input_tokens: int | None = Field(default=None, ge=1, description="input tokens the model accepts, where "
                                         "the provider limits input on its own (None: only the context window)")
    image_input: ImageInput | None = Field(default=None, description="how an input image is billed (None: the "
                                           "provider's rule)")
    tool_prompt: ToolPrompt | None = Field(default=None, description="the system prompt added to a call that "
                                           "carries tools, in tokens by tool_choice (None: the provider's)")
    reasoning: bool = Field(default=False, description="an OpenAI reasoning model (gpt-5, o-series): the API "
                            "refuses max_tokens for it (max_completion_tokens, which also counts reasoning tokens) "
                            "and any temperature or top_p but 1, unless its reasoning effort is 'none'")
    effort_default: Effort | None = Field(
        default=None, description="the reasoning effort of a call that names none (gpt-5.1 on: 'none' or 'medium'; "
        "at 'none' the model takes any temperature and top_p)")
    efforts: tuple[Effort, ...] | None = Field(default=None, description="the reasoning efforts the API takes for "
                                               "the model (None: not checked; gpt-6.2-sol refuses 'none')")
    adaptive_only: bool = Field(default=False, description="a Claude model that thinks adaptively only (Sonnet 5 on): "
                                "the API answers 400 to a manual thinking {type: enabled} and to a temperature, "
                                "top_p or top_k other than the default")
    forced_tool_choice: bool = Field(default=True, description="whether the API takes a tool_choice that forces a "
                                     "tool (Anthropic's {type: any} or {type: tool}); Claude Fable 5.1 answers 400")
    mid_conversation_system: bool = Field(
        default=False, description="whether Anthropic's API takes a message of role system among the messages (its "
        "mid-conversation system message: after a user turn, last or before an assistant one); at any other model it "
        "answers 400, the system prompt being the top-level system field alone")
    shutdown: date | None = Field(default=None, description="the day the provider stops serving the model, as "
                                  "its deprecations page says (a start that calls it over HTTP warns ahead)")
    successor: str | None = Field(default=None, description="the model of the same provider and kind that takes over "
                                  "from this one once it shuts down (None: none named); `trace ... --current-models` "
                                  "writes it, following a chain, for a model shut down by the day")

    def effort(self, body: dict) -> str | None:
        """The reasoning effort ``body`` (on the wire, OpenAI's) asks for, else the model's default."""
        r = body.get("reasoning")
        return body.get("reasoning_effort") or (r.get("effort") if isinstance(r, dict) else None) or self.effort_default

    def fixed_sampling(self, body: dict) -> bool:
        """Whether ``body`` (on the wire) may give only the default temperature and top_p: a Claude model that thinks
        adaptively only, or an OpenAI reasoning model at an effort but 'none' (gpt-5.1 on)."""
        if self.adaptive_only:
            return True
        if not self.reasoning or self.effort_default is None:  # gpt-5 and the o-series have no effort 'none'
            return self.reasoning
        return self.effort(body) != "none"

    @model_validator(mode="before")
    @classmethod
    def _cache_terms(cls, raw: object) -> object:
        # The older spelling of a model's cache terms: one place, the model's prompt_cache, holds them now
        # (``load_catalog`` respells an overlay before merging it, so it overrides a newer-spelt default).
        return respelt_cache_terms(raw)

    @model_validator(mode="after")
    def _priced(self) -> ModelSpec:
        if self.kind == "text" and (self.input_per_mtok is None or self.output_per_mtok is None):
            raise ValueError("a text model needs input_per_mtok and output_per_mtok")
        if self.kind == "image" and not (self.per_image or self.gpu_s_per_image):
            raise ValueError("an image model needs per_image (hosted) or gpu_s_per_image (GPU-priced)")
        if self.kind == "video" and not (self.per_second or self.gpu_s_per_video_second):
            raise ValueError("a video model needs per_second (hosted) or gpu_s_per_video_second (GPU-priced)")
        for table, default in ((self.per_image or self.gpu_s_per_image, self.default_size),
                               (self.per_second or self.gpu_s_per_video_second, self.default_resolution)):
            if table and default is not None and default not in table:
                raise ValueError(f"default {default!r} is not one of the priced options {sorted(table)}")
        if self.durations_s is not None:
            # Requests are held to (0, 600] s before this list is read: a length outside it would be one no
            # request could ask for.
            if not self.durations_s or any(not 0 < d <= 600 for d in self.durations_s):
                raise ValueError(f"durations_s must list lengths in (0, 600] seconds, got {list(self.durations_s)}")
            if self.default_duration_s not in self.durations_s:
                raise ValueError(f"default_duration_s {self.default_duration_s:g} is not one of durations_s "
                                 f"{list(self.durations_s)}; make it one of them")
        for res, lengths in (self.durations_at or {}).items():
            if res not in (self.per_second or self.gpu_s_per_video_second or {}) or not lengths or (
                    self.durations_s is not None and not set(lengths) <= set(self.durations_s)):
                raise ValueError(f"durations_at {res!r}: {list(lengths)} must be lengths of durations_s at a priced "
                                 "resolution")
        # Mistyped limits and tiers, an overlay's above all: a cap over the window is output no call can give, yet
        # budgets reserved it for every request without a cap of its own; a cheaper long tier billed long prompts less.
        win, lc = self.context_window, self.long_context
        for name, value in (("max_output_tokens", self.max_output_tokens), ("max_input_tokens", self.max_input_tokens)):
            if win is not None and value is not None and value > win:  # a default cap never written is said to be one
                given = "" if name in self.model_fields_set else " (the default: none is given)"
                raise ValueError(f"{name} {value:,}{given} is over context_window {win:,} (the input and output tokens "
                                 f"the model accepts): lower {name} to at most {win:,}, or raise context_window")
        for name in ("input_per_mtok", "output_per_mtok") if lc is not None else ():
            base, long = getattr(self, name), getattr(lc, name)
            if base is not None and long < base:
                # (An overlay that changes the base price alone has the catalog's tier merged under it.)
                raise ValueError(f"long_context.{name} {long:g} is below {name} {base:g}: the long-prompt tier is the "
                                 "dearer one; give its prices from the provider's page too (long_context: {input_per_mtok"
                                 ": ..., output_per_mtok: ...}), or long_context: null for one price at any length")
        return self

    @property
    def gpu_priced(self) -> bool:
        return bool(self.gpu_s_per_image or self.gpu_s_per_video_second)
