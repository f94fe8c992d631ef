"""An SDK's retry of a batch create (``client.batches.create``, ``client.messages.batches.create``) answers the batch
its try made (``_endpoint_batch_once``). Before, each try was a batch of its own: the client saw two, and the
choices 1 to n-1 of its ``n`` > 1 lines were generated, and paid, twice. The endpoint under uvicorn over the tests'
fake engine (no Ray)."""

from __future__ import annotations

import json
import re
import threading

import openai
import pytest

from engine.app import endpoint
from engine.app._endpoint_retries import RETRY_COUNT, SdkRetries
from engine.app.endpoint import make_app
from tests.unit.test_endpoint import CAT, FakeEngine, batch_line, fake_endpoint, serving, upload, wait_done
from tests.unit.test_endpoint_msgbatches import ask, claude_endpoint, ended

CREATE = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}


def tries(count: int, tenant: str | None = None) -> dict:
    """The headers of an SDK's try ``count`` (0: the first), of ``tenant`` or the client's own."""
    return {"extra_headers": {RETRY_COUNT: str(count), **({endpoint.HEADER_TENANT: tenant} if tenant else {})}}


def test_a_retried_batch_create_answers_the_batch_of_its_try_and_nothing_else_does():
    with fake_endpoint() as (eng, client):
        client = client.with_options(default_headers={endpoint.HEADER_TENANT: "acme"})
        f = upload(client, [batch_line("a", "Name a river.")])
        first = client.batches.create(input_file_id=f.id, **CREATE, **tries(0))
        again = client.batches.create(input_file_id=f.id, **CREATE, **tries(1))
        assert again.id == first.id  # the retry (its answer lost) gets the batch its try made
        assert client.batches.create(input_file_id=f.id, **CREATE, **tries(2)).id == first.id
        other = client.batches.create(input_file_id=f.id, **CREATE, metadata={"run": "2"}, **tries(1))
        assert other.id != first.id  # another body is another create
        assert client.batches.create(input_file_id=f.id, **CREATE, **tries(0)).id not in (first.id, other.id)
        # Another tenant's retry of the same body is its own create: the file is not its own (a 404), never the
        # batch of acme's try.
        with pytest.raises(openai.NotFoundError, match="No such File"):
            client.batches.create(input_file_id=f.id, **CREATE, **tries(1, tenant="globex"))
        wait_done(client, first.id)
        batches = client.batches.list().data
    assert len(batches) == 3 and len(eng.submitted) == len(set(eng.submitted)) == 3


def test_a_retried_message_batch_create_answers_the_batch_of_its_try():
    with claude_endpoint() as (eng, client):
        reqs = [ask("q")]
        first = client.messages.batches.create(requests=reqs, **tries(0))
        assert client.messages.batches.create(requests=reqs, **tries(1)).id == first.id
        assert client.messages.batches.create(requests=[ask("q", "Name a sea.")], **tries(1)).id != first.id
        assert client.messages.batches.create(requests=reqs, **tries(1, tenant="globex")).id != first.id
        assert client.messages.batches.create(requests=reqs, **tries(0)).id != first.id
    assert len(eng.submitted) == len(set(eng.submitted)) == 4


class SlowToTake(FakeEngine):
    """Takes a batch's lines only once the create's retry has come (``retried``): the first try outlives the
    client's timeout, as a create of a large file on a busy engine may."""

    def __init__(self):
        super().__init__()
        self.retried = threading.Event()

    def submit_many(self, ds):
        assert self.retried.wait(10)
        return super().submit_many(ds)


def test_an_sdk_create_that_outlived_its_timeout_is_one_batch_however_often_retried():
    eng = SlowToTake()
    app = make_app(eng, catalog=CAT)

    async def seen(scope, receive, send):  # the app, told when the SDK's retry comes
        if (RETRY_COUNT.encode(), b"1") in scope.get("headers", ()):
            eng.retried.set()
        await app(scope, receive, send)

    with serving(seen) as url, openai.OpenAI(base_url=url, api_key="x", max_retries=1, timeout=0.5) as client:
        f = upload(client, [batch_line("a", "Name a river."), batch_line("b", "Name a sea.")])
        made = client.batches.create(input_file_id=f.id, **CREATE)
        assert wait_done(client, made.id).request_counts.completed == 2
        assert [b.id for b in client.batches.list().data] == [made.id]  # one batch, though created twice
    assert len(eng.submitted) == len(set(eng.submitted)) == 2


def test_a_retry_after_a_restart_answers_the_batch_its_try_made_before_it(tmp_path):
    state = tmp_path / "state"
    with fake_endpoint(state_dir=state) as (_, client):
        f = upload(client, [batch_line("a", "Name a river.")])
        first = client.batches.create(input_file_id=f.id, **CREATE, **tries(0))
        wait_done(client, first.id)
    with fake_endpoint(state_dir=state) as (eng, client):
        assert client.batches.create(input_file_id=f.id, **CREATE, **tries(1)).id == first.id
        assert client.batches.create(input_file_id=f.id, **CREATE, **tries(0)).id != first.id


def test_an_ended_message_batch_leaves_no_plain_hash_of_its_requests_on_disk_and_is_still_taken_by_its_retry(
        tmp_path, monkeypatch):
    """A Message Batch's requests are its body, gone from the state directory once the batch has them (and its
    input once it ended); its record kept the plain SHA-256 of that body, for good: a reader of the directory
    confirmed a guessed short request by hashing it, as the log of generations' tries let before stop 74. The
    record keeps an HMAC under the directory's secret, and a retry after a restart still takes the batch; a
    record of the version before (its plain key) is taken by its retry too."""
    plain: list[str] = []
    real = SdkRetries.key

    def seen(tenant, url, content):
        plain.append(real(tenant, url, content))
        return plain[-1]

    monkeypatch.setattr(SdkRetries, "key", staticmethod(seen))
    state = tmp_path / "state"
    reqs = [ask("a", "yes")]
    with claude_endpoint(state_dir=state) as (_, client):
        made = client.messages.batches.create(requests=reqs, **tries(0))
        ended(client, made.id)
    assert plain, "no key made"
    on_disk = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
    assert not re.search(rb'"content":\s*"yes"', on_disk)  # the requests are gone: their hash was all a reader had
    assert not [k for k in plain if k.encode() in on_disk]  # what a guess hashed alone finds
    record = state / "batches" / f"{made.id}.json"
    with claude_endpoint(state_dir=state) as (_, client):
        assert client.messages.batches.create(requests=reqs, **tries(1)).id == made.id
    old = json.loads(record.read_bytes())  # as the version before wrote it
    old.pop("retry_h", None)
    old["retry_key"] = plain[0]
    record.write_text(json.dumps(old))
    with claude_endpoint(state_dir=state) as (_, client):
        assert client.messages.batches.create(requests=reqs, **tries(1)).id == made.id
        assert client.messages.batches.create(requests=reqs, **tries(0)).id != made.id
    assert plain[0].encode() not in record.read_bytes()  # written again keyed at that start
