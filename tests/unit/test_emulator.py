"""The loopback provider emulator, driven through the official OpenAI and Anthropic SDKs."""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import anthropic
import openai
import pytest

import engine.emulator as emulator_pkg
from engine.core.catalog import Catalog, default_catalog
from engine.core.cost import CacheSplit, price_text
from engine.core.errors import CatalogError, ConfigError
from engine.emulator import Emulator, filler_text, serve

# The Anthropic SDK warns that catalog models such as claude-sonnet-4-5 near their end of life: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

KEY = "sk-EMULATOR-TEST-KEY"
FAST = {"latency_scale": 0.0, "speedup": 1e4}
# The installed Anthropic SDK (2.17) sends ``api_key`` as ``Authorization: Bearer``; Anthropic's API (and the
# emulator) reads an API key from x-api-key alone, so a client here sends it there, as the engine's provider does.
X_API_KEY = {"X-Api-Key": KEY, "Authorization": anthropic.Omit()}


class Sdk:
    """Official SDK clients pointed at one emulator (``max_retries=0``), closed together."""

    def __init__(self, emu: Emulator):
        self.emu = emu
        self._made: list[Any] = []

    def openai(self, provider: str = "openai", **kw: Any) -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.emu.base_url(provider), api_key=KEY, max_retries=0, **kw)
        self._made.append(client)
        return client

    def anthropic(self, **kw: Any) -> anthropic.Anthropic:
        client = anthropic.Anthropic(base_url=self.emu.anthropic_base_url("anthropic"), api_key=KEY, max_retries=0,
                                     default_headers=X_API_KEY, **kw)
        self._made.append(client)
        return client

    def close(self) -> None:
        for client in self._made:
            client.close()


@pytest.fixture
def emu(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    """An emulator at speedup 1e4 (batches finish in well under a second), or ``param`` (indirect)."""
    with Emulator(latency_scale=0.0, speedup=getattr(request, "param", FAST["speedup"])) as e:
        yield e


# Real time: at 1e4x a 300 s cache TTL lasts 30 ms, less than two SDK calls take.
real_time = pytest.mark.parametrize("emu", [1.0], indirect=True, ids=["speedup1"])


@pytest.fixture
def sdk(emu: Emulator) -> Iterator[Sdk]:
    with closing(Sdk(emu)) as s:
        yield s


def post(url: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    """A raw POST, for what the SDKs will not send (no key, no max_tokens)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def wait_for(probe: Callable[[], Any], what: str, timeout_s: float = 5.0) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout_s`` (bounded, not a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def price(provider: str, model: str, split: CacheSplit, out: int, mode: str = "sync") -> float:
    cat = default_catalog()
    return price_text(cat.provider(provider), cat.model(provider, model), split, out, mode).total


def assert_bill_consistent(emu: Emulator) -> None:
    bill = emu.bill()
    assert bill.total_usd == pytest.approx(sum(i.cost_usd for i in bill.items), abs=1e-15)
    assert sum(bill.by_provider.values()) == pytest.approx(bill.total_usd, abs=1e-15)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def batch_line(cid: str, text: str, model: str = "gpt-5-mini") -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": user(text)}}


def upload(client: openai.OpenAI, lines: list[dict]) -> str:
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return client.files.create(file=("input.jsonl", data), purpose="batch").id


def jsonl(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    lines = [json.loads(x) for x in client.files.content(file_id).text.split("\n") if x.strip()]
    return {x["custom_id"]: x for x in lines}


def finished_batch(client: openai.OpenAI, batch_id: str) -> Any:
    final = ("completed", "failed", "expired", "cancelled")
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in final and b, "a final batch status")


# -- sync calls ------------------------------------------------------------------------------------------------
def test_public_api_is_pinned() -> None:
    assert emulator_pkg.__all__ == ["MARKER", "ROUTE_NAMES", "Bill", "BilledItem", "Call", "Emulator",
                                    "FaultPlan", "FaultSpec", "filler_text", "serve"]


def test_chat_round_trip_usage_text_and_bill(emu: Emulator, sdk: Sdk) -> None:
    prompt = "Summarise the plot. [[emulator:output_tokens=37]]"
    raw = sdk.openai().chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=[{"role": "system", "content": "Be brief."}, *user(prompt)])
    r = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_") and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == tokens("Be brief." + prompt)
    assert r.usage.completion_tokens == 37 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == filler_text("Be brief." + prompt, 37)
    assert len(r.choices[0].message.content) == 4 * 37
    (item,) = emu.bill().items
    assert (item.provider, item.model, item.mode, item.request_id) == ("openai", "gpt-5-mini", "sync",
                                                                        raw.headers["x-request-id"])
    assert item.cost_usd == price("openai", "gpt-5-mini", CacheSplit(0, 0, r.usage.prompt_tokens), 37)
    assert emu.count("chat.completions") == 1


def test_output_is_capped_by_max_tokens_and_default_length(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    capped = client.chat.completions.create(model="gpt-5", messages=user("go [[emulator:output_tokens=500]]"),
                                            max_completion_tokens=20)
    assert capped.usage.completion_tokens == 20 and capped.choices[0].finish_reason == "length"
    plain = client.chat.completions.create(model="gpt-5", messages=user("no marker"))
    assert plain.usage.completion_tokens == 256
    resp = client.responses.create(model="gpt-5", instructions="Sys.", input="Hi [[emulator:output_tokens=9]]")
    assert resp.output_text == filler_text("Sys.Hi [[emulator:output_tokens=9]]", 9)
    assert resp.usage.input_tokens == tokens("Sys.Hi [[emulator:output_tokens=9]]")
    assert resp.usage.output_tokens == 9 and resp.status == "completed"


@real_time
def test_openai_prompt_cache_hit_is_billed_at_the_cached_price(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    shared = "x" * 5000  # 1250 tokens: a cacheable prefix (>= 1024)
    first = client.chat.completions.create(model="gpt-5-mini", messages=user(shared + "A question"))
    second = client.chat.completions.create(model="gpt-5-mini", messages=user(shared + "B question"))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == 1250 // 128 * 128  # the longest warm prefix, in 128-token blocks
    total = second.usage.prompt_tokens
    write = total // 128 * 128 - cached
    b1, b2 = emu.bill().items
    assert b2.cost_usd == price("openai", "gpt-5-mini", CacheSplit(cached, write, total - cached - write), 256)
    assert b2.cost_usd < b1.cost_usd
    # Another model has its own cache, and a short prompt never reads.
    other = client.chat.completions.create(model="gpt-5", messages=user(shared + "C"))
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert_bill_consistent(emu)


@real_time
def test_anthropic_cache_control_write_then_read(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.anthropic()
    doc = "d" * 8000  # 2000 tokens, above Sonnet's 1024 minimum
    system = [{"type": "text", "text": doc, "cache_control": {"type": "ephemeral"}}]
    m1 = client.messages.create(model="claude-sonnet-4-5", max_tokens=50, system=system,
                                messages=user("first [[emulator:output_tokens=10]]"))
    m2 = client.messages.create(model="claude-sonnet-4-5", max_tokens=50, system=system,
                                messages=user("second one"))
    assert (m1.usage.cache_creation_input_tokens, m1.usage.cache_read_input_tokens) == (2000, 0)
    assert m1.usage.input_tokens == tokens(doc + "first [[emulator:output_tokens=10]]") - 2000
    assert (m2.usage.cache_creation_input_tokens, m2.usage.cache_read_input_tokens) == (0, 2000)
    assert m1.stop_reason == "end_turn" and m1.usage.output_tokens == 10
    assert m2.stop_reason == "max_tokens" and m2.usage.output_tokens == 50
    b1, b2 = emu.bill().items
    assert b1.cost_usd == price("anthropic", "claude-sonnet-4-5", CacheSplit(0, 2000, m1.usage.input_tokens), 10)
    assert b2.cost_usd == price("anthropic", "claude-sonnet-4-5", CacheSplit(2000, 0, m2.usage.input_tokens), 50)
    # Haiku 4.5 needs 4096 tokens: the same prefix is not cached there.
    m3 = client.messages.create(model="claude-haiku-4-5", max_tokens=5, system=system, messages=user("x"))
    assert m3.usage.cache_creation_input_tokens == 0


def test_anthropic_a_marked_block_is_one_entry_at_its_end(emu: Emulator, sdk: Sdk) -> None:
    """Anthropic caches the prefix up to a marked block's end. A call that marks its second block writes that
    prefix alone: a later call marking only the first block shares a prefix that is no entry, so it writes it
    and reads nothing (the emulator put a second breakpoint where each marked text block starts, and read it)."""
    client = sdk.anthropic()
    eph = {"type": "ephemeral"}
    a, b, c = ("a" * 6000, "b" * 6000, "c" * 6000)  # 1,500 tokens each, above Sonnet's 1024 minimum
    def call(*blocks: dict):
        return client.messages.create(model="claude-sonnet-4-5", max_tokens=5,
                                      messages=[{"role": "user", "content": list(blocks)}])

    first = call({"type": "text", "text": a}, {"type": "text", "text": b, "cache_control": eph},
                 {"type": "text", "text": "x"})
    second = call({"type": "text", "text": a, "cache_control": eph}, {"type": "text", "text": c})
    assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (3000, 0)
    assert (second.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens) == (1500, 0)
    assert_bill_consistent(emu)


@real_time  # (at 1e4x the entry outlived no SDK call: it failed whenever a worker met it first)
def test_anthropic_looks_back_20_blocks_before_a_breakpoint(emu: Emulator, sdk: Sdk) -> None:
    """Anthropic checks for a hit at the block ends up to about 20 blocks before each breakpoint: a call that
    marks only the end of its longer prompt reads an entry a shorter prompt wrote, and writes the rest. An entry
    more blocks back is not found (and the emulator read only at a call's own breakpoints)."""
    client = sdk.anthropic()
    eph = {"type": "ephemeral"}

    def call(doc: str, n: int, tag: str):
        content = [{"type": "text", "text": doc}] + [{"type": "text", "text": f"<{tag}{k:05d}>"} for k in range(n)]
        content[-1]["cache_control"] = eph
        return client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": [
            *content, {"type": "text", "text": "tail"}]}]).usage

    doc, far = "a" * 6000, "f" * 6000  # 1,500 tokens each
    assert (call(doc, 0, "").cache_creation_input_tokens, call(far, 0, "").cache_creation_input_tokens) == (1500, 1500)
    near = call(doc, 20, "n")  # the entry is the 20th block end before the breakpoint
    assert (near.cache_read_input_tokens, near.cache_creation_input_tokens) == (1500, 20 * 2)
    gone = call(far, 21, "g")  # the 21st: out of reach
    assert (gone.cache_read_input_tokens, gone.cache_creation_input_tokens) == (0, 1500 + 21 * 2)
    assert_bill_consistent(emu)


def test_cache_entries_expire_on_the_emulator_clock(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    prompt = user("y" * 6000)
    client.chat.completions.create(model="gpt-5-mini", messages=prompt)
    t0 = emu.now()
    ttl = default_catalog().provider("openai").prompt_cache.ttl_s
    wait_for(lambda: emu.now() > t0 + ttl, "the cache TTL to pass at 1e4x")
    again = client.chat.completions.create(model="gpt-5-mini", messages=prompt)
    assert again.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-2"])
def test_image_generation_is_billed_per_image(emu: Emulator, sdk: Sdk, model: str) -> None:
    client = sdk.openai()
    out = client.images.generate(model=model, prompt="a red fox", n=3, size="1536x1024")
    assert len(out.data) == 3
    assert base64.b64decode(out.data[0].b64_json).startswith(b"\x89PNG\r\n\x1a\n")
    (item,) = emu.bill().items
    per_image = default_catalog().model("openai", model).per_image
    spec = default_catalog().model("openai", model)  # and the prompt's 3 text tokens, billed once
    assert item.cost_usd == pytest.approx(per_image["1536x1024"] * 3 + 3 * spec.prompt_per_mtok / 1e6, abs=1e-12)
    assert item.usage == {"images": 3, "size": "1536x1024", "input_tokens": 3} and out.usage.input_tokens == 3
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(model=model, prompt="a fox", size="256x256")
    assert len(emu.bill().items) == 1
    client.images.generate(model=model, prompt="a red fox", size="1024x1024", quality="high")
    by_quality = default_catalog().model("openai", model).per_image_quality
    assert emu.bill().items[-1].cost_usd == pytest.approx(by_quality["high"]["1024x1024"] + 3 * spec.prompt_per_mtok
                                                           / 1e6, abs=1e-12)  # billed at its quality, not medium
    # Asked at no quality (OpenAI's default is "auto"), the answer says which quality was made, as OpenAI's does.
    made = client.images.generate(model=model, prompt="a red fox", size="1024x1024")
    assert made.quality == "medium" and emu.bill().items[-1].cost_usd == pytest.approx(
        by_quality["medium"]["1024x1024"] + 3 * spec.prompt_per_mtok / 1e6, abs=1e-12)


def test_unknown_model_missing_key_and_streaming_are_refused(emu: Emulator, sdk: Sdk) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.openai().chat.completions.create(model="claude-sonnet-4-5", messages=user("hi"))
    with pytest.raises(anthropic.NotFoundError):
        sdk.anthropic().messages.create(model="gpt-5", max_tokens=5, messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="stream"):
        sdk.openai().chat.completions.create(model="gpt-5", messages=user("hi"), stream=True)
    messages_url = emu.anthropic_base_url("anthropic") + "/v1/messages"
    status, body = post(messages_url, {"model": "claude-haiku-4-5", "messages": user("hi")}, {"x-api-key": KEY})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    status, body = post(messages_url, {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": user("hi")}, {})
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    status, body = post(emu.base_url("openai") + "/chat/completions", {"model": "gpt-5", "messages": user("hi")},
                        {"authorization": "Bearer "})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert emu.bill().items == ()


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/messages/batches", "/v1/messages/count_tokens"])
def test_an_anthropic_route_refuses_a_key_sent_as_bearer_alone(emu: Emulator, route: str) -> None:
    """Anthropic's API reads an API key from ``x-api-key`` and answers a call without it 401
    ``authentication_error`` "x-api-key header is required" (n8n-io/n8n#37930, karthink/gptel#354), a Bearer header
    or not: the emulator took ``Authorization: Bearer <key>`` alone, so an engine sending its key there (the
    installed SDK's ``api_key``, rvkeys85) passed every emulated test. Fails on the code before (200)."""
    url = emu.anthropic_base_url("anthropic") + route
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": user("hi")}
    if route.endswith("batches"):
        body = {"requests": [{"custom_id": "a", "params": body}]}
    elif route.endswith("count_tokens"):  # a count takes no max_tokens
        body = {k: v for k, v in body.items() if k != "max_tokens"}
    status, got = post(url, body, {"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"})
    assert status == 401, got
    assert got["type"] == "error" and got["error"] == {"type": "authentication_error",
                                                       "message": "x-api-key header is required"}
    assert got["request_id"].startswith("req_")
    status, _ = post(url, body, {"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert status == 200


# -- faults ----------------------------------------------------------------------------------------------------
def test_429_with_retry_after_then_normal_service(emu: Emulator, sdk: Sdk) -> None:
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": 2}])
    client = sdk.openai()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-5-mini", messages=user("hi"))
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.code == "rate_limit_exceeded"
    client.chat.completions.create(model="gpt-5-mini", messages=user("hi"))
    emu.faults.script("anthropic", "messages", [{"status": 429, "retry_after_s": 3}, {"status": 529}])
    with pytest.raises(anthropic.RateLimitError) as ainfo:
        sdk.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=5, messages=user("hi"))
    assert ainfo.value.response.headers["retry-after"] == "3"
    with pytest.raises(anthropic.InternalServerError) as over:
        sdk.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=5, messages=user("hi"))
    assert over.value.status_code == 529 and "overloaded_error" in over.value.response.text
    assert len(emu.bill().items) == 1  # no fault answer is billed
    assert emu.count("chat.completions", status=429) == 1


def test_5xx_and_seeded_rates(emu: Emulator, sdk: Sdk) -> None:
    emu.faults.script("openai", "responses", [{"status": 500}])
    with pytest.raises(openai.InternalServerError):
        sdk.openai().responses.create(model="gpt-5-mini", input="hi")
    emu.faults.rate_429 = 1.0
    with pytest.raises(openai.RateLimitError):
        sdk.openai().chat.completions.create(model="gpt-5-mini", messages=user("hi"))
    emu.faults.rate_429, emu.faults.rate_5xx = 0.0, 1.0
    with pytest.raises(anthropic.InternalServerError):
        sdk.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=5, messages=user("hi"))
    emu.faults.rate_5xx = 0.0
    sdk.openai().files.create(file=("f.jsonl", b"{}\n"), purpose="batch")  # rates never touch non-model routes
    assert emu.bill().items == ()


def test_client_timeout_against_a_held_connection(emu: Emulator, sdk: Sdk) -> None:
    # Held far longer than the bound, so a loaded machine's slow 0.2 s timeout cannot pass for the hold's end
    # (held 2 s, bounded at 1.5 s before); the emulator's stop ends the hold.
    emu.faults.script("openai", "chat.completions", [{"timeout_s": 60.0}])
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        sdk.openai(timeout=0.2).chat.completions.create(model="gpt-5-mini", messages=user("hi"))
    assert time.monotonic() - start < 30.0
    sdk.openai().chat.completions.create(model="gpt-5-mini", messages=user("hi"))
    assert len(emu.bill().items) == 1


def test_faults_and_bill_over_http(emu: Emulator, sdk: Sdk) -> None:
    origin = emu.base_url("openai").rsplit("/openai/", 1)[0]
    plan = {"script": [{"provider": "google", "route": "chat.completions", "specs": [{"status": 503}]}]}
    req = urllib.request.Request(origin + "/_emulator/faults", data=json.dumps(plan).encode(), method="POST")
    assert json.load(urllib.request.urlopen(req, timeout=5))["ok"] is True
    client = sdk.openai("google")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gemini-2.5-flash", messages=user("hi"))
    client.chat.completions.create(model="gemini-2.5-flash", messages=user("hi"))
    bill = json.load(urllib.request.urlopen(origin + "/_emulator/bill", timeout=5))
    assert bill["total_usd"] == emu.bill().total_usd and len(bill["items"]) == 1
    assert bill["by_model"] == {"google/gemini-2.5-flash": bill["total_usd"]}


def test_idempotency_key_replays_without_billing(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    kw = {"model": "gpt-5-mini", "messages": user("once"), "extra_headers": {"Idempotency-Key": "k-1"}}
    a = client.chat.completions.with_raw_response.create(**kw)
    b = client.chat.completions.with_raw_response.create(**kw)
    assert a.parse().id == b.parse().id and b.headers["idempotent-replayed"] == "true"
    assert len(emu.bill().items) == 1
    with pytest.raises(openai.ConflictError):
        client.chat.completions.create(model="gpt-5-mini", messages=user("other"),
                                       extra_headers={"Idempotency-Key": "k-1"})


def test_concurrent_calls_with_one_idempotency_key_bill_once(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()

    def call(_: int) -> str:
        return client.chat.completions.create(model="gpt-5-mini", messages=user("same"),
                                              extra_headers={"Idempotency-Key": "k-many"}).id

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = set(pool.map(call, range(32)))
    assert len(ids) == 1 and len(emu.bill().items) == 1
    assert emu.count("chat.completions", status=200) == 32


# -- OpenAI batches --------------------------------------------------------------------------------------------
def test_openai_batch_round_trip(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    texts = {f"r{i}": f"request {i} [[emulator:output_tokens={10 + i}]]" for i in range(5)}
    fid = upload(client, [batch_line(cid, t) for cid, t in texts.items()])
    batch = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"
    done = finished_batch(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert done.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at < done.expires_at
    lines = jsonl(client, done.output_file_id)
    assert set(lines) == set(texts)
    for cid, text in texts.items():
        body = lines[cid]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == filler_text(text, body["usage"]["completion_tokens"])
    items = emu.bill().items
    assert {i.custom_id for i in items} == set(texts) and {i.mode for i in items} == {"batch_api"}
    for it in items:
        split = CacheSplit(0, 0, tokens(texts[it.custom_id]))
        assert it.cost_usd == price("openai", "gpt-5-mini", split, it.usage["output_tokens"], "batch_api")
        assert it.cost_usd == pytest.approx(0.5 * price("openai", "gpt-5-mini", split, it.usage["output_tokens"]))
    assert_bill_consistent(emu)
    assert len(emu.bill().items) == 5  # reading again bills nothing more


def test_openai_batch_on_the_responses_endpoint(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "gpt-5", "input": f"ask {i}", "max_output_tokens": 7}}
             for i in range(2)]
    fid = upload(client, lines)
    done = finished_batch(client, client.batches.create(input_file_id=fid, endpoint="/v1/responses",
                                                        completion_window="24h").id)
    assert done.status == "completed" and done.usage.output_tokens == 14
    bodies = {cid: x["response"]["body"] for cid, x in jsonl(client, done.output_file_id).items()}
    assert {b["object"] for b in bodies.values()} == {"response"}
    assert bodies["q1"]["output"][0]["content"][0]["text"] == filler_text("ask 1", 7)


def test_batch_with_a_failed_member(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    emu.faults.fail_members.add("bad")
    fid = upload(client, [batch_line("good", "fine"), batch_line("bad", "doomed")])
    done = finished_batch(client, client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                                        completion_window="24h").id)
    assert done.status == "completed" and done.request_counts.failed == 1
    assert set(jsonl(client, done.output_file_id)) == {"good"}
    err = jsonl(client, done.error_file_id)["bad"]
    assert err["error"]["code"] == "server_error" and err["response"]["status_code"] == 500
    assert [i.custom_id for i in emu.bill().items] == ["good"]


def test_invalid_batch_input_fails_at_validation(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    fid = upload(client, [batch_line("same", "a"), batch_line("same", "b")])
    done = finished_batch(client, client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                                        completion_window="24h").id)
    assert done.status == "failed" and done.failed_at is not None
    assert [e.code for e in done.errors.data] == ["duplicate_custom_id"] and done.errors.data[0].line == 2
    assert emu.bill().items == ()


def test_expired_batch_keeps_what_finished(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.openai()
    emu.faults.expire_batches(n=1, finished_fraction=0.5)
    fid = upload(client, [batch_line(f"m{i}", f"text {i}") for i in range(4)])
    done = finished_batch(client, client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                                        completion_window="24h").id)
    assert done.status == "expired" and done.expired_at is not None
    assert set(jsonl(client, done.output_file_id)) == {"m0", "m1"}
    errors = jsonl(client, done.error_file_id)
    assert set(errors) == {"m2", "m3"} and {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert sorted(i.custom_id for i in emu.bill().items) == ["m0", "m1"]


def test_batch_expires_when_the_window_passes_first() -> None:
    raw = default_catalog().model_dump()
    raw["providers"]["openai"]["batch_api"].update(
        completion_window_s=100, turnaround_median_s=100, turnaround_p95_s=100, turnaround_min_s=100)
    with Emulator(Catalog.model_validate(raw), **FAST) as e, closing(Sdk(e)) as sdk:
        client = sdk.openai()
        fid = upload(client, [batch_line(f"m{i}", "t") for i in range(4)])
        done = finished_batch(client, client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                                            completion_window="24h").id)
        # In progress from t=1 s, member k ends at 1 + 100 (k + 1) / 4: the last (t=101) misses the 100 s window.
        assert done.status == "expired" and done.request_counts.completed == 3
        assert set(jsonl(client, done.error_file_id)) == {"m3"}


def test_cancel_leaves_finished_members_billed_and_the_rest_cancelled() -> None:
    # Seed 2 draws a long first turnaround (2792 s, 2.8 s real at 1,000x), so a cancel lands mid-way. (At FAST's
    # 10,000x the 20 members ended within 0.28 s of real time: a slow poll could find none left to cancel.)
    with Emulator(seed=2, **{**FAST, "speedup": 1e3}) as e, closing(Sdk(e)) as sdk:
        client = sdk.openai()
        fid = upload(client, [batch_line(f"c{i:02d}", f"job {i}") for i in range(20)])
        bid = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h").id
        wait_for(lambda: client.batches.retrieve(bid).request_counts.completed >= 1, "a first finished member")
        assert client.batches.cancel(bid).status == "cancelling"
        done = finished_batch(client, bid)
        assert done.status == "cancelled" and done.cancelled_at is not None
        ok, failed = jsonl(client, done.output_file_id), jsonl(client, done.error_file_id)
        assert ok and failed and len(ok) + len(failed) == 20
        assert {x["error"]["code"] for x in failed.values()} == {"batch_cancelled"}
        assert {i.custom_id for i in e.bill().items} == set(ok)
        assert client.batches.cancel(bid).status == "cancelled"  # cancelling again changes nothing
        fid2 = upload(client, [batch_line("z", "t")])
        b2 = client.batches.create(input_file_id=fid2, endpoint="/v1/chat/completions", completion_window="24h")
        assert finished_batch(client, b2.id).status == "completed"
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a batch with status 'completed'"):
            client.batches.cancel(b2.id)


# -- Anthropic Message Batches ---------------------------------------------------------------------------------
def anthropic_requests(n: int, prefix: str = "a") -> list[dict]:
    return [{"custom_id": f"{prefix}{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 30,
                                                      "messages": user(f"q{i} [[emulator:output_tokens={5 + i}]]")}}
            for i in range(n)]


def ended(client: anthropic.Anthropic, batch_id: str) -> Any:
    return wait_for(lambda: (b := client.messages.batches.retrieve(batch_id)).processing_status == "ended" and b,
                    "processing_status ended")


def test_anthropic_message_batch_round_trip(emu: Emulator, sdk: Sdk) -> None:
    client = sdk.anthropic()
    emu.faults.fail_members.add("a2")
    batch = client.messages.batches.create(requests=anthropic_requests(4))
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 4
    done = ended(client, batch.id)
    assert done.request_counts.succeeded == 3 and done.request_counts.errored == 1
    assert done.results_url.startswith(emu.anthropic_base_url("anthropic"))
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["a2"].type == "errored" and results["a2"].error.error.type == "api_error"
    msg = results["a1"].message
    assert msg.usage.output_tokens == 6 and msg.usage.service_tier == "batch"
    items = {i.custom_id: i for i in emu.bill().items}
    assert set(items) == {"a0", "a1", "a3"}
    assert items["a1"].cost_usd == price("anthropic", "claude-haiku-4-5",
                                         CacheSplit(0, 0, msg.usage.input_tokens), 6, "batch_api")


def test_anthropic_message_batch_cancel() -> None:
    # Seed 2 draws a long first turnaround (1861 s, 1.9 s real at 1,000x), so a cancel lands mid-way.
    with Emulator(seed=2, **{**FAST, "speedup": 1e3}) as e, closing(Sdk(e)) as sdk:
        client = sdk.anthropic()
        batch = client.messages.batches.create(requests=anthropic_requests(20, "c"))

        def some_finished() -> bool:
            client.messages.batches.retrieve(batch.id)  # a read advances the batch
            return len(e.bill().items) >= 1

        wait_for(some_finished, "a first finished member")
        assert client.messages.batches.cancel(batch.id).processing_status in ("canceling", "ended")
        done = ended(client, batch.id)
        counts = done.request_counts
        assert counts.succeeded >= 1 and counts.canceled >= 1 and counts.succeeded + counts.canceled == 20
        results = {r.custom_id: r.result.type for r in client.messages.batches.results(batch.id)}
        billed = {i.custom_id for i in e.bill().items}
        assert billed == {cid for cid, t in results.items() if t == "succeeded"}


# -- secrets and bookkeeping -----------------------------------------------------------------------------------
def test_keys_never_appear_in_answers_bill_calls_or_repr(emu: Emulator, sdk: Sdk) -> None:
    seen: list[str] = []
    client = sdk.openai()
    raw = client.chat.completions.with_raw_response.create(model="gpt-5-mini", messages=user("hi"))
    seen += [raw.http_response.text, json.dumps(dict(raw.headers))]
    emu.faults.script("openai", "chat.completions", [{"status": 429}])
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-5-mini", messages=user("hi"))
    seen += [info.value.response.text, json.dumps(dict(info.value.response.headers))]
    araw = sdk.anthropic().messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=5,
                                                             messages=user("x"))
    seen += [araw.http_response.text, json.dumps(dict(araw.headers))]
    origin = emu.base_url("openai").rsplit("/openai/", 1)[0]
    for path in ("/_emulator/bill", "/_emulator/calls"):
        seen.append(urllib.request.urlopen(origin + path, timeout=5).read().decode())
    seen += [emu.bill().model_dump_json(), repr(emu), repr(emu.faults), repr(emu.calls), repr(emu.bill())]
    assert seen and not any(KEY in s or KEY[3:] in s for s in seen)
    assert_bill_consistent(emu)


def test_bad_settings_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="speedup"):
        Emulator(speedup=0)
    with pytest.raises(CatalogError, match="cannot read catalog"):
        serve(0, catalog_path="/nonexistent/catalog.yaml")
    e = Emulator(latency_scale=0)
    with pytest.raises(ConfigError, match="start"):
        e.base_url("openai")
    with pytest.raises(ConfigError, match="unknown route"):
        e.faults.script("openai", "chat", [{"status": 429}])
    with pytest.raises(ConfigError, match="status"):
        e.faults.script("openai", "chat.completions", [{"retry_after_s": 1}])


def test_reset_forgets_everything(emu: Emulator, sdk: Sdk) -> None:
    sdk.openai().chat.completions.create(model="gpt-5-mini", messages=user("hi"))
    emu.faults.rate_429 = 0.5
    emu.reset()
    assert emu.bill().items == () and emu.calls == [] and emu.faults.rate_429 == 0.0


def test_a_followed_emulator_draws_the_simulated_worlds_turnaround():
    """``follow(..., world=)``: a provider slower than the catalog says is slower over HTTP too, slot by slot
    as in the simulator (engine.core.draws.TurnaroundWorld), so a live run learns what its simulated twin does."""
    from engine.core.draws import Draws, TurnaroundWorld

    class At:
        def __init__(self, t: float) -> None:
            self.t = t

        def now(self) -> float:
            return self.t

    cat = default_catalog()
    prov = cat.provider("openai")
    slow = TurnaroundWorld(3.0, ())
    e = Emulator(cat, latency_scale=0.0)
    for t in (0.0, 600.0, 5000.0):
        e.follow(At(t), seed=4, slot_s=60.0, world=slow)
        got = e._core.draw_turnaround(prov)
        assert got == Draws(0, 1, 4, 60.0).turnaround("openai", prov.batch_api, t, slow)
        e.follow(At(t), seed=4, slot_s=60.0)  # the catalog's world
        plain = e._core.draw_turnaround(prov)
        assert got == min(3.0 * plain, prov.batch_api.completion_window_s) or plain == prov.batch_api.turnaround_min_s
