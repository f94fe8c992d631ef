"""Gemini 2.5 Flash Image ("Nano Banana") at the ``google`` provider (docs/providers.md, "Gemini"): priced from the
catalog at one price for its ten aspect ratios plus its prompt's text, checked per request against what Google's
OpenAI compatibility layer documents for images, answered by the emulator's ``google`` side as the layer does, and
sent live through the engine with the official ``openai`` SDK. Before, the model was not in the catalog."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import openai
import pytest
import yaml
from pydantic import ValidationError

from actors._types import Job
from engine.core.catalog import load_catalog
from engine.core.cost import price_alone
from engine.core.errors import CatalogError
from engine.core.request import Request, validation_context
from engine.core.settings import ProvidersSettings, Settings
from engine.emulator import Emulator
from tests.unit.test_http_providers import EMU_CANCEL_S, SPEED, VALIDATING_S, Rig, T, fixed_turnaround_catalog

NANO = "gemini-2.5-flash-image"
CAT = fixed_turnaround_catalog(T, ("google",))
# Google's image-generation page: each aspect ratio's pixel size, all made at 1,290 output tokens.
ASPECTS = {"1:1": "1024x1024", "2:3": "832x1248", "3:2": "1248x832", "3:4": "864x1184", "4:3": "1184x864",
           "4:5": "896x1152", "5:4": "1152x896", "9:16": "768x1344", "16:9": "1344x768", "21:9": "1536x672"}


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


def live() -> Settings:
    return Settings(providers=ProvidersSettings(mode="http", endpoints={"google": {}}))


def image(rid: str = "n-0", settings: Settings | None = None, **fields) -> Request:
    d = {"id": rid, "arrival_s": 0.0, "model": NANO, "prompt": "a banana on a plate", **fields}
    return Request.model_validate(d, context=validation_context(CAT, settings or live()))


def google_says(exc: openai.APIStatusError) -> str:
    (item,) = exc.body
    return f"{item['error']['status']}: {item['error']['message']}"


# -- price ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", sorted(ASPECTS.values()))
def test_every_aspect_ratio_costs_the_page_price_and_its_prompt_at_the_input_price(size):
    r = image(params={"size": size})
    price = price_alone(r, CAT, "sync")
    assert price.media == pytest.approx(0.039, abs=1e-12)
    assert price.input == pytest.approx(r.input_tokens * 0.30 / 1e6, abs=1e-15) and r.input_tokens > 0
    # 1,290 image tokens at $30 per million: the page's per-image figure rounds it up, never down.
    assert 0.039 >= 1290 * 30 / 1e6 > 0.039 * 0.99
    assert image(params={}).params["size"] == "1024x1024"


def test_it_rides_googles_native_batch_at_half_price_and_imagen_rides_none():
    """Batched through Google's native batchGenerateContent (tests/unit/test_gemini_batch.py), not the layer's
    Batch API, which documents chat completions only; Imagen, called at :predict, takes no batch at all."""
    google = CAT.provider("google")
    assert google.supports_batch_api("image", NANO) and not google.supports_batch_api("image", "imagen-4")
    assert price_alone(image(), CAT, "batch_api").media == pytest.approx(0.0195, abs=1e-12)  # the page's batch price
    imagen = Request.model_validate({"id": "i", "arrival_s": 0.0, "model": "imagen-4", "prompt": "a banana"},
                                    context=validation_context(CAT, live()))
    with pytest.raises(CatalogError):
        price_alone(imagen, CAT, "batch_api")


# -- checks --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, field, said", [
    ({"params": {"size": "1792x1024"}}, "params.size", "1344x768 (16:9)"),
    ({"body": {"prompt": "a banana", "size": "512x512"}}, "body.size", "1536x672 (21:9)"),
    ({"params": {"quality": "high"}}, "params.quality", "leave it out"),
    ({"body": {"prompt": "a banana", "quality": "hd"}}, "body.quality", "leave it out"),
    ({"body": {"prompt": "a banana", "style": "vivid"}}, "body.style", "leave it out"),
])
def test_what_the_layer_does_not_make_is_refused_per_request_naming_the_field_and_the_fix(fields, field, said):
    with pytest.raises(ValidationError) as ei:
        image(**fields)
    (err,) = ei.value.errors()
    assert field in err["msg"] and said in err["msg"], err["msg"]


def test_what_the_layer_documents_for_an_image_is_taken():
    r = image(body={"prompt": "a banana", "size": "1344x768", "n": 1})
    assert r.params["size"] == "1344x768" and r.kind == "image"


# -- the emulator's google side ------------------------------------------------------------------------------------
def test_the_emulators_google_side_makes_one_base64_image_per_call_billed_at_the_catalog_price(emu):
    client = openai.OpenAI(base_url=emu.base_url("google"), api_key="emulator-test-key", max_retries=0)
    out = client.images.generate(model=NANO, prompt="a banana on a plate", size="1344x768", n=1,
                                 response_format="b64_json")
    (made,) = out.data
    assert base64.b64decode(made.b64_json).startswith(b"\x89PNG\r\n\x1a\n")
    raw = out.model_dump(exclude_none=True)
    assert "quality" not in raw and "output_format" not in raw  # OpenAI's, not the layer's
    assert out.usage.output_tokens == 1290 and out.usage.input_tokens > 0
    (item,) = emu.bill().items
    assert item.provider == "google" and item.usage["size"] == "1344x768"
    assert item.cost_usd == pytest.approx(0.039 + out.usage.input_tokens * 0.30 / 1e6, abs=1e-12)
    for said, kw in [('Unknown name "quality"', {"quality": "high"}),
                     ("response_format", {"response_format": "url"}),
                     ("size", {"size": "1792x1024"})]:
        with pytest.raises(openai.BadRequestError) as ei:
            client.images.generate(**{"model": NANO, "prompt": "a banana", **kw})
        assert said in google_says(ei.value), google_says(ei.value)
    assert len(emu.bill().items) == 1


# -- live through the engine ---------------------------------------------------------------------------------------
def test_a_nano_banana_image_is_made_through_the_layer_and_billed_as_the_emulator_bills_it(emu):
    r = image(params={"size": ASPECTS["16:9"]})

    async def go():
        rig = Rig(emu, "google")
        try:
            await rig.run("sync", [Job(0, r, "fp-nano")])
            return await rig.until(lambda: rig.results.get(r.id), "the image"), rig.calls
        finally:
            await rig.close()

    res, calls = asyncio.run(go())
    ((job, _, _),) = calls
    assert job.body == {"model": NANO, "prompt": r.prompt, "size": "1344x768", "n": 1, "response_format": "b64_json"}
    (item,) = emu.bill().items
    assert res.status == "ok" and res.real and res.mode == "sync"
    assert base64.b64decode(res.output).startswith(b"\x89PNG\r\n\x1a\n")
    assert res.usage["input_tokens"] == r.input_tokens
    assert res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
    assert res.cost_usd == pytest.approx(0.039 + r.input_tokens * 0.30 / 1e6, abs=1e-12)


@pytest.mark.parametrize("batch_api, said", [
    ({"media_models": None}, ["batch_api.media_models is not set", "imagen-4", "gemini-2.5-flash-image"]),
    ({"kinds": ["text", "image", "video"], "media_models": None}, ["batch_api.media_models is not set", "veo-3"]),
    ({"kinds": ["text", "image", "video"], "media_models": [NANO, "veo-3"]}, ["batch_api.media_models", "veo-3",
                                                                              "image models only"]),
])
def test_a_gemini_catalog_that_would_plan_a_model_with_no_batch_route_as_batched_is_refused_at_load(
        tmp_path, batch_api, said):
    """A ``compat: gemini`` provider's media ride Google's native batchGenerateContent or no batch: it takes
    generateContent's image models, not Imagen's :predict nor Veo's. Before, images in ``batch_api.kinds`` without
    ``batch_api.media_models`` planned every image model as batched (Imagen too) at half price, and each such batch
    went sync at the full price when it was sent; a Veo model among them, the same."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"providers": {"google": {"batch_api": batch_api}}}))
    with pytest.raises(CatalogError) as refused:
        load_catalog(None, overlay)
    for words in ["providers.google", *said]:
        assert words in str(refused.value)
    # The fix the error names loads, and plans Imagen and Veo sync.
    overlay.write_text(yaml.safe_dump({"providers": {"google": {"batch_api": {**batch_api, "media_models": [NANO]}}}}))
    google = load_catalog(None, overlay).provider("google")
    assert google.supports_batch_api("image", NANO) and not google.supports_batch_api("image", "imagen-4")
    assert not google.supports_batch_api("video", "veo-3")
