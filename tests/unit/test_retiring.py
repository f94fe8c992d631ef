"""Models the provider shuts down: the catalog's ``shutdown`` days, and the warning a start that calls them gives."""

from __future__ import annotations

import datetime
import logging

import pytest

from engine.app.provider_setup import http_setup, retiring
from engine.core.catalog import default_catalog, load_catalog
from engine.core.errors import CatalogError
from engine.core.settings import ProviderEndpoint, ProvidersSettings, Settings

CAT = default_catalog()
DAY = datetime.date(2026, 12, 5)


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fake")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-fake")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    return monkeypatch


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "smartbatch.providers" and r.levelno == logging.WARNING]


def test_retiring_names_the_models_past_or_near_their_shutdown_day_and_no_other():
    dates = {m: s.shutdown for m, s in CAT.providers["openai"].models.items()}
    got = retiring(CAT, "openai", DAY)
    assert got == sorted(((m, d) for m, d in dates.items() if d is not None and (d - DAY).days <= 30),
                         key=lambda x: (x[1], x[0]))
    assert got and all(d is not None for _, d in got)
    gone = [(m, d) for m, d in got if d <= DAY]
    assert retiring(CAT, "openai", DAY, within_days=0) == gone
    assert retiring(CAT, "openai", datetime.date(2020, 1, 1)) == []


def test_a_start_against_the_real_api_warns_of_the_models_it_shuts_down(keys, caplog):
    settings = Settings(providers=ProvidersSettings(mode="http"))
    with caplog.at_level(logging.WARNING, logger="smartbatch.providers"):
        http_setup(CAT, settings, today=DAY)
    said = [m for m in _warned(caplog) if m.startswith("openai:")]
    assert len(said) == 1, _warned(caplog)
    soon = [m for m, d in retiring(CAT, "openai", DAY) if d > DAY]
    gone = [m for m, d in retiring(CAT, "openai", DAY) if d <= DAY]
    assert soon and gone
    for m in soon:
        d = CAT.providers["openai"].models[m].shutdown
        assert f"{m} shuts down on {d} (in {(d - DAY).days} days" in said[0]
    for m in gone:
        assert f"{m} shut down on {CAT.providers['openai'].models[m].shutdown}" in said[0]
    assert "--catalog-overlay" in said[0]
    # the models with no day, to move to
    assert "the catalog also prices gpt-5.4, gpt-5.4-mini, gpt-6.2-sol, gpt-6-luna;" in said[0]
    assert "gpt-4o-mini" not in said[0]  # 40 days on: not yet
    (claude,) = [m for m in _warned(caplog) if m.startswith("anthropic:")]
    assert "claude-sonnet-4-5 shut down on 2026-11-30 (successor: claude-sonnet-5-5)," in claude  # five days before
    assert ("the catalog also prices claude-haiku-4-5, claude-sonnet-5-5, claude-opus-5-5, claude-haiku-5-5, "
            "claude-fable-5-1, claude-fable-5;") in claude


def test_a_server_the_user_named_keeps_its_own_lineup_and_is_not_warned_of(keys, caplog):
    named = Settings(providers=ProvidersSettings(mode="http", endpoints={
        "openai": ProviderEndpoint(api="openai", api_key_env="OPENAI_API_KEY", base_url="http://127.0.0.1:9/v1")}))
    with caplog.at_level(logging.WARNING, logger="smartbatch.providers"):
        http_setup(CAT, named, today=DAY)
        keys.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # the SDK's own variable names a server too
        http_setup(CAT, Settings(providers=ProvidersSettings(mode="http")), today=DAY)
        http_setup(CAT, Settings(), today=DAY)  # simulated: nothing is called
    # (Anthropic's real API, named by no one, is warned of: its claude-sonnet-4-5 has shut down)
    assert not [m for m in _warned(caplog) if not m.startswith("anthropic:")]


def test_an_overlay_gives_or_takes_back_a_shutdown_day_and_a_bad_one_names_the_field(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("providers:\n  openai:\n    models:\n      gpt-5-mini: {shutdown: null}\n"
                       "  anthropic:\n    models:\n      claude-haiku-4-5: {shutdown: 2026-12-20}\n")
    cat = load_catalog(None, overlay)
    assert cat.model("openai", "gpt-5-mini").shutdown is None
    assert retiring(cat, "anthropic", DAY) == [("claude-sonnet-4-5", datetime.date(2026, 11, 30)),
                                               ("claude-haiku-4-5", datetime.date(2026, 12, 20))]
    overlay.write_text("providers:\n  openai:\n    models:\n      gpt-5: {shutdown: next week}\n")
    with pytest.raises(CatalogError, match="shutdown"):
        load_catalog(None, overlay)


def test_a_start_at_googles_address_warns_of_its_retired_veo_previews(keys, caplog):
    """Gemini's preset names Google's own address as its base_url: read as a server the user named, its retired
    models passed unsaid (a helper's tour). OpenAI's own address given as a base_url is OpenAI's too."""
    keys.setenv("GEMINI_API_KEY", "gem-test-fake")
    with caplog.at_level(logging.WARNING, logger="smartbatch.providers"):
        http_setup(CAT, Settings(providers=ProvidersSettings(mode="http", endpoints={"google": {}})), today=DAY)
        keys.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1")
        http_setup(CAT, Settings(providers=ProvidersSettings(mode="http", endpoints={"openai": {}})), today=DAY)
    (google,) = [m for m in _warned(caplog) if m.startswith("google:")]
    assert ("veo-3.1-fast-generate-preview shut down on 2026-10-22 (successor: veo-3.1-fast-generate-001); "
            "veo-3.1-generate-preview shut down on 2026-10-22 (successor: veo-3.1-generate-001)") in google
    (openai,) = [m for m in _warned(caplog) if m.startswith("openai:")]
    assert "sora-2 shut down on 2026-09-24" in openai


def test_a_retired_models_warning_names_its_successor_and_a_model_with_none_says_none(keys, caplog):
    """The warning said a model shut down and to name a successor in a catalog, when the catalog names one: the
    user was sent to research what it already knew (gpt-image-1's gpt-image-2, gpt-5's gpt-5.4)."""
    with caplog.at_level(logging.WARNING, logger="smartbatch.providers"):
        http_setup(CAT, Settings(providers=ProvidersSettings(mode="http")), today=DAY)
    (said,) = [m for m in _warned(caplog) if m.startswith("openai:")]
    assert "gpt-image-1 shut down on 2026-10-23 (successor: gpt-image-2);" in said
    assert "gpt-5 shuts down on 2026-12-11 (in 6 days; successor: gpt-5.4);" in said
    assert "sora-2 shut down on 2026-09-24;" in said  # OpenAI names no replacement: none is invented
