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


def test_n_choices_add_up_the_details_of_each_providers_body():
    one = {"choices": [{}], "usage": {"prompt_tokens": 5, "completion_tokens": 40, "completion_tokens_details": {
        "reasoning_tokens": 30, "audio_tokens": 0}}}
    other = {"choices": [{}], "usage": {"prompt_tokens": 5, "completion_tokens": 20, "completion_tokens_details": {
        "reasoning_tokens": 12, "accepted_prediction_tokens": 1}}}
    details = merged_body([one, other])["usage"]["completion_tokens_details"]
    assert details == {"reasoning_tokens": 42, "audio_tokens": 0, "accepted_prediction_tokens": 1}
    assert "completion_tokens_details" not in merged_body([{"choices": [{}], "usage": {}}])["usage"]
