"""Implementations of ``engine.core.provider_api.Provider``: simulated, OpenAI-compatible over HTTP (Gemini's with its
media batches on Google's native routes), Anthropic over HTTP. ``make_provider`` picks one by configuration; the dispatcher knows only the protocol."""

from __future__ import annotations

from actors.providers.simulated import SimulatedProvider
from engine.core.catalog import Catalog
from engine.core.errors import ConfigError
from engine.core.provider_api import Provider, Secret
from engine.core.settings import Settings
from engine.runtime.providers import SimProvider

__all__ = ["SimulatedProvider", "make_provider"]


def make_provider(name: str, catalog: Catalog, settings: Settings, sim: SimProvider, clock,
                  key: Secret | None = None) -> Provider:
    """The provider for ``name``: over HTTP when ``settings.providers`` says so, else simulated."""
    if name not in settings.providers.http_providers(catalog.providers):
        return SimulatedProvider(sim, clock)
    ep = settings.providers.endpoints[name]
    if ep.api == "openai" and catalog.provider(name).compat == "gemini":  # its media batches on Google's routes
        from actors.providers.gemini_http import GeminiProvider

        return GeminiProvider(name, catalog, settings, ep, key, clock)
    if ep.api == "openai":
        from actors.providers.openai_http import OpenAIProvider

        return OpenAIProvider(name, catalog, settings, ep, key, clock)
    if ep.api == "anthropic":
        from actors.providers.anthropic_http import AnthropicProvider

        return AnthropicProvider(name, catalog, settings, ep, key, clock)
    raise ConfigError(f"providers.endpoints.{name}.api {ep.api!r} has no adapter; use openai or anthropic")
