"""The provider/model catalog: prices, limits and capabilities, validated on load.

Providers *declare* what they can do (``batch_api``, ``prompt_cache``, ``gpu_batching``); the cost model and
the policies read those declarations and never guess a capability from a provider's name.
"""

from __future__ import annotations

import functools
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from engine.core._catalog_errors import catalog_problem
from engine.core._catalog_parts import (
    BatchApi,
    FlexTier,
    GpuBatching,
    Kind,
    LongContext,
    ModelCache,
    PromptCache,
    _Frozen,
    check_gemini_batches,
    merged_cache,
    respelt_cache_terms,
    respelt_catalog,
)
from engine.core._yaml import yaml_problem
from engine.core.body_tokens import ImageInput, ToolPrompt
from engine.core.errors import CatalogError

__all__ = ["BatchApi", "Catalog", "Effort", "FlexTier", "GpuBatching", "Kind", "Latency", "MediaLatency", "ModelCache", "ModelSpec",
           "PromptCache", "ProviderSpec", "RateLimits", "default_catalog", "load_catalog"]

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class RateLimits(_Frozen):
    rpm: float = Field(gt=0, description="requests per minute")
    tpm: float = Field(gt=0, description="tokens per minute (input + output)")
    max_concurrency: int = Field(ge=1)


class Latency(_Frozen):
    """Sync latency of a text call: ``(base_s + per_output_token_s * out) * exp(sigma * z)``, z ~ N(0,1)."""

    base_s: float = Field(ge=0)
    per_output_token_s: float = Field(ge=0, default=0.0)
    per_unit_s: float = Field(ge=0, default=0.0)
    sigma: float = Field(ge=0, le=2, default=0.3)


class MediaLatency(_Frozen):
    image_s: float = Field(gt=0)
    video_base_s: float = Field(gt=0)
    video_per_second_s: float = Field(ge=0)
    sigma: float = Field(ge=0, le=2, default=0.3)


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


class ProviderSpec(_Frozen):
    # The simulation-only fields have defaults, so an overlay can add a provider with prices alone.
    name: str = ""
    failure_rate: float = Field(default=0.0, ge=0, lt=1)
    throttled_share: float = Field(default=0.5, ge=0, le=1,
                                   description="share of failures that are 429s (the rest are 5xx)")
    retry_after_s: float = Field(default=10.0, ge=0, description="the Retry-After of this provider's 429s")
    rate_limits: RateLimits = RateLimits(rpm=10_000, tpm=4_000_000, max_concurrency=256)
    sync_latency: Latency = Latency(base_s=1.0, per_output_token_s=0.01)
    media_latency: MediaLatency | None = None
    batch_api: BatchApi | None = None
    flex: FlexTier | None = None
    prompt_cache: PromptCache | None = None
    gpu_batching: GpuBatching | None = None
    image_input: ImageInput | None = None  # the models' rule for input images, unless a model names its own
    tool_prompt: ToolPrompt | None = None  # the tool-use system prompt of its models, unless a model names its own
    # How the provider's OpenAI-compatible layer differs from OpenAI's API, as its documentation says (None: not
    # at all): "gemini", Google's (docs/providers.md, "Gemini"). Bodies are checked and usage read by it.
    compat: Literal["gemini"] | None = None
    models: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _consistent(self) -> ProviderSpec:
        for mname, m in self.models.items():
            if m.gpu_priced and self.gpu_batching is None:
                raise ValueError(f"model {mname!r} is GPU-priced but the provider declares no gpu_batching")
            if m.kind != "text" and not m.gpu_priced and self.media_latency is None:
                raise ValueError(f"model {mname!r} is a hosted {m.kind} model; add media_latency to the provider")
        for mname, m in self.models.items():
            _check_successor(self.models, mname, m)
        for mname in self.flex.models if self.flex is not None else ():
            if mname not in self.models or self.models[mname].kind != "text":
                raise ValueError(f"flex.models names {mname!r}, which is not a text model of this provider; "
                                 f"list some of: {', '.join(k for k, m in self.models.items() if m.kind == 'text')}")
        ba = self.batch_api
        for mname in ba.media_models or () if ba is not None else ():
            m = self.models.get(mname)
            if m is None or m.kind == "text" or m.kind not in ba.kinds:
                raise ValueError(f"batch_api.media_models names {mname!r}, which is no model of a kind in "
                                 f"batch_api.kinds {list(ba.kinds)} other than text; list some of: "
                                 f"{', '.join(k for k, x in self.models.items() if x.kind in ba.kinds and x.kind != 'text')}")
        if self.compat == "gemini":
            check_gemini_batches(ba, {k: m.kind for k, m in self.models.items()})
        return self

    def cache_of(self, model: str | ModelSpec) -> PromptCache | None:
        """The prompt cache ``model`` (a name or its spec) is billed under: the provider's, with the model's own
        terms where it gives them (None: the provider has no prompt cache, whatever the model's terms, as an overlay
        that takes the provider's away means). The one way every bill, bound, estimate and warmth
        reads a cache's terms, so a model's 1.25x write or 30-minute TTL holds in all of them alike."""
        pc = self.prompt_cache
        spec = self.models.get(model) if isinstance(model, str) else model
        if pc is None or spec is None or spec.prompt_cache is None:
            return pc
        return merged_cache(pc, spec.prompt_cache)

    def supports_batch_api(self, kind: str, model: str | ModelSpec) -> bool:
        """Whether ``model`` (a name or its spec) of ``kind`` rides the provider's batch API: its kind listed, and
        an image or video model among ``media_models`` where they are named (a spec by value: it knows no name)."""
        ba = self.batch_api
        if ba is None or kind not in ba.kinds:
            return False
        if kind == "text" or ba.media_models is None:
            return True
        if isinstance(model, str):
            return model in ba.media_models
        return any(self.models.get(m) == model for m in ba.media_models)

    def supports_flex(self, model: str) -> bool:
        return self.flex is not None and model in self.flex.models


class Catalog(_Frozen):
    schema_version: int = 1
    providers: dict[str, ProviderSpec]

    @model_validator(mode="after")
    def _name_providers(self) -> Catalog:
        for name, p in self.providers.items():
            if p.name != name:
                object.__setattr__(p, "name", name)  # frozen, but the key is the single source of the name
        return self

    def provider(self, name: str) -> ProviderSpec:
        try:
            return self.providers[name]
        except KeyError:
            raise CatalogError(
                f"unknown provider {name!r}; the catalog has {sorted(self.providers)}"
            ) from None

    def model(self, provider: str, model: str) -> ModelSpec:
        p = self.provider(provider)
        try:
            return p.models[model]
        except KeyError:
            raise CatalogError(
                f"provider {provider!r} has no model {model!r}; it has {sorted(p.models)}"
            ) from None

    def image_rule(self, provider: str, model: str) -> ImageInput | None:
        """How the model bills an input image: its own rule, else its provider's (None: neither names one)."""
        return self.model(provider, model).image_input or self.provider(provider).image_input

    def tool_prompt(self, provider: str, model: str) -> ToolPrompt | None:
        """The system prompt the model's calls with tools carry: its own term, else its provider's (None: none)."""
        return self.model(provider, model).tool_prompt or self.provider(provider).tool_prompt

    def current(self, provider: str, model: str, today: date) -> str:
        """The model a request for ``model`` goes to on ``today``: itself while it is served (or when it names no
        successor), else its successor's, following the chain (validated on load: same provider and kind, no loop)."""
        spec = self.model(provider, model)
        while spec.shutdown is not None and spec.shutdown <= today and spec.successor is not None:
            model, spec = spec.successor, self.providers[provider].models[spec.successor]
        return model

    def find_model(self, model: str) -> tuple[str, ModelSpec]:
        """The provider of a model name, when a trace line names only the model."""
        hits = [(pn, p.models[model]) for pn, p in self.providers.items() if model in p.models]
        if not hits:
            import difflib

            names = sorted({m for p in self.providers.values() for m in p.models})
            close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"the catalog has {names}"
            raise CatalogError(f"model {model!r} is in no provider's catalog; {hint} (a model of your own "
                               "goes in a catalog overlay: SMARTBATCH_CATALOG_OVERLAY=file.yaml, or the commands' "
                               "--catalog-overlay)")
        if len(hits) > 1:
            raise CatalogError(f"model {model!r} is offered by several providers {[h[0] for h in hits]}; set "
                               "'provider' on the line")
        return hits[0]


def _check_successor(models: dict[str, ModelSpec], name: str, spec: ModelSpec) -> None:
    # A successor is the provider's own replacement: a trace row keeps its provider (and key, and bill) when its
    # model is written as the successor, so the successor must be of the same provider, and make the same kind.
    seen, at = [name], spec
    while at.successor is not None:
        nxt = models.get(at.successor)
        if nxt is None or nxt.kind != at.kind:
            same = ", ".join(k for k, m in models.items() if m.kind == at.kind and k != seen[-1]) or "none"
            raise ValueError(f"model {seen[-1]!r}: successor {at.successor!r} is not a {at.kind} model of this "
                             f"provider; name one of: {same} (or none)")
        if at.successor in seen:
            raise ValueError(f"model {name!r}: successors loop ({' -> '.join([*seen, at.successor])}); end the "
                             "chain at a model with no successor")
        seen.append(at.successor)
        at = nxt


def _read_yaml(path: str | Path | None, flag: str) -> tuple[dict, str]:
    if path is None:
        text = resources.files("engine").joinpath("data/catalog.yaml").read_text(encoding="utf-8")
        where = "<default catalog>"
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"cannot read catalog {where}: {exc}; pass an existing UTF-8 file to {flag}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {yaml_problem(exc, where)}") from exc  # one line, as every command error
    if not isinstance(raw, dict):
        raise CatalogError(f"catalog {where} must be a YAML mapping with 'providers'")
    return raw, where


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mapping by mapping (a value that is not a mapping replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_catalog(path: str | Path | None = None, overlay: str | Path | None = None) -> Catalog:
    """Load and validate a catalog YAML file (the packaged default when ``path`` is None). ``overlay`` is a
    YAML file merged on top, mapping by mapping: it adds or overrides providers, models and prices without
    copying the whole catalog (a new provider needs only its models and prices)."""
    raw, where = _read_yaml(path, "--catalog")
    base = extra = None
    if overlay is not None:
        extra, owhere = _read_yaml(overlay, "--catalog-overlay")
        try:
            base, extra = respelt_catalog(raw), respelt_catalog(extra)
        except ValueError as exc:
            raise CatalogError(f"catalog {where} + overlay {owhere}: {exc}") from None
        raw, where = _merge(base, extra), f"{where} + overlay {owhere}"
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(catalog_problem(exc, where, Catalog, base or raw, extra)) from exc


@functools.cache
def default_catalog() -> Catalog:
    """The packaged catalog, parsed once (it is immutable, so sharing it is safe)."""
    return load_catalog(None)
