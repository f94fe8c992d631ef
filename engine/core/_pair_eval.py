"""Precision and recall of near-duplicate search on labelled paraphrase pairs, with a seeded tune/held-out split.

Used by ``benchmarks/bench_cache.py`` (which prints every figure of docs/cache.md) and by the tests that pin the
held-out precision. Pure and I/O-free apart from ``load_pairs``.

* Rows are joined into duplicate clusters first (union-find over the pairs: QQP repeats a question across rows),
  and the split assigns whole clusters, so no text is in both halves.
* On one half, the cache holds every ``similar`` text of the half and each ``origin`` asks for its top-1
  match, as GPTCache's own benchmark does. A hit (cosine at or above the threshold, every guard passed) is
  right when the match lies in the origin's cluster.
* Labels are scored two ways, side by side. Raw: the clusters of the pairs as listed (already the transitive
  closure of every labelled pair of the file). Folded: texts that are equal once case, punctuation and spacing
  are dropped (``fold``) are one node too, so "If Trump becomes President..." / "...president..." count as
  the same question; QQP gives the same question several ids and lists duplicate pairs for only some of them.
  The split and the threshold use the raw clusters.
* ``choose_threshold`` picks, on the tune halves, the lowest threshold of a grid at and above which precision
  stays at or above the target on each, and on both pooled with one wrong hit to spare; the held-out halves
  then say what that threshold is worth.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.core.similarity import Guards, guard_between, traits

__all__ = ["GRID", "Scored", "WrongHit", "choose_threshold", "clusters", "fold", "load_pairs", "score", "split",
           "sweep"]

GRID = tuple(round(0.80 + 0.005 * k, 3) for k in range(40))  # 0.800 ... 0.995
_ALNUM = re.compile(r"[^\W_]+")


def load_pairs(data: Path) -> dict[str, list[dict]]:
    """``{"gptcache": rows, "qqp": rows}`` from the shared real data (see its SOURCES.md)."""
    out = {"gptcache": json.loads((data / "gptcache_paraphrase_pairs.json").read_text())}
    with tarfile.open(data / "gptcache_similar_qqp.json.gz") as tf:
        member = tf.extractfile("similiar_qqp.json")
        if member is None:
            raise FileNotFoundError(f"{data / 'gptcache_similar_qqp.json.gz'} lacks similiar_qqp.json")
        out["qqp"] = json.load(member)
    return out


def fold(text: str) -> str:
    """A text with case, punctuation and spacing dropped: its words and numbers, lowercased, one space apart."""
    return " ".join(_ALNUM.findall(text.lower()))


def clusters(rows: Sequence[dict], folded: bool = False) -> Callable[[str], str]:
    """Union-find over the pairs: ``find(text)`` names the duplicate cluster of a text. ``folded``: texts equal
    under ``fold`` are one node too."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rows:
        parent[find(r["origin"])] = find(r["similar"])
        if folded:  # "\x00" keeps a folded key apart from every text
            for t in (r["origin"], r["similar"]):
                parent[find(t)] = find("\x00" + fold(t))
    return find


def split(rows: Sequence[dict], seed: int = 0, tune_share: float = 0.5) -> tuple[list[dict], list[dict]]:
    """(tune, held out): whole clusters drawn at random with ``seed``, so no text crosses the split."""
    find = clusters(rows)
    roots = sorted({find(r["origin"]) for r in rows})
    rng = np.random.default_rng(seed)
    tune_roots = {roots[k] for k in rng.permutation(len(roots))[: round(tune_share * len(roots))]}
    tune = [r for r in rows if find(r["origin"]) in tune_roots]
    held = [r for r in rows if find(r["origin"]) not in tune_roots]
    return tune, held


class WrongHit(NamedTuple):
    """A hit the raw labels call wrong, with what helps to judge it: whether the folded labels call it right,
    and where the origin's best labelled duplicate in the cache ranked (1 is the top) and scored."""

    sim: float
    origin: str
    match: str
    right_folded: bool
    partner_rank: int
    partner_sim: float


class Scored(NamedTuple):
    """Each origin's top-1 match: its cosine, whether it is right (raw labels), whether the guards pass it,
    whether the two texts are the same after case and whitespace folding; and, when scored by ``score``,
    whether it is right under folded labels and the rank and cosine of the best labelled duplicate."""

    sim: np.ndarray
    right: np.ndarray
    passes: np.ndarray
    same: np.ndarray
    pairs: tuple[tuple[str, str], ...] = ()  # (origin, its top-1 match), for reading the hits by hand
    right_folded: np.ndarray | None = None
    partner_rank: np.ndarray | None = None
    partner_sim: np.ndarray | None = None

    def wrong(self, threshold: float) -> list[tuple[float, str, str]]:
        """The hits the labels call wrong at ``threshold`` (all guards): (cosine, origin, match), to audit."""
        hit = (self.sim >= threshold) & self.passes & ~self.right
        return [(float(self.sim[k]), *self.pairs[k]) for k in np.flatnonzero(hit)]

    def audit(self, threshold: float) -> list[WrongHit]:
        """``wrong`` with the evidence beside each hit (needs a ``Scored`` made by ``score``)."""
        if self.right_folded is None or self.partner_rank is None or self.partner_sim is None:
            raise ValueError("audit needs the folded labels and partners that score() records")
        hit = (self.sim >= threshold) & self.passes & ~self.right
        return [WrongHit(float(self.sim[k]), *self.pairs[k], bool(self.right_folded[k]),
                         int(self.partner_rank[k]), float(self.partner_sim[k])) for k in np.flatnonzero(hit)]

    def at(self, threshold: float, guarded: bool = True, folded: bool = False) -> dict:
        """Hits, right, wrong, precision, recall and right same-text hits at ``threshold``; ``folded``: right
        under the folded labels."""
        if folded and self.right_folded is None:
            raise ValueError("folded figures need the folded labels that score() records")
        right_of = self.right_folded if folded else self.right
        hit = (self.sim >= threshold) & (self.passes if guarded else True)
        n, right = int(hit.sum()), int((hit & right_of).sum())
        return {"threshold": threshold, "hits": n, "right": right, "wrong": n - right,
                "precision": right / n if n else 1.0, "recall": right / len(self.sim),
                "same_text": int((hit & right_of & self.same).sum())}


def score(rows: Sequence[dict], vectors: Callable[[list[str]], np.ndarray], guards: Guards = Guards()) -> Scored:
    """Top-1 of every origin among the ``similar`` texts of ``rows`` (exact search, one product per 2,000), right
    under raw and folded labels, and the best-ranked labelled duplicate of each origin in the cache."""
    find, find_folded = clusters(rows), clusters(rows, folded=True)
    origins = [r["origin"] for r in rows]
    store = list(dict.fromkeys(r["similar"] for r in rows))
    members: dict[str, list[int]] = {}
    for j, t in enumerate(store):
        members.setdefault(find(t), []).append(j)
    s_mat = vectors(store)
    best_j = np.empty(len(origins), dtype=np.int64)
    best_s = np.empty(len(origins), dtype=np.float32)
    partner_rank = np.zeros(len(origins), dtype=np.int64)
    partner_sim = np.full(len(origins), np.nan, dtype=np.float32)
    for lo in range(0, len(origins), 2000):
        sims = vectors(origins[lo:lo + 2000]) @ s_mat.T
        best_j[lo:lo + 2000] = sims.argmax(1)
        best_s[lo:lo + 2000] = sims[np.arange(len(sims)), best_j[lo:lo + 2000]]
        for i, o in enumerate(origins[lo:lo + 2000]):
            js = members.get(find(o))
            if js:
                partner_sim[lo + i] = p = sims[i, js].max()
                partner_rank[lo + i] = int((sims[i] > p).sum()) + 1
    matches = [store[j] for j in best_j]
    right = np.array([find(o) == find(m) for o, m in zip(origins, matches)], dtype=bool)
    right_folded = np.array([find_folded(o) == find_folded(m) for o, m in zip(origins, matches)], dtype=bool)
    passes = np.array([guard_between(traits(o), traits(m), guards) is None for o, m in zip(origins, matches)],
                      dtype=bool)
    same = np.array([" ".join(o.lower().split()) == " ".join(m.lower().split()) for o, m in zip(origins, matches)],
                    dtype=bool)
    return Scored(best_s, right, passes, same, tuple(zip(origins, matches)), right_folded, partner_rank,
                  partner_sim)


def sweep(scored: Scored, thresholds: Sequence[float] = GRID, guarded: bool = True) -> list[dict]:
    return [scored.at(t, guarded) for t in thresholds]


def choose_threshold(tune: Sequence[Scored], target: float, grid: Sequence[float] = GRID) -> float | None:
    """The lowest threshold of ``grid`` at and above which every scored set keeps precision >= ``target``, and
    the sets pooled keep it with one wrong hit more than they have (a threshold whose precision only holds by
    luck between two worse ones is not chosen); None if none.

    The extra wrong hit is a margin for sampling error: the wrong hits left at these thresholds are a handful
    per thousand (most are unlinked duplicates in QQP), so a threshold that passes with none to spare on one
    half falls short on another about as often as not."""

    def holds(t: float) -> bool:
        at = [s.at(t) for s in tune]
        hits, right = sum(a["hits"] for a in at), sum(a["right"] for a in at)
        return all(a["precision"] >= target for a in at) and right >= target * (hits + 1)

    best = None
    for t in reversed(grid):
        if not holds(t):
            break
        best = t
    return best
