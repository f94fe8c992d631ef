"""A ``near_threshold`` the user set below the floor in effect (keys84). Every near-duplicate class applies at least
``sim.near_floor``, raised to the vectors' tuned minimum of its kind while the embedding is installed (text 0.925,
images and video 0.95; ``engine.runtime.reuse.class_threshold``): a lower value was accepted without a word and
changed nothing (a helper's tour, stop 83: 0.88, 0.92 and 0.925 billed the same). The engine's start now warns
once, naming the field, the value, the floor in effect and the fix; no Ray (the start is cut short after it)."""

from __future__ import annotations

import logging

import pytest

from engine.core import embedding


class _Cut(Exception):
    """Raised where the start would check the cluster and start Ray: past the policy and its warning."""


def _start(monkeypatch, caplog, policy_params: dict | None, near_floor: float = 0.85) -> str:
    import actors.remote
    from engine.app.driver import Engine
    from engine.core.settings import Settings

    def cut(settings) -> None:
        raise _Cut

    monkeypatch.setattr(actors.remote, "check_cluster_modes", cut)
    settings = Settings(sim={"near_floor": near_floor})
    with caplog.at_level(logging.WARNING, logger="smartbatch"), pytest.raises(_Cut):
        Engine.start(settings, policy_params=policy_params)
    return "\n".join(r.getMessage() for r in caplog.records if "near_threshold" in r.getMessage())


def _with_embedding() -> bool:
    try:
        embedding.load_embedder()
    except ImportError:
        return False
    return True


def test_a_near_threshold_under_the_embeddings_floor_is_told_at_the_start(monkeypatch, caplog):
    """0.88 while the embedding is installed: every text class still needs 0.925. Fails on the code before: nothing
    was logged (``'' == ...``)."""
    if not _with_embedding():
        pytest.skip("wordllama is not installed: the floor is sim.near_floor (the next test)")
    said = _start(monkeypatch, caplog, {"near_threshold": 0.88})
    assert said.count("near_threshold = 0.88 is below the floor in effect, 0.925") == 1, said
    assert "tuned minimum for text (0.925; images and video 0.95)" in said, said
    assert "Set near_threshold to 0.925 or more" in said and "leave it out" in said, said


def test_without_the_embedding_the_floor_is_sim_near_floor(monkeypatch, caplog):
    """Without the embedding the floor is ``sim.near_floor`` alone: 0.8 under 0.85 is told, with that fix too."""
    monkeypatch.setattr(embedding, "load_embedder", lambda: (_ for _ in ()).throw(embedding.EmbeddingUnavailable("x")))
    monkeypatch.setattr(embedding, "embedding_installed", lambda: False)
    said = _start(monkeypatch, caplog, {"near_threshold": 0.8})
    assert "near_threshold = 0.8 is below the floor in effect, 0.85: sim.near_floor (0.85)" in said, said
    assert "or lower sim.near_floor first" in said, said


@pytest.mark.parametrize("params", [None, {"near_threshold": 0.95}, {"near_threshold": 0.88, "reuse_near": False}])
def test_no_word_for_the_default_a_value_at_the_floor_or_near_reuse_off(monkeypatch, caplog, params):
    """Smart's own default (0.92) is under text's floor too, but is not the user's doing (docs/policies.md says
    it); a value at or above the floor applies; with near reuse off the threshold is read by nothing."""
    assert _start(monkeypatch, caplog, params) == ""


def test_the_warning_reads_no_model_in_the_driver(monkeypatch, caplog):
    """The driver makes no vectors: telling the floor must not read the embedding's table into it for the engine's
    life (0.4 CPU-s and about 80 MB; a review, stop 84). Fails on the code before: the start loaded the model
    (``1 == 0``, the cached embedder)."""
    if not _with_embedding():
        pytest.skip("wordllama is not installed: there is no model to read")
    embedding.load_embedder.cache_clear()
    try:
        said = _start(monkeypatch, caplog, {"near_threshold": 0.88})
        assert embedding.load_embedder.cache_info().currsize == 0
    finally:
        embedding.load_embedder.cache_clear()
    assert "below the floor in effect, 0.925" in said, said
