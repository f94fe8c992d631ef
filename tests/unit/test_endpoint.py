"""The OpenAI-compatible front (engine.app.endpoint) served by uvicorn on a free port, driven with the
official ``openai`` SDK against a fake engine that answers deterministically (no Ray)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn
from pydantic import ValidationError

from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.core.catalog import default_catalog
from engine.core.cost import price_alone, price_usage
from engine.core.errors import Overloaded, RequestError
from engine.core.request import Request, validation_context
from engine.core.result import CANCELLED, ENGINE_CANCELLED, ID_TAKEN, Result
from engine.core.settings import default_settings
from engine.core.trace import _problems_of

CAT = default_catalog()
CANCEL_WAIT_S = 1.0


class FakeEngine:
    """The engine's asyncio API, answering at once: text echoes the last message, cost is half the list price.
    An id ending in ``boom`` fails (a provider's 503), ``taken`` is held by another driver, ``tardy`` is answered
    after its deadline, ``full`` is refused as overloaded, and one ending in
    ``slow`` stays unfinished until ``release()``. A (tenant, id) names one request, as in the engine."""

    def __init__(self):
        self.settings, self.catalog = default_settings(), CAT
        self._ctx = validation_context(CAT, self.settings)
        self.seen: dict[str, dict] = {}  # id -> the dict submitted
        self.submitted: list[str] = []  # every submission's id, in order
        self._reqs: dict[tuple[str, str], Request] = {}
        self._held: list[tuple[concurrent.futures.Future, Result]] = []
        self.gone: str | None = None  # why the engine went away (``stop_under``)
        self.ledger_down = False  # every request: the budget ledger did not answer until its deadline
        self.withdrawn: list[str] = []  # ids ``cancel_requests`` was given

    def _request(self, d: dict) -> Request:
        try:
            req = Request.model_validate({**d, "arrival_s": 0.0}, context=self._ctx)
        except ValidationError as exc:
            field, msg = _problems_of(exc)[0]
            raise RequestError(d.get("id"), field, msg) from None
        if req.id == "full":
            raise Overloaded("max_pending=0 unfinished requests")
        first = self._reqs.setdefault((req.tenant, req.id), req)
        if first.model_copy(update={"deadline_s": req.deadline_s}) != req:  # content, as the engine's fingerprint
            raise RequestError(req.id, "id", "already submitted with other content", code=ID_TAKEN)  # as the engine
        self.seen[req.id] = dict(d)
        self.submitted.append(req.id)
        return req

    def _result(self, req: Request) -> Result:
        if req.id.endswith("boom"):
            return Result(id=req.id, tenant=req.tenant, status="failed", error="openai HTTP 503: overloaded")
        if req.id.endswith("broke"):
            return Result(id=req.id, tenant=req.tenant, status="rejected", error="budget_exhausted",
                          reason="budget global has $0.000371 left")
        if req.id.endswith("ledgerdown") or self.ledger_down:  # the budget ledger's Redis did not answer until the deadline
            return Result(id=req.id, tenant=req.tenant, status="rejected", error="budget_unavailable",
                          reason="the budget ledger did not answer: Redis at redis://127.0.0.1:1/0 is unavailable")
        if req.id.endswith("gone"):  # held when the engine stopped elsewhere (``smartbatch stop``, nothing sent)
            return Result(id=req.id, tenant=req.tenant, status="failed", error=self.gone)
        if req.id.endswith("taken"):  # another driver of a shared engine holds the id with other content
            return Result(id=req.id, tenant=req.tenant, status="failed", reason=ID_TAKEN,
                          error=f"field 'id': tenant {req.tenant!r} already submitted id {req.id!r} with other "
                                "content (another driver of this engine?)")
        if req.id.endswith("late"):
            return Result(id=req.id, tenant=req.tenant, status="expired", error="deadline passed before a result")
        if req.id.endswith("stopping-maybebilled"):  # ... as it waited for a next try, a try unanswered before it
            return Result(id=req.id, tenant=req.tenant, status="failed", possibly_billed_usd=0.0004,
                          error=f"{ENGINE_CANCELLED}; a call got no answer, so the provider may have billed it: "
                                "its budget is charged the call's upper bound, $0.000400 (report: possibly_billed)")
        if req.id.endswith("stopping"):  # the engine's cancel, as a ``serve`` stop drains
            return Result(id=req.id, tenant=req.tenant, status="failed", error=ENGINE_CANCELLED)
        if req.kind == "image":
            out = f"https://img.test/{req.id}.png"
        else:
            out = "echo: " + (req.body["messages"][-1]["content"] if "messages" in req.body else req.body["input"])
        return Result(id=req.id, tenant=req.tenant, status="ok", output=out, model=req.model,
                      provider=req.provider, usage={"input_tokens": 7, "output_tokens": 3},
                      cost_usd=price_usage(req, CAT, "batch_api", input_tokens=7, output_tokens=3).total,
                      mode="batch_api", hit=None,
                      deadline_met=not req.id.endswith("tardy"))

    async def asubmit(self, d: dict) -> Result:
        return self._result(self._request(d))

    async def asubmit_many(self, ds: list[dict]) -> list[Result]:
        return [self._result(req) for req in [self._request(d) for d in ds]]  # all refused, or all queued

    def submit_many(self, ds: list[dict]) -> list[concurrent.futures.Future]:
        futs = []
        for req in [self._request(d) for d in ds]:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            if req.id.endswith(("slow", "queued")):
                self._held.append((fut, self._result(req)))
            else:
                fut.set_result(self._result(req))
            futs.append(fut)
        return futs

    async def as_completed(self, futures):
        loop, arrived = asyncio.get_running_loop(), asyncio.Queue()

        def done(f):
            try:
                loop.call_soon_threadsafe(arrived.put_nowait, f)
            except RuntimeError:  # the loop has closed
                pass

        futures = list(futures)
        for f in futures:
            f.add_done_callback(done)
        for _ in futures:
            yield (await arrived.get()).result()

    def stop_under(self, why: str) -> None:
        """The engine stopped elsewhere (``smartbatch stop``): what it held fails with ``why``, as a driver's."""
        self.gone = why
        for fut, res in self._held:
            fut.set_result(Result(id=res.id, tenant=res.tenant, status="failed", error=why))
        self._held.clear()

    def cancel_requests(self, futs) -> int:
        """Lines not sent yet ("-queued") end cancelled; those in a call ("-slow") run on."""
        ids = {id(f) for f in futs}
        self.withdrawn += [res.id for fut, res in self._held if id(fut) in ids]
        queued = [(fut, res) for fut, res in self._held if id(fut) in ids and res.id.endswith("queued")]
        for fut, res in queued:
            self._held.remove((fut, res))
            fut.set_result(Result(id=res.id, tenant=res.tenant, status="failed", error=f"{CANCELLED}: withdrawn"))
        return len(queued)

    def release(self):
        for fut, res in self._held:
            fut.set_result(res)
        self._held.clear()


@pytest.fixture(scope="module")
def served():
    # A cancelling batch waits 1 s for its running lines here (600 s by default, as OpenAI's cancel may take).
    with fake_endpoint(cancel_wait_s=CANCEL_WAIT_S) as (eng, client):
        yield eng, client


@contextlib.contextmanager
def fake_endpoint(**app_kw):
    """The endpoint over a ``FakeEngine`` on a free loopback port, and an SDK client of it (no retries)."""
    eng = FakeEngine()
    try:
        with serving(make_app(eng, catalog=CAT, **app_kw)) as url, \
                openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
            yield eng, client
    finally:
        eng.release()


@contextlib.contextmanager
def serving(app):
    """``app`` on a free loopback port, for a test of its own; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        limit = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < limit:
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_batch_past_the_open_lines_limit_fails_and_leaves_room_for_chat():
    """Batch lines ride long windows and hold the engine's max_pending places meanwhile; chat calls share them.
    Past ``max_open_batch_lines`` a new batch fails validation (as OpenAI's does past its enqueued limit), and
    chat still answers; once the earlier batch has ended, the same file goes through."""
    eng = FakeEngine()
    with serving(make_app(eng, catalog=CAT, max_open_batch_lines=3)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        f = upload(client, [batch_line("a-slow", "one"), batch_line("b-slow", "two")])
        held = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert held.status == "in_progress"
        over = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert over.status == "failed" and over.errors.data[0].code == "request_limit_exceeded"
        assert "your earlier batches hold 2 of them" in over.errors.data[0].message
        assert chat(client).parse().choices[0].message.content.startswith("echo:")
        eng.release()
        assert wait_done(client, held.id).status == "completed"
        again = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert again.status == "in_progress"
        eng.release()
        assert wait_done(client, again.id).status == "completed"


def test_an_endpoint_started_with_a_key_refuses_any_other_in_openais_shape():
    """``make_app(api_key_sha256=...)`` (``smartbatch serve --http-key-env``): without it anyone who reaches the
    port spends the engine's provider keys (a helper's review: a wrong key and none both got a 200)."""
    import hashlib

    eng = FakeEngine()
    digest = hashlib.sha256(b"right-key").hexdigest()
    with serving(make_app(eng, catalog=CAT, api_key_sha256=digest)) as url:
        with openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0, timeout=10) as bad:
            with pytest.raises(openai.AuthenticationError) as exc:
                chat(bad)
            assert exc.value.code == "invalid_api_key" and "--http-key-env" in exc.value.message
            with pytest.raises(openai.AuthenticationError):
                bad.batches.list()
        with pytest.raises(urllib.error.HTTPError) as no_key:  # no Authorization header at all
            urllib.request.urlopen(f"{url}/models", timeout=10)
        assert no_key.value.code == 401
        no_key.value.close()  # the error holds the response and its socket
        assert eng.submitted == []  # nothing reached the engine
        with openai.OpenAI(base_url=url, api_key="right-key", max_retries=0, timeout=10) as good:
            assert chat(good).parse().choices[0].message.content.startswith("echo:")
            assert good.batches.list().data == []


def wait_done(client, batch_id: str, limit_s: float = 5.0):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} still {b.status} after {limit_s} s")


def chat(client, content="Name three rivers.", **kw):
    return client.chat.completions.with_raw_response.create(
        model="gpt-5-mini", messages=[{"role": "user", "content": content}], max_completion_tokens=50, **kw)


def test_chat_completion_answers_with_smartbatch_headers_and_fields_from_headers(served):
    eng, client = served
    raw = chat(client, extra_headers={endpoint.HEADER_DEADLINE: "120.5", endpoint.HEADER_TENANT: "acme",
                                      endpoint.HEADER_PRIORITY: "background",
                                      endpoint.HEADER_REQUEST_ID: "q1"})
    done = raw.parse()
    assert done.object == "chat.completion" and done.model == "gpt-5-mini"
    assert done.choices[0].message.content == "echo: Name three rivers."
    assert done.usage.prompt_tokens == 7 and done.usage.completion_tokens == 3
    h = raw.headers
    assert h[endpoint.HEADER_MODE] == "batch_api" and h[endpoint.HEADER_HIT] == "none"
    assert h[endpoint.HEADER_REQUEST_ID] == "q1" and h[endpoint.HEADER_DEADLINE_MET] == "true"
    # An answer after its deadline is still the answer (billed: a 504 threw it away), and says it came late.
    late = chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q1-tardy"})
    assert late.parse().choices[0].message.content == "echo: Name three rivers."
    assert late.headers[endpoint.HEADER_DEADLINE_MET] == "false"
    sent = eng.seen["q1"]
    assert (sent["deadline_s"], sent["tenant"], sent["priority"]) == (120.5, "acme", "background")
    assert sent["body"]["max_completion_tokens"] == 50 and "arrival_s" not in sent
    # The saving is against the list price at the tokens the answer counted (7 in, 3 out), not at the cap of 50
    # it was sent with: priced at the cap, an answer that stopped short read as a saving it never made.
    req = Request.model_validate({**sent, "arrival_s": 0.0}, context=validation_context(CAT))
    listed = price_usage(req, CAT, "sync", input_tokens=7, output_tokens=3).total
    assert 0 < listed < price_alone(req, CAT, "sync").total
    assert float(h[endpoint.HEADER_COST]) == pytest.approx(listed / 2, abs=1e-9)
    assert float(h[endpoint.HEADER_SAVING]) == pytest.approx(listed / 2, abs=1e-9)


def test_without_headers_the_engine_defaults_apply_and_ids_are_fresh(served):
    eng, client = served
    ids = {chat(client, "Hi").headers[endpoint.HEADER_REQUEST_ID] for _ in range(2)}
    assert len(ids) == 2
    sent = eng.seen[ids.pop()]
    assert not {"tenant", "priority"} & set(sent)
    # The deadline is the client's: the SDK gives up at its read timeout (10 s here, sent as a header), so the
    # answer must be back by then. With a longer timeout the priority's default applies.
    assert sent["deadline_s"] == pytest.approx(10 * endpoint.CLIENT_TIMEOUT_SHARE)
    rid = chat(client, "Hi", extra_headers={endpoint.CLIENT_TIMEOUT: "100000"}).headers[endpoint.HEADER_REQUEST_ID]
    assert eng.seen[rid]["deadline_s"] == eng.settings.deadlines.normal
    rid = chat(client, "Hi", extra_headers={endpoint.CLIENT_TIMEOUT: "100000", endpoint.HEADER_PRIORITY: "urgent"}
               ).headers[endpoint.HEADER_REQUEST_ID]
    assert eng.seen[rid]["deadline_s"] == eng.settings.deadlines.urgent
    rid = chat(client, "Hi", extra_headers={endpoint.HEADER_DEADLINE: "900"}).headers[endpoint.HEADER_REQUEST_ID]
    assert eng.seen[rid]["deadline_s"] == 900.0  # the caller's own deadline wins


@pytest.mark.parametrize(("header", "value"), [
    (endpoint.HEADER_DEADLINE, "soon"), (endpoint.HEADER_DEADLINE, "-5"), (endpoint.HEADER_DEADLINE, "1e9"),
    (endpoint.HEADER_PRIORITY, "asap"), (endpoint.HEADER_TENANT, "t" * 300)])
def test_a_bad_header_is_a_400_naming_it(served, header, value):
    _, client = served
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, extra_headers={header: value})
    assert exc.value.param == header and header in exc.value.message
    assert exc.value.type == "invalid_request_error"


@pytest.mark.parametrize(("header", "says"), [
    ("X-Smartbatch-Dealine", endpoint.HEADER_DEADLINE), ("x-smartbatch-tenent", endpoint.HEADER_TENANT),
    ("X-Smartbatch-Mode", "the engine's answer")])
def test_a_misspelt_smartbatch_header_is_a_400_naming_it_and_the_one_meant(served, header, says):
    """A helper's tour of the README sent `X-Smartbatch-Dealine: 600`: the header was ignored, and the request
    took the default deadline unsaid, as a settings variable misspelt is not (README, "Layout")."""
    eng, client = served
    before = len(eng.seen)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, extra_headers={header: "600"})
    assert exc.value.param.lower() == header.lower() and says in exc.value.message, exc.value.message
    f = upload(client, [batch_line("a", "one")])
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_headers={header: "acme"})
    assert exc.value.param.lower() == header.lower()
    assert len(eng.seen) == before  # nothing reached the engine


@pytest.mark.parametrize("tenant", ["t" * 300, "a\tb"])
def test_a_bad_tenant_header_of_a_batch_is_one_400_naming_it_not_an_error_on_every_line(served, tenant):
    """The batch was created and every line failed with "field 'tenant': ...", a field the lines do not have (a
    helper's hunt); a chat completion already answered 400 naming the header."""
    eng, client = served
    f = upload(client, [batch_line("a", "one"), batch_line("b", "two")])
    before = len(eng.seen)
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_headers={endpoint.HEADER_TENANT: tenant})
    assert exc.value.param == endpoint.HEADER_TENANT and endpoint.HEADER_TENANT in exc.value.message
    assert len(eng.seen) == before  # no line reached the engine


def test_a_body_nested_too_deeply_is_a_400_in_openais_shape(served):
    """It was a plain-text 500, which the SDKs retry (a helper's hunt)."""
    _, client = served
    body = ('{"model": "gpt-5-mini", "x": ' + "[" * 5000 + "]" * 5000 + "}").encode()
    for url in ("chat/completions", "batches"):
        http = urllib.request.Request(f"{client.base_url}{url}", data=body, method="POST",
                                      headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(http, timeout=10)
        assert exc.value.code == 400
        error = json.loads(exc.value.read())["error"]
        assert error["type"] == "invalid_request_error" and "nested too deeply" in error["message"]


def test_a_bad_body_is_refused_naming_the_field(served):
    _, client = served
    with pytest.raises(openai.NotFoundError) as exc:  # as OpenAI answers an unknown model (since stop 56)
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert exc.value.param == "model" and "no-such-model" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:  # n=2 is two choices (test_endpoint_choices.py)
        chat(client, n=0)
    assert exc.value.param == "n"
    key = {endpoint.HEADER_REQUEST_ID: "q2"}
    first = chat(client, "Same", extra_headers=key).parse()
    assert chat(client, "Same", extra_headers=key).parse().id == first.id  # the idempotency key: one answer
    with pytest.raises(openai.BadRequestError) as exc:  # the same key with other content
        chat(client, "Other", extra_headers=key)
    assert exc.value.param == endpoint.HEADER_REQUEST_ID and exc.value.code == "id_taken"
    # Held by another driver of a shared engine with other content: the caller's id again, not a 502 server
    # error that named nothing to change (a helper's hunt).
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, "Mine", extra_headers={endpoint.HEADER_REQUEST_ID: "q-taken"})
    assert exc.value.param == endpoint.HEADER_REQUEST_ID and exc.value.code == "id_taken"
    assert "another driver" in exc.value.message


def test_a_response_format_the_provider_would_refuse_is_a_400_saying_what_the_call_takes(served):
    """A json_schema format without its json_schema object was accepted, and would have ridden its deadline (a
    batch window) to the provider's 400; an image's ``response_format="b64_json"`` (the SDK's images.generate) was
    told to send a chat format such as 'json_object' (a hunt with the SDKs)."""
    eng, client = served
    before = len(eng.submitted)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, response_format={"type": "json_schema"})
    assert exc.value.param == "response_format" and "its json_schema object" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="gpt-image-1", prompt="a cat", response_format="b64_json")
    assert exc.value.param == "response_format" and "json_object" not in exc.value.message
    assert "leave it out" in exc.value.message and "on an image call" in exc.value.message
    assert len(eng.submitted) == before  # nothing reached the engine
    schema = {"name": "river", "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}
    assert chat(client, response_format={"type": "json_schema", "json_schema": schema}).parse().choices


@pytest.mark.parametrize(("field", "value"), [("user", 5), ("store", "yes")])
def test_bookkeeping_fields_of_the_wrong_type_are_400s_naming_them(served, field, value):
    """Accepted, they rode the call's deadline to the provider's 400 (a hunt with the SDKs)."""
    eng, client = served
    before = len(eng.submitted)
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, extra_body={field: value})
    assert exc.value.param == field and f"body.{field} must be" in exc.value.message
    assert len(eng.submitted) == before
    assert chat(client, user="u-1", store=False, metadata={"team": "7"}).parse().choices


def test_the_responses_route_answers_in_the_sdks_shape(served):
    """``client.responses.create`` got a 404 while batches took /v1/responses lines (a review); its body now has
    every field the SDK's ``Response`` type requires, checked strictly."""
    from openai.types.responses import Response as SdkResponse

    _, client = served
    raw = client.responses.with_raw_response.create(model="gpt-5-mini", input="Name three rivers.")
    assert raw.headers[endpoint.HEADER_MODE] == "batch_api"
    checked = SdkResponse.model_validate(json.loads(raw.text))  # every required field (the SDK's parse is lenient)
    assert checked.output_text == "echo: Name three rivers." and raw.parse().output_text == checked.output_text
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="gpt-5-mini", input="")
    assert exc.value.param == "input"


def test_a_failed_result_passes_the_providers_status_and_a_full_engine_is_a_429(served):
    _, client = served
    with pytest.raises(openai.InternalServerError) as exc:
        chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-boom"})
    assert exc.value.status_code == 503 and "HTTP 503" in exc.value.message
    assert exc.value.response.headers["x-should-retry"] == "false"
    # A failed result is final (the engine retried it already): the SDK's own retries, on by default, would
    # each be a new request, generated and billed again. The answer tells it not to.
    eng, retrying = served[0], client.with_options(max_retries=2)
    before = len(eng.submitted)
    with pytest.raises(openai.InternalServerError):
        retrying.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "x"}],
                                         extra_headers={endpoint.HEADER_REQUEST_ID: "q2-boom"})
    assert eng.submitted[before:] == ["q2-boom"]
    with pytest.raises(openai.RateLimitError) as exc:
        chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "full"})
    assert exc.value.response.headers["retry-after"] == "1"


def test_a_call_the_engines_stop_ended_unanswered_is_a_503_the_sdk_may_retry(served):
    """While ``serve`` drains, the engine's cancel ends calls unanswered: a final 502 made the SDKs give up on
    calls the restarted engine would answer (a review). It is a 503 with Retry-After, and no word against a retry."""
    _, client = served
    with pytest.raises(openai.InternalServerError) as exc:
        chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-stopping"})
    assert exc.value.status_code == 503 and "engine is stopping" in exc.value.message
    assert "x-should-retry" not in exc.value.response.headers
    assert int(exc.value.response.headers["retry-after"]) > 0


def test_a_budget_refusal_tells_the_client_which_budget_and_what_is_left(served):
    """The 429 said only "budget_exhausted": the reason the engine gives (which budget, what it has left, as
    docs/budgets.md promises) was dropped whenever an error was set (a helper's hunt)."""
    _, client = served
    with pytest.raises(openai.RateLimitError) as exc:
        chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-broke"})
    assert "budget_exhausted: budget global has $0.000371 left" in exc.value.message


def test_a_call_an_engine_stop_ended_without_the_drains_word_is_final_and_says_it_may_have_been_billed():
    """``smartbatch stop --name`` fails the endpoint's open calls with "engine ... was stopped" whether they waited
    unsent (nothing under way) or were cut under way at a provider, billed (``--drain-s 0``): the driver cannot
    tell which. A retryable 503 (as for a while in stop 79) had the SDK send it again as a new request, paying a
    billed one twice; it is final and says so."""
    with fake_endpoint() as (eng, client):
        eng.gone = "engine 'fake' was stopped"
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-gone"})
    assert exc.value.status_code == 502 and exc.value.code == "engine_stopped"
    assert exc.value.response.headers["x-should-retry"] == "false" and "retry-after" not in exc.value.response.headers
    assert "was stopped" in exc.value.message and "may have been cut under way" in exc.value.message


def test_a_call_the_drains_cancel_ended_after_a_try_that_may_have_been_billed_is_final_not_a_retryable_503():
    """The drain's cancel ends a call waiting for its next try at once, unsent; but a try before it that got no
    answer may have been billed (its budget charged the bound, ``possibly_billed``). Its 503 had the SDK send it
    again as a new request, which paid for it again (a review, revend)."""
    with fake_endpoint() as (_, client):
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-stopping-maybebilled"})
    assert exc.value.status_code == 502 and exc.value.response.headers["x-should-retry"] == "false"
    assert "may have billed it" in exc.value.message


def test_a_call_an_engine_failure_ended_is_a_final_502_not_the_retryable_503_of_a_stop():
    """A driver's ``gone`` is also an engine lost (its result hub died and did not come back), whose calls under
    way at the providers may have been made and billed: the SDK's retry of a 503, a new request, paid for them
    again. Read as a stop with nothing under way, it was that 503 (a review, revend)."""
    with fake_endpoint() as (eng, client):
        eng.gone = "engine failure: the result hub (hub) died (RayActorError) and did not come back"
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-gone"})
    assert exc.value.status_code == 502 and exc.value.code == "request_failed"
    assert exc.value.response.headers["x-should-retry"] == "false" and "result hub" in exc.value.message


def test_a_call_the_budget_ledger_left_unanswered_is_a_503_the_sdk_retries_not_a_final_quota_429(served):
    """A Redis restart left the ledger unanswering until the call's deadline: nothing was reserved or billed, and
    the next try may pass. It was a 429 ``insufficient_quota`` with ``x-should-retry: false``, which no SDK
    retried and an application reads as a spent quota (a user's tour, every call of a 3 s Redis restart)."""
    with fake_endpoint() as (eng, client):
        eng.ledger_down = True
        with pytest.raises(openai.InternalServerError) as exc:
            chat(client)  # the SDK's own try: its retry is a new request (``_endpoint_retries``)
    assert exc.value.status_code == 503 and exc.value.code == "budget_unavailable"
    assert "budget ledger did not answer" in exc.value.message and "billed nothing" in exc.value.message
    assert "x-should-retry" not in exc.value.response.headers
    assert int(exc.value.response.headers["retry-after"]) > 0


def test_a_call_of_the_callers_id_the_ledger_left_unanswered_says_send_it_under_a_new_id_not_retry_it():
    """The engine keeps a request's result under its id (the driver answers a repeated id from its future, for
    its retention, an hour by default), so the SDK's retries, which send the same X-Smartbatch-Request-Id, and the
    caller's own "send it again" were each this 503 again at once. It now says to use a new id, and no SDK
    retries it (a review, revend)."""
    with fake_endpoint() as (eng, client):
        for _ in range(2):  # the same id again is the same answer, never a second call of it
            with pytest.raises(openai.InternalServerError) as exc:
                chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-ledgerdown"})
            assert exc.value.status_code == 503 and exc.value.code == "budget_unavailable"
            assert exc.value.response.headers["x-should-retry"] == "false"
            assert f"under a new {endpoint.HEADER_REQUEST_ID}" in exc.value.message
        eng.ledger_down = False
        assert chat(client, extra_headers={endpoint.HEADER_REQUEST_ID: "q-later"}).parse().choices[0].message.content


def test_images_come_back_in_openais_shape(served):
    eng, client = served
    raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt="a red fox", size="1024x1536",
                                                    extra_headers={endpoint.HEADER_REQUEST_ID: "img1"})
    img = raw.parse()
    assert img.created > 0 and [d.url for d in img.data] == ["https://img.test/img1.png"]
    assert raw.headers[endpoint.HEADER_MODE] == "batch_api"
    assert eng.seen["img1"]["body"]["prompt"] == "a red fox"
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model="gpt-image-1", prompt="a fox", n=2)
    assert exc.value.param == "n"
    with pytest.raises(openai.BadRequestError) as exc:  # a text model on the images route
        client.images.generate(model="gpt-5-mini", prompt="a fox")
    assert exc.value.param == "model"


def test_an_unknown_model_is_a_404_model_not_found_and_a_prompt_past_the_window_says_context_length_exceeded(
        served):
    """As OpenAI answers, and as applications catch to fall back or to shorten the prompt: both were 400s with no
    code (a helper's hunt with the SDK)."""
    eng, client = served
    before = len(eng.seen)
    for call in (lambda: client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.responses.create(model="gpt-9", input="hi"),
                 lambda: client.images.generate(model="dall-e-9", prompt="a fox")):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert (exc.value.code, exc.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x " * 300_000}])
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as exc:  # another refusal keeps no code
        client.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}],
                                       temperature=9)
    assert exc.value.code is None and len(eng.seen) == before  # none of them reached the engine


def test_models_list_the_catalog(served):
    _, client = served
    ids = {m.id for m in client.models.list()}
    assert {"gpt-5-mini", "claude-haiku-4-5", "gpt-image-1"} <= ids
    assert client.models.retrieve("gpt-5-mini").owned_by == "openai"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def batch_line(cid, content, model="gpt-5-mini"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": content}],
                                "max_completion_tokens": 20}})


def upload(client, lines):
    return client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")


def test_a_batch_round_trip_through_files_and_batches(served):
    eng, client = served
    client = client.with_options(default_headers={endpoint.HEADER_TENANT: "acme"})  # its files and batches
    f = upload(client, [batch_line("a", "one"), batch_line("b", "two"), batch_line("bad", "x", model="nope"),
                        batch_line("c-boom", "three")])
    assert f.id.startswith("file-") and f.purpose == "batch" and f.status == "processed" and f.bytes > 0
    assert client.files.retrieve(f.id).filename == "in.jsonl"
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "t1"})
    assert b.status == "in_progress" and b.request_counts.total == 4 and b.metadata == {"job": "t1"}
    b = wait_done(client, b.id)
    assert b.status == "completed" and b.completed_at is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (4, 2, 2)
    sent = eng.seen[f"{b.id}/a"]
    assert sent["deadline_s"] == 86400.0 and sent["tenant"] == "acme"
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b"]
    assert out[1]["response"]["status_code"] == 200
    assert out[1]["response"]["body"]["choices"][0]["message"]["content"] == "echo: two"
    lines = {e["custom_id"]: e for e in map(json.loads, client.files.content(b.error_file_id).text.splitlines())}
    errs = {cid: e["error"] for cid, e in lines.items()}
    assert errs["bad"]["code"] == "invalid_request" and "field 'model'" in errs["bad"]["message"]
    assert errs["c-boom"]["code"] == "request_failed" and "HTTP 503" in errs["c-boom"]["message"]
    # The provider's HTTP error rides in the line's response, as in OpenAI's error file (readers look up
    # line["response"]["status_code"]); a line refused before any call has none.
    boom = lines["c-boom"]["response"]
    assert boom["status_code"] == 503 and "HTTP 503" in boom["body"]["error"]["message"]
    assert lines["bad"]["response"] is None
    rep = client.get(f"/batches/{b.id}/smartbatch_report", cast_to=object)
    assert rep["totals"]["succeeded"] == 2
    assert rep["totals"]["saving_usd"] == pytest.approx(rep["totals"]["cost_usd"])  # half off
    assert rep["totals"]["cost_usd"] > 0
    assert b.id in [x.id for x in client.batches.list()]
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"


def test_a_custom_id_repeated_in_another_batch_is_another_request(served):
    _, client = served
    contents = []
    for text in ("first", "second"):
        b = client.batches.create(input_file_id=upload(client, [batch_line("same", text)]).id,
                                  endpoint="/v1/chat/completions", completion_window="1h")
        b = wait_done(client, b.id)
        (line,) = map(json.loads, client.files.content(b.output_file_id).text.splitlines())
        contents.append((line["id"], line["response"]["body"]["choices"][0]["message"]["content"]))
    assert [c for _, c in contents] == ["echo: first", "echo: second"]
    assert contents[0][0] != contents[1][0]


def test_cancel_keeps_what_finished_and_errors_the_rest(served):
    eng, client = served
    f = upload(client, [batch_line("done", "one"), batch_line("x-slow", "two")])
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.cancel(b.id).status == "cancelling"
    b = wait_done(client, b.id)
    assert b.status == "cancelled" and b.cancelled_at is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (1, 1)
    (out,) = map(json.loads, client.files.content(b.output_file_id).text.splitlines())
    (err,) = map(json.loads, client.files.content(b.error_file_id).text.splitlines())
    assert out["custom_id"] == "done"
    assert (err["custom_id"], err["error"]["code"]) == ("x-slow", "batch_cancelled")
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(b.id)


def test_a_cancel_withdraws_the_lines_not_sent_and_they_end_at_once_billed_nothing(served):
    """Before, the engine was not told: a line still waiting to be sent ran on and was billed for an output
    nobody read. Now the open lines are withdrawn (``Engine.cancel_requests``); one not sent yet ends at once."""
    eng, client = served
    f = upload(client, [batch_line("done", "one"), batch_line("w-queued", "two")])
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.cancel(b.id).status == "cancelling"
    b = wait_done(client, b.id)
    withdrawn = [i.rpartition("/")[2] for i in eng.withdrawn]  # (the engine is the module's: other tests' too)
    assert b.status == "cancelled" and "w-queued" in withdrawn and "done" not in withdrawn
    assert (b.request_counts.completed, b.request_counts.failed) == (1, 1)
    (err,) = map(json.loads, client.files.content(b.error_file_id).text.splitlines())
    assert (err["custom_id"], err["error"]["code"]) == ("w-queued", "batch_cancelled")


def test_a_cancelled_batch_waits_for_its_running_lines_and_keeps_what_was_paid_for(served):
    """The engine cannot stop a line it accepted: it runs on and is billed. Finalised at once, the cancel left
    that result out of the output (a review); the batch now stays cancelling while its lines finish, up to its
    wait, and the output has every line that came back."""
    eng, client = served
    f = upload(client, [batch_line("done", "one"), batch_line("y-slow", "two")])
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.cancel(b.id).status == "cancelling"
    assert client.batches.retrieve(b.id).status == "cancelling"  # its slow line is still running
    eng.release()  # the slow line's result comes back within the wait
    b = wait_done(client, b.id)
    assert b.status == "cancelled" and b.error_file_id is None
    assert (b.request_counts.completed, b.request_counts.failed) == (2, 0)
    outs = {json.loads(x)["custom_id"] for x in client.files.content(b.output_file_id).text.splitlines()}
    assert outs == {"done", "y-slow"}


def test_a_batch_whose_line_missed_its_window_is_expired_and_keeps_the_rest(served):
    """OpenAI's batch is ``expired`` when its window ends before every line is done, with the done ones in its
    output: a line the engine could not answer by its deadline (the window) read as a ``completed`` batch with
    no ``expired_at`` (a review)."""
    _, client = served
    f = upload(client, [batch_line("done", "one"), batch_line("x-late", "two")])
    b = wait_done(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)
    assert b.status == "expired" and b.expired_at is not None and b.completed_at is None
    assert (b.request_counts.completed, b.request_counts.failed) == (1, 1)
    (out,) = map(json.loads, client.files.content(b.output_file_id).text.splitlines())
    (err,) = map(json.loads, client.files.content(b.error_file_id).text.splitlines())
    assert out["custom_id"] == "done" and (err["custom_id"], err["error"]["code"]) == ("x-late", "batch_expired")


def test_bad_batch_inputs_and_unknown_ids(served):
    _, client = served
    with pytest.raises(openai.NotFoundError) as exc:
        client.files.retrieve("file-nope")
    assert "file-nope" in exc.value.message
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.retrieve("batch_nope")
    assert "batch_nope" in exc.value.message
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert exc.value.param == "input_file_id"  # the create's field: it was the files route's "file_id"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert exc.value.param == "purpose"
    f = upload(client, [batch_line("a", "one")])
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="soon")
    assert exc.value.param == "completion_window"
    bad = upload(client, [batch_line("a", "one"), batch_line("a", "dup")])  # a repeated custom_id
    b = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "failed" and b.errors.data[0].line == 2
    assert "duplicate custom_id" in b.errors.data[0].message
    # Counted 0 / 0 / 0, as OpenAI counts a batch that failed validation: it counted the lines with a usable
    # custom_id (1 of 2 here), and completed + failed never reached that total.
    counts = client.batches.retrieve(b.id).request_counts
    assert (counts.total, counts.completed, counts.failed) == (0, 0, 0)
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    assert f.id not in [x.id for x in client.files.list()]


def test_the_engine_refuses_an_id_reused_with_other_content_with_the_code_the_endpoint_passes_on():
    """The driver's own refusal carries ``id_taken``, as another driver's does, so a caller tells them by one code
    (the endpoint answered the first with ``code: null``, a review)."""
    from types import SimpleNamespace

    from engine.app._driver_admit import _same_content

    ctx = validation_context(CAT)
    first = Request.model_validate({"id": "q", "model": "gpt-5-mini", "prompt": "One", "arrival_s": 0.0}, context=ctx)
    again = first.model_copy(update={"prompt": "Two"})
    _same_content(first, SimpleNamespace(_req=first))  # the same content: no refusal
    with pytest.raises(RequestError) as exc:
        _same_content(again, SimpleNamespace(_req=first))
    assert exc.value.field == "id" and exc.value.code == ID_TAKEN


def test_an_http_engines_endpoint_refuses_a_model_it_would_simulate_per_request_and_per_line(monkeypatch):
    """An HTTP engine that calls the providers' own APIs answered a chat call for Gemini (no endpoint) with a 200 of
    placeholder text at a simulated cost, and so each such line of a batch (a new user's tour). Refused now: a 400
    naming ``model``, and in a batch that line alone, its neighbours answered."""
    from engine.core.settings import Settings

    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    eng = FakeEngine()
    eng.settings = Settings(providers={"mode": "http"})  # the providers' own APIs: simulate_others is false
    with serving(make_app(eng, catalog=CAT, cancel_wait_s=CANCEL_WAIT_S)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "Hi"}])
        assert exc.value.param == "model" and "google, which has no HTTP endpoint" in exc.value.message
        assert "SIMULATE_OTHERS=true" in exc.value.message and eng.submitted == []
        assert chat(client).parse().choices[0].message.content.startswith("echo:")  # its endpoint's model
        f = upload(client, [batch_line("a", "one"), batch_line("g", "two", model="gemini-2.5-flash"),
                            batch_line("b", "three")])
        b = wait_done(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                    completion_window="24h").id)
        assert (b.status, b.request_counts.completed, b.request_counts.failed) == ("completed", 2, 1)
        (err,) = map(json.loads, client.files.content(b.error_file_id).text.splitlines())
        assert err["custom_id"] == "g" and err["error"]["code"] == "invalid_request"
        assert "field 'model'" in err["error"]["message"] and "simulated" in err["error"]["message"]
        assert [x for x in eng.submitted if x.endswith("/g")] == []
