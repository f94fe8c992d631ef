"""The results a cache resolved lately, kept so a re-admission after the hub lost them gets them again."""

from __future__ import annotations

from collections import OrderedDict

from engine.core.result import Result
from engine.core.tool_calls import calls_bytes

__all__ = ["Delivered"]

PER_RESULT_BYTES = 256  # about what a result holds besides its output


class Delivered:
    """Oldest first, bounded by count and by the bytes of the outputs held: a reused result holds its output,
    which the memory layer's limit does not see (a helper's hunt, stop 54: 65,536 results of 16 kB held 1 GB).
    Past either bound the oldest go; a re-admission of one of those is generated again, as before the bound."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._d: OrderedDict[str, tuple[Result, float]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, uid: str) -> bool:
        return uid in self._d

    def __getitem__(self, uid: str) -> tuple[Result, float]:
        return self._d[uid]

    def put(self, result: Result, price: float) -> None:
        self.pop(result.uid)
        self._d[result.uid] = (result, price)
        self.bytes += _size(result)
        while self._d and (len(self._d) > self.max_entries or self.bytes > self.max_bytes):
            _, (old, _) = self._d.popitem(last=False)
            self.bytes -= _size(old)

    def pop(self, uid: str) -> None:
        held = self._d.pop(uid, None)
        if held is not None:
            self.bytes -= _size(held[0])


def _size(r: Result) -> int:
    return len(r.output or "") + calls_bytes(r.tool_calls) + PER_RESULT_BYTES
