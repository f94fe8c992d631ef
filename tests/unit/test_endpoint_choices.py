"""``n`` > 1 on the chat completions route, read with the official SDK over the tests' fake engine under uvicorn (no
Ray): it was a 400, so an application that samples several answers could not change only its ``base_url`` (a
helper's tour). Each choice is a request of its own, reserved for and billed as one."""

from __future__ import annotations

import openai
import pytest

from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.core.result import ENGINE_CANCELLED, Result
from tests.unit.test_endpoint import CAT, FakeEngine, fake_endpoint, serving
from tests.unit.test_endpoint_reuse import CachedEngine

ASK = [{"role": "user", "content": "Name a river."}]


@pytest.fixture(scope="module")
def served():
    with fake_endpoint() as (eng, client):
        yield eng, client


def test_n_choices_are_n_requests_each_generated_and_billed_with_its_own_output(served):
    eng, client = served
    one = client.chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=ASK, max_completion_tokens=50, extra_headers={endpoint.HEADER_REQUEST_ID: "c1"})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=ASK, max_completion_tokens=50, n=3,
        extra_headers={endpoint.HEADER_REQUEST_ID: "c3"})
    done = raw.parse()
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert all(c.message.content == "echo: Name a river." and c.finish_reason == "stop" for c in done.choices)
    # Three requests, the first under the caller's id; the others are generated, never served choice 0's answer.
    assert eng.submitted[-3:] == ["c3", "c3/n1", "c3/n2"]
    assert [eng.seen[i].get("reuse") for i in ("c3", "c3/n1", "c3/n2")] == [None, "none", "none"]
    # Each reserves and is billed as a whole request: its cap, no n on the wire (Anthropic refuses n).
    assert all(eng.seen[i]["body"]["max_completion_tokens"] == 50 and "n" not in eng.seen[i]["body"]
               for i in ("c3", "c3/n1", "c3/n2"))
    assert done.usage.prompt_tokens == 3 * 7 and done.usage.completion_tokens == 3 * 3
    cost = float(one.headers[endpoint.HEADER_COST])
    assert float(raw.headers[endpoint.HEADER_COST]) == pytest.approx(3 * cost)
    assert float(raw.headers[endpoint.HEADER_SAVING]) == pytest.approx(3 * float(one.headers[endpoint.HEADER_SAVING]))
    assert raw.headers[endpoint.HEADER_MODE] == "batch_api" and raw.headers[endpoint.HEADER_REQUEST_ID] == "c3"


def test_n_choices_stream_and_reach_a_claude_model(served):
    eng, client = served
    chunks = list(client.chat.completions.create(model="claude-haiku-4-5", messages=ASK, n=2, stream=True,
                                                 extra_headers={endpoint.HEADER_REQUEST_ID: "c-claude"}))
    assert sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason) == [0, 1]
    assert [ch.delta.content for c in chunks for ch in c.choices if ch.delta.content] == ["echo: Name a river."] * 2
    assert "n" not in eng.seen["c-claude"]["body"] and "n" not in eng.seen["c-claude/n1"]["body"]
    single = client.chat.completions.create(model="claude-haiku-4-5", messages=ASK, n=1)  # n=1 too: not on the wire
    assert len(single.choices) == 1


@pytest.mark.parametrize("n", [0, 129, "2", 1.5, True])
def test_a_bad_n_is_a_400_naming_it(served, n):
    _, client = served
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gpt-5-mini", messages=ASK, extra_body={"n": n})
    assert exc.value.param == "n" and "128" in exc.value.message


def test_one_failed_choice_fails_the_call_with_its_status(served):
    _, client = served
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="gpt-5-mini", messages=ASK, n=2,
                                       extra_headers={endpoint.HEADER_REQUEST_ID: "c-boom"})
    assert exc.value.status_code == 503 and exc.value.response.headers["x-should-retry"] == "false"


class StoppingEngine(FakeEngine):
    """Choice 1 is cut by the engine's stop (``serve`` draining) after choice 0 was answered and billed."""

    def _result(self, req):
        if req.id.endswith("/n1"):
            return Result(id=req.id, tenant=req.tenant, status="failed", error=ENGINE_CANCELLED)
        return super()._result(req)


def test_a_choice_cut_by_the_engines_stop_after_another_was_billed_is_not_retried_by_the_sdk():
    # A stop's 503 asks the SDK to retry (nothing was billed for that request); for n choices the others were
    # billed, and the SDK's retry (a new request: a new engine, or a fresh id) paid for them again (a review).
    with serving(make_app(StoppingEngine(), catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="gpt-5-mini", messages=ASK, n=2,
                                           extra_headers={endpoint.HEADER_REQUEST_ID: "s1"})
        assert exc.value.status_code == 503 and exc.value.response.headers.get("x-should-retry") == "false"
        assert "1 of the 2 choices were answered and billed" in exc.value.message
        with pytest.raises(openai.APIStatusError) as exc:  # nothing billed: the SDK may retry it
            client.chat.completions.create(model="gpt-5-mini", messages=ASK,
                                           extra_headers={endpoint.HEADER_REQUEST_ID: "s2/n1"})
        assert exc.value.status_code == 503 and "x-should-retry" not in exc.value.response.headers


class StoppedEngine(FakeEngine):
    """Stopped elsewhere (``smartbatch stop --name``): choice 0 waited in a group, named unsent by the stop;
    choice 1 was under way at a provider (``actors._stop_cut``)."""

    gone_why = "engine 'fake' was stopped"

    def _result(self, req):
        from engine.app._driver_stop import unsent_at_stop

        self.gone = self.gone_why
        error = self.gone if req.id.endswith("/n1") else unsent_at_stop(self.gone)
        return Result(id=req.id, tenant=req.tenant, status="failed", error=error)


def test_choices_a_stop_cut_unsent_and_under_way_are_a_final_502_not_the_retryable_503_of_the_unsent_one():
    """The first failed choice gave the call's answer: the 503 of choice 0, never sent, had the SDK retry the
    whole call, choice 1 (cut under way, maybe billed) with it (stop 81)."""
    with serving(make_app(StoppedEngine(), catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="gpt-5-mini", messages=ASK, n=2,
                                           extra_headers={endpoint.HEADER_REQUEST_ID: "m1"})
        assert exc.value.status_code == 502 and exc.value.response.headers.get("x-should-retry") == "false"
        assert "may have been cut under way" in exc.value.message
        with pytest.raises(openai.APIStatusError) as exc:  # one choice alone, named unsent: the SDK may retry it
            client.chat.completions.create(model="gpt-5-mini", messages=ASK,
                                           extra_headers={endpoint.HEADER_REQUEST_ID: "m2"})
        assert exc.value.status_code == 503 and "retry-after" in exc.value.response.headers


def test_over_the_real_cache_choice_0_may_be_reused_and_the_others_are_always_generated(tmp_path):
    eng = CachedEngine(tmp_path)
    with serving(make_app(eng, catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        one = client.chat.completions.create(model="gpt-5-mini", messages=ASK, extra_headers={
            endpoint.HEADER_REQUEST_ID: "a"})
        raw = client.chat.completions.with_raw_response.create(model="gpt-5-mini", messages=ASK, n=3,
                                                               extra_headers={endpoint.HEADER_REQUEST_ID: "b"})
        texts = [c.message.content for c in raw.parse().choices]
        # Choice 0 is the earlier identical request's answer (free); choices 1 and 2 are their own calls, not
        # served that answer nor each other's though all three have one content.
        assert texts == [one.choices[0].message.content, "The Nile (b/n1).", "The Nile (b/n2)."]
        assert raw.headers[endpoint.HEADER_MODE] == "reuse,sync,sync"
        assert raw.headers[endpoint.HEADER_HIT] == "exact,none,none"
        fresh = client.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "New?"}],
                                               n=2, extra_headers={endpoint.HEADER_REQUEST_ID: "c"})
        assert [c.message.content for c in fresh.choices] == ["The Nile (c).", "The Nile (c/n1)."]
