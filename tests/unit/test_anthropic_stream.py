"""A sync Claude call streams (``messages.stream``, the ``anthropic`` SDK's advice for long answers): a whole answer
sends nothing until it is done, so one that took longer than ``timeout_s`` to write was cut after it was billed,
counted possibly billed and sent again (docs/providers.md). Streamed, ``timeout_s`` is a wait between events; the
whole call keeps a bound (``stream_bound``), and a stream cut after it began is possibly billed, made again under
its key. The emulator answers ``stream: true`` as Anthropic does, billed as the whole answer."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest

import actors.providers._anthropic_stream as anthropic_stream
import actors.providers.anthropic_http as anthropic_http
from engine.emulator import Emulator
from tests.unit.helpers import in_virtual_time
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    CAT,
    KEY,
    SPEED,
    Rig,
    direct,
    emu,
    job_of,
    jobs_of,
    req,
)
from tests.unit.test_money_hunt import _drained

X_API_KEY = {"X-Api-Key": KEY, "Authorization": anthropic.Omit()}  # where Anthropic reads an API key (the SDK's Bearer not)


def _paced(every_s: float, events: list[bytes]) -> anthropic.AsyncAnthropic:
    """A client whose every call is answered 200 with ``events``, one each ``every_s`` of its loop's clock."""
    import httpx2
    from anthropic._base_client import get_platform

    def answer(request: Any) -> Any:
        async def body():
            for event in events:
                await asyncio.sleep(every_s)
                yield event

        return httpx2.Response(200, headers={"content-type": "text/event-stream", "request-id": "req_x"},
                               content=body())

    client = anthropic.AsyncAnthropic(api_key=KEY, base_url="http://127.0.0.1:9", max_retries=0,
                                      http_client=anthropic.DefaultAsyncHttpxClient(
                                          transport=httpx2.MockTransport(answer)))
    client._platform = get_platform()  # (read in a worker thread at the first call otherwise)
    return client


def _long_events() -> tuple[dict, list[bytes]]:
    """A 1,000-token answer (25 deltas) as a whole Message and as its stream's 31 events."""
    from engine.emulator._anthropic_stream import message_events

    usage = {"input_tokens": 9, "output_tokens": 1000, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
           "content": [{"type": "text", "text": "word" * 250}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": usage}
    return msg, message_events(msg)[0]


def _served_call(e: Emulator, every_s: float, timeout_s: float) -> tuple[Any, Any, float]:
    """One sync call of a 1,000-token request through the Anthropic provider, its answer served an event every
    ``every_s`` (virtual s): (the outcome, the whole Message's own outcome, the call's virtual seconds)."""
    msg, events = _long_events()
    job = job_of(req(0, "anthropic", output_tokens=1000, max_output_tokens=1000))

    async def go():
        p = direct(e, "anthropic", timeout_s=timeout_s)
        await p.client.close()
        p.client = _paced(every_s, events)
        loop = asyncio.get_running_loop()
        try:
            start = loop.time()
            out = await p.call(job)
            whole = {k: v for k, v in msg.items() if v is not None}  # (as a whole answer is read: no nulls)
            return out, p._outcome(job, whole, "req_x", "sync"), loop.time() - start
        finally:
            await p.close()

    return in_virtual_time(go)


def test_an_answer_longer_than_the_timeout_whose_events_keep_coming_is_read_whole(emu):  # noqa: F811
    # 31 events 0.1 s apart: 3.1 s, three times the 1 s wait, none of its gaps near it. At the emulator in real
    # seconds (events 16 ms apart), a process stalled 1.5 s mid-stream was cut by that wait: "no event of the
    # stream within 1 s" (a flake hunt, stop 80).
    out, whole, took = _served_call(emu, 0.1, timeout_s=1.0)
    # Before: "timed out after 1 s", possibly billed, and made again by the dispatcher.
    assert out.ok and not out.replayed, out.error
    assert took > 3.0  # it did outlast the timeout
    assert out.usage.output_tokens == 1000 and out._replace(at=0.0) == whole._replace(at=0.0)


def test_a_stream_cut_midway_is_possibly_billed_and_made_again_under_its_key_billed_once(emu):  # noqa: F811
    (job,) = jobs = jobs_of("anthropic", n=1, claims=True)
    emu.faults.script("anthropic", "messages", [{"cut_body": True}])  # billed, its stream broken after half

    async def go():
        rig = Rig(emu, "anthropic")  # its cut is its connection closed: a 0.5 s wait between events only risked a stall
        api, keys = rig.d.provider.client.messages, []
        inner = api.stream

        def spy(**kw: Any) -> Any:
            keys.append(kw["extra_headers"]["Idempotency-Key"])
            return inner(**kw)

        api.stream = spy
        try:
            await rig.reserve(jobs)
            await rig.run("sync", jobs)
            await rig.resolved(jobs)
            await _drained(rig)
            (item,) = emu.bill().items  # the cut stream's call, billed once: its retry was given its answer again
            r = rig.results[job.req.id]
            assert r.status == "ok" and r.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            (_, _, cut), *_, (_, _, last) = rig.calls
            assert not cut.ok and cut.maybe_billed and cut.retryable, cut  # never counted free
            assert last.ok and last.replayed
            assert len(keys) == len(rig.calls) >= 2 and len(set(keys)) == 1  # before: no stream at all
            assert item.idempotency_key == keys[0]
            assert sum(rig.budget.book.spend.values()) == pytest.approx(item.cost_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_stream_past_its_whole_bound_is_cut_and_counted_possibly_billed(emu, monkeypatch):  # noqa: F811
    # Its events keep coming (0.1 s apart, a wait of 1 s allowed between them), but its bound is 0.8 s, before
    # its 3.1 s: cut by the bound, not the wait, at 0.8 s of the loop's clock. In real seconds at the emulator, a
    # process stalled 1.2 s from 0.05 s in was cut before the emulator's prefill (0.08 s) had billed it, and the
    # bill the test read was empty (a flake hunt, stop 80).
    monkeypatch.setattr(anthropic_http, "stream_bound", lambda body, timeout_s: 0.8)
    out, _, took = _served_call(emu, 0.1, timeout_s=1.0)
    assert not out.ok and out.maybe_billed and out.retryable and out.real, out
    assert "no whole answer within 0.8 s" in out.error and took == pytest.approx(0.8)


def test_the_bound_is_the_caps_tokens_at_the_floor_rate_past_the_first_events_wait():
    assert anthropic_stream.stream_bound({"max_tokens": 64_000}, 600.0) == 600.0 + 6_400.0
    assert anthropic_stream.stream_bound({"max_tokens": 100}, 600.0) == 1_200.0  # a whole answer's, at least
    assert anthropic_stream.stream_bound({}, 30.0) == 60.0


def _twins() -> tuple[Emulator, Emulator]:
    return (Emulator(CAT, latency_scale=0.0, speedup=SPEED), Emulator(CAT, latency_scale=0.0, speedup=SPEED))


def _sans_ids(msg: dict) -> dict:
    """A Message without the ids the emulator draws anew for each answer (its own, its tool calls')."""
    return {**msg, "id": None, "content": [{k: v for k, v in c.items() if k != "id"} for c in msg["content"]]}


TOOLS = [{"name": "lookup", "description": "Look a word up.",
          "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}]


@pytest.mark.parametrize("body", [None, {"messages": [{"role": "user", "content": "Define 'stream'."}],
                                         "tools": TOOLS, "tool_choice": {"type": "any"}}])
def test_a_streamed_answer_is_the_whole_answer_in_content_usage_and_cost(body):
    """The engine's streamed call and the SDK's whole ``create`` of the same body, each at one of two emulators
    of one seed: the same Message (id, content, usage, stop reason), read into the same outcome (output, tool
    calls, usage, cost), the same bill."""
    r = req(0, "anthropic", output_tokens=300, **({} if body is None else {"body": body}))
    a, b = _twins()
    with a, b:
        async def go():
            p = direct(a, "anthropic")
            try:
                sent = p.sync_body(job_of(r))
                client = anthropic.AsyncAnthropic(base_url=b.anthropic_base_url("anthropic"), api_key=KEY,
                                                  max_retries=0, default_headers=X_API_KEY)
                whole = await client.messages.create(**sent, timeout=30.0)
                async with client.messages.stream(**sent, timeout=30.0) as s:  # the SDK's own reader
                    read = (await s.get_final_message()).model_dump(mode="json", exclude_none=True)
                await client.close()
                out = await p.call(job_of(r))
                # What the whole answer was read into before (``AnthropicProvider.call``)
                before = p._outcome(job_of(r), whole.model_dump(mode="json", exclude_none=True),
                                    whole._request_id, "sync")
                return out, before, read
            finally:
                await p.close()

        out, before, read = asyncio.run(go())
        (streamed_item,), (whole_item, again) = a.bill().items, b.bill().items
    assert out.ok and out._replace(at=0.0) == before._replace(at=0.0), (out, before)
    assert _sans_ids(read) == _sans_ids(out.raw)
    assert out.finish == ("tool_calls" if body else "stop") and bool(out.tool_calls) == bool(body)
    assert out.cost == pytest.approx(streamed_item.cost_usd, abs=1e-12) and streamed_item.cost_usd > 0
    assert (streamed_item.usage, streamed_item.cost_usd) == (whole_item.usage, whole_item.cost_usd) == (
        again.usage, again.cost_usd)


def test_the_emulator_streams_anthropic_s_events_in_order():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as e:
        client = anthropic.Anthropic(base_url=e.anthropic_base_url("anthropic"), api_key=KEY, max_retries=0,
                                     default_headers=X_API_KEY)
        stream = client.messages.create(model="claude-haiku-4-5", max_tokens=50, stream=True, timeout=30.0,
                                        messages=[{"role": "user", "content": "Hi [[emulator:output_tokens=30]]"}])
        events = [ev.type for ev in stream]
        (item,) = e.bill().items
    assert stream.response.headers["content-type"] == "text/event-stream" and item.usage["output_tokens"] == 30
    assert events == ["message_start", "content_block_start", *["content_block_delta"] * 3, "content_block_stop",
                      "message_delta", "message_stop"]  # (and a ping after message_start, which the SDK drops)


def _served(events: list[bytes]) -> anthropic.AsyncAnthropic:
    """A client whose every call is answered 200 with ``events`` (a transport in the test: no socket)."""
    import httpx2

    def answer(request: Any) -> Any:
        return httpx2.Response(200, headers={"content-type": "text/event-stream", "request-id": "req_x"},
                               content=b"".join(events))

    return anthropic.AsyncAnthropic(api_key=KEY, base_url="http://127.0.0.1:9", max_retries=0,
                                    http_client=anthropic.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(answer)))


def _events() -> list[bytes]:
    from engine.emulator._anthropic_stream import message_events

    usage = {"input_tokens": 9, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    return message_events({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                           "content": [{"type": "text", "text": "Hi there"}], "stop_reason": "end_turn",
                           "stop_sequence": None, "usage": usage})[0]


@pytest.mark.parametrize("how", ["whole", "no message_stop", "an error event", "no message_delta"])
def test_a_stream_that_ends_early_or_says_an_error_midway_is_broken_not_an_answer(how):
    # The SDK's own reader takes a stream that ends before message_stop for a whole one (its Message is the part
    # read: a cut answer taken as whole, billed and never made again), and an error event midway for the call's
    # own error answer (a 200 refused for good: possibly billed, counted free).
    events = _events()
    if how == "no message_stop":
        events = events[:-2]
    elif how == "no message_delta":  # a review: read as whole, its output the 1 token of message_start, priced so
        events = [*events[:-2], events[-1]]
    elif how == "an error event":
        events = [*events[:3], b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                  b'"message":"Overloaded"}}\n\n']
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}

    async def go():
        client = _served(events)
        try:
            return await anthropic_stream.streamed_call(client.messages, anthropic, body, "k", 5.0, 10.0)
        finally:
            await client.close()

    if how == "whole":
        msg, rid, replayed = asyncio.run(go())
        assert msg["content"] == [{"type": "text", "text": "Hi there"}] and msg["usage"]["output_tokens"] == 3
        assert (rid, replayed) == ("req_x", False)
        return
    said = {"no message_stop": "before message_stop", "no message_delta": "without its message_delta"}
    with pytest.raises(anthropic_stream.Broken, match=said.get(how, "Overloaded")):
        asyncio.run(go())


_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":%s}\n\n'


@pytest.mark.parametrize("how", ["a delta past its blocks", "a null partial_json", "a message_start without usage"])
def test_a_stream_of_another_shape_after_it_began_is_possibly_billed_never_counted_free(emu, how):  # noqa: F811
    """A review: the reader named AssertionError, RuntimeError and ValueError alone. What else the SDK's
    accumulator raises at such events escaped: a TypeError read as the body's own fault (not retried, billed
    nothing), an IndexError or AttributeError out of ``call`` (the dispatcher's engine error, settled at $0)."""
    events = _events()
    tool = (b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":'
            b'{"type":"tool_use","id":"toolu_1","name":"lookup","input":{}}}\n\n')
    cut = {"a delta past its blocks": [*events[:2], _DELTA % (3, b'{"type":"text_delta","text":"x"}')],
           "a null partial_json": [*events[:2], tool, _DELTA % (0, b'{"type":"input_json_delta","partial_json":null}')],
           "a message_start without usage": [b'event: message_start\ndata: {"type":"message_start","message":'
                                             b'{"id":"msg_1","type":"message","role":"assistant","content":[]}}\n\n']}
    served = [*cut[how], *events[-2:]]  # then message_delta and message_stop, as if whole

    async def go():
        p = direct(emu, "anthropic")
        await p.client.close()
        p.client = _served(served)
        try:
            return await p.call(job_of(req(0, "anthropic")))
        finally:
            await p.close()

    out = asyncio.run(go())  # before: raised (IndexError, AttributeError), or "bad request body" (TypeError)
    assert not out.ok and out.maybe_billed and out.retryable and out.real, out
    assert "could not be read" in out.error


def test_a_key_first_sent_whole_before_the_upgrade_is_answered_by_its_replay_billed_once(emu):  # noqa: F811
    """A call made whole by an engine before stop 80 (billed), made again after the upgrade (a restart's journal)
    under the same key: the emulator, which keeps keys, refuses the streamed body (``stream: true``, another body)
    with its 409. Before (a review): failed at once as a key reused, paid and lost; now asked whole, replayed."""
    from engine.core.provider_api import sent_key

    job = job_of(req(0, "anthropic"))

    async def go():
        p = direct(emu, "anthropic")
        try:
            body = p.sync_body(job)
            client = anthropic.AsyncAnthropic(base_url=emu.anthropic_base_url("anthropic"), api_key=KEY,
                                              max_retries=0, default_headers=X_API_KEY)
            first = await client.messages.create(**body, extra_headers={"Idempotency-Key": sent_key(job, body)},
                                                 timeout=30.0)  # as create_call sent it before stop 80
            await client.close()
            return first, await p.call(job)
        finally:
            await p.close()

    first, out = asyncio.run(go())
    assert out.ok and out.replayed and not out.key_reused, out.error
    (item,) = emu.bill().items
    assert out.provider_request_id == item.request_id == first._request_id
    assert out.cost == pytest.approx(item.cost_usd, abs=1e-12) and out.output == first.content[0].text


def test_a_whole_message_answered_to_a_stream_is_read_as_the_whole_answer():
    """A server that answers ``stream: true`` with a whole Message (a proxy that drops ``stream``; a provider
    replaying under the key a call made whole before stop 80): read as events, there were none, and the call
    was a stream ended early, possibly billed and made again each time (a review)."""
    import httpx2

    whole = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
             "content": [{"type": "text", "text": "Hi there"}], "stop_reason": "end_turn", "stop_sequence": None,
             "usage": {"input_tokens": 9, "output_tokens": 3}}

    def answer(request: Any) -> Any:
        return httpx2.Response(200, json=whole, headers={"request-id": "req_x", "idempotent-replayed": "true"})

    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}

    async def go():
        client = anthropic.AsyncAnthropic(api_key=KEY, base_url="http://127.0.0.1:9", max_retries=0,
                                          http_client=anthropic.DefaultAsyncHttpxClient(
                                              transport=httpx2.MockTransport(answer)))
        try:
            return await anthropic_stream.streamed_call(client.messages, anthropic, body, "k", 5.0, 10.0)
        finally:
            await client.close()

    msg, rid, replayed = asyncio.run(go())  # before: Broken, "the stream ended before message_stop"
    assert msg == {k: v for k, v in whole.items() if v is not None} and (rid, replayed) == ("req_x", True)
