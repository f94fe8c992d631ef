"""The request: one line of a trace, and the unit every decision is about."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from engine.catalog import Catalog, Kind, default_catalog
from engine.errors import CatalogError
from engine.settings import Settings

__all__ = ["PRIORITIES", "PRIORITY_RANK", "FieldProblem", "Priority", "Request", "Reuse", "validation_context"]

Priority = Literal["urgent", "normal", "background"]
Reuse = Literal["none", "exact", "near"]
PRIORITIES: tuple[Priority, ...] = ("urgent", "normal", "background")
PRIORITY_RANK: dict[str, int] = {p: k for k, p in enumerate(PRIORITIES)}  # 0 is the most urgent

ParamValue = str | int | float | bool


class FieldProblem(ValueError):
    """A cross-field problem found while filling defaults, tagged with the field the user should fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def validation_context(catalog: Catalog | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """The context ``Request.model_validate(d, context=...)`` reads to fill defaults and check the model."""
    return {"catalog": catalog or default_catalog(), "settings": settings or Settings()}


def _ctx(info: ValidationInfo) -> tuple[Catalog, Settings]:
    ctx = info.context or {}
    return ctx.get("catalog") or default_catalog(), ctx.get("settings") or Settings()


class Request(BaseModel):
    """A generation request. Validated once; every default is resolved here so that later code never guesses.

    ``deadline_s`` is relative to ``arrival_s``: the request meets its deadline when its result exists by
    ``arrival_s + deadline_s``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    arrival_s: float = Field(ge=0)
    tenant: str = Field(default="default", min_length=1)
    provider: str
    model: str
    kind: Kind
    prompt: str = ""
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    max_output_tokens: int | None = Field(default=None, ge=1, description="the cap sent to the provider "
                                          "(max_tokens); a budget reserves for it. None: the model's maximum")
    prefix_blocks: tuple[int, ...] = ()
    params: dict[str, ParamValue] = Field(default_factory=dict)
    priority: Priority = "normal"
    deadline_s: float = Field(gt=0)
    reuse: Reuse = "exact"

    @field_validator("arrival_s", "deadline_s")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number of seconds")
        return v

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            raise FieldProblem("line", "a request must be a JSON object")
        catalog, settings = _ctx(info)
        d = dict(data)
        model = d.get("model")
        if not isinstance(model, str):
            return d  # field validation reports the missing/invalid model
        provider = d.get("provider")
        try:
            if provider is None:
                provider, spec = catalog.find_model(model)
                d["provider"] = provider
            elif isinstance(provider, str):
                spec = catalog.model(provider, model)
            else:
                return d
        except CatalogError as exc:
            raise FieldProblem("provider" if "has no model" not in str(exc) and provider is not None else "model", str(exc)) from None
        kind = d.setdefault("kind", spec.kind)
        if kind != spec.kind:
            raise FieldProblem("kind", f"kind {kind!r} does not match model {model!r}, which generates {spec.kind!r}")
        prompt = d.get("prompt", "")
        if spec.kind != "text" and (not isinstance(prompt, str) or not prompt.strip()):
            raise FieldProblem("prompt", f"a {spec.kind} request needs a non-empty 'prompt'")
        if d.get("input_tokens") is None:
            if spec.kind == "text" and not (isinstance(prompt, str) and prompt):
                raise FieldProblem("input_tokens", "a text request needs 'input_tokens' or a 'prompt' to estimate them from")
            d["input_tokens"] = math.ceil(len(prompt) / settings.chars_per_token) if isinstance(prompt, str) else 0
        if d.get("output_tokens") is None:
            d["output_tokens"] = settings.default_output_tokens if spec.kind == "text" else 0
        if d.get("deadline_s") is None:
            prio = d.get("priority", "normal")
            d["deadline_s"] = getattr(settings.deadlines, prio, settings.deadlines.normal)
        params = d.get("params") or {}
        if isinstance(params, dict):
            params = dict(params)
            if spec.kind == "image":
                table = spec.per_image or spec.gpu_s_per_image or {}
                params.setdefault("size", spec.default_size or next(iter(table)))
                if params["size"] not in table:
                    raise FieldProblem("params.size", f"params.size {params['size']!r} is not offered by {model!r}; "
                                     f"use one of {sorted(table)}")
            elif spec.kind == "video":
                table = spec.per_second or spec.gpu_s_per_video_second or {}
                params.setdefault("resolution", spec.default_resolution or next(iter(table)))
                params.setdefault("duration_s", spec.default_duration_s)
                if params["resolution"] not in table:
                    raise FieldProblem("params.resolution", f"params.resolution {params['resolution']!r} is not offered by {model!r}; "
                                     f"use one of {sorted(table)}")
                dur = params["duration_s"]
                if isinstance(dur, bool) or not isinstance(dur, (int, float)) or not 0 < dur <= 600:
                    raise FieldProblem("params.duration_s", f"params.duration_s must be a number of seconds in (0, 600], got {dur!r}")
            d["params"] = params
        return d

    @model_validator(mode="after")
    def _output_within_model(self, info: ValidationInfo) -> Request:
        catalog, _ = _ctx(info)
        spec = catalog.model(self.provider, self.model)
        if self.kind == "text" and self.output_tokens > spec.max_output_tokens:
            raise FieldProblem(
                "output_tokens", f"output_tokens {self.output_tokens} exceeds {self.model}'s maximum {spec.max_output_tokens}"
            )
        cap = self.max_output_tokens
        if cap is not None and not self.output_tokens <= cap <= spec.max_output_tokens:
            raise FieldProblem("max_output_tokens", f"max_output_tokens {cap} must be between output_tokens "
                               f"{self.output_tokens} and {self.model}'s maximum {spec.max_output_tokens}")
        return self

    @property
    def deadline_at(self) -> float:
        """Absolute time by which the result must exist."""
        return self.arrival_s + self.deadline_s
