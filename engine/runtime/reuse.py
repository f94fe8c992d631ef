"""The reuse index: exact fingerprints and near-duplicate vectors of generated results.

Plain and I/O-free: the simulator uses it directly, and the cache actor wraps it. Only generated results are
indexed (a reused result is not a new source), each with the time its result exists, which may lie in the
future while the request is in flight.

Near-duplicate search is exact (one matrix product) while a class is small. A class past ``BRUTE_MAX``
entries gets an inverted-file index: rows are filed under their nearest of about sqrt(n) centroids, and a
query scores only the rows of its ``nprobe`` nearest cells. A near-duplicate lies so close to its source
(cosine >= the threshold) that both fall in the same or a neighbouring cell, so the probe finds it while
scoring a few percent of the rows (``benchmarks/bench_cache.py`` measures the agreement with exact search).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from engine.core.similarity import Guards, Traits, guard_between, traits

__all__ = ["BRUTE_MAX", "NearHit", "ReuseIndex", "Top"]

BRUTE_MAX = 8192  # rows up to which a class is searched exactly
NPROBE = 4  # cells probed per query once a class is indexed
_KMEANS_ITERS = 4
_KMEANS_SAMPLE = 20_000


class NearHit(NamedTuple):
    source: Hashable
    done_at: float
    similarity: float


class Top(NamedTuple):
    """The best row for a query: its source, time and cosine; ``traits()`` reads what the guards compare (once
    per row, and only for a row that clears the threshold)."""

    source: Hashable
    done_at: float
    similarity: float
    rows: _Rows
    j: int

    def traits(self) -> Traits:
        return self.rows.traits(self.j)


class _Rows:
    """A growable float32 matrix with one source, text and time per row."""

    __slots__ = ("mat", "n", "sources", "texts", "done", "_t", "_traits")

    def __init__(self, dim: int, cap: int = 16):
        self.mat = np.empty((cap, dim), dtype=np.float32)
        self._t: np.ndarray | None = None
        self._traits: dict[int, Traits] = {}  # read on a row's first match, kept for the next
        self.n = 0
        self.sources: list[Hashable] = []
        self.texts: list[str] = []
        self.done: list[float] = []

    def add(self, vecs: np.ndarray, sources: Sequence[Hashable], texts: Sequence[str],
            done: Sequence[float]) -> None:
        need = self.n + len(vecs)
        if need > self.mat.shape[0]:
            grown = np.empty((max(need, 2 * self.mat.shape[0]), self.mat.shape[1]), dtype=np.float32)
            grown[: self.n] = self.mat[: self.n]
            self.mat = grown
        self.mat[self.n:need] = vecs
        self.n = need
        self._t = None
        self.sources.extend(sources)
        self.texts.extend(texts)
        self.done.extend(done)

    def view(self) -> np.ndarray:
        return self.mat[: self.n]

    def traits(self, j: int) -> Traits:
        t = self._traits.get(j)
        if t is None:
            t = self._traits[j] = traits(self.texts[j])
        return t

    def scan_t(self) -> np.ndarray:
        """The rows folded to half the dimensions, transposed and contiguous, kept until the next add."""
        if self._t is None:
            self._t = np.ascontiguousarray(_fold(self.mat[: self.n]).T)
        return self._t


def _fold(x: np.ndarray) -> np.ndarray:
    """Unit rows of half the width: column c + column c + d/2. The features hash a gram to column
    h mod d, so this is exactly the vector hashing into d/2 columns would give, at half the bytes to read."""
    half = x.shape[1] // 2
    f = x[:, :half] + x[:, half:2 * half]
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return f / norms


class _Shelf:
    """One near-duplicate class (tenant scope + compatibility key): flat rows, or cells of an inverted file."""

    __slots__ = ("dim", "flat", "centroids", "cells", "n", "built_at", "seed")

    def __init__(self, dim: int, seed: int):
        self.dim = dim
        self.flat: _Rows | None = _Rows(dim)
        self.centroids: np.ndarray | None = None
        self.cells: list[_Rows] = []
        self.n = 0
        self.built_at = 0
        self.seed = seed

    def add(self, vecs: np.ndarray, sources: Sequence[Hashable], texts: Sequence[str],
            done: Sequence[float]) -> None:
        self.n += len(vecs)
        if self.centroids is None:
            self.flat.add(vecs, sources, texts, done)
            if self.flat.n > BRUTE_MAX:
                self._build()
            return
        cell = np.argmax(vecs @ self.centroids.T, axis=1)
        for c in np.unique(cell):
            sel = np.flatnonzero(cell == c)
            self.cells[c].add(vecs[sel], [sources[k] for k in sel], [texts[k] for k in sel],
                              [done[k] for k in sel])
        if self.n > 4 * self.built_at:  # re-cluster as the class grows, so cells stay about sqrt(n) rows
            self._build()

    def _all_rows(self) -> _Rows:
        if self.centroids is None:
            return self.flat
        out = _Rows(self.dim, self.n)
        for c in self.cells:
            out.add(c.view(), c.sources, c.texts, c.done)
        return out

    def _build(self) -> None:
        rows = self._all_rows()
        x = rows.view()
        rng = np.random.default_rng(self.seed)
        k = int(np.clip(np.sqrt(len(x)), 64, 2048))
        sample = x[rng.choice(len(x), min(len(x), _KMEANS_SAMPLE), replace=False)]
        cent = sample[rng.choice(len(sample), k, replace=False)].copy()
        for _ in range(_KMEANS_ITERS):  # spherical k-means on a sample: cells need only be roughly balanced
            lab = np.argmax(sample @ cent.T, axis=1)
            sums = np.zeros_like(cent)
            np.add.at(sums, lab, sample)
            norms = np.linalg.norm(sums, axis=1)
            live = norms > 0
            cent[live] = sums[live] / norms[live, None]
        cell = np.argmax(x @ cent.T, axis=1)
        self.centroids = cent
        self.cells = [_Rows(self.dim) for _ in range(k)]
        for c in range(k):
            sel = np.flatnonzero(cell == c)
            if sel.size:
                self.cells[c].add(x[sel], [rows.sources[j] for j in sel], [rows.texts[j] for j in sel],
                                  [rows.done[j] for j in sel])
        self.flat = None
        self.built_at = self.n

    def top1(self, q: np.ndarray) -> list[tuple[_Rows, int, float] | None]:
        """Best row per query (rows object, row index, cosine)."""
        m = len(q)
        if self.n == 0:
            return [None] * m
        if self.centroids is None:
            sims = q @ self.flat.view().T
            j = np.argmax(sims, axis=1)
            s = sims[np.arange(m), j]
            return [(self.flat, int(j[i]), float(s[i])) for i in range(m)]
        coarse = q @ self.centroids.T
        nprobe = min(NPROBE, len(self.centroids))
        probes = np.empty((m, nprobe), dtype=np.int64)
        rows = np.arange(m)
        for p in range(nprobe):  # nprobe argmax passes beat one argpartition for a handful of probes
            probes[:, p] = best = coarse.argmax(axis=1)
            coarse[rows, best] = -np.inf
        probes = probes.ravel()
        # Visit each probed cell once, scoring all the queries that probe it in one product.
        order = np.argsort(probes, kind="stable")
        cells_sorted = probes[order]
        queries_sorted = order // nprobe
        starts = np.flatnonzero(np.r_[True, cells_sorted[1:] != cells_sorted[:-1]])
        ends = np.r_[starts[1:], len(order)]
        s_out = np.full(len(order), -np.inf, dtype=np.float32)
        j_out = np.zeros(len(order), dtype=np.int64)
        qf = _fold(q)
        for a, b in zip(starts.tolist(), ends.tolist()):
            cell = self.cells[cells_sorted[a]]
            if cell.n:
                qs = queries_sorted[a:b]
                # Scan at half width (half the memory traffic, which is what bounds this loop), then score
                # each cell's winner exactly, so a reported similarity is always the full-width cosine.
                j = (qf[qs] @ cell.scan_t()).argmax(axis=1)
                j_out[a:b] = j
                s_out[a:b] = np.einsum("ij,ij->i", q[qs], cell.mat[j])
        # Back to (query, probe) order; the best probe per query wins.
        s_qp = np.empty_like(s_out)
        s_qp[order] = s_out
        j_qp = np.empty_like(j_out)
        j_qp[order] = j_out
        s_qp, j_qp, c_qp = s_qp.reshape(m, nprobe), j_qp.reshape(m, nprobe), probes.reshape(m, nprobe)
        k = s_qp.argmax(axis=1)
        out: list[tuple[_Rows, int, float] | None] = []
        for i, ki in enumerate(k.tolist()):
            s = float(s_qp[i, ki])
            out.append(None if s == -np.inf else (self.cells[c_qp[i, ki]], int(j_qp[i, ki]), s))
        return out


class ReuseIndex:
    def __init__(self, dim: int, *, seed: int = 0):
        self.dim = dim
        self.seed = seed
        self._exact: dict[str, tuple[Hashable, float]] = {}
        self._shelves: dict[Hashable, _Shelf] = {}

    def __len__(self) -> int:
        return len(self._exact)

    @property
    def near_entries(self) -> int:
        return sum(s.n for s in self._shelves.values())

    def add(self, fp: str, source: Hashable, done_at: float, *, near_key: Hashable | None = None,
            vec: np.ndarray | None = None, text: str = "") -> None:
        prev = self._exact.get(fp)
        if prev is None or done_at < prev[1]:
            self._exact[fp] = (source, done_at)
        if near_key is not None and vec is not None:
            self.add_near(near_key, vec[None, :], [source], [text], [done_at])

    def add_near(self, near_key: Hashable, vecs: np.ndarray, sources: Sequence[Hashable],
                 texts: Sequence[str], done: Sequence[float]) -> None:
        """Index many rows of one class in one step."""
        shelf = self._shelves.get(near_key)
        if shelf is None:
            shelf = self._shelves[near_key] = _Shelf(self.dim, self.seed)
        shelf.add(np.asarray(vecs, dtype=np.float32), sources, texts, done)

    def exact(self, fp: str) -> tuple[Hashable, float] | None:
        return self._exact.get(fp)

    def near(self, near_key: Hashable, vec: np.ndarray, text: str, threshold: float,
             guards: Guards = Guards()) -> NearHit | None:
        """Top-1 cosine match in the class, refused unless it clears ``threshold`` and every guard."""
        return self.near_many(near_key, vec[None, :], [text], threshold, guards)[0]

    def near_many(self, near_key: Hashable, vecs: np.ndarray, texts: Sequence[str], threshold: float,
                  guards: Guards = Guards()) -> list[NearHit | None]:
        """``near`` for many queries of one class at once (one matrix product per probed cell)."""
        out: list[NearHit | None] = []
        for text, top in zip(texts, self.top_many(near_key, vecs)):
            # Precision first: only the top match is considered; a guard that refuses it means no hit,
            # never a fall-back to a weaker candidate.
            out.append(None if top is None or top.similarity < threshold
                       or guard_between(traits(text), top.traits(), guards) is not None
                       else NearHit(top.source, top.done_at, top.similarity))
        return out

    def top_many(self, near_key: Hashable, vecs: np.ndarray) -> list[Top | None]:
        """The best row of the class per query, before any threshold or guard."""
        shelf = self._shelves.get(near_key)
        if shelf is None:
            return [None] * len(vecs)
        return [None if best is None else Top(best[0].sources[best[1]], best[0].done[best[1]], best[2], *best[:2])
                for best in shelf.top1(np.asarray(vecs, dtype=np.float32))]

    def __repr__(self) -> str:
        return f"ReuseIndex(exact={len(self._exact)}, near_classes={len(self._shelves)})"
