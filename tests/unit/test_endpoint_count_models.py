"""Anthropic's Models API and token count at the endpoint, with the official ``anthropic`` SDK: ``models.list()``
(page by page), ``models.retrieve()`` and ``messages.count_tokens()``, the endpoint under uvicorn with the engine
stand-in of ``test_endpoint_claude`` and the emulator's Anthropic side behind it (no Ray). Before, the Anthropic
SDK got OpenAI's model list, which it could not read, and a 404 for the count; the OpenAI SDK's list stays as it
was."""

from __future__ import annotations

import asyncio
import datetime
import os

import anthropic
import openai
import pytest

from actors._count_tokens import count_by
from actors.providers import SimulatedProvider, make_provider
from engine.app._endpoint_count import counted
from engine.app._endpoint_messages import AnthropicError
from engine.app._endpoint_models import display_name
from engine.app.endpoint import make_app
from engine.app.live import EMULATOR_KEY_ENV
from engine.core.clock import ManualClock
from engine.core.draws import Draws
from engine.core.errors import ProviderError
from engine.core.settings import Settings
from engine.emulator import Emulator
from engine.runtime.providers import SimProvider
from tests.unit.test_endpoint import serving
from tests.unit.test_endpoint_claude import OneCallEngine
from tests.unit.test_http_providers import CAT, SPEED, direct

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
MODEL = "claude-sonnet-4-5"
CLAUDE = [m for m, s in CAT.providers["anthropic"].models.items() if s.kind == "text"]
WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def both():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = OneCallEngine(emu)
        with serving(make_app(eng, catalog=CAT)) as url, \
                anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0,
                                    timeout=20) as claude, \
                openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=20) as oai:
            try:
                yield eng, claude, oai, emu
            finally:
                eng.close()


def test_the_anthropic_sdk_lists_the_claude_models_page_by_page(both):
    _, claude, _, _ = both
    assert len(CLAUDE) > 3  # so a page of 3 leaves more
    first = claude.models.list(limit=3)
    assert [m.id for m in first.data] == CLAUDE[:3] and first.has_more
    assert (first.first_id, first.last_id) == (CLAUDE[0], CLAUDE[2])
    # The SDK's auto-paging follows last_id as after_id until has_more is false: every Claude model, once, in order.
    assert [m.id for m in claude.models.list(limit=3)] == CLAUDE
    assert [m.id for m in claude.models.list()] == CLAUDE  # the default page of 20 holds them all
    back = claude.models.list(before_id=CLAUDE[4], limit=2)
    assert [m.id for m in back.data] == CLAUDE[2:4] and back.has_more
    assert [m.id for m in claude.models.list(before_id=CLAUDE[1], limit=5).data] == CLAUDE[:1]
    info = first.data[0]
    assert info.type == "model" and info.display_name == "Claude Sonnet 4.5"
    assert info.created_at == datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    assert info.max_tokens == CAT.providers["anthropic"].models[CLAUDE[0]].max_output_tokens
    with pytest.raises(anthropic.BadRequestError, match="limit"):
        claude.models.list(limit=1001)
    with pytest.raises(anthropic.BadRequestError, match="after_id"):
        claude.models.list(after_id="gpt-5-mini")


def test_the_anthropic_sdk_retrieves_a_claude_model_and_an_unknown_one_is_anthropics_404(both):
    _, claude, _, _ = both
    got = claude.models.retrieve(MODEL)
    assert (got.id, got.type, got.display_name) == (MODEL, "model", "Claude Sonnet 4.5")
    for other in ("gpt-5-mini", "claude-nonesuch"):  # a model of another API is no Claude model either
        with pytest.raises(anthropic.NotFoundError) as caught:
            claude.models.retrieve(other)
        assert caught.value.body["type"] == "error"
        assert caught.value.body["error"]["type"] == "not_found_error" and other in caught.value.message


def test_the_same_path_answers_the_openai_sdk_in_openais_shape_with_every_model(both):
    _, claude, oai, _ = both
    listed = oai.models.list()
    every = [m for p in CAT.providers.values() for m in p.models]
    assert [m.id for m in listed.data] == every and {m.object for m in listed.data} == {"model"}
    assert oai.models.retrieve("gpt-5-mini").owned_by == "openai"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("nonesuch")
    assert caught.value.body["code"] == "model_not_found"
    assert [m.id for m in claude.models.list()] == CLAUDE  # and the Anthropic SDK, at the same path, its own


def test_count_tokens_is_the_input_the_emulator_bills_for_the_same_body_and_bills_nothing(both):
    eng, claude, _, emu = both
    body = dict(model=MODEL, system="Answer in one word.", tools=[WEATHER],
                messages=[{"role": "user", "content": "Is it raining in Oslo? Look it up."}])
    before, asked = len(emu.bill().items), len(eng.reqs)
    counted = claude.messages.count_tokens(**body)
    assert emu.count("messages.count_tokens") == 1 and len(emu.bill().items) == before  # asked, free
    assert len(eng.reqs) == asked  # not a request of the engine: not budgeted, cached nor billed
    sent = claude.messages.create(max_tokens=50, **body)
    (bill,) = [i for i in emu.bill().items[before:] if i.route == "messages"]
    billed = sum(bill.usage.get(k, 0) for k in ("input_tokens", "cache_read_input_tokens",
                                                 "cache_creation_input_tokens"))
    assert counted.input_tokens == billed == sent.usage.input_tokens > 0


def test_a_bad_count_is_refused_naming_the_field_and_the_providers_own_refusal_comes_back(both):
    _, claude, _, emu = both
    ask = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.BadRequestError, match=r"^400 model 'gpt-5-mini' is not called "
                                                   r"through Anthropic's Messages API"):
        claude.messages.count_tokens(model="gpt-5-mini", messages=ask)
    with pytest.raises(anthropic.NotFoundError, match="claude-nonesuch"):
        claude.messages.count_tokens(model="claude-nonesuch", messages=ask)
    with pytest.raises(anthropic.BadRequestError, match="messages is required"):
        claude.messages.count_tokens(model=MODEL, messages=[])
    calls = emu.count("messages.count_tokens")
    # What only the provider refuses (a count takes no max_tokens) is its 400, passed back in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.count_tokens(model=MODEL, messages=ask, extra_body={"max_tokens": 10})
    assert caught.value.body["error"] == {"type": "invalid_request_error",
                                          "message": "max_tokens: Extra inputs are not permitted"}
    assert emu.count("messages.count_tokens") == calls + 1  # the three before never left the endpoint


def test_the_count_needs_no_key_where_the_endpoint_runs_the_dispatchers_provider_holds_it(both, monkeypatch):
    """``serve --address`` puts the replica on a cluster whose workers may not have the key's variable: the count
    is asked by the provider the dispatcher holds, with its key (read where the engine started). Before, the
    endpoint read the variable itself and answered a 503."""
    _, claude, _, emu = both
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "How many tokens is this?"}])
    with_key = claude.messages.count_tokens(**ask)  # (the stand-in's provider made while the variable is there)
    calls = emu.count("messages.count_tokens")
    monkeypatch.delenv(EMULATOR_KEY_ENV)
    assert claude.messages.count_tokens(**ask).input_tokens == with_key.input_tokens > 0
    assert emu.count("messages.count_tokens") == calls + 1 and EMULATOR_KEY_ENV not in os.environ


def _counts(emu: Emulator, key: str, faults: list[dict], n: int, **settings_kw) -> list[tuple]:
    """The answers of ``n`` counts asked by the HTTP provider alone (``count_by``), after ``faults``."""
    emu.faults.script("anthropic", "messages.count_tokens", faults)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}

    async def go():
        provider = direct(emu, "anthropic", key, **settings_kw)
        try:
            return [await count_by(provider, "anthropic", provider.settings, body) for _ in range(n)]
        finally:
            await provider.close()
    return asyncio.run(go())


def test_a_providers_error_comes_back_at_its_status_with_its_retry_headers_and_the_key_masked():
    key = "sk-count-NEVERSHOWN-7"
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        busy, limited, refused, fine = _counts(emu, key, [
            {"status": 529}, {"status": 429, "retry_after_s": 7},
            {"status": 401, "message": f"invalid x-api-key {key}"}], 4)
    assert busy[0] == 529 and busy[1]["error"]["type"] == "overloaded_error"
    assert limited[0] == 429 and limited[2]["retry-after"] == "7"  # the client waits as Anthropic asked
    assert refused[0] == 401 and key not in str(refused) and "[redacted]" in refused[1]["error"]["message"]
    assert fine == (200, {"input_tokens": fine[1]["input_tokens"]}, {}) and fine[1]["input_tokens"] > 0


def test_a_count_anthropic_does_not_answer_in_time_is_a_504():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        (late,) = _counts(emu, "k", [{"timeout_s": 60.0}], 1, timeout_s=0.2)  # (ended by the stop)
    assert late[0] == 504 and "did not answer the count within 0.2 s" in late[1]["error"]["message"]


def test_a_count_nobody_can_answer_exactly_is_refused_saying_why():
    settings = Settings()  # simulated providers: nobody to count exactly
    sim = SimProvider(CAT.provider("anthropic"), CAT, settings, Draws(0, 4, 0, 60.0), draw=False)
    provider = make_provider("anthropic", CAT, settings, sim, ManualClock())  # what the dispatcher holds
    assert isinstance(provider, SimulatedProvider)
    status, body, headers = asyncio.run(count_by(provider, "anthropic", settings, {"model": MODEL}))
    assert status == 501 and "providers.mode='sim'" in body["error"]["message"]
    assert body["type"] == "error" and headers == {"x-should-retry": "false"}


class _Lost:
    settings = Settings()

    async def count_tokens(self, provider, body):
        raise ProviderError(f"the dispatcher of {provider!r} could not answer the count (RayActorError); send "
                            "it again")


def test_a_count_the_engine_cannot_ask_is_a_503_naming_why():
    with pytest.raises(AnthropicError) as caught:
        asyncio.run(counted(_Lost(), "anthropic", {"model": MODEL}))
    assert caught.value.status == 503 and "RayActorError" in caught.value.message


def test_a_display_name_reads_as_anthropics():
    assert display_name("claude-sonnet-4-5") == "Claude Sonnet 4.5"
    assert display_name("claude-fable-5") == "Claude Fable 5"
    assert display_name("claude-3-5-haiku-20241022") == "Claude 3.5 Haiku"


def test_the_anthropic_sdks_files_api_is_a_404_in_its_shape_and_openais_files_stay(both):
    """The Anthropic SDK's Files API (beta) shares OpenAI's /v1/files: the OpenAI route kept its upload as a batch
    input no message could name. It is refused in Anthropic's shape; the OpenAI SDK's files route is unchanged."""
    _, claude, oai, _ = both
    for call in (lambda: claude.beta.files.upload(file=("notes.txt", b"hello", "text/plain")),
                 lambda: claude.beta.files.list(), lambda: claude.beta.files.retrieve_metadata("file_x")):
        with pytest.raises(anthropic.NotFoundError) as exc:
            call()
        assert exc.value.body["error"]["type"] == "not_found_error"
        assert "Files API" in exc.value.body["error"]["message"]
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini"}}\n'
    up = oai.files.create(file=("in.jsonl", line), purpose="batch")
    assert oai.files.retrieve(up.id).purpose == "batch"


def test_veos_own_route_is_a_404_that_says_where_veo_goes(both):
    """Google's Veo route got a bare "Unknown request URL" (a helper's tour): the 404 names the way in that makes
    Veo, a driver script. (OpenAI's Videos API is served: ``test_endpoint_videos``.)"""
    _, _, oai, _ = both
    with pytest.raises(openai.NotFoundError) as exc:
        oai.post("/../v1beta/models/veo-3.1-generate-001:predictLongRunning", body={}, cast_to=object)
    said = exc.value.body["message"] if "message" in exc.value.body else exc.value.body["error"]["message"]
    assert "no Veo route" in said and "Engine.connect(name).submit(" in said


def test_counts_past_the_dispatchers_bound_are_refused_at_once_and_hold_none_of_its_slots():
    """Slow counts (Anthropic slow to answer, up to a minute each) pile up at a dispatcher no further than
    ``COUNT_CONCURRENCY``: one more is a 429 at once, with a retry-after, and once they answer a count goes through
    again. Before, nothing bounded them: each held one of the dispatcher actor's method slots (1,000, shared with
    the groupers' dispatches and its batch follow-up) and a connection of the provider's client."""
    from actors._count_tokens import COUNT_CONCURRENCY, CountTokens

    class SlowProvider:
        def __init__(self):
            self.release, self.asked = asyncio.Event(), 0

        async def count_tokens(self, body):
            self.asked += 1
            await self.release.wait()
            return 200, {"input_tokens": 7}, {}

    class D(CountTokens):
        def __init__(self):
            self.provider, self.name, self.settings = SlowProvider(), "anthropic", Settings()

    async def go():
        d = D()
        slow = [asyncio.ensure_future(d.count_tokens({"model": MODEL})) for _ in range(COUNT_CONCURRENCY)]
        while d.provider.asked < COUNT_CONCURRENCY:
            await asyncio.sleep(0)  # each started count reaches the provider (no timer: the loop's next turn)
        status, body, headers = await asyncio.wait_for(d.count_tokens({"model": MODEL}), 5.0)  # (a bound)
        assert status == 429 and body["error"]["type"] == "rate_limit_error" and headers.get("retry-after")
        assert d.provider.asked == COUNT_CONCURRENCY  # never sent
        d.provider.release.set()
        assert [s for s, _, _ in await asyncio.gather(*slow)] == [200] * COUNT_CONCURRENCY
        assert (await d.count_tokens({"model": MODEL}))[0] == 200

    asyncio.run(go())
