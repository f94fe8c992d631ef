"""An ended Gemini native batch's operation (``GET v1beta/batches/{id}``), read as it arrives (``gemini_http``).

Its inline responses hold each image in base64, and the answer holds them twice (``metadata.output`` and
``response``, as the emulator and the batch guide's REST example give it). Read whole and parsed, the body, its text
and the parsed copies of both were about 6 times the images at once (``benchmarks/bench_gemini_parse.py``: 6.01x
at 20 images of 1 MB). Here the bytes are scanned as they come: each member of
``metadata.output.inlinedResponses.inlinedResponses`` is parsed alone once its last byte is in and its bytes
let go, ``response`` is passed over unheld, and the rest (names, state, counts: small) is parsed at the end. The
peak is then the members parsed so far and one member's bytes (1.2x in the same bench).

The scan is JSON's own grammar reduced to what finds those places: strings (with their escapes: a ``"`` or a
bracket inside one is text) and the brackets, commas and colons outside them. Whatever it passes on is parsed by
``json``, so an answer that is not JSON, or is cut short, raises ``ValueError`` as a whole read did."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["OPERATION_DROPPED", "PAGE_DROPPED", "STREAMED", "read_operation"]

# The SDK's own request header for an answer handed back unread (what its ``with_streaming_response`` sets).
STREAMED = {"X-Stainless-Raw-Response": "stream"}

_RESPONSES = ("metadata", "output", "inlinedResponses", "inlinedResponses")  # parsed one member at a time
_DROPPED = ("response",)  # the same responses again: never held (the handle keeps no ``response``)
OPERATION_DROPPED = (_DROPPED,)
# A lookup's page (``GET v1beta/batches``): each listed operation's responses, both copies, passed over (null).
PAGE_DROPPED = (("operations", "*", "response"), ("operations", "*", "metadata", "output"))
_OUTSIDE = re.compile(rb'[{}\[\],:"]')
_INSIDE = re.compile(rb'["\\]')
_NORMAL, _MEMBERS, _SKIP = 0, 1, 2


class _Scan:
    """The scan's state between chunks (a string, a key or a member may run across any number of them)."""

    def __init__(self, members: bool, dropped: tuple[tuple[str, ...], ...]) -> None:
        self._keep = members  # the members parsed (a fetch), or passed over as ``response`` is (a poll)
        self._dropped = dropped  # the values passed over unheld, each left null
        self.rest = bytearray()  # the operation but its members' array (``[]``) and ``response`` (``null``)
        self.members: list | None = None
        self._stack: list[list] = []  # outside the two: [is an object, its current key, a key is next]
        self._mode = _NORMAL
        self._depth = 0  # brackets open within the member being read (``_MEMBERS``) or the value passed over
        self._member = bytearray()
        self._comma = False  # a member ended at a comma: another must follow
        self._in_str = self._escaped = False
        self._key: list[bytes] | None = None  # an object key's bytes so far, while one is read (``_NORMAL``)
        self._kstart = 0  # where that key's bytes start in the current chunk

    def feed(self, chunk: bytes) -> None:
        i, start, n = 0, 0, len(chunk)  # start: the first byte not yet handed to the mode's sink
        while i < n:
            if self._in_str:
                if self._escaped:
                    i, self._escaped = i + 1, False
                    continue
                m = _INSIDE.search(chunk, i)
                if m is None:
                    break
                j = m.start()
                if chunk[j] == 0x5C:  # a backslash: the next byte is escaped, in this chunk or the next
                    i, self._escaped = j + 2, j + 1 >= n
                    continue
                self._in_str, i = False, j + 1
                if self._key is not None:
                    self._key.append(chunk[self._kstart:j])
                    frame = self._stack[-1]
                    frame[1], frame[2], self._key = json.loads(b'"' + b"".join(self._key) + b'"'), False, None
                continue
            m = _OUTSIDE.search(chunk, i)
            if m is None:
                break
            j, i = m.start(), m.start() + 1
            start = self._structural(chunk, j, start)
        if self._key is not None:  # a key runs into the next chunk
            self._key.append(chunk[self._kstart:])
            self._kstart = 0
        self._sink(chunk, start, n)

    def _sink(self, chunk: bytes, start: int, end: int) -> None:
        if self._mode == _NORMAL:
            self.rest += chunk[start:end]
        elif self._mode == _MEMBERS:
            self._member += chunk[start:end]

    def _structural(self, chunk: bytes, j: int, start: int) -> int:
        """The byte ``chunk[j]`` outside any string; returns the new start of the mode's sink."""
        c = chunk[j]
        if c == 0x22:  # "
            self._in_str = True
            top = self._stack[-1] if self._mode == _NORMAL and self._stack else None
            if top is not None and top[0] and top[2]:
                self._key, self._kstart = [], j + 1
            return start
        if self._mode == _NORMAL:
            return self._normal(chunk, c, j, start)
        if c in (0x7B, 0x5B):  # { [
            self._depth += 1
            return start
        if c in (0x7D, 0x5D) and self._depth:  # } ]
            self._depth -= 1
            if self._mode == _SKIP and not self._depth:  # the value passed over ends here
                self._mode = _NORMAL
                return j + 1
            return start
        if self._mode == _SKIP or self._depth or c == 0x3A:  # within a value, or a colon
            return start
        if c == 0x2C or c == 0x5D:  # a member ends (a comma), or the members do (])
            self._member += chunk[start:j]
            self._end_member(last=c == 0x5D)
            if c == 0x5D:
                self._mode = _NORMAL
            return j + 1
        raise ValueError("a batch's inlinedResponses closed with '}'")

    def _end_member(self, last: bool) -> None:
        if self._member.strip():
            # Let the bytes go before the next member's arrive: one member's bytes held at a time.
            member, self._member = self._member, bytearray()
            self.members.append(json.loads(member))
        elif not last or self._comma:  # "[,", ",," or ",]": not JSON
            raise ValueError("a batch's inlinedResponses holds an empty member")
        self._comma = not last

    def _normal(self, chunk: bytes, c: int, j: int, start: int) -> int:
        stack = self._stack
        if c in (0x7B, 0x5B):  # { [: a value opens
            path = tuple(f[1] if f[0] else "*" for f in stack)
            if path in self._dropped or (path == _RESPONSES and c == 0x5B):
                self.rest += chunk[start:j] + (b"null" if path in self._dropped else b"[]")
                if path in self._dropped or not self._keep:
                    self._mode, self._depth = _SKIP, 1
                else:  # a later copy of the field replaces an earlier one, as in a parse of the whole
                    self._mode, self._depth, self.members, self._comma = _MEMBERS, 0, [], False
                return j + 1
            stack.append([c == 0x7B, None, c == 0x7B])
        elif c in (0x7D, 0x5D):
            if not stack:
                raise ValueError(f"an unmatched {chr(c)!r} in a batch's answer")
            stack.pop()
        elif stack and stack[-1][0]:
            stack[-1][2] = c == 0x2C  # after a comma a key is next; after a colon its value
        return start

    def end(self) -> tuple[Any, list | None]:
        if self._in_str or self._stack or self._mode != _NORMAL:
            raise ValueError("a batch's answer was cut short (it ends inside a value)")
        op = json.loads(self.rest)
        # A key given twice on the way to the members (``metadata``, ``output``, ...): a parse keeps its last value,
        # which may hold no list where an earlier one held members (the scan kept those). The members stand only
        # where the parse keeps the list the scan left (``[]``): the last list there is the one it keeps.
        at = op
        for key in _RESPONSES:
            at = at.get(key) if isinstance(at, dict) else None
        return op, self.members if isinstance(at, list) else None


async def read_operation(chunks: AsyncIterator[bytes], members: bool = True,
                         dropped: tuple[tuple[str, ...], ...] = OPERATION_DROPPED) -> tuple[Any, list | None]:
    """The operation ``chunks`` make, without its inline responses (an empty list where they were, ``response``
    null), and the members of ``metadata.output.inlinedResponses.inlinedResponses`` (None where a parse
    of the whole finds no list there; always None unless ``members``: a poll's read, which keeps none, passes them
    over). ``dropped``: the values passed over (null), an operation's ``response`` unless told (a lookup's page:
    ``PAGE_DROPPED``). ``ValueError`` where the bytes are not JSON or end early."""
    scan = _Scan(members, dropped)
    async for chunk in chunks:
        scan.feed(chunk)
    return scan.end()
