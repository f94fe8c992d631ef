"""The reuse index: exact fingerprints and near-duplicate vectors of generated results.

Plain and I/O-free: the simulator uses it directly, and the cache actor wraps it. Only generated results are
indexed (a reused result is not a new source), each with the time its result exists, which may lie in the
future while the request is in flight.

Near-duplicate search is exact (one matrix product) while a class is small. A class past ``BRUTE_MAX``
entries also gets an HNSW graph (usearch: int8 copies of the vectors, 16 links per node); a query
takes the graph's ``ANN_CANDIDATES`` nearest rows and scores them again at full precision, so a reported
similarity is always the exact float32 cosine (``benchmarks/bench_cache.py`` measures the agreement with exact
search). Rows go into the graph one call per ``add_near``, single-threaded, so the same adds give the same
graph and the simulator stays deterministic. Without usearch a class stays on exact search (slower past a few
thousand rows, never wrong).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from engine.core.features import compat_kind, near_min_threshold
from engine.core.similarity import Guards, Traits, guard_between, traits

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BRUTE_MAX", "NearHit", "ReuseIndex", "Top", "class_threshold", "near_threshold_unmet"]

BRUTE_MAX = 8192  # rows up to which a class is searched exactly
ANN_CANDIDATES = 4  # graph results re-scored exactly per query
# int8 copies (a quarter of the float32 bytes; the exact re-scoring undoes their rounding) and a search beam of
# 32: on the 100,000-entry benchmark it finds exact search's best match for 99.6 % of queries that have one
# in about 35 ms per 1,000 queries (a beam of 64: 100 %, about 70 ms; see docs/cache.md).
_HNSW_OPTIONS = {"metric": "ip", "dtype": "i8", "connectivity": 16, "expansion_add": 128, "expansion_search": 32}


def __getattr__(name: str) -> Any:
    """``_Hnsw``, usearch's index class (None without usearch), imported on first use. numpy and usearch load
    where a near class is indexed, not at import: every engine actor imports this module (Ray loads the class of
    each peer's handle it is given), and numpy cost a worker that indexes nothing about 90 ms of CPU at start."""
    if name != "_Hnsw":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from usearch.index import Index as graph
    except ImportError:  # an optional accelerator: exact search gives the same answers, more slowly
        graph = None
    globals()["_Hnsw"] = graph  # kept, so a test's monkeypatch of ``_Hnsw`` is what ``_graph_class`` reads
    return graph


def _graph_class() -> Any:
    return globals()["_Hnsw"] if "_Hnsw" in globals() else __getattr__("_Hnsw")


def class_threshold(near_key: Hashable, asked: float) -> float:
    """The threshold a class applies: ``asked`` (the policy's, at least the engine's floor), raised to the
    vectors' tuned minimum for the class's kind (``features.near_min_threshold``). Both runtimes key a class
    by ``features.near_class``, (tenant scope, compat key[, chat context]); a key of another shape (a
    benchmark's) has no kind and takes the strictest."""
    compat = near_key[1] if isinstance(near_key, tuple) and len(near_key) in (2, 3) else None
    return max(asked, near_min_threshold(compat_kind(compat) if isinstance(compat, tuple) else None))


def near_threshold_unmet(asked: float, near_floor: float) -> str | None:
    """Why a ``near_threshold`` a user set changes nothing, or None: below the floor in effect for every kind
    (``sim.near_floor``, raised to the vectors' tuned minimum of text, the lowest kind's, while the embedding is
    installed), each class applies that floor instead (``class_threshold``), and the value was accepted without a
    word (a helper's tour, stop 83: 0.88, 0.92 and 0.925 billed the same to the cent)."""
    text_min = near_min_threshold("text", load=False)
    floor = max(near_floor, text_min)
    if asked >= floor:
        return None
    why = (f"the embedding's tuned minimum for text ({text_min:g}; images and video "
           f"{near_min_threshold('image', load=False):g}), below which its matches are not precise enough"
           if text_min > near_floor else f"sim.near_floor ({near_floor:g})")
    return (f"near_threshold = {asked:g} is below the floor in effect, {floor:g}: {why}; every near-duplicate "
            f"match still needs {floor:g}, so the value changes nothing. Set near_threshold to {floor:g} or more "
            "to ask for more" + ("" if text_min > near_floor else ", or lower sim.near_floor first")
            + ", or leave it out")


class NearHit(NamedTuple):
    source: Hashable
    done_at: float
    similarity: float


class Top(NamedTuple):
    """The best row for a query: its source, time and cosine; ``traits()`` reads what the guards compare (once
    per row, and only for a row that clears the threshold). It keeps the row's text, so a row evicted while a
    lookup awaits (``ReuseIndex.drop_oldest``) can still be judged."""

    source: Hashable
    done_at: float
    similarity: float
    rows: _Rows
    j: int  # the row's id in its class: ids only grow, so eviction never renames a row
    text: str

    def traits(self) -> Traits:
        return self.rows.traits(self.j, self.text)


class _Rows:
    """A growable float32 matrix with one source, text and time per row, evicted oldest first. Row ``j`` (an
    id, stable for the row's life) sits at position ``j - base``; positions below ``start`` are evicted and
    reclaimed once they outnumber the live ones, so an eviction costs O(1) amortised, not a copy of the class."""

    __slots__ = ("mat", "n", "start", "base", "sources", "texts", "done", "_traits")

    def __init__(self, dim: int, cap: int = 16):
        import numpy as np
        self.mat = np.empty((cap, dim), dtype=np.float32)
        self._traits: dict[int, Traits] = {}  # read on a row's first match, kept for the next
        self.n = 0  # positions used
        self.start = 0  # first live position
        self.base = 0  # id of position 0
        self.sources: list[Hashable] = []
        self.texts: list[str | None] = []
        self.done: list[float] = []

    @property
    def live(self) -> int:
        return self.n - self.start

    def add(self, vecs: np.ndarray, sources: Sequence[Hashable], texts: Sequence[str],
            done: Sequence[float]) -> None:
        import numpy as np
        need = self.n + len(vecs)
        if need > self.mat.shape[0]:
            self._reclaim()
            need = self.n + len(vecs)
        if need > self.mat.shape[0]:
            grown = np.empty((max(need, 2 * self.mat.shape[0]), self.mat.shape[1]), dtype=np.float32)
            grown[: self.n] = self.mat[: self.n]
            self.mat = grown
        self.mat[self.n:need] = vecs
        self.n = need
        self.sources.extend(sources)
        self.texts.extend(texts)
        self.done.extend(done)

    def drop_front(self, k: int) -> tuple[np.ndarray, list[Hashable]]:
        """Evict the ``k`` oldest live rows: their ids and sources."""
        import numpy as np
        lo, hi = self.start, self.start + min(k, self.live)
        # Their ids are read now: a reclaim below moves ``base``, and the graph must lose these rows, not others.
        ids, sources = np.arange(self.base + lo, self.base + hi), self.sources[lo:hi]
        for pos in range(lo, hi):
            self._traits.pop(self.base + pos, None)
            self.texts[pos] = None  # the text is what weighs; drop it now, not at the next reclaim
        self.start = hi
        if self.start > self.live:
            self._reclaim()
        return ids, sources

    def _reclaim(self) -> None:
        """Move the live rows to position 0, into a smaller matrix when they fill under a quarter of it: a class
        that shrank kept its peak's matrix, so classes that took turns at the bound each held one (six: 188 MiB
        of matrices for 20 MiB of vectors)."""
        import numpy as np
        if self.start == 0:
            return
        live, cap = self.live, max(2 * self.live, 16)
        if self.mat.shape[0] > 2 * cap:
            shrunk = np.empty((cap, self.mat.shape[1]), dtype=np.float32)
            shrunk[:live] = self.mat[self.start:self.n]
            self.mat = shrunk
        else:
            self.mat[:live] = self.mat[self.start:self.n]
        del self.sources[:self.start], self.texts[:self.start], self.done[:self.start]
        self.base += self.start
        self.n, self.start = live, 0

    def view(self) -> np.ndarray:
        return self.mat[self.start: self.n]

    def row(self, j: int) -> tuple[Hashable, float, str]:
        pos = j - self.base
        return self.sources[pos], self.done[pos], self.texts[pos]

    def traits(self, j: int, text: str) -> Traits:
        t = self._traits.get(j)
        if t is None:
            t = traits(text)
            if j - self.base >= self.start:  # still live: keep it for the row's next match
                self._traits[j] = t
        return t


class _Shelf:
    """One near-duplicate class (tenant scope + compatibility key): its live rows, and past ``BRUTE_MAX`` rows
    an HNSW graph over them (graph key = row id)."""

    __slots__ = ("rows", "graph")

    def __init__(self, dim: int):
        self.rows = _Rows(dim)
        self.graph = None

    @property
    def n(self) -> int:
        return self.rows.live

    def add(self, vecs: np.ndarray, sources: Sequence[Hashable], texts: Sequence[str],
            done: Sequence[float]) -> None:
        import numpy as np
        rows = self.rows
        first = rows.base + rows.n
        rows.add(vecs, sources, texts, done)
        if self.graph is None and rows.live > BRUTE_MAX and _graph_class() is not None:
            self.graph = _graph_class()(ndim=rows.mat.shape[1], **_HNSW_OPTIONS)
            first = rows.base + rows.start
        if self.graph is not None:
            lo = first - rows.base
            self.graph.add(np.arange(first, rows.base + rows.n), rows.mat[lo:rows.n], threads=1)

    def drop_front(self, k: int) -> list[Hashable]:
        ids, sources = self.rows.drop_front(k)
        if self.graph is not None and len(ids):
            if self.rows.live <= BRUTE_MAX // 2:
                # Back to exact search: a graph keeps its peak's memory (16 MiB for 20,000 rows) however few
                # rows are left; past ``BRUTE_MAX`` again, ``add`` builds one of the live rows.
                self.graph = None
            else:
                # usearch reuses a removed node's memory for later adds, so a bounded class stays bounded.
                self.graph.remove(ids)
        return sources

    def top1(self, q: np.ndarray) -> list[tuple[_Rows, int, float] | None]:
        """Best row per query (rows object, row id, cosine)."""
        import numpy as np
        m = len(q)
        rows = self.rows
        if self.n == 0 or m == 0:  # no query: the graph's empty answer cannot be shaped (m, count)
            return [None] * m
        if self.graph is None:
            sims = q @ rows.view().T
            j = np.argmax(sims, axis=1)
            s = sims[np.arange(m), j]
            j = j + rows.base + rows.start
        else:
            found = self.graph.search(q, count=ANN_CANDIDATES)
            keys = np.asarray(found.keys).reshape(m, -1).astype(np.int64)
            # A batch answer says how many of each row's keys are real; one query's answer holds only those.
            counts = np.asarray(getattr(found, "counts", [keys.shape[1]])).reshape(m, 1)
            valid = (np.arange(keys.shape[1])[None, :] < counts) & (keys >= rows.base + rows.start)
            pos = np.where(valid, keys - rows.base, rows.start)
            sims = np.einsum("qkd,qd->qk", rows.mat[pos], q)  # exact cosines of the candidates
            sims[~valid] = -np.inf
            best = sims.argmax(axis=1)
            j, s = keys[np.arange(m), best], sims[np.arange(m), best]
        return [None if s[i] == -np.inf else (rows, int(j[i]), float(s[i])) for i in range(m)]


class ReuseIndex:
    def __init__(self, dim: int):
        self.dim = dim
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
        import numpy as np
        shelf = self._shelves.get(near_key)
        if shelf is None:
            shelf = self._shelves[near_key] = _Shelf(self.dim)
        shelf.add(np.asarray(vecs, dtype=np.float32), sources, texts, done)

    def live(self, near_key: Hashable) -> int:
        """Rows of the class in the index."""
        shelf = self._shelves.get(near_key)
        return 0 if shelf is None else shelf.n

    def drop_oldest(self, near_key: Hashable, k: int) -> list[Hashable]:
        """Evict the ``k`` oldest rows of the class (the cache actor bounds its index this way; the simulator
        never does, a trace being bounded): their sources. A class left empty is forgotten, graph and all."""
        shelf = self._shelves.get(near_key)
        if shelf is None:
            return []
        sources = shelf.drop_front(k)
        if shelf.n == 0:
            del self._shelves[near_key]
        return sources

    def exact(self, fp: str) -> tuple[Hashable, float] | None:
        return self._exact.get(fp)

    def near(self, near_key: Hashable, vec: np.ndarray, text: str, threshold: float,
             guards: Guards = Guards()) -> NearHit | None:
        """Top-1 cosine match in the class, refused unless it clears ``threshold`` (raised to the kind's tuned
        minimum, ``class_threshold``) and every guard."""
        return self.near_many(near_key, vec[None, :], [text], threshold, guards)[0]

    def near_many(self, near_key: Hashable, vecs: np.ndarray, texts: Sequence[str], threshold: float,
                  guards: Guards = Guards()) -> list[NearHit | None]:
        """``near`` for many queries of one class at once; ``threshold`` is raised to ``class_threshold``."""
        threshold = class_threshold(near_key, threshold)
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
        import numpy as np
        shelf = self._shelves.get(near_key)
        if shelf is None:
            return [None] * len(vecs)
        out: list[Top | None] = []
        for best in shelf.top1(np.asarray(vecs, dtype=np.float32)):
            if best is None:
                out.append(None)
                continue
            rows, j, sim = best
            source, done, text = rows.row(j)
            out.append(Top(source, done, sim, rows, j, text))
        return out

    def __repr__(self) -> str:
        return f"ReuseIndex(exact={len(self._exact)}, near_classes={len(self._shelves)})"
