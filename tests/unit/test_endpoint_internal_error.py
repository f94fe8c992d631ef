"""A bug's exception in the OpenAI-compatible endpoint (``_endpoint_internal``): a 500 in the shape of the
endpoint's other errors, with the call's id where the SDKs read it, logged under that id, the exception's words
(which may quote a key) kept out of the answer. Before, Starlette's own plain-text 500 answered it, with no id: the
SDKs' ``e.request_id`` was None and the log did not say which call it was. The endpoint under uvicorn, driven by
the official SDKs, over an engine stand-in that raises (no Ray)."""

from __future__ import annotations

import logging

import anthropic
import openai
import pytest

from engine.app import endpoint
from engine.app._endpoint_internal import INTERNAL_CODE
from engine.app.endpoint import make_app
from tests.unit.test_endpoint import CAT, FakeEngine, chat, serving

KEY = "sk-proj-" + "Q" * 40  # what a bug's words may quote: never in the answer
CLAUDE = "claude-sonnet-4-5"


class BuggyEngine(FakeEngine):
    """``FakeEngine`` that takes each request (its id kept) and then raises, as a bug below the route would."""

    async def asubmit(self, d: dict):
        self._request(d)
        raise RuntimeError(f"a bug that quotes the key {KEY}")


def boom() -> None:
    raise KeyError(KEY)


@pytest.fixture(scope="module")
def buggy():
    eng = BuggyEngine()
    app = make_app(eng, catalog=CAT)
    app.add_api_route("/v1/boom", boom)  # a route with no request of the engine's that raises
    with serving(app) as url:
        yield eng, url


def logged(caplog, rid: str) -> list[logging.LogRecord]:
    """The endpoint's log lines of a bug under ``rid``: each with its traceback, and never the key its words quote."""
    found = [r for r in caplog.records if r.name == "smartbatch.endpoint" and rid in r.getMessage()
             and getattr(r, "error_type", None)]
    assert all("Traceback" in r.getMessage() and KEY not in r.getMessage() and not r.exc_info for r in found)
    return found


def test_a_generations_bug_is_a_500_in_openais_shape_under_its_request_id_and_logged_there(buggy, caplog):
    eng, url = buggy
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client)
        rid = eng.submitted[-1]
        assert exc.value.request_id == rid == exc.value.response.headers[endpoint.HEADER_REQUEST_ID]
        body = exc.value.response.json()["error"]
        assert (body["type"], body["code"]) == ("server_error", INTERNAL_CODE) == (exc.value.type, exc.value.code)
        assert "RuntimeError" in body["message"] and rid in body["message"]
        assert KEY not in exc.value.response.text
        assert [r.error_type for r in logged(caplog, rid)] == ["RuntimeError"]  # the operator finds it by the id
        with pytest.raises(openai.InternalServerError) as own:  # the caller's own id, as its answer would carry
            chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-bug"})
        assert own.value.request_id == "q-bug"


def test_the_sdks_retry_of_a_bugs_500_takes_the_tries_id_so_nothing_is_paid_twice(buggy):
    """The request may run on, billed, when a bug breaks the answer: the 500 is no refusal, and the SDK's retry
    (it retries a 500) takes the try's id, as it did when Starlette answered."""
    eng, url = buggy
    before = len(eng.submitted)
    with openai.OpenAI(base_url=url, api_key="x", max_retries=1, timeout=10) as client:
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client, content="Name three lakes.")
    tries = eng.submitted[before:]
    assert len(tries) == 2 and set(tries) == {exc.value.request_id}


def test_a_bug_in_a_route_without_a_request_is_a_500_with_an_id_of_its_own(buggy, caplog):
    _, url = buggy
    with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.InternalServerError) as exc:
            client.get("/boom", cast_to=object)
    rid = exc.value.request_id
    assert rid and rid.startswith("req_") and exc.value.code == INTERNAL_CODE and "KeyError" in exc.value.message
    assert KEY not in exc.value.response.text
    assert [r.error_type for r in logged(caplog, rid)] == ["KeyError"]


def test_a_bug_on_the_messages_route_is_a_500_in_anthropics_shape_with_its_request_id(buggy, caplog):
    eng, url = buggy
    with anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0, timeout=10) as client:
        with pytest.raises(anthropic.InternalServerError) as exc:
            client.messages.create(model=CLAUDE, max_tokens=50, messages=[{"role": "user", "content": "x"}])
    rid = eng.submitted[-1]
    assert exc.value.request_id == rid
    body = exc.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error" and rid in body["error"]["message"]
    assert KEY not in exc.value.response.text
    assert [r.error_type for r in logged(caplog, rid)] == ["RuntimeError"]


class _UnrenderedAnswer(endpoint.JSONResponse):
    """The answer of a generation that cannot be written out: a bug past ``answer`` (a NaN, which JSON refuses)."""

    def render(self, content) -> bytes:
        if isinstance(content, dict) and content.get("object") == "chat.completion":
            raise ValueError(f"Out of range float values are not JSON compliant (it quoted {KEY})")
        return super().render(content)


def test_a_bug_past_a_generations_answer_is_a_500_under_the_id_its_request_took_and_was_billed_under(monkeypatch,
                                                                                                   caplog):
    """The middleware answered it under a fresh id: no line of the log named the request the engine made (and
    billed), and the SDK's ``e.request_id`` was not the one its retry took (a review of stop 80)."""
    monkeypatch.setattr(endpoint, "JSONResponse", _UnrenderedAnswer)
    eng = FakeEngine()
    with serving(make_app(eng, catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=1, timeout=10) as client:
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client, content="Name three seas.")
        assert len(eng.submitted) == 2 and set(eng.submitted) == {exc.value.request_id}  # the retry took the try
        assert exc.value.code == INTERNAL_CODE and KEY not in exc.value.response.text
        assert exc.value.response.headers[endpoint.HEADER_REQUEST_ID] == exc.value.request_id
        assert [r.error_type for r in logged(caplog, exc.value.request_id)] == ["ValueError", "ValueError"]
        with pytest.raises(openai.InternalServerError) as own:
            chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-unrendered"})
        assert own.value.request_id == "q-unrendered"


def test_a_bugs_log_line_keeps_the_callers_path_on_its_line_and_no_key(caplog):
    """The path is the caller's writing: a ``%0a`` in it, decoded, started a log line of the caller's making; the
    traceback's last line is the exception's words, which quoted the key into the operator's log (a review)."""
    from engine.app._endpoint_internal import internal_error

    with caplog.at_level(logging.ERROR, logger="smartbatch.endpoint"):
        err = internal_error(KeyError(KEY), "req_1", "GET /v1/boom\nERROR forged line")
    (rec,) = [r for r in caplog.records if r.name == "smartbatch.endpoint"]
    first, *rest = rec.getMessage().strip().split("\n")
    assert "GET /v1/boom\\nERROR forged line" in first and "req_1" in first
    assert not any("forged" in line for line in rest)
    assert KEY not in caplog.text and "[redacted]" in rec.getMessage() and "KeyError" in rest[-1]
    assert err.status == 500 and KEY not in str(err.message)


def test_a_bugs_log_line_is_masked_once_by_the_loggers_filter_a_headers_secret_too(caplog):
    """The 500's traceback was masked twice, by hand (``redact``: key shapes alone) and by the logger's filter
    (``KeyFilter``); the filter alone masks it now, what stands after ``Authorization: Bearer`` or ``?key=``
    whatever its shape too, and the line reads ``[redacted]`` once per secret (keys82)."""
    from engine.app._endpoint_internal import internal_error

    bearer = "Authorization: Bearer opaque-" + "Z" * 30  # a proxy's token: no provider key's shape
    with caplog.at_level(logging.ERROR, logger="smartbatch.endpoint"):
        internal_error(RuntimeError(f"upstream said 401 to {bearer} with {KEY}"), "req_2", "POST /v1/x")
    (rec,) = [r for r in caplog.records if r.name == "smartbatch.endpoint"]
    last = rec.getMessage().strip().split("\n")[-1]
    assert last == "RuntimeError: upstream said 401 to Authorization: Bearer [redacted] with [redacted]", last
    assert "Z" * 30 not in caplog.text and KEY not in caplog.text
