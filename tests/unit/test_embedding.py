"""The near-duplicate vectors: a sentence embedding loaded offline, the guards on top, the hashed fallback, the
tuned thresholds (re-derived on the real pairs) and the ANN index."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import engine.runtime.reuse as reuse_mod
from engine.core import embedding
from engine.core._pair_eval import choose_threshold, clusters, load_pairs, score, split
from engine.core.features import (
    NEAR_DIM,
    compat_key,
    featurize,
    featurize_texts,
    near_min_threshold,
    near_space,
    near_vectors,
    near_vectors_texts,
)
from engine.core.request import Request, validation_context
from engine.core.similarity import Guards, guard_reason
from engine.runtime.reuse import ReuseIndex, class_threshold


def _have_model() -> bool:
    try:
        embedding.load_embedder()
    except ImportError:
        return False
    return True


HAVE_MODEL = _have_model()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="wordllama is not installed: the hashed fallback is in use")
CTX = validation_context()
# Measured on the held-out half (split seed 0) at the text threshold 0.925: GPTCache 74/74 right (recall
# 14.8 %), QQP 99.37 % precision, 26.3 % recall (docs/cache.md). The floors leave a margin for a new release
# of the tokenizer, not for a change of the vectors or guards: that must update docs/cache.md and these figures.
GPTCACHE_RECALL_FLOOR = 0.13
QQP_RECALL_FLOOR = 0.25
QQP_PRECISION_FLOOR = 0.99  # QQP lists only some duplicates: each of its 26 "wrong" hits is the same question


def unavailable():
    raise embedding.EmbeddingUnavailable("wordllama hidden by the test")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(embedding, "load_embedder", unavailable)


@pytest.fixture(scope="module")
def scored(real_data):
    """Top-1 scores of the tune and held-out halves of both pair files (about 8 s, once)."""
    if not HAVE_MODEL:
        pytest.skip("wordllama is not installed: the thresholds are tuned for the embedding")
    halves = {name: split(rows, seed=0) for name, rows in load_pairs(real_data).items()}
    return {name: (score(tune, near_vectors_texts), score(held, near_vectors_texts))
            for name, (tune, held) in halves.items()}


@needs_model
def test_the_model_loads_once_from_the_package_files():
    e = embedding.load_embedder()
    assert e is embedding.load_embedder()  # one per process
    root = embedding._package_dir()
    assert root.joinpath("weights", "l2_supercat_256.safetensors").is_file()  # shipped in the wheel
    m = e.embed(["How do I cook rice?", "", "how to cook rice"])
    assert m.shape == (3, 256) and m.dtype == np.float32
    assert np.allclose(np.linalg.norm(m[[0, 2]], axis=1), 1.0, atol=1e-5) and not m[1].any()
    assert m[0] @ m[2] > 0.8
    # WordLlama's definition, from the tokenizer's plain encode (with offsets): the mean of the token rows,
    # normalised. Pins the fast batch path (ids without offsets, pooled by reduceat) to it.
    ids = e._tok.encode("How do I cook rice?", add_special_tokens=False).ids
    ref = e.table[ids].mean(axis=0)
    assert np.allclose(m[0], ref / np.linalg.norm(ref), atol=1e-6)


@needs_model
def test_leading_dimensions_are_the_wide_embedding_cut_and_normalised():
    e = embedding.load_embedder()
    texts = ["How do I cook rice?", "", "Why is the sky blue at noon?"]
    wide, lead = e.embed(texts), e.embed(texts, dims=128)
    cut = wide[:, :128]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    assert lead.shape == (3, 128) and not lead[1].any()
    assert np.allclose(lead[[0, 2]], cut[[0, 2]] / norms[[0, 2]], atol=1e-6)
    for bad in (0, 257):
        with pytest.raises(ValueError, match="dims"):
            e.embed(texts, dims=bad)


@needs_model
def test_near_vectors_are_one_function_for_every_runtime():
    reqs = [Request.model_validate({"id": str(k), "arrival_s": 0, "model": "gpt-5-mini", "prompt": p}, context=CTX)
            for k, p in enumerate(["How do I cook rice?", "How can I cook rice?"])]
    v = near_vectors(reqs)
    assert v.shape == (2, NEAR_DIM)
    assert np.array_equal(v, near_vectors_texts([r.prompt for r in reqs], [r.params for r in reqs]))  # warm-up's
    assert featurize(reqs).shape == (2, 1024)  # other widths stay hashed n-grams
    assert near_space().startswith("wordllama")


@needs_model
def test_the_embedding_catches_real_paraphrases_the_hashed_vectors_miss(real_data):
    rows = load_pairs(real_data)["gptcache"]
    origins, similar = [r["origin"] for r in rows], [r["similar"] for r in rows]
    near = np.einsum("ij,ij->i", near_vectors_texts(origins), near_vectors_texts(similar))
    hashed = np.einsum("ij,ij->i", featurize_texts(origins, dim=NEAR_DIM), featurize_texts(similar, dim=NEAR_DIM))
    text_min = near_min_threshold("text")
    caught = [k for k in range(len(rows)) if near[k] >= text_min and hashed[k] < 0.85
              and guard_reason(origins[k], similar[k]) is None]
    assert len(caught) >= 60, len(caught)  # 94 of the 999 pairs: the hashed vectors are below even the floor
    # One of them, served through the index as a runtime would:
    k = caught[0]
    idx = ReuseIndex(NEAR_DIM)
    key = ("t", ("openai", "gpt-5-mini", "text"))
    idx.add_near(key, near_vectors_texts([similar[k]]), ["src"], [similar[k]], [0.0])
    hit = idx.near(key, near_vectors_texts([origins[k]])[0], origins[k], 0.85)
    assert hit is not None and hit.source == "src"


_REPORT = ("The quarterly report covers revenue, costs and hiring across the European and Asian offices. "
           "Revenue rose in every region except the north, where a warehouse fire closed two sites. ") * 6


@needs_model
@pytest.mark.parametrize("a, b, guard", [
    ("How do I reset my Gmail account password?", "How do I not reset my Gmail account password?", "negation"),
    ("Why does a cat chase a dog?", "Why does a dog chase a cat?", "same words in another order"),
    ("How do I lose 10 kg in 3 months?", "How do I lose 15 kg in 3 months?", "numbers"),
    # A long shared context lifts any two asks above the threshold (0.999 here): the context guard.
    ("List the risks in the report below.\n" + _REPORT, "List the opportunities in the report below.\n" + _REPORT,
     "words of context"),
])
def test_guards_still_refuse_lookalikes_above_the_threshold(a, b, guard):
    va, vb = near_vectors_texts([a, b])
    assert va @ vb >= near_min_threshold("text")  # the vectors alone would serve it
    assert guard in guard_reason(a, b)
    idx = ReuseIndex(NEAR_DIM)
    key = ("t", ("openai", "gpt-5-mini", "text"))
    idx.add_near(key, vb[None, :], ["src"], [b], [0.0])
    assert idx.near(key, va, a, 0.85) is None
    assert idx.near(key, va, a, 0.85, Guards.of(())) is not None


def test_without_the_package_the_hashed_vectors_are_used(no_model, caplog):
    texts = ["How do I cook rice?", "How can I cook rice?"]
    with caplog.at_level(logging.WARNING, logger="smartbatch.features"):
        v = near_vectors_texts(texts)
    assert np.array_equal(v, featurize_texts(texts, dim=NEAR_DIM))
    assert near_space() == f"ngrams-{NEAR_DIM}" and near_min_threshold("text") == 0.0
    assert class_threshold(("t", ("openai", "gpt-5-mini", "text")), 0.92) == 0.92  # the policy decides, as before
    idx = ReuseIndex(NEAR_DIM)
    key = ("t", ("openai", "gpt-5-mini", "text"))
    idx.add_near(key, featurize_texts(["Draw a red car at night"], dim=NEAR_DIM), ["src"],
                 ["Draw a red car at night"], [0.0])
    q = near_vectors_texts(["draw a red car at night."])[0]
    assert idx.near(key, q, "draw a red car at night.", 0.92).source == "src"


def test_different_params_are_never_near_duplicates():
    reqs = [Request.model_validate({"id": str(k), "arrival_s": 0, "model": "flux-1-dev", "prompt": "a red car",
                                    "params": p}, context=CTX)
            for k, p in enumerate([{"seed": 1}, {"seed": 1}, {"seed": 2}])]
    assert compat_key(reqs[0]) == compat_key(reqs[2])  # same class: only the vectors keep them apart
    v = near_vectors(reqs)
    assert v[0] @ v[1] == pytest.approx(1.0) and abs(v[0] @ v[2]) < 0.5


@pytest.mark.parametrize("a, b, refused", [
    ("What is IP address?", "What is my IP address?", True),  # a definition, a lookup: whose it is counts
    ("How much does it's cost to build an iPhone?", "How much does it cost to build an iPhone app?", True),
    ("Do they know they haven't won?", "Do they know they haven\u2019t won?", False),  # one apostrophe, two glyphs
    ("Should cow slaughter be banned in India?", "Should cow slaughter be banned in India or not?", False),
    ("How do I know if I'm blacklisted?", "How do I know if i'm blacklisted?", False),  # "I'm" is no entity
    ("What's the scope of your course?", "What is the scope of your course?", False),
    ("How can I become an engineer at google?", "How can I become an engineer at Google?", False),
    ("What are the seven wonders of the world?", "What are the 7 wonders of the world?", False),
    ("What is one thing people don't know about you?", "What is something people don't know about you?",
     False),  # "one" is as often a pronoun as a number
    ("What are the seven wonders of the world?", "What are the 8 wonders of the world?", True),
])
def test_guards_read_words_not_spellings(a, b, refused):
    assert (guard_reason(a, b) is not None) is refused and (guard_reason(b, a) is not None) is refused


@needs_model
def test_each_kind_has_its_threshold():
    text = ("t", ("openai", "gpt-5-mini", "text"))
    image = ("t", ("fal", "flux-1-dev", "image", (("size", "1024x1024"),)))
    assert class_threshold(text, 0.85) == near_min_threshold("text") == 0.925
    assert class_threshold(image, 0.85) == near_min_threshold("image") == 0.95
    assert class_threshold(image, 0.97) == 0.97  # a policy may ask for more
    assert class_threshold("a key of no kind", 0.5) == 0.95  # the strictest
    # Image prompts that differ in an attribute no guard knows stay below the image threshold.
    a, b = near_vectors_texts(["a castle on a hill at sunset, fantasy art", "a castle on a hill at sunrise, fantasy art"])
    assert a @ b < near_min_threshold("image")


def test_the_text_threshold_is_the_one_the_tune_halves_choose(scored):
    assert choose_threshold([tune for tune, _ in scored.values()], 0.995) == near_min_threshold("text")


def test_held_out_precision_and_recall(scored):
    text_min = near_min_threshold("text")
    gpt = scored["gptcache"][1].at(text_min)
    assert gpt["precision"] >= 0.995 and gpt["recall"] >= GPTCACHE_RECALL_FLOOR, gpt
    qqp = scored["qqp"][1].at(text_min)
    assert qqp["precision"] >= QQP_PRECISION_FLOOR and qqp["recall"] >= QQP_RECALL_FLOOR, qqp
    assert gpt["same_text"] == 0  # GPTCache's recall is all paraphrase, none of it an exact repeat
    wrong = scored["qqp"][1].wrong(text_min)  # what bench_cache.py --show-wrong prints to audit
    assert len(wrong) == qqp["wrong"] and all(sim >= text_min and a != b for sim, a, b in wrong)


def test_the_hits_called_wrong_are_not_linked_by_any_pair_and_folding_only_adds_right_ones(scored, real_data):
    """The raw labels are already the closure of every pair of the file (the split keeps clusters whole), so no
    pair links a hit they call wrong; the folded labels (one question spelled two ways is one node) only ever
    call more hits right, never fewer (docs/cache.md)."""
    text_min = near_min_threshold("text")
    for name, rows in load_pairs(real_data).items():
        linked = clusters(rows)
        for s in scored[name]:
            assert not any(linked(a) == linked(b) for _, a, b in s.wrong(text_min))
            assert (s.right_folded >= s.right).all()
            raw, folded = s.at(text_min), s.at(text_min, folded=True)
            assert folded["hits"] == raw["hits"] and folded["right"] >= raw["right"]
    audit = scored["qqp"][1].audit(text_min)
    assert sum(w.right_folded for w in audit) >= 3  # "If Trump becomes President..." / "...president..." and more
    assert sum(w.partner_rank == 2 for w in audit) >= len(audit) / 2  # the labelled duplicate came second


def test_split_keeps_clusters_whole():
    rows = [{"origin": "a", "similar": "b"}, {"origin": "b", "similar": "c"}, {"origin": "d", "similar": "e"},
            {"origin": "f", "similar": "g"}]
    tune, held = split(rows, seed=3)
    assert sorted(map(str, tune + held)) == sorted(map(str, rows))
    texts = lambda rs: {t for r in rs for t in (r["origin"], r["similar"])}
    assert not texts(tune) & texts(held)
    assert split(rows, seed=3) == (tune, held)  # seeded


def test_a_large_class_is_searched_with_the_ann_graph(monkeypatch):
    monkeypatch.setattr(reuse_mod, "BRUTE_MAX", 500)
    rng = np.random.default_rng(4)
    vecs = rng.standard_normal((3000, NEAR_DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    texts = [f"row {k}" for k in range(3000)]
    q = vecs[::10] + 0.02 * rng.standard_normal((300, NEAR_DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    found = {}
    for graph in (reuse_mod._Hnsw, None):
        if graph is None and reuse_mod._Hnsw is None:
            continue
        monkeypatch.setattr(reuse_mod, "_Hnsw", graph)
        idx = ReuseIndex(NEAR_DIM)
        for lo in range(0, 3000, 700):  # grows past BRUTE_MAX in steps, as a live cache does
            idx.add_near("c", vecs[lo:lo + 700], list(range(lo, lo + 700)), texts[lo:lo + 700], [0.0] * 700)
        assert (idx._shelves["c"].graph is not None) == (graph is not None)
        tops = idx.top_many("c", q)
        found[graph is None] = [t.source for t in tops]
        assert all(t.similarity == pytest.approx(float(q[i] @ vecs[t.source]), abs=1e-5) for i, t in enumerate(tops))
    for sources in found.values():
        assert sources == list(range(0, 3000, 10))  # the graph finds what exact search finds


@pytest.mark.parametrize("dim", [NEAR_DIM, 100])  # a power of two takes a mask for the column, 100 the modulo
def test_hashed_rows_do_not_depend_on_the_batch_around_them(dim):
    """The hashes are made a slice of text at a time (a batch of long prompts at once spills out of the CPU's
    caches): each row must be what its text gives alone, wherever the slices fall."""
    import random

    rnd = random.Random(3)
    vocab = ["report", "revenue", "the", "of", "Paris", "7", "café", "naïve", "x", "summarise"]
    texts = ["", "a", "How do I cook rice?"] + [
        " ".join(rnd.choice(vocab) for _ in range(rnd.choice([3, 50, 2_000, 6_000]))) for _ in range(30)]
    params = [{"seed": k % 3} if k % 4 == 1 else {} for k in range(len(texts))]
    together = featurize_texts(texts, params, dim=dim)
    alone = np.vstack([featurize_texts([t], [p], dim=dim) for t, p in zip(texts, params)])
    assert sum(map(len, texts)) > 4 * 16_384  # several slices
    assert np.array_equal(together, alone)
    assert not together[0].any() and np.allclose(np.linalg.norm(together[1:], axis=1), 1.0, atol=1e-5)


@needs_model
def test_two_different_asks_over_a_short_shared_report_are_not_served_for_each_other():
    """Here the shared part is about 5x the differing one and the cosine 0.95, above the text threshold: a
    ratio of 6 let it through (a review found it); the guard now refuses from 3x."""
    a = "Critique the report below.\n" + _REPORT[:180]
    b = "Rewrite the report below for children.\n" + _REPORT[:180]
    va, vb = near_vectors_texts([a, b])
    assert va @ vb >= near_min_threshold("text")  # the vectors alone would serve one for the other
    assert guard_reason(a, b) is not None
