"""A batch line of url ``/v1/messages`` (Anthropic's Messages API) for a model not called through it is refused
naming the url, as the endpoint's ``/v1/messages`` and Message Batches refuse it. Before (a new user's tour, stop
79), its Anthropic body was judged by the other API's rules: a line with the Messages API's required
``max_tokens`` for gpt-5.4-mini was told "body.max_tokens is refused by OpenAI for reasoning models; give
max_completion_tokens", a field Messages does not have, and one without it was taken and sent to OpenAI."""

from __future__ import annotations

import json

import pytest

from engine.core.batchfile import parse_batch_file
from engine.core.settings import Settings


def _line(cid: str, model: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/messages",
                       "body": {"model": model, "messages": [{"role": "user", "content": "Hello"}], **body}})


@pytest.mark.parametrize("body", [{"max_tokens": 100}, {}], ids=["with-max_tokens", "without"])
def test_a_messages_line_for_an_openai_model_is_refused_naming_the_url(body):
    bf = parse_batch_file((_line("m", "gpt-5.4-mini", **body) + "\n").encode(), source="in.jsonl", window_s=3600.0)
    ((_, _, field, message),) = bf.problems()
    assert field == "url" and "/v1/chat/completions" in message and "max_completion_tokens" not in message, message


def test_a_messages_line_for_a_claude_model_is_taken_also_without_an_anthropic_endpoint():
    text = (_line("c", "claude-haiku-4-5", max_tokens=100) + "\n").encode()
    assert [r.model for r in parse_batch_file(text, source="in.jsonl", window_s=3600.0).requests] == ["claude-haiku-4-5"]
    only_openai = Settings(providers={"endpoints": {"openai": {"api": "openai", "api_key_env": "OPENAI_API_KEY"}}})
    bf = parse_batch_file(text, source="in.jsonl", window_s=3600.0, settings=only_openai)
    assert not bf.problems() and [r.id for r in bf.requests] == ["c"], bf.problems()
