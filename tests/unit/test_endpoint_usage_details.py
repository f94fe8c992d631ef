"""``usage.completion_tokens_details``, which OpenAI's chat completions always send, read with the official SDK
over the tests' fake engine (no Ray). An answer the endpoint builds (a Claude model's, a copy from the cache) and
a call of ``n`` choices had none, so ``usage.completion_tokens_details.reasoning_tokens``, which applications
read to price reasoning models, raised on ``None`` (a helper's tour)."""

from __future__ import annotations

import pytest

from engine.core._choices import merged_body
from tests.unit.test_endpoint import fake_endpoint

ASK = [{"role": "user", "content": "Name a river."}]


@pytest.fixture(scope="module")
def client():
    with fake_endpoint() as (_, client):
        yield client


@pytest.mark.parametrize("model,n", [("claude-haiku-4-5", 1), ("gpt-5-mini", 1), ("gpt-5-mini", 3)])
def test_a_chat_answer_says_its_completion_tokens_details(client, model, n):
    done = client.chat.completions.create(model=model, messages=ASK, max_completion_tokens=50, n=n)
    assert done.usage.completion_tokens_details.reasoning_tokens == 0
    assert done.usage.prompt_tokens_details.cached_tokens == 0
    # Every key OpenAI's own answer sends, 0 (a copy from the cache read None where the answer it copied said 0,
    # and n choices kept two prompt keys alone: a user's tour).
    details = done.usage.completion_tokens_details
    assert (details.audio_tokens, details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0, 0)
    assert done.usage.prompt_tokens_details.audio_tokens == 0


def test_n_choices_add_up_the_details_of_each_providers_body():
    one = {"choices": [{}], "usage": {"prompt_tokens": 5, "completion_tokens": 40, "completion_tokens_details": {
        "reasoning_tokens": 30, "audio_tokens": 0}}}
    other = {"choices": [{}], "usage": {"prompt_tokens": 5, "completion_tokens": 20, "completion_tokens_details": {
        "reasoning_tokens": 12, "accepted_prediction_tokens": 1}}}
    details = merged_body([one, other])["usage"]["completion_tokens_details"]
    assert details == {"reasoning_tokens": 42, "audio_tokens": 0, "accepted_prediction_tokens": 1}
    assert "completion_tokens_details" not in merged_body([{"choices": [{}], "usage": {}}])["usage"]


def test_n_choices_add_up_every_key_of_the_prompt_details_as_of_the_completion_details():
    """OpenAI's bodies say ``audio_tokens`` beside ``cached_tokens``; the merge kept two keys of the prompt's
    details alone, so a call of n choices read None where each choice's body said 0 (a user's tour)."""
    one = {"choices": [{}], "usage": {"prompt_tokens": 5, "prompt_tokens_details": {
        "cached_tokens": 2, "audio_tokens": 0}}}
    other = {"choices": [{}], "usage": {"prompt_tokens": 5, "prompt_tokens_details": {
        "cached_tokens": 1, "audio_tokens": 0, "cache_write_tokens": 3}}}
    details = merged_body([one, other])["usage"]["prompt_tokens_details"]
    assert details == {"cached_tokens": 3, "audio_tokens": 0, "cache_write_tokens": 3}
