"""How a dispatch to a batch API is cut to the provider's limit on one batch's size (OpenAI's 200 MB input
file, Anthropic's 256 MB create; ``batch_api.max_file_mb``); ``cut`` also makes the parts of a batch a full batch
queue refused, by their input tokens (``actors._queue_full``); ``results_parts`` cuts an image dispatch by its
lines' bounds (``image_line_bytes``), so that the dispatcher holds at most ``batch_results_max_mb`` of images when
it reads one batch's results."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from actors._types import Job
from engine.core.catalog import Catalog, ModelSpec
from engine.core.request import Request

__all__ = ["BYTES_PER_PIXEL", "FETCH_CALLS", "LINE_OVERHEAD", "cut", "file_parts", "image_line_bytes", "line_bound",
           "read_bound_s", "results_parts", "text_line_bytes"]

FETCH_CALLS = 3  # calls a results read may make (a poll, the output file, the error file), each up to timeout_s

LINE_OVERHEAD = 1024  # bytes a batch line adds to its request's body or prompt, at most (ids, url, model, caps)
# A results line holds its image in base64 (a third more than the file). The most a file may weigh, a pixel, by
# the format asked (``output_format``, png by default). A png that does not compress (a transparent one at high
# quality: noise-like detail in four channels) is its raw 8-bit RGBA, 4 bytes, and deflate stores such data as it
# is. The bound was 3 bytes (RGB), an opaque one's: 85 transparent 1536x1024 lines of 8 MiB were ~680 MiB in a
# read bounded at 512 (a review). webp lossless tops out at its raw RGBA too (3.99 measured on noise). A jpeg at
# 100 % can pass its raw RGB: 4.1 bytes a pixel on noise, 4.7 on black-and-white noise (measured, 4:4:4), so 6.
# The quality asked (low, medium, high) changes the detail, not the pixels: the bound is the same at every one.
BYTES_PER_PIXEL = {"png": 4.0, "webp": 4.0, "jpeg": 6.0}
PNG_SLACK = 1.01  # what a png adds to its pixels: a filter byte a row, deflate's stored blocks, 12 bytes a chunk
FILE_OVERHEAD = 64 * 1024  # a file's own headers and ancillary chunks (a colour profile, text): a bound
LOGPROB_ENTRY = 96  # a logprobs entry's fields beside its token: its logprob, the keys and brackets
RESULT_OVERHEAD = 8 * 1024  # a results line's fields beside its image (custom_id, ids, status, usage, size)
FALLBACK_PIXELS = (1536, 1024)  # a model whose price table names no WxH size: OpenAI's largest gpt-image size
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def file_parts(jobs: list[Job], limit_mb: float | None, cpt: float) -> list[list[Job]]:
    """``jobs`` in order, cut into parts whose requests weigh at most 95 % of the provider's limit (the
    margin covers what the provider's body adds to a request: model, caps, the line's own fields). A
    request is weighed by its body or prompt as JSON, and at least by its input tokens as text, which is
    what a request sent at its recorded size sends (``message_parts``): that text holds its prompt, whose
    characters past ASCII and JSON escapes weigh more than a byte each. An image's body that names no prompt is
    sent with the request's own beside it (``OpenAIProvider.body``, ``GeminiProvider.inline_request``): both."""
    if limit_mb is None:
        return [jobs]
    limit = 0.95 * limit_mb * 2**20

    def weight(j: Job) -> float:
        r = j.req
        prompt = len(json.dumps(r.prompt, ensure_ascii=False).encode())
        raw = len(json.dumps(r.body if r.body is not None else r.prompt, ensure_ascii=False).encode())
        if r.kind == "image" and isinstance(r.body, dict) and not isinstance(r.body.get("prompt"), str):
            raw += prompt  # its declared input_tokens need not cover it (a trace's recorded size)
        return max(raw, r.input_tokens * cpt + prompt - len(r.prompt)) + LINE_OVERHEAD

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


def _pixels(model: ModelSpec, size: object) -> tuple[int, int]:
    """``size`` ("WxH") as pixels; any other (none, "auto") the model's largest in its price table."""
    if isinstance(size, str) and (m := _SIZE.match(size)):
        return int(m[1]), int(m[2])
    sizes = {k for t in (model.per_image_quality or {}).values() for k in t} | set(model.per_image or {})
    pixels = [(int(m[1]), int(m[2])) for k in sizes if (m := _SIZE.match(k))]
    return max(pixels, key=lambda wh: wh[0] * wh[1], default=FALLBACK_PIXELS)


def image_line_bytes(model: ModelSpec, req: Request | None = None) -> int:
    """The most one image's results line may weigh, in bytes: the image at the size and format ``req`` asks (its
    body's, else its params'; without one, the model's largest size as a png), stored as it comes from the pixels
    (``BYTES_PER_PIXEL``, a png's filter bytes and framing), in base64, with the line's own fields and the prompt
    as JSON (a model that gives a revised prompt echoes one). A true bound: a read cut by it must not overrun."""
    body = (req.body or {}) if req is not None else {}
    params = req.params if req is not None else {}
    w, h = _pixels(model, body.get("size", params.get("size")))
    fmt = body.get("output_format", params.get("output_format", "png"))
    per_pixel = BYTES_PER_PIXEL.get(fmt if isinstance(fmt, str) else "", max(BYTES_PER_PIXEL.values()))
    image = math.ceil((w * h * per_pixel + h) * PNG_SLACK) + FILE_OVERHEAD
    prompt = body.get("prompt") or (req.prompt if req is not None else "")
    echo = 6 * len(prompt) if isinstance(prompt, str) else 0  # as JSON (\uXXXX): 6 bytes a character at most
    return 4 * math.ceil(image / 3) + RESULT_OVERHEAD + echo


def text_line_bytes(model: ModelSpec, req: Request, cpt: float) -> int:
    """A bound of a text answer's results line, for the time its read may take (``batch_results_min_kib_s``), not
    the memory it holds: its output cap (the request's, else the model's) at ``cpt`` characters a token (4 at
    least), each up to 6 bytes as JSON (``\\uXXXX``), with the line's own fields. Asked for (``logprobs``), each
    token is written again with its bytes and its ``top_logprobs`` alternatives (``LOGPROB_ENTRY``): a line 7
    times its answer, 120 times with 20 alternatives, whose read, bounded by the answer alone, was cut however
    fast it went. A Responses model's answer echoes its request's fields but its input (``instructions``,
    ``tools``, ``text``)."""
    cap = req.max_output_tokens or model.max_output_tokens
    chars = max(cpt, 4.0)
    body = req.body or {}
    top = body.get("top_logprobs")
    entries = 0
    if body.get("logprobs") or any("logprobs" in str(x) for x in body.get("include") or ()):
        entries = 1 + (top if type(top) is int and top > 0 else 0)
    # An entry's token as JSON (12 bytes a character at most) and its bytes (4 a character, each "255, ")
    token = 6 * chars + entries * (LOGPROB_ENTRY + 32 * chars)
    echo = len(json.dumps({k: v for k, v in body.items() if k not in ("input", "messages")}, default=str)) \
        if model.api == "responses" else 0
    return math.ceil(cap * token) + RESULT_OVERHEAD + echo


def results_parts(parts: list[list[Job]], line_bytes: Callable[[Job], int | None], max_mb: float) -> list[list[Job]]:
    """``parts`` cut again so that the results of each weigh at most ``max_mb`` MiB
    (``Settings.batch_results_max_mb``): by ``line_bytes``, an image's bound (``image_line_bytes``); None for
    text, whose answers weigh what the input limit already bounds (``file_parts``) and are not cut by it. A line
    heavier than the bound alone is a part alone."""
    limit = max_mb * 2**20
    return [q for p in parts for q in (cut(p, lambda j: line_bytes(j) or 0, limit)
                                       if any(line_bytes(j) is not None for j in p) else [p])]


def line_bound(catalog: Catalog, provider: str, req: Request) -> int | None:
    """The bound of ``req``'s results line (``image_line_bytes``): None for a model that is no image one."""
    spec = catalog.model(provider, req.model)
    return image_line_bytes(spec, req) if spec.kind == "image" else None


def read_bound_s(catalog: Catalog, settings: Any, provider: str, cjobs: Sequence[Any]) -> float:
    """Real seconds a try at reading the results of a batch of ``cjobs`` (``CallJob`` s) may take: its calls'
    timeouts and the results' size bound (the sum of its lines' bounds) at ``batch_results_min_kib_s``. Each
    call's timeout bounds only the wait between chunks: a server that trickled a byte inside it held the read for
    as long as it went on. Never capped at ``batch_results_max_mb``: text is not cut by it, and a text batch
    heavier (50,000 answers of 4,000 tokens: 800 MB) read faster than the floor rate was cut at every try, then
    failed whole. The dispatcher's reads (``ResultsReads._read_bound_s``) and a resume's
    (``engine.app._batch_rescue``) are bounded by it."""
    size = sum(line_bound(catalog, provider, j.req) or text_line_bytes(catalog.model(provider, j.req.model), j.req,
                                                                        settings.chars_per_token) for j in cjobs)
    timeout_s = settings.providers.endpoints[provider].timeout_s
    return FETCH_CALLS * timeout_s + size / (settings.batch_results_min_kib_s * 1024)
