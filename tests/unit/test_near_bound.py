"""The near-duplicate index is bounded: the cache actor evicts its oldest rows past ``cache.near_max_entries``
rows, ``cache.near_max_mb`` of text and vectors, or the cache's TTL, and an index that evicted answers as an
index of the rows it kept (exact search and the HNSW graph alike)."""

import asyncio
import sys

import numpy as np
import pytest

import engine.runtime.reuse as reuse_mod
from actors._near_index import ROW_BYTES
from engine.core.features import NEAR_DIM, featurize_texts
from engine.core.similarity import Guards
from engine.runtime.reuse import ReuseIndex
from tests.unit.test_cache import generated, job, make_cache


def _texts(n: int, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{k}" for k in range(300)]
    return [" ".join(rng.choice(words, 8)) + f" item {k}" for k in range(n)]


@pytest.mark.parametrize("brute_max", [10**9, 300], ids=["exact search", "graph"])
def test_an_index_that_evicts_its_oldest_rows_answers_as_an_index_of_the_rows_it_kept(monkeypatch, brute_max):
    monkeypatch.setattr(reuse_mod, "BRUTE_MAX", brute_max)
    texts = _texts(4000)
    vecs = featurize_texts(texts, dim=NEAR_DIM)
    idx, keep, chunk = ReuseIndex(NEAR_DIM), 1000, 250
    for lo in range(0, len(texts), chunk):
        idx.add_near("c", vecs[lo:lo + chunk], list(range(lo, lo + chunk)), texts[lo:lo + chunk], [0.0] * chunk)
        over = idx.live("c") - keep
        if over > 0:
            assert idx.drop_oldest("c", over) == list(range(lo + chunk - keep - over, lo + chunk - keep))
    shelf = idx._shelves["c"]
    assert idx.live("c") == idx.near_entries == keep
    assert (shelf.graph is not None) == (brute_max < keep)
    # Storage stays within a small multiple of what is kept, however many rows went through.
    assert shelf.rows.mat.shape[0] <= 2 * (keep + chunk) and len(shelf.rows.texts) <= 2 * keep + chunk
    if shelf.graph is not None:
        assert len(shelf.graph) == keep
    fresh = ReuseIndex(NEAR_DIM)
    fresh.add_near("c", vecs[-keep:], list(range(len(texts) - keep, len(texts))), texts[-keep:], [0.0] * keep)
    queries = list(range(0, len(texts), 7))  # evicted rows and kept ones
    got = idx.top_many("c", vecs[queries])
    want = fresh.top_many("c", vecs[queries])
    assert all(t.source >= len(texts) - keep for t in got)  # never an evicted row
    assert all(g.text == texts[g.source] for g in got)
    # A query with a row of its own among the kept finds it. Without one, the graph is approximate (a fresh
    # graph of the kept rows agrees with exact search on about 95 % of these unrelated queries, this one 93 %).
    matched = [k for k, q in enumerate(queries) if q >= len(texts) - keep]
    assert [got[k].source for k in matched] == [want[k].source for k in matched] == [queries[k] for k in matched]
    if shelf.graph is None:
        assert [g.source for g in got] == [w.source for w in want]
    hits = idx.near_many("c", vecs[queries], [texts[q] for q in queries], 0.99, Guards.of(()))
    assert [h.source if h else None for h in hits] == [q if q >= len(texts) - keep else None for q in queries]
    assert idx.drop_oldest("c", keep) and "c" not in idx._shelves  # an emptied class is forgotten
    assert idx.top_many("c", vecs[:2]) == [None, None]


@pytest.mark.parametrize("drop", [600, 1], ids=["most at once", "one at a time"])
def test_an_eviction_that_reclaims_removes_the_evicted_rows_from_the_graph(monkeypatch, drop):
    """Evicting past half a class's live rows reclaims its matrix (``base`` moves): the graph must lose the
    evicted ids, not the ids as renumbered after the reclaim (once the kept rows themselves: none was found)."""
    monkeypatch.setattr(reuse_mod, "BRUTE_MAX", 100)
    texts = _texts(1000)
    vecs = featurize_texts(texts, dim=NEAR_DIM)
    idx = ReuseIndex(NEAR_DIM)
    idx.add_near("c", vecs, list(range(1000)), texts, [0.0] * 1000)
    shelf = idx._shelves["c"]
    while shelf.rows.base == 0:  # until an eviction reclaims
        idx.drop_oldest("c", drop)
    rows, kept = shelf.rows, idx.live("c")
    assert sorted(int(k) for k in shelf.graph.keys) == list(range(rows.base + rows.start, rows.base + rows.n))
    got = idx.top_many("c", vecs[1000 - kept:])
    assert [t.source if t else None for t in got] == list(range(1000 - kept, 1000))


def test_classes_that_take_turns_at_the_bound_do_not_each_keep_their_peak_s_matrix_and_graph(monkeypatch):
    """A class's matrix only grew and its graph kept its nodes' memory: classes that took turns at the bound
    (a trickle keeping each alive) each held their peak (six of 20,000 rows: 188 MiB of matrices and 98 MiB of
    graphs for 20 MiB of live vectors)."""
    monkeypatch.setattr(reuse_mod, "BRUTE_MAX", 100)
    rng = np.random.default_rng(0)
    idx, keep, fifo = ReuseIndex(NEAR_DIM), 1000, []

    def add(c: int, n: int) -> None:
        v = rng.standard_normal((n, NEAR_DIM)).astype(np.float32)
        idx.add_near(c, v / np.linalg.norm(v, axis=1, keepdims=True), [(c, len(fifo) + k) for k in range(n)],
                     ["t"] * n, [0.0] * n)
        fifo.extend([c] * n)
        while idx.near_entries > keep:
            idx.drop_oldest(fifo[len(fifo) - idx.near_entries], 1)

    for c in range(4):
        for _ in range(keep // 50):
            add(c, 50)
            for old in range(c):
                add(old, 1)
    shelves = idx._shelves
    assert [c for c, s in shelves.items() if s.n < 50] == [0, 1, 2] and shelves[3].n > 900  # 19, 19, 19, 943
    assert sum(s.rows.mat.shape[0] for s in shelves.values()) <= 4 * (keep + 16 * len(shelves))
    assert [s.graph is not None for s in shelves.values()] == [False, False, False, True]
    for s in shelves.values():  # every live row is still found
        r = s.rows
        got = idx.top_many(next(c for c in shelves if shelves[c] is s), r.mat[r.start:r.n])
        assert [t.source for t in got] == r.sources[r.start:r.n]


def test_a_near_ask_that_follows_an_identical_request_in_a_class_with_a_graph_is_looked_up(monkeypatch, tmp_path):
    """The ask attached to its identical leader leaves its class no query for the index; a class past
    ``BRUTE_MAX`` then searched its graph with none, and the lookup raised (ValueError: cannot reshape)."""
    monkeypatch.setattr(reuse_mod, "BRUTE_MAX", 3)

    async def go():
        hub, cache = make_cache(tmp_path)
        for i in range(6):
            await generated(cache, hub, job(i, f"A watercolour of lighthouse number {i} on a cliff"))
        assert cache.index._shelves[next(iter(cache.index._shelves))].graph is not None
        prompt = "An oil painting of a red fox in the snow at dawn"
        assert await cache.lookup([job(10, prompt)]) == [0]
        assert await cache.lookup([job(11, prompt)]) == []  # follows r10, in flight
        assert cache.stats["in_flight"] == 1

    asyncio.run(go())


def test_the_cache_keeps_at_most_its_bound_of_near_rows_and_the_oldest_leave_first(tmp_path):
    async def go():
        hub, cache = make_cache(tmp_path, near_max_entries=40)
        prompts = [f"A watercolour of lighthouse number {k} on a cliff, with {k} gulls" for k in range(120)]
        for i, p in enumerate(prompts):
            await generated(cache, hub, job(i, p))
        s = cache.cache_stats()
        assert s["near_entries"] == 40 and s["near_evicted"] == 80 and len(cache.indexed) == 40
        assert cache.index.near_entries + sum(map(len, cache._pending.values())) == 40
        # A near duplicate of a kept result is served; one of an evicted result is generated.
        recent, old = (job(i, "a" + prompts[k][1:] + ".") for i, k in ((500, -1), (501, 0)))
        assert await cache.lookup([recent, old]) == [1]
        (res,) = await hub.pull(0.01)
        assert (res.id, res.hit) == ("r500", "near")

    asyncio.run(go())


def test_rows_queued_for_an_exact_only_workload_are_bounded_too(tmp_path):
    """Requests asking exact reuse (the default) queue their rows unfeaturised; a class nobody asks near for
    must not keep them all."""
    async def go():
        hub, cache = make_cache(tmp_path, near_max_mb=0.1)
        doc, bound = "x" * 20_000, 0.1 * 2**20
        prompts = [f"Summarise report {i}: {doc}" for i in range(30)]
        for i, p in enumerate(prompts):
            await generated(cache, hub, job(i, p, reuse="exact"))
        fit = int(bound // (sys.getsizeof(prompts[-1]) + ROW_BYTES))  # 4 rows of about 21 kB
        s = cache.cache_stats()
        assert s["near_bytes"] <= bound and s["near_entries"] == fit and s["near_evicted"] == 30 - fit
        assert [r[1] for r in cache._pending[next(iter(cache._pending))]] == prompts[-fit:]
        assert cache.index.near_entries == 0

    asyncio.run(go())


@pytest.mark.parametrize("char", ["a", "\u4e2d", "\U0001f600"], ids=["ascii", "chinese", "emoji"])
def test_the_near_bound_counts_the_bytes_a_text_holds_not_its_characters(tmp_path, char):
    """``near_max_mb`` counted characters: an 8 MiB bound held 15 MiB of Chinese text or 30 MiB of emoji."""
    hub, cache = make_cache(tmp_path, near_max_mb=1)
    for i in range(300):
        cache._queue_rows([("k", f"fp{i}", f"{i} " + char * 4000, {}, 1.0, None)])
    held = sum(sys.getsizeof(row[1]) + ROW_BYTES for row in cache._pending["k"])
    assert held == cache.cache_stats()["near_bytes"] <= 2**20 < held + sys.getsizeof(char * 4000) + ROW_BYTES


def test_rows_older_than_the_cache_ttl_leave_the_index(tmp_path):
    async def go():
        hub, cache = make_cache(tmp_path, ttl_s=100.0)
        first = "An oil painting of a red fox in the snow at dawn"
        await generated(cache, hub, job(0, first))
        cache.clock.advance(150.0)
        await generated(cache, hub, job(1, "A pencil sketch of a sailing boat in a storm"))
        assert cache.cache_stats()["near_entries"] == 1 and cache.cache_stats()["near_evicted"] == 1
        assert await cache.lookup([job(2, "an" + first[2:] + ".")]) == [0]  # its source has expired: generated

    asyncio.run(go())
