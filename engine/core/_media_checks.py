"""Checks of a media request's priced params (an image's size, a video's resolution and length) against its
model's catalog entry, and the priced fields a provider's own body names taken into them: OpenAI's Videos API
(``seconds``, ``size``) and Google's Veo (``parameters.durationSeconds``, ``parameters.resolution``, or those at
the body's top). What the provider makes is what it bills, so it is what the request is reserved for and priced
at. They raise ``FieldProblem``; ``engine.core.request`` runs them while filling defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.core._checks import FieldProblem
from engine.core._gemini import gemini_sizes

if TYPE_CHECKING:
    from engine.core.catalog import ModelSpec

__all__ = ["check_media", "media_from_body"]

# Veo's names of the priced fields (Google's ``predictLongRunning`` parameters) -> the request's params
_VEO_FIELDS = {"durationSeconds": "duration_s", "resolution": "resolution"}


def _seconds(value: Any, field: str, spec: ModelSpec, model: str) -> float:
    try:
        seconds = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        seconds = None
    if seconds is None or (spec.durations_s is not None and seconds not in spec.durations_s):
        raise FieldProblem(field, f"{field} {value!r} is not offered by {model!r}; use one of "
                           f"{', '.join(f'{d:g}' for d in spec.durations_s or ())} (seconds)")
    return seconds


def media_from_body(body: Mapping[str, Any], params: dict[str, Any], spec: ModelSpec, model: str,
                    keys: tuple[str, ...]) -> dict[str, str]:
    """Take into ``params`` (in place) the priced fields a provider body names: those of ``keys`` by their own
    names, a video's ``seconds`` and ``size`` (OpenAI's Videos API) and Veo's ``durationSeconds`` and
    ``resolution`` (in ``parameters`` or at the top), which is what the provider makes and bills: priced and
    reserved at the params' defaults instead, a sora-2-pro body of 12 s at 1792x1024 was reserved $2.40 and billed
    $6 (a review). One the params name otherwise is refused: give one. Returns, per param taken, the body's field
    that gave it (``body.seconds``), for a later check to name."""
    from engine.core.video_sizes import OPENAI_VIDEO_SIZES, resolution_of

    # param -> (its value, the body's field that gave it, as the body gave it)
    took = {k: (body[k], f"body.{k}", body[k]) for k in keys if k in body}
    if spec.kind == "video" and "size" in body:
        offered = [z for res in (spec.per_second or spec.gpu_s_per_video_second or {}) for z in
                   OPENAI_VIDEO_SIZES.get(res, ())]
        if body["size"] not in offered:
            raise FieldProblem("body.size", f"body.size {body['size']!r} is not offered by {model!r} at a price the "
                               f"catalog knows; use one of {', '.join(offered) or 'none'}")
        took["resolution"] = (resolution_of(body["size"]), "body.size", body["size"])
    if spec.kind == "video" and "seconds" in body:
        took["duration_s"] = (_seconds(body["seconds"], "body.seconds", spec, model), "body.seconds", body["seconds"])
    # Veo's body goes as given (actors/providers/_veo.py), so it is what Google makes. Before, a Veo body was
    # refused whole as a field of Gemini's OpenAI layer, which the docs said it could give (a helper's tour).
    veo = body.get("parameters") if spec.kind == "video" else None
    for where, fields in (("body.parameters", veo if isinstance(veo, Mapping) else {}),
                          ("body", body if spec.kind == "video" else {})):
        for name, param in _VEO_FIELDS.items():
            if name not in fields or f"{where}.{name}" == "body.resolution":  # by its own name, above
                continue
            field = f"{where}.{name}"
            value = _seconds(fields[name], field, spec, model) if param == "duration_s" else fields[name]
            if param in took and took[param][0] != value:
                raise FieldProblem(field, f"{field} {fields[name]!r} differs from {took[param][1]} "
                                   f"{took[param][2]!r}: give one")
            took.setdefault(param, (value, field, fields[name]))
    for k, (v, field, shown) in took.items():
        if params.setdefault(k, v) != v:
            raise FieldProblem(f"params.{k}", f"params.{k} {params[k]!r} differs from {field.removeprefix('body.')} "
                               f"{shown!r}: give one")
    return {k: field for k, (_, field, _) in took.items()}


def check_media(params: dict[str, Any], spec: ModelSpec, model: str, came: Mapping[str, str] | None = None,
                compat: str | None = None) -> None:
    """Fill a media request's priced params with its model's defaults (in place) and hold them to what the
    catalog offers: an image's ``size``, a video's ``resolution`` and ``duration_s``, and the lengths a model
    makes at a resolution (``durations_at``: Veo makes 1080p and 4k at 8 s only). A value the model does not
    take would be priced from no table, or refused by the provider after the request was accepted. ``came``:
    the body's field that gave a param (``media_from_body``), named instead of the param; ``compat``: the
    provider's OpenAI-compatible layer (Gemini's makes no quality, and names its sizes by aspect ratio)."""
    if spec.kind == "image":
        table = spec.per_image or spec.gpu_s_per_image or {}
        params.setdefault("size", spec.default_size or next(iter(table)))
        if params["size"] not in table:
            field = (came or {}).get("size", "params.size")
            offered = gemini_sizes(table) if compat == "gemini" else sorted(table)
            raise FieldProblem(field, f"{field} {params['size']!r} is not offered by {model!r}; use one of {offered}")
        if compat == "gemini" and params.get("quality") is not None:
            field = (came or {}).get("quality", "params.quality")
            raise FieldProblem(field, f"{field} is not taken by Gemini's OpenAI compatibility layer, whose image "
                               f"models make one quality at one price: leave it out")
        # A quality the provider does not know was reserved and counted at the dearest, and answered with a 400
        # (an emulator that took it billed it so; a helper's hunt).
        qualities = spec.per_image_quality
        if qualities and params.get("quality") not in (None, "auto", *qualities):
            raise FieldProblem("params.quality", f"params.quality {params['quality']!r} is not offered by {model!r}; "
                               f"use one of {sorted(qualities)} or 'auto'")
    elif spec.kind == "video":
        table = spec.per_second or spec.gpu_s_per_video_second or {}
        params.setdefault("resolution", spec.default_resolution or next(iter(table)))
        params.setdefault("duration_s", spec.default_duration_s)
        res_field = (came or {}).get("resolution", "params.resolution")
        if params["resolution"] not in table:
            raise FieldProblem(res_field, f"{res_field} {params['resolution']!r} is not offered by "
                               f"{model!r}; use one of {sorted(table)}")
        dur = params["duration_s"]
        if isinstance(dur, bool) or not isinstance(dur, (int, float)) or not 0 < dur <= 600:
            raise FieldProblem("params.duration_s", f"params.duration_s must be a number of seconds in (0, 600], "
                               f"got {dur!r}")
        # A provider with fixed lengths (OpenAI's Videos API: seconds "4", "8" or "12") refuses any other one
        # when the job is created, after this request was accepted, reserved for and perhaps batched.
        if spec.durations_s is not None and dur not in spec.durations_s:
            raise FieldProblem("params.duration_s", f"params.duration_s {dur:g} is not offered by {model!r}; use "
                               f"one of {', '.join(f'{d:g}' for d in spec.durations_s)} (seconds)")
        # So with a length the model makes, but not at this resolution (Veo: 1080p and 4k at 8 s only): accepted,
        # the request failed at the provider's 400 (a helper's tour).
        lengths = (spec.durations_at or {}).get(params["resolution"])
        if lengths is not None and dur not in lengths:
            field = (came or {}).get("duration_s", "params.duration_s")
            others = sorted(r for r in table if r not in (spec.durations_at or {}) or dur in spec.durations_at[r])
            raise FieldProblem(field, f"{field} {dur:g} is not offered by {model!r} at {params['resolution']}, "
                               f"made at {', '.join(f'{d:g}' for d in lengths)} s only; give "
                               f"{' or '.join(f'{d:g}' for d in lengths)}" + (f", or resolution "
                               f"{' or '.join(others)}" if others else ""))
