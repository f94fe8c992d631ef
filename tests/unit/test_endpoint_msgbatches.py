"""Anthropic's Message Batches (``/v1/messages/batches``) driven with the official ``anthropic`` SDK: the endpoint
under uvicorn over ``FakeEngine`` (no Ray), whose settings call Anthropic over HTTP, as the Messages route asks.
Before, ``client.messages.batches`` got a 404 and an Anthropic application had no batch route at all."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request

import anthropic
import pytest

from engine.app import _endpoint_msgbatches as msgbatches
from engine.app import endpoint
from engine.app._endpoint_messages import AnthropicError
from engine.app._endpoint_msgbatch_shape import batch_lines, refused_line
from engine.app.endpoint import make_app
from engine.core.batchfile import parse_batch_file
from engine.core.settings import ProviderEndpoint, ProvidersSettings, default_settings
from tests.unit.test_endpoint import CAT, FakeEngine, serving

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
MODEL = "claude-sonnet-4-5"


class ClaudeEngine(FakeEngine):
    """``FakeEngine`` (answers at once, by the request id's ending) whose Anthropic models go over HTTP."""

    def __init__(self):
        super().__init__()
        ep = ProviderEndpoint(api="anthropic", base_url="http://127.0.0.1:9", api_key_env="SMARTBATCH_TEST_UNUSED")
        s = default_settings()
        self.settings = s.model_copy(update={"providers": ProvidersSettings(
            mode="http", endpoints={"anthropic": ep}, simulate_others=True)})


@contextlib.contextmanager
def claude_endpoint(eng: ClaudeEngine | None = None, **app_kw):
    eng = eng or ClaudeEngine()
    try:
        with serving(make_app(eng, catalog=CAT, cancel_wait_s=5.0, **app_kw)) as url, \
                anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0,
                                    timeout=10) as client:
            yield eng, client
    finally:
        eng.release()


@pytest.fixture(scope="module")
def served():
    with claude_endpoint() as (eng, client):
        yield eng, client


def status(method: str, url: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def ask(cid: str, text: str = "Name a river.", **params) -> dict:
    return {"custom_id": cid, "params": {"model": MODEL, "max_tokens": 100,
                                         "messages": [{"role": "user", "content": text}], **params}}


def ended(client, batch_id: str, limit_s: float = 5.0):
    """The batch once its processing has ended: the route polled (each call a round trip), up to ``limit_s``."""
    end = time.monotonic() + limit_s
    while (b := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < end, b
    return b


def test_a_batch_of_good_and_bad_requests_ends_with_a_result_for_each(served):
    eng, client = served
    client = client.with_options(default_headers={endpoint.HEADER_TENANT: "acme"})  # its batch, seen by acme
    no_cap = ask("nocap")
    del no_cap["params"]["max_tokens"]
    b = client.messages.batches.create(requests=[
        ask("a", "one"), ask("b", "two", system="Be brief."), no_cap, ask("gpt", model="gpt-5-mini"),
        ask("hot", temperature="warm"), ask("c-boom"), ask("gone", model="claude-sonnet-9"),
        {"custom_id": "noparams"}])
    assert b.id.startswith("msgbatch_") and b.type == "message_batch" and b.results_url is None
    assert b.processing_status in ("in_progress", "ended") and sum(b.request_counts.to_dict().values()) == 8
    assert (b.expires_at - b.created_at).total_seconds() == 86400  # Anthropic's 24 hours, every line's deadline
    sent = eng.seen[f"{b.id}/a"]
    assert sent["deadline_s"] == 86400.0 and sent["tenant"] == "acme" and sent["body"]["model"] == MODEL
    assert eng.seen[f"{b.id}/b"]["body"]["system"] == "Be brief."  # Anthropic's body, as the caller wrote it
    b = ended(client, b.id)
    assert b.ended_at is not None and b.results_url.endswith(f"/v1/messages/batches/{b.id}/results")
    counts = b.request_counts
    assert (counts.succeeded, counts.errored, counts.processing, counts.canceled) == (2, 6, 0, 0)
    got = {r.custom_id: r.result for r in client.messages.batches.results(b.id)}
    assert set(got) == {"a", "b", "nocap", "gpt", "hot", "c-boom", "gone", "noparams"}
    assert got["a"].type == "succeeded" and got["a"].message.type == "message"
    assert got["a"].message.content[0].text == "echo: one" and got["a"].message.model == MODEL
    assert [got[k].type for k in ("nocap", "gpt", "hot", "c-boom", "gone", "noparams")] == ["errored"] * 6
    says = {k: (got[k].error.error.type, got[k].error.error.message) for k in got if got[k].type == "errored"}
    assert says["nocap"][1].startswith("params.max_tokens: ") and says["nocap"][0] == "invalid_request_error"
    assert says["gpt"][1].startswith("params.model: ") and "/v1/batches" in says["gpt"][1]
    assert says["hot"][1].startswith("params.temperature: ")
    assert says["gone"][1].startswith("params.model: ") and "claude-sonnet-9" in says["gone"][1]
    assert says["noparams"][1].startswith("params: ")
    assert says["c-boom"][0] == "overloaded_error" or says["c-boom"][0] == "api_error"
    assert "503" in says["c-boom"][1]
    # Nothing refused went to the engine; the others each once.
    assert not [i for i in eng.submitted if i.startswith(b.id) and i.split("/")[1] in ("nocap", "gpt", "noparams")]
    # Its files are the batch's own: the Files API neither serves nor deletes them (a delete emptied its results).
    for kind in ("output", "error"):
        fid = f"file-{b.id}-{kind}"
        for method, path in (("GET", fid), ("DELETE", fid), ("GET", f"{fid}/content")):
            assert status(method, f"{str(client.base_url).rstrip('/')}/v1/files/{path}") == 404, (method, path)
    assert {r.custom_id for r in client.messages.batches.results(b.id)} == set(got)


@pytest.mark.parametrize("requests, says", [
    ([], "requests: is required"),
    ([ask("a"), ask("a")], "requests.1.custom_id: 'a' is also the custom_id of requests.0"),
    ([ask("a b")], "requests.0.custom_id: 'a b' must be 1 to 64"),
    ([ask("x" * 65)], "requests.0.custom_id:"),
    # Matched whole: "a\n" passed the pattern's "$", was taken beside "a", and its result never came (a hunt).
    ([ask("a"), ask("a\n")], "requests.1.custom_id: 'a\\n' must be 1 to 64"),
])
def test_a_malformed_create_is_a_400_in_anthropics_shape(served, requests, says):
    _, client = served
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.batches.create(requests=requests)
    assert exc.value.body["type"] == "error" and exc.value.body["error"]["type"] == "invalid_request_error"
    assert exc.value.body["error"]["message"].startswith(says)


def test_a_create_past_the_size_of_a_message_batch_is_a_413(served, monkeypatch):
    """Anthropic's 256 MB (here made 4 KB): before, a create of any size was read whole and taken. Refused by its
    Content-Length, or as it streams in when it gives none."""
    eng, client = served
    monkeypatch.setattr(msgbatches, "MAX_BATCH_BYTES", 4096, raising=False)
    reqs = [ask(f"big{i}", "word " * 200) for i in range(5)]
    with pytest.raises(anthropic.APIStatusError) as exc:
        client.messages.batches.create(requests=reqs)
    assert exc.value.status_code == 413 and exc.value.body["error"]["type"] == "request_too_large"
    assert exc.value.body["error"]["message"].startswith("requests: the batch is ")

    class Chunked:  # a create with no Content-Length, read as it streams in
        headers: dict = {}

        async def stream(self):
            for _ in range(5):
                yield b"x" * 1000

    with pytest.raises(AnthropicError) as said:
        asyncio.run(msgbatches._bounded_body(Chunked()))
    assert said.value.status == 413 and said.value.message.startswith("requests: the batch is more than 4,096")
    assert not [i for i in eng.submitted if "/big" in i]  # nothing of either went to the engine
    assert client.messages.batches.create(requests=reqs[:1]).request_counts  # one that fits goes through


def test_a_cancel_ends_the_unsent_requests_canceled_and_keeps_the_answered_ones(served):
    eng, client = served
    b = client.messages.batches.create(requests=[ask("x-queued"), ask("y-slow"), ask("z")])
    c = client.messages.batches.cancel(b.id)
    assert c.processing_status == "canceling" and c.cancel_initiated_at is not None
    assert f"{b.id}/x-queued" in eng.withdrawn  # taken back from the engine: never sent, never billed
    eng.release()  # the request already in a call is answered: kept, not paid again
    b = ended(client, b.id)
    counts = b.request_counts
    assert (counts.canceled, counts.succeeded, counts.errored, counts.processing) == (1, 2, 0, 0)
    got = {r.custom_id: r.result.type for r in client.messages.batches.results(b.id)}
    assert got == {"x-queued": "canceled", "y-slow": "succeeded", "z": "succeeded"}
    with pytest.raises(anthropic.APIStatusError) as exc:  # ended: nothing left to cancel
        client.messages.batches.cancel(b.id)
    assert exc.value.status_code == 409 and exc.value.body["type"] == "error"


def test_the_list_pages_newest_first_and_holds_message_batches_alone(served):
    _, client = served
    first = client.messages.batches.create(requests=[ask("l1")])
    second = client.messages.batches.create(requests=[ask("l2")])
    page = client.messages.batches.list(limit=1)
    assert [m.id for m in page.data] == [second.id] and page.has_more
    every = [m.id for m in client.messages.batches.list(limit=1)]  # the SDK pages on with after_id
    assert every.index(second.id) < every.index(first.id) and all(i.startswith("msgbatch_") for i in every)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_nope")
    ended(client, first.id)
    assert client.messages.batches.delete(first.id).type == "message_batch_deleted"
    assert first.id not in [m.id for m in client.messages.batches.list()]


def test_a_restarted_endpoint_takes_back_an_open_message_batch_and_asks_nothing_twice(tmp_path):
    state, first = tmp_path / "state", ClaudeEngine()
    with claude_endpoint(first, state_dir=state) as (_, client):
        b = client.messages.batches.create(requests=[ask("q"), ask("p-slow"), ask("bad", model="gpt-5-mini")])
        assert client.messages.batches.retrieve(b.id).request_counts.succeeded == 1
        first._held.clear()  # the engine went with the endpoint: its held request is never answered
    again = ClaudeEngine()
    with claude_endpoint(again, state_dir=state) as (_, client):
        assert client.messages.batches.retrieve(b.id).processing_status == "in_progress"
        assert again.submitted == [f"{b.id}/p-slow"]  # the answered one is kept, not asked again
        again.release()
        done = ended(client, b.id)
        assert (done.request_counts.succeeded, done.request_counts.errored) == (2, 1)
        got = {r.custom_id: r.result.type for r in client.messages.batches.results(b.id)}
        assert got == {"q": "succeeded", "p-slow": "succeeded", "bad": "errored"}


def test_a_message_batch_whose_input_is_lost_at_a_restart_ends_with_a_result_per_known_request(tmp_path):
    """Its input gone from the state directory, the batch fails at the next start. Before, it kept one error of
    OpenAI's batch shape (no custom_id): its retrieve and the whole list of Message Batches answered 500."""
    state, first = tmp_path / "state", ClaudeEngine()
    with claude_endpoint(first, state_dir=state) as (_, client):
        b = client.messages.batches.create(requests=[ask("q"), ask("p-slow"), ask("bad", model="gpt-5-mini")])
        other = client.messages.batches.create(requests=[ask("o")])
        first._held.clear()
    (state / "batches" / f"{b.id}.input").unlink()
    with claude_endpoint(ClaudeEngine(), state_dir=state) as (again, client):
        done = client.messages.batches.retrieve(b.id)
        assert done.processing_status == "ended" and done.request_counts.errored == 2
        got = {r.custom_id: r.result for r in client.messages.batches.results(b.id)}
        assert set(got) == {"q", "bad"} and {r.type for r in got.values()} == {"errored"}
        assert got["bad"].error.error.message.startswith("params.model: ")
        assert "input was not found" in got["q"].error.error.message
        assert {m.id for m in client.messages.batches.list()} == {b.id, other.id}
        assert not again.submitted  # nothing asked again


def test_a_request_the_engine_refuses_is_named_as_the_caller_sent_it():
    """The engine names a line's fields ``body.X``; a Message Batch's caller sent ``params.X``. Before, a live tour
    read ``params.temperature: body.temperature must be ...`` and ``params.max_tokens: max_tokens is required``."""
    settings = ClaudeEngine().settings
    no_cap = ask("nocap")
    del no_cap["params"]["max_tokens"]
    reqs = [ask("hot", temperature=1.7), ask("big", max_tokens=10**7), no_cap]
    data, errors = batch_lines(reqs, CAT, settings)
    bf = parse_batch_file(data, source="f", window_s=86400, catalog=CAT, settings=settings, live=True)
    errors += [refused_line(ln.custom_id, *ln.problem, sent=True) for ln in bf.invalid]
    says = {e["custom_id"]: e["message"] for e in errors}
    assert set(says) == {"hot", "big", "nocap"}
    for cid, field in (("hot", "temperature"), ("big", "max_tokens"), ("nocap", "max_tokens")):
        assert says[cid].startswith(f"params.{field}: ") and "body." not in says[cid], says[cid]
        assert not says[cid].startswith(f"params.{field}: {field}"), says[cid]


def test_a_time_compressed_engines_batches_expire_at_their_window_in_real_time():
    """The window counts engine seconds (each line's deadline): at 24x a 24-hour batch ends within an hour of real
    time. Before, both batch routes showed ``expires_at`` as ``created_at`` plus the whole window, a day away."""
    import openai

    from tests.unit.test_endpoint import batch_line, upload

    class Compressed(ClaudeEngine):
        class clock:  # noqa: N801 (the engine's clock, as the endpoint reads it)
            speedup = 24.0

    with claude_endpoint(Compressed()) as (eng, client):
        b = client.messages.batches.create(requests=[ask("a")])
        assert (b.expires_at - b.created_at).total_seconds() == 3600  # 86,400 engine seconds at 24x
        with openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="x", max_retries=0,
                           timeout=10) as oai:
            f = upload(oai, [batch_line("a", "one")])
            o = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            assert o.expires_at - o.created_at == 3600
