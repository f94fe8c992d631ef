import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.features import compat_key, featurize, featurize_texts, fingerprint, normalise_prompt
from engine.core.request import Request, validation_context

CTX = validation_context()  # settings read once, not per request


def req(**kw):
    base = {"id": "a", "arrival_s": 0, "model": "flux-1-dev", "prompt": "a red car at night"}
    base.update(kw)
    return Request.model_validate(base, context=CTX)


def test_vectors_are_fixed_length_unit_float32_and_stable():
    texts = ["a red car at night", "", "Hugging Face Hub is a platform", "x"]
    m = featurize_texts(texts)
    assert m.shape == (4, 1024) and m.dtype == np.float32
    norms = np.linalg.norm(m, axis=1)
    assert np.allclose(norms[[0, 2, 3]], 1.0, atol=1e-5) and norms[1] == 0
    assert np.array_equal(m, featurize_texts(texts))  # hashing is stable (crc32, not hash())


def test_paraphrases_score_higher_than_unrelated_prompts():
    m = featurize_texts([
        "Hugging Face Hub is a platform to host Git-based models, datasets, and Spaces.",
        "Hugging Face Hub serves as a repository for Git-based models, datasets, and Spaces.",
        "What is the best way to cook rice in a pressure cooker?",
    ])
    assert m[0] @ m[1] > 0.5 > m[0] @ m[2]


def test_params_change_the_vector_and_dim_is_configurable():
    a, b = featurize([req(), req(params={"size": "512x512"})])
    assert 0.5 < a @ b < 0.999
    assert featurize([req()], dim=64).shape == (1, 64)


def test_ten_thousand_requests_in_one_call():
    reqs = [req(id=str(i), prompt=f"product {i} description in a friendly tone") for i in range(10_000)]
    m = featurize(reqs)
    assert m.shape == (10_000, 1024) and np.isfinite(m).all()
    assert len({m[i].tobytes() for i in range(0, 10_000, 997)}) == len(range(0, 10_000, 997))


def test_compat_key_separates_what_cannot_share_a_batch():
    assert compat_key(req()) == compat_key(req(id="b", prompt="other", priority="urgent"))
    assert compat_key(req()) != compat_key(req(params={"size": "512x512"}))
    v1 = req(model="wan-2.1-t2v", params={"resolution": "480p", "duration_s": 5})
    v2 = req(model="wan-2.1-t2v", params={"resolution": "480p", "duration_s": 4})
    assert compat_key(v1) != compat_key(v2)
    t1 = Request.model_validate({"id": "t", "arrival_s": 0, "model": "gpt-5", "prompt": "x"})
    assert compat_key(t1) == ("openai", "gpt-5", "text")


def test_fingerprint_covers_output_and_ignores_scheduling_fields():
    base = req()
    same = req(id="other", arrival_s=99, priority="background", deadline_s=5, reuse="near",
               prompt="  a red   car at night ")
    assert fingerprint(base) == fingerprint(same)
    assert fingerprint(base) != fingerprint(req(tenant="t2"))
    assert fingerprint(base, share_across_tenants=True) == fingerprint(req(tenant="t2"), share_across_tenants=True)
    assert fingerprint(base) != fingerprint(req(params={"size": "512x512"}))
    assert fingerprint(base) != fingerprint(req(prompt="A red car at night"))  # case can change an output


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .\t\n\r\x0b\x0c\x1c\x1f\x85\u00a0\u1680\u2003\u2028\u3000\u200b"
                                             "\ufb01\uff21\u00e9e\u0301")), max_size=40))
def test_normalise_prompt_is_nfkc_with_whitespace_runs_folded(text):
    """The fast path (ASCII skips NFKC; str.split folds whitespace) gives the text the rule defines, on the
    characters where the two could part: Unicode spaces, separators, compatibility forms, combining marks."""
    import re
    import unicodedata

    assert normalise_prompt(text) == re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def test_a_power_of_two_width_takes_the_column_the_modulo_gives():
    """A width that is a power of two takes its column with a mask, any other width with the modulo. A hash's
    column at 3 x 128 is, modulo 128, its column at 128, so the wide rows folded onto 128 columns must be the
    narrow rows: this ties the mask to the modulo (rows compared only with rows of the same code could not)."""
    texts = ["How do I cook rice?", "A red car at night, café naïve", "x", "", "summarise the report " * 300]
    narrow = featurize_texts(texts, dim=128)
    folded = featurize_texts(texts, dim=3 * 128).reshape(len(texts), 3, 128).sum(axis=1)
    lengths = np.linalg.norm(folded, axis=1, keepdims=True)
    lengths[lengths == 0] = 1.0
    assert np.allclose(folded / lengths, narrow, atol=1e-6)
    assert not narrow[3].any() and narrow[:3].any(axis=1).all()


def test_no_tenant_shares_the_scope_of_results_shared_across_tenants():
    """Tenants "*" and "_shared" were the shared scopes' own names: an engine that keeps tenants apart, warmed
    from a Redis another engine shared results in, served them alice's result (a helper's hunt)."""
    from actors.cache import tenant_scope

    alice = req(tenant="alice")
    for name in ("*", "_shared", "\\x00*"):
        assert fingerprint(req(tenant=name)) != fingerprint(alice, share_across_tenants=True)
        assert tenant_scope(name, False) != tenant_scope("alice", True)
    assert tenant_scope("alice", True) == tenant_scope("bob", True)
