"""Google's OpenAI compatibility layer for the Gemini API (a provider whose catalog entry says ``compat: gemini``):
what a chat completions (or images) body may hold there, and how an answer's usage is billed. Google documents the layer
briefly (https://ai.google.dev/gemini-api/docs/openai, and its reference of the request's fields); where it says
nothing, the rule here refuses what may be refused and never bills less than Google may (docs/providers.md,
"Gemini", whose ASSUMPTION marks say which is which)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.core._checks import FieldProblem

if TYPE_CHECKING:
    from engine.core.catalog import ModelSpec

__all__ = ["GEMINI_ASPECTS", "GEMINI_FIELDS", "GEMINI_IMAGE_FIELDS", "GEMINI_OPENAI_URL", "THINKING_KEYS", "check_gemini_body",
           "gemini_output_tokens", "gemini_sizes"]

GEMINI_OPENAI_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"

# The chat completions fields Google's reference of the layer names. ``extra_body`` is a field on the wire there:
# Gemini's own options travel in it, under ``google``.
GEMINI_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "tools", "tool_choice", "reasoning_effort", "modalities", "n",
    "stop", "max_completion_tokens", "max_tokens", "temperature", "top_p", "response_format", "seed",
    "presence_penalty", "frequency_penalty", "extra_body"})
# The images endpoint's fields: those of Google's example (model, prompt, response_format "b64_json", n 1), and
# ``size``, which picks the aspect ratio of that pixel size (ASSUMPTION: the layer's page shows no size; a size it
# ignored would make a 1:1 image at the same price, as every aspect ratio costs the same).
GEMINI_IMAGE_FIELDS = frozenset({"model", "prompt", "n", "size", "response_format"})
# Gemini 2.5 Flash Image's aspect ratios by the pixel size each makes (https://ai.google.dev/gemini-api/docs/
# image-generation, its table; read 2026-12-06): named beside a size in a refusal, as Google names them.
_ASPECTS = {"1024x1024": "1:1", "832x1248": "2:3", "1248x832": "3:2", "864x1184": "3:4", "1184x864": "4:3",
            "896x1152": "4:5", "1152x896": "5:4", "768x1344": "9:16", "1344x768": "16:9", "1536x672": "21:9"}
GEMINI_ASPECTS: Mapping[str, str] = _ASPECTS  # Google's native calls name the aspect ratio, not the size
# ``extra_body.google.thinking_config``: its keys and their types (Gemini's thinking budget, or level, and whether
# the answer shows the thoughts).
THINKING_KEYS: dict[str, type] = {"thinking_budget": int, "thinking_level": str, "include_thoughts": bool}

# The fix for a field OpenAI takes and the layer does not document, where there is more to say than "leave it out".
_FIXES = {
    "prompt_cache_key": "Gemini caches a shared prompt start by itself (implicit caching)",
    "service_tier": "Gemini's flex and priority tiers are billed at prices the catalog does not hold",
    "max_output_tokens": "the cap of chat completions is max_completion_tokens",
    "user": "Gemini takes no end-user id here",
}


def check_gemini_body(body: Mapping[str, Any], where: str, spec: ModelSpec) -> None:
    """Raise ``FieldProblem`` for what Google's OpenAI compatibility layer would refuse, or bill at prices the
    catalog lacks: a field it does not document, a Gemini option it does not document (``cached_content`` is a
    cache billed per hour of storage), a reasoning effort the model does not take (``efforts``), and an effort
    beside a thinking budget or level (the layer takes one or the other); for an image model, a field its images
    endpoint does not take."""
    if spec.kind == "image":
        _check_image_body(body, where)
        return
    for key in body:
        if key not in GEMINI_FIELDS:
            why = _FIXES.get(key, "it is not among the fields Google documents for its OpenAI compatibility layer")
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} is not taken by Gemini's OpenAI compatibility layer "
                               f"({why}): leave it out")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise FieldProblem(f"{where}.modalities", f"{where}.modalities {str(modalities)[:40]} is refused: only "
                           "['text'] here, an answer in audio is billed at prices the catalog does not hold; leave "
                           "it out")
    thinking = _thinking_config(body.get("extra_body"), f"{where}.extra_body")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if spec.efforts is not None and effort not in spec.efforts:
            raise FieldProblem(f"{where}.reasoning_effort", f"{where}.reasoning_effort {str(effort)[:20]!r} is "
                               f"refused by Gemini for {body.get('model') or 'this model'}: give one of "
                               f"{', '.join(spec.efforts)}")
        if thinking.keys() & {"thinking_budget", "thinking_level"}:
            raise FieldProblem(f"{where}.reasoning_effort", f"{where}.reasoning_effort and {where}.extra_body.google"
                               ".thinking_config set the same thinking: Gemini takes one of them, give one")


def _check_image_body(body: Mapping[str, Any], where: str) -> None:
    """An images body at the layer: its documented fields only (an OpenAI image's ``quality``, ``style`` or
    ``output_format`` has no Gemini counterpart). Its ``response_format`` is the engine's to set ("b64_json", what
    it reads); a caller's string is refused by the generation checks, before this."""
    for key in body:
        if key not in GEMINI_IMAGE_FIELDS:
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} is not taken by the images endpoint of Gemini's OpenAI "
                               f"compatibility layer (it takes {', '.join(sorted(GEMINI_IMAGE_FIELDS))}): leave it out")


def gemini_sizes(sizes: Any) -> str:
    """``sizes`` (pixel sizes) as a refusal names them, each with the aspect ratio Google names it by."""
    return ", ".join(f"{z} ({_ASPECTS[z]})" if z in _ASPECTS else str(z) for z in sizes)


def _thinking_config(extra: Any, where: str) -> Mapping[str, Any]:
    """``extra_body.google.thinking_config`` checked ({} where there is none)."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping) or set(extra) - {"google"}:
        raise FieldProblem(where, f"{where} must be {{'google': {{...}}}}: Gemini's own options go under 'google'")
    google = extra.get("google") or {}
    if not isinstance(google, Mapping):
        raise FieldProblem(f"{where}.google", f"{where}.google must be an object")
    for key in google:
        if key != "thinking_config":
            why = ("an explicit cache, billed per hour of storage at prices the catalog does not hold; Gemini "
                   "caches a shared prompt start by itself" if key == "cached_content" else
                   "only thinking_config is taken here")
            raise FieldProblem(f"{where}.google.{key}", f"{where}.google.{key} is refused ({why}): leave it out")
    cfg = google.get("thinking_config") or {}
    if not isinstance(cfg, Mapping):
        raise FieldProblem(f"{where}.google.thinking_config", f"{where}.google.thinking_config must be an object")
    for key, value in cfg.items():
        kind = THINKING_KEYS.get(key)
        if kind is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FieldProblem(f"{where}.google.thinking_config.{key}", f"{where}.google.thinking_config.{key} "
                               f"{str(value)[:20]!r} is refused: give " + ", ".join(
                                   f"{k} ({t.__name__})" for k, t in THINKING_KEYS.items()))
    return cfg


def gemini_output_tokens(usage: Mapping[str, Any]) -> int:
    """The output tokens of a chat completion's ``usage`` from Gemini's layer, thinking included (Google bills
    thinking as output). Its answers may count the thoughts apart from ``completion_tokens``: where
    ``total_tokens`` exceeds prompt and completion together, the difference was made too, and is billed. With no
    ``total_tokens``, a ``completion_tokens_details.reasoning_tokens`` is added (ASSUMPTION: counted apart; this
    may bill the thoughts twice, never less than Google does)."""
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if usage.get("total_tokens") is not None:
        return max(completion, _count(usage.get("total_tokens")) - prompt)
    details = usage.get("completion_tokens_details") or {}
    return completion + (_count(details.get("reasoning_tokens")) if isinstance(details, Mapping) else 0)


def _count(v: Any) -> int:
    """As the providers read a count: never below 0 (a negative one was priced as money given back)."""
    n = int(v or 0)
    return n if n > 0 else 0
