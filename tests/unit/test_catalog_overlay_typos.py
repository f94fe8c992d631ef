"""A catalog overlay with a typo is told the name it may mean. Before (a new user's tour, stop 79), a misspelt
provider or model read as a new one missing its fields ("field 'providers.opnai.models.gpt-5.kind': Field
required", no word of 'openai'), and a misspelt field as "Extra inputs are not permitted" alone."""

from __future__ import annotations

import pytest

from engine.core.catalog import load_catalog
from engine.core.errors import CatalogError


@pytest.mark.parametrize(("overlay", "field", "said"), [
    ("providers:\n  opnai:\n    models:\n      gpt-5: {input_per_mtok: 1.0}\n",
     "providers.opnai.models.gpt-5.kind", "a new provider 'opnai', as the catalog has none of that name: did you "
                                          "mean 'openai'?"),
    ("providers:\n  openai:\n    models:\n      gpt-5.4-mni: {input_per_mtok: 1.0}\n",
     "providers.openai.models.gpt-5.4-mni.kind", "a new model 'gpt-5.4-mni' to openai, as the catalog has none of "
                                                 "that name: did you mean 'gpt-5.4-mini'?"),
    ("providers:\n  openai:\n    models:\n      gpt-5: {input_per_mtk: 1.0}\n",
     "providers.openai.models.gpt-5.input_per_mtk", "Extra inputs are not permitted; did you mean 'input_per_mtok'?"),
    ("providers:\n  openai:\n    batch_apii: {discount: 0.5}\n",
     "providers.openai.batch_apii", "Extra inputs are not permitted; did you mean 'batch_api'?"),
    # a review of stop 79: a name as its brand writes it was told nothing (difflib minds case)
    ("providers:\n  OpenAI:\n    models:\n      gpt-5: {input_per_mtok: 1.0}\n",
     "providers.OpenAI.models.gpt-5.kind", "a new provider 'OpenAI', as the catalog has none of that name: did you "
                                           "mean 'openai'?"),
    ("providers:\n  openai:\n    models:\n      GPT-5: {input_per_mtok: 1.0}\n",
     "providers.openai.models.GPT-5.kind", "did you mean 'gpt-5'?"),
], ids=["provider", "model", "model-field", "provider-field", "provider-case", "model-case"])
def test_an_overlay_s_typo_is_told_the_name_it_may_mean(tmp_path, overlay, field, said):
    path = tmp_path / "overlay.yaml"
    path.write_text(overlay)
    with pytest.raises(CatalogError) as info:
        load_catalog(None, path)
    assert f"field '{field}'" in str(info.value) and said in str(info.value), str(info.value)


def test_a_new_provider_far_from_every_name_is_told_only_what_it_lacks(tmp_path):
    path = tmp_path / "overlay.yaml"
    path.write_text("providers:\n  local-vllm:\n    models:\n      llama-3.1-8b: {input_per_mtok: 0.02}\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(None, path)
    text = str(info.value)
    assert "field 'providers.local-vllm.models.llama-3.1-8b.kind': Field required" in text and "mean" not in text
    path.write_text("providers:\n  local-vllm:\n    models:\n      llama-3.1-8b: {kind: text, input_per_mtok: 0.02, "
                    "output_per_mtok: 0.05}\n")
    assert "llama-3.1-8b" in load_catalog(None, path).provider("local-vllm").models  # as docs/providers.md adds it


def test_a_file_of_changes_given_as_the_whole_catalog_is_told_to_give_it_as_an_overlay(tmp_path):
    """docs/cost-model.md: prices come from the catalog, "or your own with --catalog". A file that changes one
    price of the packaged catalog, given as --catalog, read "field 'providers.openai.models.gpt-5-mini.kind':
    Field required" and no word of the flag that takes changes (a helper's tour, stop 83)."""
    path = tmp_path / "mine.yaml"
    path.write_text("providers:\n  openai:\n    models:\n      gpt-5-mini: {input_per_mtok: 0.25, output_per_mtok: 2.0}\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    text = str(info.value)
    assert "field 'providers.openai.models.gpt-5-mini.kind': Field required" in text, text
    assert "--catalog-overlay" in text and "packaged" in text, text
    # A whole catalog of a model of its own is told only what it lacks: its file is no change of the packaged one.
    path.write_text("providers:\n  local-vllm:\n    models:\n      llama-3.1-8b: {input_per_mtok: 0.02}\n")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert "Field required" in str(info.value) and "--catalog-overlay" not in str(info.value), str(info.value)
