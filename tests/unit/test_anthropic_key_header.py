"""The Anthropic provider sends its key as ``x-api-key``, the header Anthropic's API reads an API key from
(rvkeys85). The Anthropic SDK installed (2.17) sends ``api_key`` as ``Authorization: Bearer``, the header Anthropic
reads an OAuth token from: an API key sent so is refused, and the project's emulator, which takes either, never
showed it. No Ray, nothing sent: each request is answered by a transport in the test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

KEY = "sk-ant-api03-" + "HEADERKEY0123456789abcdef"  # split so no scan of real keys flags the fake


def _provider(monkeypatch, base_url: str = "http://127.0.0.1:9") -> Any:
    """The driver's Anthropic provider (``actors._stop_left._client``, as a stop makes it), its key ``KEY``."""
    from actors._stop_left import _client
    from engine.core.catalog import load_catalog
    from engine.core.settings import Settings

    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS", '{"anthropic": {"api": "anthropic", "api_key_env": '
                       f'"ANTHROPIC_API_KEY", "base_url": "{base_url}"}}}}')
    settings = Settings()
    return _client("anthropic", settings, load_catalog(settings.catalog_path))


@pytest.mark.parametrize("call", ["message", "stream", "batch_create", "batch_poll", "count", "copied_client"])
def test_the_anthropic_provider_sends_its_key_as_x_api_key_alone(monkeypatch, call):
    """Every route the provider calls (a Message, whole or streamed, a Message Batch's create and poll, a count) and a
    copy of its client carry the key in ``x-api-key`` and no ``Authorization`` header; fails on the code before
    (``Authorization: Bearer <key>``, no ``x-api-key``)."""
    import anthropic
    import httpx2
    from anthropic._base_client import get_platform

    sent: list[httpx2.Headers] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.headers)
        return httpx2.Response(401, json={"type": "error", "error": {"type": "authentication_error", "message": "x"}})

    p = _provider(monkeypatch)
    p.client._client._transport = httpx2.MockTransport(answer)  # its own HTTP client, which puts the key on
    p.client._platform = get_platform()  # (read in a worker thread at the first call otherwise)
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    c = p.client

    async def streamed() -> None:  # as the provider's sync calls stream (``_anthropic_stream``)
        async with c.messages.stream(**body):
            pass

    async def go() -> None:
        if call == "count":
            await p.count_tokens(body)  # answers the refusal, raises none
            return
        made = {"message": lambda: c.messages.create(**body),
                "stream": streamed,
                "batch_create": lambda: c.messages.batches.create(requests=[], extra_headers={"Idempotency-Key": "k"}),
                "batch_poll": lambda: c.messages.batches.retrieve("msgbatch_1"),
                "copied_client": lambda: c.with_options(timeout=3.0).messages.batches.retrieve("msgbatch_1")}[call]
        with pytest.raises(anthropic.AuthenticationError):
            await made()

    asyncio.run(go())
    assert len(sent) == 1
    assert sent[0].get("x-api-key") == KEY
    assert "authorization" not in sent[0], sent[0].get("authorization", "")[:12]


def test_the_stops_and_rescues_anthropic_provider_is_let_in_by_the_emulator(monkeypatch):
    """The emulator answers an Anthropic call without ``x-api-key`` with Anthropic's 401 (keys86): the provider the
    driver makes for a stop's cancel and a take-back's rescue (``_stop_left._client``, ``make_provider`` as the
    dispatchers call it) counts, makes a Message Batch and cancels it there, each answered."""
    import anthropic

    from engine.emulator import Emulator

    with Emulator(latency_scale=0.0, speedup=1e4) as emu:
        p = _provider(monkeypatch, emu.anthropic_base_url("anthropic"))
        body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}

        async def go() -> tuple:
            try:
                counted = await p.count_tokens({k: v for k, v in body.items() if k != "max_tokens"})
                made = await p.client.messages.batches.create(requests=[{"custom_id": "a", "params": body}])
                return counted, made, await p.client.messages.batches.cancel(made.id)
            finally:
                await p.close()

        (status, answer, _), made, cancelled = asyncio.run(go())
        bearer = anthropic.Anthropic(base_url=emu.anthropic_base_url("anthropic"), api_key=KEY, max_retries=0)
        with bearer, pytest.raises(anthropic.AuthenticationError, match="x-api-key header is required"):
            bearer.messages.batches.list()  # the installed SDK's own way: Authorization: Bearer alone
    assert status == 200 and answer["input_tokens"] > 0
    assert cancelled.id == made.id and cancelled.processing_status in ("canceling", "ended")
