"""The request: one line of a trace, and the unit every decision is about."""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.core._checks import (
    FieldProblem,
    check_generation,
    check_json,
    check_messages,
    check_params,
    check_text,
    no_text_problem,
    tenant_problem,
)
from engine.core._media_checks import check_media, media_from_body
from engine.core._request_catalog import _ctx, in_catalog, validation_context
from engine.core._request_fields import (
    _CAP_KEYS,
    _LINE_KEYS,
    _URL_KIND,
    BODY_KEYS,
    MEDIA_PARAMS,
    Float,
    Int,
    ParamValue,
    _from_batch_line,
)
from engine.core._tenant_name import tenant_ends_problem
from engine.core._window import check_window
from engine.core.body_tokens import (
    body_image_tokens,
    call_chars,
    only_tool_outputs,
    sends_prompt,
    split_body,
    tool_chars,
    tool_prompt_tokens,
)
from engine.core.catalog import Kind
from engine.core.errors import CatalogError, RequestError
from engine.core.settings import MAX_DEADLINE_S
from engine.core.wire_checks import check_line_url, check_real, check_wire, layer_of

__all__ = ["BODY_KEYS", "DEADLINE_SLACK_S", "MAX_DEADLINE_S", "MEDIA_PARAMS", "PRIORITIES", "PRIORITY_RANK", "FieldProblem", "Priority",
           "Request", "Reuse", "in_catalog", "split_body", "tenant_problem", "validation_context"]

Priority = Literal["urgent", "normal", "background"]
Reuse = Literal["none", "exact", "near"]
PRIORITIES: tuple[Priority, ...] = ("urgent", "normal", "background")
PRIORITY_RANK: dict[str, int] = {p: k for k, p in enumerate(PRIORITIES)}  # 0 is the most urgent


@functools.cache
def _known_names() -> frozenset[str]:
    return frozenset(Request.model_fields) | BODY_KEYS | _LINE_KEYS


def _check_names(d: dict) -> None:
    """A misspelt field is named as such, before a check it would make fail for another reason ("promt" would
    read as a missing prompt). Runs for every request: the known names are built once."""
    known = _known_names()
    for k in d:
        if isinstance(k, str) and k not in known:
            import difflib

            close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.75)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FieldProblem(k or "line", f"{k!r} is not a request field; {hint}remove it or fix its spelling (provider "
                               "fields go in 'body'; see docs/traces.md)")


# A result this close after its deadline still meets it: a timer may fire a hair late, and float sums of
# arrival and deadline round. One value for the simulator and the actors (engine seconds).
DEADLINE_SLACK_S = 1e-6


class Request(BaseModel):
    """A generation request. Validated once; every default is resolved here so that later code never guesses.

    ``deadline_s`` is relative to ``arrival_s``: the request meets its deadline when its result exists by
    ``arrival_s + deadline_s``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    arrival_s: Float = Field(ge=0)
    tenant: str = Field(default="default", min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$",
                        description="who the request is for; no control characters")
    provider: str
    model: str
    kind: Kind
    prompt: str = ""
    input_tokens: Int = Field(ge=0)
    output_tokens: Int = Field(ge=0)
    max_output_tokens: Int | None = Field(default=None, ge=1, description="the cap sent to the provider "
                                          "(max_tokens); a budget reserves for it. None: the model's maximum")
    prefix_blocks: tuple[Annotated[Int, Field(ge=0)], ...] = ()  # ids: a negative one is a mistake
    params: dict[str, ParamValue] = Field(default_factory=dict)
    priority: Priority = "normal"
    deadline_s: Float = Field(json_schema_extra={"exclusiveMinimum": 0})  # > 0, checked below to say the fix
    reuse: Reuse = "exact"
    gather: bool = Field(default=True, strict=True, description="false: nothing more will be sent with it (a "
                         "batch file, read whole), so it is never held to gather company: its batch goes once judged")
    body: dict[str, Any] | None = Field(default=None, description="the provider's own request body "
                                        "(messages, system, temperature, tools, ...), sent unchanged")

    def __init__(self, /, **data: Any) -> None:
        # Built directly, a bad field is refused as submit() refuses it (RequestError: the field and the fix), not
        # in pydantic's report; model_validate keeps its ValidationError, whose every problem a trace reader lists.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            from engine.core.trace import request_error  # trace imports this module

            err = request_error(exc, data)
            if err.field in ("model", "provider") and "catalog" in str(err):  # the overlay it names is not read here
                raise RequestError(err.request_id, err.field, f"{err._message}; Request(**fields) checks the packaged "
                                   "catalog alone: give the fields to the engine's submit (its catalog), or build it as "
                                   "Request.model_validate(fields, context=validation_context(catalog))") from None
            raise err from None

    # Pydantic calls a model's own __init__ from model_validate too, dropping its context (catalog, settings):
    # marked as the base's, it runs for Request(**kw) alone.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @field_validator("id")
    @classmethod
    def _printable_id(cls, v: str) -> str:
        # An id is printed (samples, logs) and keys the cache, the journal and idempotency: a NUL, newline or ESC
        # in it garbled a terminal and the hash of tenant + id (custom_id and tenant refuse them too).
        bad = next((c for c in v if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise ValueError(f"id {v[:40]!r} holds the control character {bad!r}; use printable characters")
        return v

    @field_validator("tenant")
    @classmethod
    def _no_space_at_an_end(cls, v: str, info: ValidationInfo) -> str:  # (why: ``tenant_ends_problem``)
        if v != v.strip() and not (info.context or {}).get("kept"):
            raise ValueError(tenant_ends_problem(v))
        return v

    @field_validator("arrival_s", "deadline_s")
    @classmethod
    def _finite(cls, v: float, info: ValidationInfo) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number of seconds")
        if info.field_name == "deadline_s" and v <= 0:  # None (omitted) took the priority's default before this
            prio = info.data.get("priority")
            prio = prio if prio in PRIORITIES else "normal"
            default = getattr(_ctx(info)[1].deadlines, prio)
            raise ValueError(f"deadline_s must be greater than 0 seconds after arrival, got {v:g}; omit it for "
                             f"the default of priority {prio!r} ({default:,.0f} s, settings.deadlines)")
        if info.field_name == "deadline_s" and v > MAX_DEADLINE_S:
            raise ValueError(f"must be at most {MAX_DEADLINE_S:,.0f} s (366 days); a later deadline changes "
                             "nothing, so give a shorter one or priority 'background'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            raise FieldProblem("line", "a request must be a JSON object")
        catalog, settings = _ctx(info)
        d = dict(data)
        for k, v in d.items():
            check_text(k, "line")
            check_text(v, str(k) or "line")
        _check_names(d)
        line_url = None
        if "custom_id" in d:
            line_url = d.get("url", "/v1/chat/completions")
            d = _from_batch_line(d)
        moved = {k: d.pop(k) for k in list(d) if k in BODY_KEYS}
        if moved:
            body = d.get("body")
            if body is not None and not isinstance(body, dict):
                raise FieldProblem("body", "body must be a JSON object (the provider's request body)")
            # One value per field: the one beside the body was sent and the body's dropped, unsaid (a helper's tour).
            if clash := next((k for k in moved if k in (body or {}) and body[k] != moved[k]), None):
                raise FieldProblem(clash, f"{clash} is given beside the body and in it, with other values: give "
                                   "it once")
            d["body"] = {**(body or {}), **moved}
        body, body_chars = d.get("body"), 0
        if body is not None:
            if not isinstance(body, dict):
                raise FieldProblem("body", "body must be a JSON object (the provider's request body)")
            check_json(body, "body")
            check_generation(body, "body")  # before the cap is read from it: a bad max_tokens is named as such
            if d.get("model") is None and body.get("model") is not None:  # a non-string one is named as 'model' below
                d["model"] = body["model"]
            if "model" in body and body["model"] != d.get("model"):
                raise FieldProblem("body.model", f"body.model {body['model']!r} differs from model "
                                   f"{d.get('model')!r}; give one model")
            text = split_body(body)[0]  # sent; a 'prompt' beside it too only if it has no text (sends_prompt)
            body_chars = len(text)
            if text and not d.get("prompt"):
                d["prompt"] = text
            caps = [(k, body[k]) for k in _CAP_KEYS if body.get(k) is not None]
            if caps and d.get("max_output_tokens") is None:
                d["max_output_tokens"] = caps[0][1]
            # The provider is sent the body's caps, and the budget reserves for max_output_tokens: a larger cap in
            # the body overran a hard budget threefold (a helper's tour).
            if other := next((k for k, cap in caps if cap != d.get("max_output_tokens")), None):
                raise FieldProblem(f"body.{other}", f"body.{other} {body[other]!r} differs from the request's output "
                                   f"cap {d.get('max_output_tokens')!r}: give one cap")
            if not isinstance(body.get("messages", []), list):
                raise FieldProblem("body.messages", "messages must be a list of message objects, e.g. "
                                   '[{"role": "user", "content": "..."}]')
        model = d.get("model")
        if not isinstance(model, str):  # here: field validation names 'provider' (it comes first), not 'model'
            raise FieldProblem("model", ("model is required" if model is None else f"model {model!r} is not a name")
                               + ": give a model of the catalog, e.g. 'gpt-5.4-mini'")
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
        if (ctx := info.context or {}).get("live"):
            check_real(d["provider"], model, settings)
        if line_url is not None:  # before the body's checks: a body of the url's API is judged by another's
            check_line_url(line_url, _URL_KIND, model, spec.kind, d["provider"], settings)
        if body is not None:
            check_messages(body, "body", spec.kind)
            check_wire(body, spec, d["provider"], settings, catalog.provider(d["provider"]).compat, ctx.get("api_fields", False))
        kind = d.setdefault("kind", spec.kind)
        if kind != spec.kind:
            raise FieldProblem("kind", f"kind {kind!r} does not match model {model!r}, which generates {spec.kind!r}")
        prompt = d.get("prompt", "")
        if not isinstance(prompt, str):  # read as no prompt, it was reported as a missing input_tokens
            raise FieldProblem("prompt", f"'prompt' is text, got {type(prompt).__name__} {str(prompt)[:40]!r}: give "
                               "it as a string")
        if spec.kind != "text" and not prompt.strip():
            raise FieldProblem("prompt", f"{spec.kind} requests need a non-empty 'prompt'")
        if d.get("input_tokens") is None:
            # A turn of only tool outputs (an agent's loop) has no text, and is one: even of empty outputs. So
            # is a message of only an image: it is sent, and billed by the image rule.
            calls, hidden = call_chars(body), tool_prompt_tokens(body, catalog.tool_prompt(d["provider"], model))
            images = body_image_tokens(body, catalog.image_rule(d["provider"], model))
            if (spec.kind == "text" and not (isinstance(prompt, str) and prompt) and not calls and not images
                    and not only_tool_outputs(body)):
                if body is not None:  # an OpenAI/Anthropic body: name its field (or a misspelt one), not the trace's
                    raise no_text_problem(body)
                if "prompt" in d:  # given, and empty: named as 'input_tokens', the field was not the one given
                    raise FieldProblem("prompt", "prompt is empty; give the text to send (or 'messages')")
                raise FieldProblem("input_tokens", "a text request needs 'input_tokens' or a 'prompt' to estimate them from")
            sent = len(prompt) if isinstance(prompt, str) else 0  # sent beside the body's text, or a label of it
            chars = (sent + body_chars if sends_prompt(body, spec.kind) else max(sent, body_chars)) + tool_chars(body) + calls
            d["input_tokens"] = math.ceil(chars / settings.chars_per_token) + images + hidden
        if d.get("output_tokens") is None:
            out = settings.default_output_tokens if spec.kind == "text" else 0
            cap = d.get("max_output_tokens")
            if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
                out = min(out, cap)
            d["output_tokens"] = out
        if d.get("deadline_s") is None:
            prio = d.get("priority", "normal")
            d["deadline_s"] = getattr(settings.deadlines, prio if prio in PRIORITIES else "normal")
        params = {} if d.get("params") is None else d["params"]  # null: none; [] or "" is no object
        if isinstance(params, dict):
            params = dict(params)
            came = {}  # a top-level media field went into the body, or the provider's own names them
            if body:
                came = media_from_body(body, params, spec, model, MEDIA_PARAMS.get(spec.kind, ()))
            check_params(params, spec.kind, model, MEDIA_PARAMS.get(spec.kind, ()))
            check_media(params, spec, model, came, layer_of(catalog, d["provider"], settings))
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
        if cap is not None and not self.output_tokens <= cap <= spec.max_output_tokens:  # named as the caller wrote it
            field = next((f"body.{k}" for k in _CAP_KEYS if (self.body or {}).get(k) == cap), "max_output_tokens")
            if cap > spec.max_output_tokens:
                raise FieldProblem(field, f"{field} {cap} is over {self.model}'s maximum output of "
                                   f"{spec.max_output_tokens:,} tokens: give at most that")
            raise FieldProblem(field, f"{field} {cap} is under output_tokens {self.output_tokens} (the output the "
                               f"request is priced for): raise {field} or lower output_tokens")
        if self.kind == "text":
            check_window(self, catalog)
        return self

    @property
    def uid(self) -> str:
        """The request's identity inside the engine: its id within its tenant. Two tenants may use the same
        id; they are two requests, and neither ever sees the other's result."""
        return f"{len(self.tenant)}:{self.tenant}/{self.id}"  # length-prefixed: no two pairs share a uid

    @property
    def deadline_at(self) -> float:
        """Absolute time by which the result must exist."""
        return self.arrival_s + self.deadline_s

    def met_by(self, done_at: float) -> bool:
        """Whether a result at ``done_at`` meets the deadline: the one rule, for both runtimes."""
        return done_at <= self.arrival_s + self.deadline_s + DEADLINE_SLACK_S
