"""The models added to the default catalog from their providers' pages (read 2026-12-05): each loads with its page's
figures, and one call at each of its tiers is billed through ``price_text`` at prices written here from the page, not
read back from the catalog (docs/providers.md, "The default catalog's current models")."""

from __future__ import annotations

import math

from engine.core.catalog import default_catalog
from engine.core.cost import CacheSplit, cache_split, price_text

CAT = default_catalog()
M = 1e-6


def bill(provider: str, model: str, split: CacheSplit, out: int, mode: str = "sync") -> float:
    return price_text(CAT.provider(provider), CAT.model(provider, model), split, out, mode).total  # type: ignore[arg-type]


def test_gemini_4_argon_bills_its_price_after_the_introductory_one_at_any_prompt_length():
    argon = CAT.model("google", "gemini-4-argon")
    # "a unified 1M input-output token limit", 65,536 out a request, no long-prompt tier on the page
    assert (argon.context_window, argon.max_input_tokens, argon.max_output_tokens) == (1_048_576, None, 65_536)
    assert argon.long_context is None and argon.shutdown is None
    google = CAT.provider("google")
    pc = google.cache_of("gemini-4-argon")
    assert (pc.automatic, pc.min_tokens, pc.read_multiplier) == (True, 4096, 0.1)
    # "$4/1M input and $20/1M output" after Nov 30, 2026; a cache hit at 0.1x (ASSUMPTION); the batch API at half
    assert math.isclose(bill("google", "gemini-4-argon", CacheSplit(8192, 0, 1808), 500),
                        (1808 * 4.00 + 8192 * 0.40 + 500 * 20.00) * M)
    assert math.isclose(bill("google", "gemini-4-argon", CacheSplit(0, 0, 900_000), 1000, "batch_api"),
                        0.5 * (900_000 * 4.00 + 1000 * 20.00) * M)  # past 200K: the same rates
    # a prefix under the 4,096-token minimum is never read from the cache, one over it is
    spec = CAT.model("google", "gemini-4-argon")
    assert cache_split(google, spec, 5000, 7, 7, 0, 512).read == 0  # 3,584 warm: under its minimum
    assert cache_split(google, CAT.model("google", "gemini-2.5-pro"), 5000, 7, 7, 0, 512).read == 3584  # 2,048's
    assert cache_split(google, spec, 5000, 8, 8, 0, 512).read == 4096


def test_the_gemini_2_5_models_keep_no_shutdown_day_the_official_page_did_not_give():
    for model in ("gemini-2.5-flash", "gemini-2.5-pro"):
        assert CAT.model("google", model).shutdown is None


def test_claude_fable_5_1_bills_a_cache_read_at_a_quarter_of_fable_5s():
    for model in ("claude-fable-5-1", "claude-fable-5"):
        spec = CAT.model("anthropic", model)
        assert (spec.context_window, spec.max_output_tokens, spec.adaptive_only) == (1_000_000, 128_000, True)
        assert spec.long_context is None
    assert not CAT.model("anthropic", "claude-fable-5-1").forced_tool_choice
    assert CAT.model("anthropic", "claude-fable-5").forced_tool_choice
    split = CacheSplit(read=20_000, write=5_000, plain=1_000)
    # $10 in, $50 out; a 5-minute write at the provider's 1.25x; a read at $0.25 (Fable 5.1), $1.00 (Fable 5)
    assert math.isclose(bill("anthropic", "claude-fable-5-1", split, 2_000),
                        (1_000 * 10 + 20_000 * 0.25 + 5_000 * 12.50 + 2_000 * 50) * M)
    assert math.isclose(bill("anthropic", "claude-fable-5", split, 2_000),
                        (1_000 * 10 + 20_000 * 1.00 + 5_000 * 12.50 + 2_000 * 50) * M)
    # one price at any prompt length; the batch API halves it all
    assert math.isclose(bill("anthropic", "claude-fable-5-1", CacheSplit(0, 0, 600_000), 1_000, "batch_api"),
                        0.5 * (600_000 * 10 + 1_000 * 50) * M)
