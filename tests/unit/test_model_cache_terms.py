"""A model's own prompt-cache terms (``ModelSpec.prompt_cache``, read through ``ProviderSpec.cache_of``): OpenAI bills
a cache write at 1.25x its input price from the GPT-5.6 family on and at 1x before it, and a GPT-6 prefix stays warm
for 30 minutes, so every bill, reservation and bound of the current models follows the model, not the provider."""

from __future__ import annotations

import math
from importlib import resources

import pytest

from actors.providers.openai_http import _usage_chat, _usage_responses
from engine.core.catalog import default_catalog, load_catalog
from engine.core.cost import CacheSplit, price_batch, price_text, price_usage, reserve_bound
from engine.core.errors import CatalogError
from engine.core.request import Request

CAT = default_catalog()
OA = CAT.provider("openai")
M = 1e-6


def load_catalog_text() -> str:
    return resources.files("engine").joinpath("data/catalog.yaml").read_text(encoding="utf-8")


def req(model: str, rid: str, blocks: list[int], tokens: int = 4000, out: int = 100, **kw) -> Request:
    return Request(id=rid, arrival_s=0.0, provider="openai", model=model, input_tokens=tokens, output_tokens=out,
                   prefix_blocks=blocks, **kw)


def test_the_default_catalog_prices_the_current_models_with_their_sources_terms():
    sol, luna = CAT.model("openai", "gpt-6.2-sol"), CAT.model("openai", "gpt-6-luna")
    assert (sol.input_per_mtok, sol.output_per_mtok, sol.max_input_tokens, sol.context_window) == (2.0, 10.0, 922_000,
                                                                                                   1_050_000)
    assert (luna.input_per_mtok, luna.output_per_mtok) == (0.10, 0.50)
    # $0.10 cached and $2.50 written of $2 input; $0.01 and $0.125 of $0.10; both warm for 30 minutes
    for model, read in (("gpt-6.2-sol", 0.05), ("gpt-6-luna", 0.1)):
        pc = OA.cache_of(model)
        assert (pc.read_multiplier, pc.write_multiplier, pc.ttl_s, pc.min_tokens) == (read, 1.25, 1800, 1024)
    for model in ("gpt-5", "gpt-5-mini", "gpt-5.4", "gpt-4o-mini"):  # before the GPT-5.6 family: no write charge
        assert OA.cache_of(model).write_multiplier == 1.0 and OA.cache_of(model).ttl_s == 300
    assert OA.cache_of("gpt-4o-mini").read_multiplier == 0.5 and OA.cache_of("gpt-5") == OA.prompt_cache
    an = CAT.provider("anthropic")
    assert an.cache_of("claude-sonnet-5-5").read_multiplier == 0.05  # $0.20 -> $0.10 of $2 on 2026-10-07
    assert an.cache_of("claude-opus-5-5").read_multiplier == 0.05 and an.cache_of("claude-haiku-4-5").min_tokens == 4096
    assert CAT.model("anthropic", "claude-haiku-5-5").long_context.above_input_tokens == 100_000
    assert str(CAT.model("anthropic", "claude-sonnet-4-5").shutdown) == "2026-11-30"


def test_an_overlay_in_the_older_spelling_still_gives_a_model_its_terms(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("providers:\n  openai:\n    models:\n"
                       "      gpt-5: {cache_read_multiplier: 0.25, cache_min_tokens: 2048}\n"
                       "      gpt-6.2-sol: {prompt_cache: {ttl_s: 43200, write_multiplier: 2.5}}\n")
    cat = load_catalog(None, overlay)
    pc = cat.provider("openai").cache_of("gpt-5")
    assert (pc.read_multiplier, pc.min_tokens, pc.write_multiplier) == (0.25, 2048, 1.0)
    twelve_hours = cat.provider("openai").cache_of("gpt-6.2-sol")  # "A 12-hour cache write costs $5"
    assert (twelve_hours.ttl_s, twelve_hours.write_multiplier, twelve_hours.read_multiplier) == (43200, 2.5, 0.05)


def test_a_gpt_6_cache_write_is_billed_at_1_25x_and_a_gpt_5_one_at_1x():
    split = CacheSplit(read=1024, write=2048, plain=928)
    sol = price_text(OA, CAT.model("openai", "gpt-6.2-sol"), split, 100, "sync")
    assert math.isclose(sol.cache_write, 2048 * 2.0 * 1.25 * M) and math.isclose(sol.cached_input, 1024 * 0.10 * M)
    gpt5 = price_text(OA, CAT.model("openai", "gpt-5"), split, 100, "sync")
    assert math.isclose(gpt5.cache_write, 2048 * 1.25 * M)  # 1x its $1.25 input
    # past 272K input tokens the cache rates double too, for the whole call; the batch API halves all
    long = price_text(OA, CAT.model("openai", "gpt-6.2-sol"), CacheSplit(0, 200_000, 80_000), 10, "batch_api")
    assert math.isclose(long.cache_write, 0.5 * 200_000 * 4.0 * 1.25 * M) and math.isclose(long.output, 0.5 * 150 * M)


def test_a_batch_the_bound_a_reservation_and_a_live_usage_price_the_write_alike():
    a, b = req("gpt-6.2-sol", "a", [1, 2, 3, 4]), req("gpt-6.2-sol", "b", [1, 2, 3, 4, 5])
    first, second = price_batch([a, b], CAT, "sync", block_tokens=512)
    assert math.isclose(first.cache_write, 2048 * 2.0 * 1.25 * M)  # the shared prefix, written once at 1.25x
    assert math.isclose(second.cached_input, 2048 * 0.10 * M)
    # a budget reserves every input token at the dearer of plain and written
    assert math.isclose(reserve_bound(a, CAT, "sync", 0), a.input_tokens * 2.0 * 1.25 * M)
    assert math.isclose(reserve_bound(req("gpt-5", "c", [1]), CAT, "sync", 0), 4000 * 1.25 * M)
    # the live engine reads the write from OpenAI's usage, and bills what the emulator and the provider bill
    chat = {"prompt_tokens": 4000, "completion_tokens": 100,
            "prompt_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 2048}}
    resp = {"input_tokens": 4000, "output_tokens": 100,
            "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 2048}}
    for usage in (_usage_chat(chat), _usage_responses(resp)):
        assert (usage.cache_read, usage.cache_write) == (1024, 2048)
        got = price_usage(a, CAT, "sync", input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                          cache_read=usage.cache_read, cache_write=usage.cache_write)
        assert math.isclose(got.total, (928 * 2.0 + 1024 * 0.10 + 2048 * 2.5 + 100 * 10.0) * M)


def test_an_older_overlay_overrides_the_default_models_own_terms_as_it_did(tmp_path):
    """The default catalog now gives gpt-4o-mini's, Haiku 4.5's and Gemini 2.5 Pro's terms in the newer spelling;
    an overlay in the older one still overrides them (merged as given, the default's prompt_cache kept its value
    and the overlay's was dropped without a word: gpt-4o-mini's reads billed at 0.5x where the overlay said 0.25x)."""
    overlay = tmp_path / "o.yaml"
    overlay.write_text("providers:\n  openai:\n    models:\n      gpt-4o-mini: {cache_read_multiplier: 0.25}\n"
                       "  anthropic:\n    models:\n      claude-haiku-4-5: {cache_min_tokens: 2048}\n"
                       "  google:\n    models:\n      gemini-2.5-pro: {cache_min_tokens: null}\n")
    cat = load_catalog(None, overlay)
    assert cat.provider("openai").cache_of("gpt-4o-mini").read_multiplier == 0.25
    assert cat.provider("anthropic").cache_of("claude-haiku-4-5").min_tokens == 2048
    assert cat.provider("google").cache_of("gemini-2.5-pro").min_tokens == 1024  # null: the provider's, as before
    mini = Request(id="m", arrival_s=0.0, provider="openai", model="gpt-4o-mini", input_tokens=4000, output_tokens=0)
    got = price_usage(mini, cat, "sync", input_tokens=4000, output_tokens=0, cache_read=2048)
    assert math.isclose(got.total, (1952 + 2048 * 0.25) * 0.15 * M)  # the parent commit's bill


def test_a_catalog_in_the_older_spelling_takes_an_overlay_in_the_newer_and_one_mapping_gives_one_value(tmp_path):
    base, over = tmp_path / "c.yaml", tmp_path / "o.yaml"
    base.write_text(load_catalog_text().replace("prompt_cache: {read_multiplier: 0.5}", "cache_read_multiplier: 0.5"))
    over.write_text("providers:\n  openai:\n    models:\n      gpt-4o-mini: {prompt_cache: {read_multiplier: 0.3}}\n")
    assert load_catalog(base, over).provider("openai").cache_of("gpt-4o-mini").read_multiplier == 0.3
    over.write_text("providers:\n  openai:\n    models:\n"
                    "      gpt-4o-mini: {cache_read_multiplier: 0.2, prompt_cache: {read_multiplier: 0.3}}\n")
    with pytest.raises(CatalogError, match=r"gpt-4o-mini.*cache_read_multiplier 0.2.*prompt_cache.read_multiplier 0.3"):
        load_catalog(None, over)

