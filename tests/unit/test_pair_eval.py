"""The pair evaluation's labels: raw clusters (the transitive closure of the listed pairs), folded ones (texts
equal but for case, punctuation and spacing are one question), and the audit of the hits called wrong."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core._pair_eval import Scored, clusters, fold, score

# Four texts with hand-made vectors, so which stored text is each origin's top match is known.
VECS = {
    "What is the purpose of life?": [1.0, 0.0, 0.0],
    "what is the purpose of life": [0.99, 0.141, 0.0],
    "Why do we live?": [0.9, 0.0, 0.436],
    "Why are we here?": [0.0, 0.0, 1.0],
}
# Two clusters that share a question spelled two ways: QQP lists pairs only between some of its duplicates.
ROWS = [{"origin": "What is the purpose of life?", "similar": "Why do we live?"},
        {"origin": "Why are we here?", "similar": "what is the purpose of life"}]


def vectors(texts: list[str]) -> np.ndarray:
    m = np.array([VECS[t] for t in texts], dtype=np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


@pytest.mark.parametrize("a, b, same", [
    ("If Trump becomes President, how will it affect India?", "If Trump becomes president, how will it affect India?",
     True),
    ('How is the new book ""The Cursed Child""?', "How is the new book 'The Cursed Child'?", True),
    ("How can I find someone with a picture?", "How can I find someone. With a picture?", True),
    ("What is purpose of life?", "What is the purpose of life?", False),  # a word added is not a spelling
    ("How do I lose 10 kg?", "How do I lose 15 kg?", False),
    ("Café au lait?", "café  au lait", True),  # letters beyond ASCII are words too
])
def test_fold_drops_case_punctuation_and_spacing_only(a, b, same):
    assert (fold(a) == fold(b)) is same


def test_folded_clusters_join_texts_that_differ_only_in_spelling():
    raw, folded = clusters(ROWS), clusters(ROWS, folded=True)
    a, b = "What is the purpose of life?", "what is the purpose of life"
    assert raw(a) == raw("Why do we live?") and raw(a) != raw(b)
    assert folded(a) == folded(b) == folded("Why are we here?") == folded("Why do we live?")
    assert folded("\x00" + fold(a)) == folded(a)  # the key of a folded text is a node of its own cluster


def test_score_records_raw_and_folded_labels_and_the_labelled_duplicates_rank():
    s = score(ROWS, vectors)
    assert [m for _, m in s.pairs] == ["what is the purpose of life", "Why do we live?"]
    assert not s.right.any() and s.right_folded.all()
    raw, folded = s.at(0.4), s.at(0.4, folded=True)
    assert (raw["hits"], raw["right"], raw["precision"]) == (2, 0, 0.0)
    assert (folded["right"], folded["precision"], folded["recall"]) == (2, 1.0, 1.0)
    # Each origin's labelled duplicate was in the cache, second to the text of its own question.
    assert s.partner_rank.tolist() == [2, 2]
    assert s.partner_sim[0] == pytest.approx(0.9, abs=1e-3)
    audit = s.audit(0.4)
    assert [(w.origin, w.match, w.right_folded, w.partner_rank) for w in audit] == [
        ("What is the purpose of life?", "what is the purpose of life", True, 2),
        ("Why are we here?", "Why do we live?", True, 2)]
    assert [(w.sim, w.origin, w.match) for w in audit] == s.wrong(0.4)
    assert len(s.audit(0.99)) == s.at(0.99)["hits"] == 1 and s.audit(0.995) == []  # the first top match: 0.990


def test_a_right_hit_is_its_own_labelled_duplicate_ranked_first():
    s = score([{"origin": "Why are we here?", "similar": "Why do we live?"}], vectors)
    assert s.right.all() and s.partner_rank.tolist() == [1] and s.partner_sim[0] == pytest.approx(s.sim[0])
    assert s.audit(0.0) == []


def test_folded_figures_and_the_audit_need_what_score_records():
    bare = Scored(np.array([0.95], dtype=np.float32), np.array([False]), np.array([True]), np.array([False]),
                  (("a", "b"),))
    assert bare.at(0.9)["wrong"] == 1 and bare.wrong(0.9) == [(pytest.approx(0.95), "a", "b")]
    with pytest.raises(ValueError, match="folded"):
        bare.at(0.9, folded=True)
    with pytest.raises(ValueError, match="audit"):
        bare.audit(0.9)
