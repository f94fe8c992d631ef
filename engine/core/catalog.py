"""The provider/model catalog: prices, limits and capabilities, validated on load.

Providers *declare* what they can do (``batch_api``, ``prompt_cache``, ``gpu_batching``); the cost model and
the policies read those declarations and never guess a capability from a provider's name.
"""

from __future__ import annotations

import functools
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from engine.core._catalog_errors import catalog_problem
from engine.core._catalog_parts import (
    BatchApi,
    FlexTier,
    GpuBatching,
    Kind,
    ModelCache,
    PromptCache,
    _Frozen,
    check_gemini_batches,
    merged_cache,
    respelt_catalog,
)
from engine.core._model_spec import Effort, ModelSpec, RateLimits
from engine.core._yaml import yaml_problem
from engine.core.body_tokens import ImageInput, ToolPrompt
from engine.core.errors import CatalogError

__all__ = ["BatchApi", "Catalog", "Effort", "FlexTier", "GpuBatching", "Kind", "Latency", "MediaLatency", "ModelCache", "ModelSpec",
           "PromptCache", "ProviderSpec", "RateLimits", "default_catalog", "load_catalog"]


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
