"""A batch's results file read a line at a time (``jsonl_records``, ``jsonl_stream``), and whether a read is whole
(``whole_read``): the lines the batch answered, none of them cut short at the end of the read."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from engine.core.errors import ProviderError

__all__ = ["CUT_READS", "CutTail", "jsonl_records", "jsonl_stream", "whole_read"]

_CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
CUT_READS = 2  # reads of a batch's results that end inside a line, made again before that line counts as unread


class CutTail(str):
    """The ``custom_id`` ("" where it names none) of a read's last line that is no JSON and has no end: the read
    may have been cut inside it (a stream ended early, a proxy's cut). Counted as a line that cannot be read, as a
    garbled one is (it is the member's: a ``str``), once ``CUT_READS`` reads ended so."""


def jsonl_records(text: str) -> tuple[list[dict], list[str | None]]:
    """A batch's results file, each line read on its own: the lines that are JSON objects, and for each other
    line the ``custom_id`` its text names (None where it names none; a last line with no end: ``CutTail``). Read
    whole, one line cut short failed the file, and every member, finished and billed, was sent again (a hunt).
    Lines end at "\\n" only: ``str.splitlines`` also splits at U+2028, U+2029 and U+0085, which JSON leaves
    unescaped inside strings."""
    records: list[dict] = []
    unread: list[str | None] = []
    *lines, tail = text.split("\n")
    for line in lines:
        _read_line(line, records, unread)
    _read_line(tail, records, unread, tail=True)
    return records, unread


def _read_line(line: str, records: list[dict], unread: list[str | None], tail: bool = False) -> None:
    if not line.strip():
        return
    try:
        rec = json.loads(line)
    except ValueError:
        rec = None
    if isinstance(rec, dict):
        records.append(rec)
    else:
        m = _CUSTOM_ID.search(line)
        cid = m.group(1) if m else None
        unread.append(CutTail(cid or "") if tail else cid)


async def jsonl_stream(chunks: AsyncIterator[bytes]) -> tuple[list[dict], list[str | None]]:
    """``jsonl_records`` of a results file read as it arrives, a line at a time: an image batch's output holds a
    base64 image of 1-2 MB per line, and read whole, the file's text, its lines and their records were three
    copies of every image at once (a batch of 1,000 images: gigabytes). Split at b"\\n" before decoding: that
    byte never sits inside a UTF-8 character, and a line cut short at the end is read (and counted) as one."""
    records: list[dict] = []
    unread: list[str | None] = []
    pieces: list[bytes] = []  # a line's so far, joined at its end (tail + chunk rescanned 2 MB lines: quadratic)
    async for chunk in chunks:
        *ends, rest = chunk.split(b"\n")
        for end in ends:
            _read_line(b"".join([*pieces, end]).decode("utf-8", errors="replace"), records, unread)
            pieces.clear()
        pieces += [rest] if rest else []
    _read_line(b"".join(pieces).decode("utf-8", errors="replace"), records, unread, tail=True)
    return records, unread


def whole_read(records: list[dict], unread: list[str | None], expected: int, what: str, handle: Any = None) -> None:
    """Raise ``ProviderError`` when a results file read fewer lines than the batch says it answered
    (``expected``, from its request counts): the read was cut short (a stream ended early, a proxy's cut), and
    a member whose line was not read would be taken for one that never ran, sent again and paid twice (a fault
    hunt: 3 of 6 finished members). Raised, the read is made again (``Dispatcher._fetch``).

    Also when the read ended inside its last line (``CutTail``), for the first ``CUT_READS`` such reads of the
    batch ``handle``: the line counts toward ``expected``, so a cut in the last line passed, and its member
    failed possibly billed though its answer was at the provider (a helper's hunt: 1 of 2 finished members)."""
    got = len(records) + len(unread)
    if got < expected:
        raise ProviderError(f"{what}: {got} result line(s) read of the {expected} the batch answered; the read was "
                            "cut short")
    if handle is not None and handle.cuts < CUT_READS and any(isinstance(u, CutTail) for u in unread):
        handle.cuts += 1
        raise ProviderError(f"{what}: the read ended inside its last line (not JSON, no end); the read was cut short")
