"""The cost model's documented rules, as properties (docs/cost-model.md)."""

import math
import re

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine.core.catalog import default_catalog
from engine.core.cost import cache_split, price_alone, price_batch, price_usage, reserve_bound
from engine.core.errors import CatalogError
from engine.core.request import Request

CAT = default_catalog()
TEXT_MODELS = [(p, m) for p, spec in CAT.providers.items() for m, ms in spec.models.items() if ms.kind == "text"]
GPU_MODELS = [(p, m) for p, spec in CAT.providers.items() for m, ms in spec.models.items() if ms.gpu_priced]
HOSTED_MEDIA = [(p, m) for p, spec in CAT.providers.items() for m, ms in spec.models.items()
                if ms.kind != "text" and not ms.gpu_priced]


@st.composite
def text_requests(draw, provider=None, model=None, n=None):
    if provider is None:
        provider, model = draw(st.sampled_from(TEXT_MODELS))
    k = n or draw(st.integers(1, 12))
    roots = draw(st.lists(st.integers(0, 3), min_size=k, max_size=k))
    out = []
    for i in range(k):
        depth = draw(st.integers(0, 8))
        # Prefix ids name a whole prefix: requests of one root share its leading ids.
        blocks = [roots[i] * 100 + j for j in range(depth)]
        # A request may end inside its shared blocks (a short turn of a long conversation): it reads only what
        # its input reaches (a hunt found the writer's mark counting the rest).
        tail = draw(st.integers(-2000, 3000))
        out.append(Request.model_validate({
            "id": f"r{i}", "arrival_s": 0, "provider": provider, "model": model,
            "input_tokens": max(depth * 512 + tail, 0), "output_tokens": draw(st.integers(0, 4000)),
            "prefix_blocks": blocks}))
    return out


@hsettings(max_examples=200, deadline=None)
@given(text_requests(), st.sampled_from(["sync", "batch_api"]), st.integers(0, 8), st.booleans())
def test_text_cost_is_never_negative(reqs, mode, warm, write):
    for r in reqs:
        assert price_alone(r, CAT, mode, warm_blocks=warm, write=write).total >= 0
    assert all(p.total >= 0 for p in price_batch(reqs, CAT, mode))


@hsettings(max_examples=300, deadline=None)
@given(text_requests(), st.sampled_from(["sync", "batch_api"]))
def test_a_text_batch_never_costs_more_than_its_items_alone(reqs, mode):
    together = sum(p.total for p in price_batch(reqs, CAT, mode))
    alone = sum(price_alone(r, CAT, mode).total for r in reqs)
    assert together <= alone + 1e-12


@pytest.mark.parametrize("mode", ["sync", "batch_api"])
def test_a_writer_marks_no_block_that_its_only_later_sharer_is_too_short_to_read(mode):
    """Sonnet reads nothing under 1,024 tokens: a 1,000-token reader of the writer's first two blocks reads
    nothing, so the writer pays no 1.25x write for it (it did: $0.004884 in a batch against $0.004500 alone)."""
    def sonnet(i, blocks, n_in):
        return Request.model_validate({"id": f"r{i}", "arrival_s": 0, "model": "claude-sonnet-4-5",
                                       "input_tokens": n_in, "output_tokens": 100, "prefix_blocks": blocks})

    writer, reader = sonnet(0, [0, 1, 2], 2000), sonnet(1, [0, 1], 1000)
    together = price_batch([writer, reader], CAT, mode)
    assert [p.total for p in together] == pytest.approx([price_alone(r, CAT, mode).total for r in (writer, reader)])
    long_reader = sonnet(2, [0, 1], 1100)  # reaches the minimum: now the write pays for itself
    assert sum(p.total for p in price_batch([writer, long_reader], CAT, mode)) < sum(
        price_alone(r, CAT, mode).total for r in (writer, long_reader))


@hsettings(max_examples=100, deadline=None)
@given(st.sampled_from(GPU_MODELS), st.integers(1, 8), st.data())
def test_a_gpu_batch_never_costs_more_than_its_jobs_alone(pm, b, data):
    provider, model = pm
    spec = CAT.model(provider, model)
    table = spec.gpu_s_per_image or spec.gpu_s_per_video_second
    key = "size" if spec.gpu_s_per_image else "resolution"
    choice = data.draw(st.sampled_from(sorted(table)))
    reqs = [Request.model_validate({"id": f"g{i}", "arrival_s": 0, "provider": provider, "model": model,
                                    "prompt": "p", "params": {key: choice}}) for i in range(b)]
    together = price_batch(reqs, CAT, "gpu_batch")
    alone = [price_alone(r, CAT, "sync") for r in reqs]
    assert sum(p.total for p in together) <= sum(p.total for p in alone) + 1e-12
    assert all(p.total > 0 for p in together)


@pytest.mark.parametrize("provider, model", TEXT_MODELS)
def test_batch_discount_is_exactly_the_catalogs(provider, model):
    # 1,000 input tokens: under every model's cache minimum (GPT-6's automatic cache writes a longer prompt at 1.25x)
    r = Request.model_validate({"id": "a", "arrival_s": 0, "provider": provider, "model": model,
                                "input_tokens": 1000, "output_tokens": 567})
    spec, prov = CAT.model(provider, model), CAT.provider(provider)
    sync = price_alone(r, CAT, "sync").total
    assert sync == pytest.approx((1000 * spec.input_per_mtok + 567 * spec.output_per_mtok) / 1e6, rel=1e-12)
    assert price_alone(r, CAT, "batch_api").total == pytest.approx((1 - prov.batch_api.discount) * sync, rel=1e-12)
    assert price_alone(r, CAT, "reuse").total == 0


def test_cache_read_and_write_multipliers_are_exact():
    # Anthropic: explicit cache, write 1.25x, read 0.1x, stacks with the batch discount.
    prov, spec = CAT.provider("anthropic"), CAT.model("anthropic", "claude-sonnet-4-5")
    p_in = spec.input_per_mtok / 1e6
    mk = lambda i: Request.model_validate({"id": str(i), "arrival_s": 0, "model": "claude-sonnet-4-5",
                                           "input_tokens": 3000, "output_tokens": 0, "prefix_blocks": [1, 2, 3, 4 + i]})
    r0, r1 = mk(0), mk(1)
    assert price_alone(r0, CAT, "sync").total == pytest.approx(3000 * p_in)  # unmarked: no cache
    written = price_alone(r0, CAT, "sync", write=True)
    assert written.cache_write == pytest.approx(2048 * 1.25 * p_in) and written.input == pytest.approx(952 * p_in)
    read = price_alone(r1, CAT, "sync", warm_blocks=3)
    assert read.cached_input == pytest.approx(1536 * 0.1 * p_in) and read.input == pytest.approx(1464 * p_in)
    b = price_batch([r0, r1], CAT, "batch_api")
    # r0 marks the 3 blocks r1 shares (1536 tokens, >= 1024 minimum); r1 reads them; all at 50 %.
    assert b[0].cache_write == pytest.approx(0.5 * 1536 * 1.25 * p_in)
    assert b[1].cached_input == pytest.approx(0.5 * 1536 * 0.1 * p_in)
    assert prov.prompt_cache.stacks_with_batch
    # r0's attempt fails: it is billed nothing and writes nothing, so r1 has nothing to read; r0's mark stands.
    f = price_batch([r0, r1], CAT, "batch_api", failed=[0])
    assert f[1].cached_input == 0.0 and f[1].input == pytest.approx(0.5 * 3000 * p_in)
    assert f[0] == b[0]


def test_reads_below_the_minimum_or_off_granularity_are_not_cached():
    prov, spec = CAT.provider("openai"), CAT.model("openai", "gpt-5")
    assert cache_split(prov, spec, 5000, 1, 1, 0, 512) == (0, 0, 5000, 0)  # 512-token prefix < 1024 minimum
    s = cache_split(prov, spec, 5000, 3, 3, 0, 500)  # 1500 warm -> rounded down to 1408 (128-token steps)
    assert s.read == 1408 and s.read % prov.prompt_cache.block_tokens == 0
    assert cache_split(prov, spec, 5000, 3, 0, 0, 512).write == 1536  # automatic cache writes the prefix


def test_gpu_batch_formula():
    prov, spec = CAT.provider("modal-h100"), CAT.model("modal-h100", "flux-1-dev")
    gb = prov.gpu_batching
    reqs = [Request.model_validate({"id": str(i), "arrival_s": 0, "model": "flux-1-dev", "prompt": "x"})
            for i in range(4)]
    unit = spec.gpu_s_per_image["1024x1024"]
    share = gb.price_per_gpu_s * (gb.setup_s / 4 + unit / gb.speedup_at(4))
    assert [p.total for p in price_batch(reqs, CAT, "gpu_batch")] == pytest.approx([share] * 4)
    assert price_alone(reqs[0], CAT, "sync").total == pytest.approx(gb.price_per_gpu_s * (gb.setup_s + unit))


@pytest.mark.parametrize("provider, model", HOSTED_MEDIA)
def test_hosted_media_is_list_price_and_its_prompt_tokens_where_the_catalog_prices_them(provider, model):
    """gpt-image-1 bills the prompt's text tokens ($5 per million) beside the image: a bill without them was 27 %
    short for a 3,000-token prompt (a hunt)."""
    spec = CAT.model(provider, model)
    r = Request.model_validate({"id": "m", "arrival_s": 0, "provider": provider, "model": model,
                                "prompt": "x" * 12_000})
    want = (spec.per_image[r.params["size"]] if spec.kind == "image"
            else spec.per_second[r.params["resolution"]] * r.params["duration_s"])
    prompt = (spec.prompt_per_mtok or 0.0) * r.input_tokens / 1e6
    assert r.input_tokens == 3_000 and (prompt > 0) == model.startswith(("gpt-image", "gemini-2.5-flash-image"))
    p = price_alone(r, CAT, "sync")
    assert p.total == pytest.approx(want + prompt) and p.media == pytest.approx(want) and p.input == pytest.approx(prompt)
    counted = price_usage(r, CAT, "sync", input_tokens=4_000, output_tokens=0)  # as the answer's usage says
    assert counted.total == pytest.approx(want + prompt * 4 / 3)


def test_unavailable_modes_are_refused_with_the_reason():
    img = Request.model_validate({"id": "i", "arrival_s": 0, "model": "imagen-4", "prompt": "x"})
    with pytest.raises(CatalogError, match="batch_api.media_models"):  # google batches images, not Imagen
        price_alone(img, CAT, "batch_api")
    with pytest.raises(CatalogError, match="not GPU-priced"):
        price_batch([img], CAT, "gpu_batch")
    flux = [Request.model_validate({"id": str(i), "arrival_s": 0, "model": "flux-1-dev", "prompt": "x"})
            for i in range(9)]
    with pytest.raises(CatalogError, match="max_batch"):
        price_batch(flux, CAT, "gpu_batch")


def test_speedup_curve_must_be_physical(tmp_path):
    from engine.core.catalog import load_catalog

    bad = (tmp_path / "c.yaml")
    bad.write_text("""
providers:
  gpu:
    failure_rate: 0
    rate_limits: {rpm: 1, tpm: 1, max_concurrency: 1}
    sync_latency: {base_s: 1}
    gpu_batching: {price_per_gpu_s: 1, setup_s: 1, max_batch: 4, speedup: [[1, 1.0], [2, 2.5]]}
    models:
      m: {kind: image, gpu_s_per_image: {"1x1": 1}}
""")
    with pytest.raises(CatalogError, match=r"providers.gpu.gpu_batching.speedup.*faster than linear"):
        load_catalog(bad)


def test_default_catalog_has_the_required_models_with_sources():
    from importlib import resources

    kinds = {(p, m): (ms.kind, ms.gpu_priced, bool(ms.per_second), bool(ms.per_image))
             for p, spec in CAT.providers.items() for m, ms in spec.models.items()}
    assert sum(1 for (p, _), k in kinds.items() if p == "openai" and k[0] == "text") >= 2
    assert sum(1 for (p, _), k in kinds.items() if p == "anthropic" and k[0] == "text") >= 2
    assert any(p == "google" and k[0] == "text" for (p, _), k in kinds.items())
    assert any(k[0] == "video" and k[2] and len(CAT.model(*pm).per_second) >= 2 for pm, k in kinds.items())
    assert any(k[0] == "image" and k[3] for k in kinds.values())
    assert any(k[1] for k in kinds.values())
    text = resources.files("engine").joinpath("data/catalog.yaml").read_text()
    for name in CAT.providers:
        block = text.split(f"\n  {name}:", 1)[1]
        assert "Source: https://" in block.split("\n  ", 2)[1] or "Source: https://" in block[:400], name
    assert text.count("ASSUMPTION") >= 10
    assert math.isclose(CAT.provider("anthropic").prompt_cache.write_multiplier, 1.25)


@pytest.mark.parametrize("model", ["flux-1-dev", "wan-2.1-t2v"])
def test_a_gpu_job_pays_and_reserves_for_the_sampler_steps_it_asks(model):
    """GPU seconds are linear in diffusion steps; the catalog's seconds are at the model's ``gpu_steps``. Priced
    from the table alone, steps=1000 on flux-1-dev cost $0.0132 (the 28-step price) alone and in its reservation,
    against $0.1655 for the GPU time it runs: a hard budget reserved 8 % of the bill."""
    from engine.core.cost import gpu_unit_seconds, reserve_bound

    spec = CAT.model("modal-h100", model)
    gb = CAT.provider("modal-h100").gpu_batching

    def req(params):
        return Request.model_validate({"id": "s", "arrival_s": 0, "model": model, "prompt": "a fox", "params": params})

    plain, at_ref, many = req({}), req({"steps": spec.gpu_steps}), req({"steps": 1000})
    assert gpu_unit_seconds(spec, at_ref.params) == gpu_unit_seconds(spec, plain.params)
    unit = gpu_unit_seconds(spec, plain.params) * 1000 / spec.gpu_steps
    assert gpu_unit_seconds(spec, many.params) == pytest.approx(unit)
    alone = gb.price_per_gpu_s * (gb.setup_s + unit)
    assert price_alone(many, CAT).total == pytest.approx(alone)
    assert reserve_bound(many, CAT, "gpu_batch") == pytest.approx(alone)
    assert price_batch([many] * 4, CAT, "gpu_batch")[0].total <= alone


def test_a_hosted_image_is_priced_and_reserved_at_its_quality():
    """gpt-image-1 was priced at medium whatever quality a request asked: a high-quality image cost 4x its
    figure, and a budget reserved a quarter of it."""
    from engine.core.cost import price_alone, reserve_bound
    from engine.core.request import Request

    cat = default_catalog()

    def image(**params):
        return Request.model_validate({"id": "i", "arrival_s": 0.0, "model": "gpt-image-1", "prompt": "a cat",
                                       "params": params})

    # the image's part (its 2-token prompt adds $0.00001)
    prices = {q: price_alone(image(quality=q), cat, "sync").media for q in ("low", "medium", "high")}
    assert prices == pytest.approx({"low": 0.011, "medium": 0.042, "high": 0.167})
    assert price_alone(image(), cat, "sync").media == pytest.approx(0.042)  # none asked: the catalog's default
    assert price_alone(image(quality="auto"), cat, "sync").media == pytest.approx(0.167)  # the provider picks
    assert price_alone(image(quality="high", size="1536x1024"), cat, "sync").media == pytest.approx(0.25)
    assert reserve_bound(image(quality="high"), cat, "sync") >= 0.167


def test_gpt_image_2_is_priced_per_image_at_the_guides_figures_and_its_prompt_at_5_per_million():
    """gpt-image-1 shut down on 2026-10-23 and the catalog priced no image model OpenAI serves: gpt-image-2's
    figures are its image output tokens at $30 per million (7,024 at high quality square, 5,488 landscape: the
    image guide's), and its text prompt at $5 per million, through the same cost model as gpt-image-1's."""
    from engine.core.cost import price_alone, reserve_bound
    from engine.core.request import Request

    cat = default_catalog()

    def image(**params):
        return Request.model_validate({"id": "i", "arrival_s": 0.0, "model": "gpt-image-2", "prompt": "x" * 4000,
                                       "params": params})

    assert price_alone(image(quality="high"), cat, "sync").media == pytest.approx(7024 * 30 / 1e6, abs=5e-4)
    assert price_alone(image(quality="high", size="1536x1024"), cat, "sync").media == pytest.approx(
        5488 * 30 / 1e6, abs=5e-4)
    got = {q: price_alone(image(quality=q), cat, "sync") for q in ("low", "medium", "high")}
    assert {q: p.media for q, p in got.items()} == pytest.approx({"low": 0.006, "medium": 0.053, "high": 0.211})
    assert all(p.input == pytest.approx(1000 * 5.0 / 1e6) for p in got.values())  # 4,000 bytes: 1,000 tokens
    assert price_alone(image(quality="auto"), cat, "sync").media == pytest.approx(0.211)  # the provider picks
    assert reserve_bound(image(), cat, "sync") >= 0.211  # none asked is "auto": reserved at the dearest


def test_a_gemini_25_pro_prompt_past_200k_tokens_is_billed_whole_at_the_long_prompt_prices():
    """Google's pricing page (https://ai.google.dev/gemini-api/docs/pricing): Gemini 2.5 Pro costs $1.25 in and
    $10 out per million for prompts up to 200k tokens and $2.50 / $15 past that, for the whole call, its cached
    input at 0.1x of either. The catalog held the first tier only, and takes prompts up to 1,048,576 tokens: a
    500k-token prompt was counted at about half its bill ($0.635 against $1.265 with 1,000 tokens out)."""
    from engine.core.cost import reserve_bound

    def pro(n_in, model="gemini-2.5-pro", cap=None):
        return Request.model_validate({"id": "g", "arrival_s": 0, "provider": "google", "model": model,
                                       "input_tokens": n_in, "output_tokens": 1_000, "max_output_tokens": cap})

    def usd(n_in, p_in, p_out, read=0):
        return ((n_in - read) * p_in + read * p_in * 0.1 + 1_000 * p_out) / 1e6

    assert price_alone(pro(200_000), CAT).total == pytest.approx(usd(200_000, 1.25, 10.0))  # the tier's edge
    assert price_alone(pro(200_001), CAT).total == pytest.approx(usd(200_001, 2.50, 15.0))
    assert price_alone(pro(500_000), CAT).total == pytest.approx(usd(500_000, 2.50, 15.0))
    assert price_alone(pro(500_000), CAT, "batch_api").total == pytest.approx(usd(500_000, 2.50, 15.0) / 2)
    # From a call's usage, cache reads included in the prompt's length: 300k tokens, 100k of them read.
    got = price_usage(pro(300_000), CAT, "sync", input_tokens=300_000, output_tokens=1_000, cache_read=100_000)
    assert got.total == pytest.approx(usd(300_000, 2.50, 15.0, read=100_000))
    # A budget reserves the long prices for a prompt that may pass the tier.
    assert reserve_bound(pro(500_000, cap=1_000), CAT, "sync") >= usd(500_000, 2.50, 15.0)
    # Gemini 2.5 Flash has one price at any length.
    assert price_alone(pro(500_000, "gemini-2.5-flash"), CAT).total == pytest.approx(usd(500_000, 0.30, 2.50))


def test_a_bound_in_a_mode_the_model_does_not_offer_is_refused_as_its_price_is():
    """`reserve_bound` reserved gpt-image-1 in the batch API at half its price (OpenAI batches no image) and a
    non-flex model's flex at its sync price, where `price_alone` refuses both: a budget reserved a discount that
    no call gets."""
    from engine.core.cost import mode_allowed, reserve_bound

    refused = 0
    for pname, provider in CAT.providers.items():
        for mname, spec in provider.models.items():
            r = Request.model_validate({"id": "m", "arrival_s": 0, "provider": pname, "model": mname, "prompt": "hi"})
            for mode in ("batch_api", "flex", "gpu_batch"):
                if mode_allowed(provider, spec, mode):
                    assert reserve_bound(r, CAT, mode) >= 0.0
                    continue
                refused += 1
                with pytest.raises(CatalogError, match=f"mode {mode!r} is not available for {pname}/{mname}"):
                    reserve_bound(r, CAT, mode)
    assert refused > 10  # the catalog has image models without a batch API, and most models have no flex tier


@pytest.mark.parametrize(("model", "mode", "names"), [
    ("imagen-4", "batch_api", "batch_api.media_models"),     # google batches images, of the models it names
    ("sora-2", "batch_api", "batch_api.kinds"),              # openai batches text and images, not video
    ("flux-1-dev", "batch_api", "declares no batch_api"),
    ("claude-haiku-5-5", "flex", "declares no flex tier"),   # Anthropic has no flex block at all
    ("gpt-6.2-sol", "flex", "flex.models"),
])
def test_a_mode_refused_names_the_declaration_that_is_missing(model, mode, names):
    """docs/cost-model.md: the refusal names the missing declaration. Google declares a batch API for images, so
    "the provider declares no batch_api for this kind" sent an overlay's author to the wrong field for Imagen,
    which only `batch_api.media_models` leaves out (a helper's tour)."""
    r = Request.model_validate({"id": "m", "arrival_s": 0, "model": model, "prompt": "a cat on a mat"})
    for call in (lambda: price_alone(r, CAT, mode), lambda: reserve_bound(r, CAT, mode)):
        with pytest.raises(CatalogError, match=re.escape(names)):
            call()
