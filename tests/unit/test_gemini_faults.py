"""Gemini's faults as Google's OpenAI compatibility layer answers them, through a ``Dispatcher`` (no Ray) at the
emulator's ``google`` side: its errors come as a list of one ``{"error": {"code", "message", "status"}}``, whose
message the ``openai`` SDK leaves out of its text, and a rate limit says its wait in a ``google.rpc.RetryInfo``
detail of that body, not in a ``Retry-After`` header. The engine reads both, as it reads OpenAI's and Anthropic's
(docs/providers.md, "Gemini"). Every wait is a bounded poll (``Rig.until``), none a sleep."""

from __future__ import annotations

import asyncio
import logging

import pytest

from actors._types import Job
from actors.providers._wire import retry_after
from engine.core.errors import ProviderError
from engine.core.request import Request, validation_context
from engine.core.settings import Settings
from tests.unit.test_gemini import CAT, FLASH, HI, ask, emu  # noqa: F401  (emu: the fixture)
from tests.unit.test_http_providers import SPEED, Rig, job_of

RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def test_a_refusal_of_geminis_layer_names_what_it_refused_and_fails_that_request_alone(emu):  # noqa: F811
    """A field the layer refuses that the engine let through (its list of the layer's fields is an ASSUMPTION):
    the result says Google's words, naming the field, where it read "google HTTP 400: Error code: 400" and
    nothing of why. The request beside it in the same dispatch is answered, and nothing is billed for the
    refused one or retried."""
    odd = Request.model_validate({"id": "odd", "arrival_s": 0.0, "model": FLASH,
                                  "body": {"messages": [HI], "store": True}},
                                 context=validation_context(CAT, Settings()))  # not checked for the layer
    jobs = [Job(0, odd, "fp-odd", claim="c0"), Job(1, ask(1), "fp-1", claim="c1")]

    async def go():
        rig = Rig(emu, "google")
        try:
            await rig.reserve(jobs)
            await rig.run("sync", jobs)
            await rig.until(lambda: len(rig.results) == 2, "both results")
            await rig.settled_to(emu.bill().total_usd)
            return rig.results, rig.calls
        finally:
            await rig.close()

    results, calls = asyncio.run(go())
    bad, good = results["odd"], results["g-1"]
    assert bad.status == "failed" and bad.cost_usd == 0.0 and bad.real, bad
    assert 'google HTTP 400: Error code: 400 - INVALID_ARGUMENT: Invalid JSON payload received. Unknown name "store"' \
        in bad.error, bad.error
    assert good.status == "ok" and good.cost_usd == pytest.approx(emu.bill().total_usd, abs=1e-12)
    assert sorted(job.req.id for job, _, _ in calls) == ["g-1", "odd"]  # the refused one was sent once


def test_a_gemini_batch_create_refused_says_googles_words_and_the_wait_its_429_names(emu):  # noqa: F811
    """A batch create that Google's layer refuses: the error the dispatcher logs names what was refused, and a
    rate limit is waited out for the RetryInfo's delay, not the catalog's guess (10 s)."""
    emu.faults.script("google", "batches.create", [
        {"status": 400, "message": "Request contains an invalid argument."},
        {"status": 429, "retry_after_s": 36.5}])

    async def go():
        rig = Rig(emu, "google")
        try:
            refused = []
            for _ in range(2):
                with pytest.raises(ProviderError) as ei:
                    await rig.d.provider.submit_batch([job_of(ask(0))], None, "ref")
                refused.append(ei.value)
            return refused
        finally:
            await rig.close()

    bad, limited = asyncio.run(go())
    assert "INVALID_ARGUMENT: Request contains an invalid argument." in str(bad) and bad.retry_after_s is None
    assert "RESOURCE_EXHAUSTED" in str(limited) and limited.retry_after_s == 36.5
    assert emu.count("batches.create", "google") == 2 and emu.bill().items == ()


def test_a_gemini_429_is_retried_no_earlier_than_the_wait_its_body_names(emu):  # noqa: F811
    """Google's 429 says its wait only in its body (RetryInfo ``retryDelay``): read as no wait at all, a quota
    window of 100 s was called again after the engine's backoff of 1 s, and a window of minutes came back 429
    after 429 until the request's deadline made each one of its tries (a fault hunt)."""
    wait_s = 100.0  # engine seconds (100 ms real)
    emu.faults.script("google", "chat.completions", [{"status": 429, "retry_after_s": wait_s}])

    async def go():
        rig = Rig(emu, "google")
        try:
            j = Job(0, ask(0), "fp-0", claim="c0")
            await rig.reserve([j])
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            await rig.settled_to(emu.bill().total_usd)
            return r, rig.calls
        finally:
            await rig.close()

    r, calls = asyncio.run(go())
    assert r.status == "ok" and r.real, r
    (j1, _, o1), (j2, start2, o2) = calls
    assert not o1.ok and o1.rate_limited and o1.retry_after_s == wait_s and o2.ok
    assert "RESOURCE_EXHAUSTED" in o1.error
    assert j1.key == j2.key and j1.body == j2.body  # the same call again, under its key
    assert start2 >= o1.at + wait_s - 1e-3 * SPEED  # engine time (1 ms real: the two clocks' reads)
    assert emu.count("chat.completions", "google", status=429) == 1 and len(emu.bill().items) == 1


def test_a_gemini_key_quoted_in_googles_error_never_shows(emu, caplog):  # noqa: F811
    """Google's refusal of a key quotes it (``Invalid API key: ...``): now that Google's words reach the result
    and the logs, the key in them is redacted, in a sync call's result and a batch create's logged refusal."""
    caplog.set_level(logging.DEBUG)
    key = "AIzaSyD-NEVERSHOWN-gemini-0123456789abc"
    quoting = f"API key not valid. Please pass a valid API key. (Invalid API key: {key})"
    emu.faults.script("google", "chat.completions", [{"status": 400, "message": quoting}])
    emu.faults.script("google", "batches.create", [{"status": 400, "message": quoting}])

    async def go():
        rig = Rig(emu, "google", key=key)
        try:
            j = Job(0, ask(0), "fp-0")
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            b = Job(1, ask(1), "fp-1")
            await rig.run("batch_api", [b], bid="refused")
            await rig.until(lambda: rig.grouper.readmitted(), "the refused batch's member back")
            return [r.model_dump_json(), repr(rig.d.provider), str(await rig.d.stats())]
        finally:
            await rig.close()

    seen = asyncio.run(go())
    seen += [rec.getMessage() for rec in caplog.records]
    assert "API key not valid" in seen[0] and "[redacted]" in seen[0]
    assert any("batch submission failed" in s and "INVALID_ARGUMENT: API key not valid" in s for s in seen)
    assert not [s for s in seen if key in s]


def _google(*details: dict) -> dict:
    return {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED",
            "details": list(details)}


@pytest.mark.parametrize(("headers", "body", "seconds"), [
    ({}, [{"error": _google({"@type": RETRY_INFO, "retryDelay": "36.429760048s"})}], 36.429760048),
    ({}, _google({"@type": "type.googleapis.com/google.rpc.Help"}, {"@type": RETRY_INFO, "retryDelay": "21s"}), 21.0),
    ({"retry-after": "3"}, [{"error": _google({"@type": RETRY_INFO, "retryDelay": "21s"})}], 3.0),  # a header first
    ({}, [{"error": _google()}], None),  # the layer's bare 429: the engine's backoff
    ({}, [{"error": _google({"@type": RETRY_INFO, "retryDelay": "soon"})}], None),
    ({}, "upstream timed out", None),
])
def test_googles_wait_is_read_from_its_error_body_where_no_header_says_one(headers, body, seconds):
    assert retry_after(headers, body) == seconds
