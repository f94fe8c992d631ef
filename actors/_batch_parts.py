"""How a dispatch to a batch API is cut to the provider's limit on one batch's size (OpenAI's 200 MB input
file, Anthropic's 256 MB create; ``batch_api.max_file_mb``); ``cut`` also makes the parts of a batch a full batch
queue refused, by their input tokens (``actors._queue_full``)."""

from __future__ import annotations

import json
from collections.abc import Callable

from actors._types import Job

__all__ = ["LINE_OVERHEAD", "cut", "file_parts"]

LINE_OVERHEAD = 1024  # bytes a batch line adds to its request's body or prompt, at most (ids, url, model, caps)


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
