"""An SDK older than the API the engine calls (pyproject lets ``openai>=1.60`` and ``anthropic>=0.45`` in) types no
field the API added since: its params are no set of the fields the API takes. Read as one, the emulator refused
the engine's own ``prompt_cache_key`` (openai 1.60: every call sharing a prefix failed) and the engine refused a
request's ``thinking`` (anthropic 0.45). Such params leave the route unchecked, as a route the SDK lacks is."""

from __future__ import annotations

from typing import TypedDict

import pytest

from engine.core import _sdk_fields
from engine.core._api_fields import check_api_body
from engine.core._checks import FieldProblem
from engine.core.catalog import default_catalog
from engine.emulator._fields import check_fields
from engine.emulator._wire import ApiError


class OldChatParams(TypedDict, total=False):  # openai 1.60's CompletionCreateParamsNonStreaming, in part
    model: str
    messages: list
    max_completion_tokens: int
    service_tier: str
    stream: bool


class OldMessageParams(TypedDict, total=False):  # anthropic 0.45's MessageCreateParamsNonStreaming, in part
    model: str
    messages: list
    max_tokens: int
    system: str
    stream: bool


@pytest.fixture
def old_sdk(monkeypatch):
    here = f"{__name__}:"
    monkeypatch.setitem(_sdk_fields._SDK_PARAMS, "chat.completions", (here + "OldChatParams",))
    monkeypatch.setitem(_sdk_fields._SDK_PARAMS, "messages", (here + "OldMessageParams",))
    _sdk_fields.sdk_fields.cache_clear()
    yield
    _sdk_fields.sdk_fields.cache_clear()


def test_an_older_sdks_params_refuse_no_field_the_engine_sends(old_sdk):
    spec = default_catalog().providers["openai"].models["gpt-5-mini"]
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}], "prompt_cache_key": "sb-1"}
    _sdk_fields.check_openai_fields(body, "body", spec)  # before: "body.prompt_cache_key is not a field of ..."
    check_fields("chat.completions", body, "openai")  # before: "Unrecognized request argument supplied"


def test_an_older_sdks_params_refuse_no_field_the_engine_checks(old_sdk):
    spec = default_catalog().providers["anthropic"].models["claude-sonnet-4-5"]
    body = {"model": "claude-sonnet-4-5", "max_tokens": 2048, "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024}}
    check_api_body(body, "body", "anthropic", spec, None)  # before: "body.thinking is not a field of ..."
    check_fields("messages", body, "anthropic")


def test_the_installed_sdks_params_still_refuse_an_unknown_field():
    _sdk_fields.sdk_fields.cache_clear()
    spec = default_catalog().providers["openai"].models["gpt-5-mini"]
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}], "prompt_cache_keys": "sb-1"}
    with pytest.raises(FieldProblem, match="body.prompt_cache_keys"):
        _sdk_fields.check_openai_fields(body, "body", spec)
    with pytest.raises(ApiError, match="prompt_cache_keys"):
        check_fields("chat.completions", body, "openai")
