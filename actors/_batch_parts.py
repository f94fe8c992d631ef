"""How a dispatch to a batch API is cut to the provider's limit on one batch's size (OpenAI's 200 MB input
file, Anthropic's 256 MB create; ``batch_api.max_file_mb``); ``cut`` also makes the parts of a batch a full batch
queue refused, by their input tokens (``actors._queue_full``); ``results_cap`` bounds an image batch's members, so
that the dispatcher holds at most ``batch_results_max_mb`` of images when it reads one batch's results."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from actors._types import Job
from engine.core.catalog import ModelSpec

__all__ = ["IMAGE_BYTES_PER_PIXEL", "LINE_OVERHEAD", "cut", "file_parts", "image_line_mb", "results_cap"]

LINE_OVERHEAD = 1024  # bytes a batch line adds to its request's body or prompt, at most (ids, url, model, caps)
# A results line of an image holds it as base64 PNG. A PNG of an opaque image weighs at most about its 3 bytes of
# RGB a pixel (stored, not compressed: zlib adds a few bytes a block), and base64 adds a third: 4 bytes a pixel.
# An upper bound, as the read it bounds must not overrun: gpt-image PNGs compress to about half that (1-3 MB at
# 1536x1024; a transparent one's 4th byte a pixel stays under the bound by that compression).
IMAGE_BYTES_PER_PIXEL = 4.0
FALLBACK_PIXELS = 1536 * 1024  # a model whose price table names no WxH size: OpenAI's largest gpt-image size
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def file_parts(jobs: list[Job], limit_mb: float | None, cpt: float) -> list[list[Job]]:
    """``jobs`` in order, cut into parts whose requests weigh at most 95 % of the provider's limit (the
    margin covers what the provider's body adds to a request: model, caps, the line's own fields). A
    request is weighed by its body or prompt as JSON, and at least by its input tokens as text, which is
    what a request sent at its recorded size sends (``message_parts``): that text holds its prompt, whose
    characters past ASCII and JSON escapes weigh more than a byte each."""
    if limit_mb is None:
        return [jobs]
    limit = 0.95 * limit_mb * 2**20

    def weight(j: Job) -> float:
        r = j.req
        raw = json.dumps(r.body if r.body is not None else r.prompt, ensure_ascii=False)
        extra = len(json.dumps(r.prompt, ensure_ascii=False).encode()) - len(r.prompt)
        return max(len(raw.encode()), r.input_tokens * cpt + extra) + LINE_OVERHEAD

    return cut(jobs, weight, limit)


def cut(jobs: list[Job], weight: Callable[[Job], float], limit: float) -> list[list[Job]]:
    """``jobs`` in order, in parts whose ``weight`` sums to at most ``limit`` (a job heavier alone is a part alone)."""
    parts: list[list[Job]] = [[]]
    held = 0.0
    for j in jobs:
        w = weight(j)
        if parts[-1] and held + w > limit:
            parts.append([])
            held = 0.0
        parts[-1].append(j)
        held += w
    return parts


def image_line_mb(model: ModelSpec) -> float:
    """What one image's results line may weigh, in MiB: the model's largest size in its price table
    (``per_image_quality``, ``per_image``) at ``IMAGE_BYTES_PER_PIXEL``."""
    sizes = {k for t in (model.per_image_quality or {}).values() for k in t} | set(model.per_image or {})
    pixels = [int(m[1]) * int(m[2]) for k in sizes if (m := _SIZE.match(k))]
    return max(pixels, default=FALLBACK_PIXELS) * IMAGE_BYTES_PER_PIXEL / 2**20


def results_cap(model: ModelSpec, max_mb: float) -> int | None:
    """The most members a batch of ``model`` may hold so that its results file weighs at most ``max_mb``
    (``Settings.batch_results_max_mb``): an image model's, at least 1; None for text, whose answers weigh
    what the input limit already bounds (``file_parts``)."""
    if model.kind != "image":
        return None
    return max(1, int(max_mb // image_line_mb(model)))
