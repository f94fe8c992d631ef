"""A model's own prompt-cache terms (``ModelSpec.prompt_cache``, read through ``ProviderSpec.cache_of``): OpenAI bills
a cache write at 1.25x its input price from the GPT-5.6 family on and at 1x before it, and a GPT-6 prefix stays warm
for 30 minutes, so every bill, reservation and bound of the current models follows the model, not the provider."""

from __future__ import annotations

import math
from importlib import resources

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from actors.providers.openai_http import _usage_chat, _usage_responses
from engine.core.catalog import default_catalog, load_catalog
from engine.core.cost import (
    CacheSplit,
    cache_split,
    mode_allowed,
    price_alone,
    price_batch,
    price_text,
    price_usage,
    reserve_bound,
)
from engine.core.errors import CatalogError
from engine.core.request import Request
from engine.emulator._cache import PromptCaches
from engine.emulator._text import Prompt, anthropic_prompt
from tests.unit.test_body_tokens import TOOL_USE_PROMPT

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
    # the whole prompt written at 1.25x (3,968 of 4,000 tokens: OpenAI's 128-token steps), the shared blocks read
    assert math.isclose(first.cache_write, 3968 * 2.0 * 1.25 * M)
    assert math.isclose(second.cached_input, 2048 * 0.10 * M) and math.isclose(second.cache_write, 1920 * 2.5 * M)
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
    """The default catalog now gives gpt-4o-mini's, Haiku 4.5's and Gemini 4 Argon's terms in the newer spelling;
    an overlay in the older one still overrides them (merged as given, the default's prompt_cache kept its value
    and the overlay's was dropped without a word: gpt-4o-mini's reads billed at 0.5x where the overlay said 0.25x)."""
    overlay = tmp_path / "o.yaml"
    overlay.write_text("providers:\n  openai:\n    models:\n      gpt-4o-mini: {cache_read_multiplier: 0.25}\n"
                       "  anthropic:\n    models:\n      claude-haiku-4-5: {cache_min_tokens: 2048}\n"
                       "  google:\n    models:\n      gemini-4-argon: {cache_min_tokens: null}\n")
    cat = load_catalog(None, overlay)
    assert cat.provider("openai").cache_of("gpt-4o-mini").read_multiplier == 0.25
    assert cat.provider("anthropic").cache_of("claude-haiku-4-5").min_tokens == 2048
    assert cat.provider("google").cache_of("gemini-4-argon").min_tokens == 2048  # null: the provider's, not its 4,096
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


def test_the_simulator_bills_a_gpt_6_call_as_the_emulator_does_its_whole_prompt_written():
    """An automatic cache writes the whole prompt it did not read, not only the blocks a request names as shared
    (the emulator does, and OpenAI's usage counts nearly all of a cold prompt in cache_write_tokens). At 1x that
    was no matter; at GPT-6's 1.25x the simulator, every estimate and the bound priced a cold gpt-6.2-sol call of
    4,000 tokens, 2 of them shared blocks, at $0.008712 where the emulator billed $0.010184 (a review)."""
    caches = PromptCaches()
    shared = "a" * 4 * 1024  # two 512-token blocks
    calls = [("gpt-6.2-sol", [11, 12], shared + "b" * 4 * 2976, 0.0), ("gpt-6.2-sol", [], "c" * 4 * 4000, 1.0),
             ("gpt-6.2-sol", [11, 12], shared + "d" * 4 * 2976, 900.0),  # reads the shared blocks: 30 minutes warm
             ("gpt-6-luna", [11, 12], shared + "e" * 4 * 2976, 901.0)]  # another model's cache: cold
    for k, (model, blocks, text, t) in enumerate(calls):
        spec = CAT.model("openai", model)
        split = caches.use(OA, spec, model, Prompt(text, (), text), t)
        r = req(model, f"r{k}", blocks, tokens=len(text) // 4)
        warm = 2 if k == 2 else 0
        assert split.read == warm * 512
        sim = price_alone(r, CAT, "sync", warm_blocks=warm, block_tokens=512)
        assert math.isclose(sim.total, price_text(OA, spec, split, r.output_tokens, "sync").total, rel_tol=1e-12), k


TEXT_MODELS = sorted((p, m) for p, prov in CAT.providers.items() for m, s in prov.models.items() if s.kind == "text")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEXT_MODELS), st.integers(1, 1_100_000), st.integers(1, 128_000), st.integers(0, 2_000_000),
       st.integers(0, 2_000_000), st.sampled_from(["sync", "batch_api"]), st.lists(st.integers(0, 9), max_size=6),
       st.integers(0, 6), st.booleans())
def test_no_usage_a_provider_answers_bills_more_than_its_reservation(pm, inp, cap, read, write, mode, blocks, warm,
                                                                     mark):
    """Every text model on its own cache terms (a GPT-6 write at 1.25x, its long prompts at 2x): whatever usage
    comes back for the request (reads and writes past its input included, which the bill clamps) and however the
    simulator splits it, the bill stays within what a hard budget reserved."""
    provider, model = pm
    spec = CAT.model(provider, model)
    if not mode_allowed(CAT.provider(provider), spec, mode):
        return
    cap = min(cap, spec.max_output_tokens)
    inp = max(min(inp, spec.max_input_tokens or inp, (spec.context_window or inp + cap) - cap), 0)
    r = Request(id="r", arrival_s=0.0, provider=provider, model=model, input_tokens=inp, output_tokens=1,
                max_output_tokens=cap, prefix_blocks=blocks)
    bound = reserve_bound(r, CAT, mode)
    billed = price_usage(r, CAT, mode, input_tokens=inp, output_tokens=r.max_output_tokens, cache_read=read,
                         cache_write=write)
    planned = price_alone(r, CAT, mode, warm_blocks=warm, write=mark).total
    assert billed.total <= bound * (1 + 1e-12) and planned <= bound * (1 + 1e-12), (billed, planned, bound)


CLAUDES = sorted(m for m, s in CAT.provider("anthropic").models.items() if s.kind == "text")
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CLAUDES), st.lists(st.text(max_size=400), min_size=1, max_size=4),
       _TEXT.filter(str.strip), st.sampled_from([None, "auto", "none", "any", "tool"]), st.integers(1, 128_000),
       st.sampled_from(["sync", "batch_api"]), st.floats(0, 1), st.floats(0, 1))
def test_no_usage_of_a_claude_call_with_tools_bills_more_than_a_reservation_of_its_own_output(
        model, descriptions, ask, kind, cap, mode, read_share, write_share):
    """The test above, for a call with tools: Anthropic bills it a tool-use system prompt (346 tokens, 313 when
    tool_choice forces a call) that the estimate left out, so a reservation of the request's own output
    (``budgets.reserve_output: request``) fell short of the bill of a short question with small tools. Whatever
    share of the bill is cache reads and writes, it stays within the reservation; and the emulator bills what
    Anthropic does."""
    spec = CAT.model("anthropic", model)
    if kind in ("any", "tool") and not spec.forced_tool_choice:
        return  # refused before it is estimated (Claude Fable 5.1)
    tools = [{"name": f"t{k}", "description": d, "input_schema": {"type": "object"}} for k, d in enumerate(descriptions)]
    choice = {} if kind is None else {"tool_choice": {"type": kind, **({"name": "t0"} if kind == "tool" else {})}}
    body = {"max_tokens": min(cap, spec.max_output_tokens), "messages": [{"role": "user", "content": ask}],
            "tools": tools, **choice}
    r = Request.model_validate({"id": "r", "arrival_s": 0.0, "model": model, "body": body})
    billed_in = anthropic_prompt(body).tokens + TOOL_USE_PROMPT[kind]  # its text and tools, and Anthropic's prompt
    read = int(billed_in * read_share)
    write = int((billed_in - read) * write_share)
    billed = price_usage(r, CAT, mode, input_tokens=billed_in, output_tokens=body["max_tokens"], cache_read=read,
                         cache_write=write)
    assert billed.total <= reserve_bound(r, CAT, mode, r.output_tokens) * (1 + 1e-12)
    assert anthropic_prompt(body, None, CAT.tool_prompt("anthropic", model)).tokens == billed_in


def test_a_live_usage_without_the_write_with_null_or_with_more_than_its_input_is_billed_within_its_reservation():
    a = req("gpt-6.2-sol", "a", [1, 2], out=100)
    bound = reserve_bound(a, CAT, "sync", 100)
    shapes = [({}, (0, 0)), ({"cached_tokens": None, "cache_write_tokens": None}, (0, 0)),
              ({"cached_tokens": 1024}, (1024, 0)), ({"cache_write_tokens": 9_000}, (0, 9_000))]
    for det, (read, write) in shapes:
        for usage in (_usage_chat({"prompt_tokens": 4000, "completion_tokens": 100, "prompt_tokens_details": det}),
                      _usage_responses({"input_tokens": 4000, "output_tokens": 100, "input_tokens_details": det})):
            assert (usage.cache_read, usage.cache_write) == (read, write)
            got = price_usage(a, CAT, "sync", input_tokens=4000, output_tokens=100, cache_read=read,
                              cache_write=write).total
            assert got <= bound * (1 + 1e-12)
    # a write past the input is billed as the whole input written, no more: the reservation's own figure
    assert math.isclose(got, bound)
    assert _usage_chat({"prompt_tokens": 10, "prompt_tokens_details": None}).cache_write == 0


def test_gemini_2_5_reads_a_warm_prefix_only_from_2048_tokens():
    """Google's caching page (its copies since 2026-07): "Gemini 2.5 Flash 2,048, Gemini 2.5 Pro 2,048". A warm
    1,536-token prefix at 2.5 Flash is billed plain (the catalog said 1,024 until stop 69 and priced it as a read);
    2,048 tokens are read."""
    cat = default_catalog()
    google = cat.provider("google")
    for model in ("gemini-2.5-flash", "gemini-2.5-pro"):
        spec = cat.model("google", model)
        assert cache_split(google, spec, 3000, 3, 3, 0, 512).read == 0
        assert cache_split(google, spec, 3000, 4, 4, 0, 512).read == 2048
