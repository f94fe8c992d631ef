"""The reuse index: exact fingerprints and near-duplicate vectors of generated results.

Plain and I/O-free: the simulator uses it directly, and the cache actor wraps it. Only generated results are
indexed (a reused result is not a new source), each with the time its result exists, which may lie in the
future while the request is in flight.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import numpy as np

from engine.similarity import Guards, guard_reason

__all__ = ["NearHit", "ReuseIndex"]


class NearHit(NamedTuple):
    source: int
    done_at: float
    similarity: float


class _Shelf:
    """Growing float32 matrix of one near-duplicate class (tenant scope + compatibility key)."""

    __slots__ = ("mat", "n", "sources", "texts", "done")

    def __init__(self, dim: int):
        self.mat = np.empty((16, dim), dtype=np.float32)
        self.n = 0
        self.sources: list[int] = []
        self.texts: list[str] = []
        self.done: list[float] = []

    def add(self, vec: np.ndarray, source: int, text: str, done_at: float) -> None:
        if self.n == self.mat.shape[0]:
            self.mat = np.concatenate([self.mat, np.empty_like(self.mat)])
        self.mat[self.n] = vec
        self.n += 1
        self.sources.append(source)
        self.texts.append(text)
        self.done.append(done_at)


class ReuseIndex:
    def __init__(self, dim: int):
        self.dim = dim
        self._exact: dict[str, tuple[int, float]] = {}
        self._shelves: dict[Hashable, _Shelf] = {}

    def __len__(self) -> int:
        return len(self._exact)

    def add(self, fp: str, source: int, done_at: float, *, near_key: Hashable | None = None,
            vec: np.ndarray | None = None, text: str = "") -> None:
        prev = self._exact.get(fp)
        if prev is None or done_at < prev[1]:
            self._exact[fp] = (source, done_at)
        if near_key is not None and vec is not None:
            shelf = self._shelves.get(near_key)
            if shelf is None:
                shelf = self._shelves[near_key] = _Shelf(self.dim)
            shelf.add(vec, source, text, done_at)

    def exact(self, fp: str) -> tuple[int, float] | None:
        return self._exact.get(fp)

    def near(self, near_key: Hashable, vec: np.ndarray, text: str, threshold: float,
             guards: Guards = Guards()) -> NearHit | None:
        """Top-1 cosine match in the class, refused unless it clears ``threshold`` and every guard."""
        shelf = self._shelves.get(near_key)
        if shelf is None or shelf.n == 0:
            return None
        sims = shelf.mat[: shelf.n] @ vec
        j = int(np.argmax(sims))
        s = float(sims[j])
        if s < threshold or guard_reason(text, shelf.texts[j], guards) is not None:
            return None
        return NearHit(shelf.sources[j], shelf.done[j], s)

    def __repr__(self) -> str:
        return f"ReuseIndex(exact={len(self._exact)}, near_classes={len(self._shelves)})"
