"""The SDKs' own retries (``max_retries=2``) against the endpoint, over the tests' fake engine under uvicorn (no
Ray). A call that outlived the client's read timeout was sent again by the SDK as a new request at each retry: a
helper's tour paid 7 calls for one ``n=3`` call and got no answer. A retry is now the request it repeats."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import httpx2 as httpx
import openai
import pytest

from engine.app import endpoint
from engine.app._endpoint_messages import AnthropicError
from engine.app._endpoint_retries import ANSWERED_KEEP_S, RETRY_COUNT, SdkRetries
from engine.app.endpoint import make_app
from engine.core.errors import Overloaded
from engine.core.result import ENGINE_CANCELLED, Result
from tests.unit.test_endpoint import CAT, FakeEngine, batch_line, serving, upload, wait_done

ASK = [{"role": "user", "content": "Name a river."}]


class AnswersOnceRetried(FakeEngine):
    """Takes each submission at once and answers none until ``tries`` submissions came: the first tries outlive
    the client's timeout, and the SDK's retry is what releases them."""

    def __init__(self, tries: int):
        super().__init__()
        self.tries, self._came, self._go = tries, 0, None

    async def _hold(self):
        self._go = self._go or asyncio.Event()
        self._came += 1
        if self._came >= self.tries:
            self._go.set()
        await asyncio.wait_for(self._go.wait(), 10)

    async def asubmit(self, d):
        req = self._request(d)
        await self._hold()
        return self._result(req)

    async def asubmit_many(self, ds):
        reqs = [self._request(d) for d in ds]
        await self._hold()
        return [self._result(req) for req in reqs]


def test_an_sdk_retry_of_a_call_that_outlived_its_timeout_is_the_same_request_not_a_second_one():
    eng = AnswersOnceRetried(tries=2)
    with serving(make_app(eng, catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=1, timeout=0.5) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-5-mini", messages=ASK, n=3, extra_headers={endpoint.HEADER_DEADLINE: "3600"})
    # Two tries reached the engine, the retry under the first try's ids: three requests, each generated once.
    assert len(eng.submitted) == 6 and len(set(eng.submitted)) == 3
    first = eng.submitted[0]
    assert eng.submitted[:3] == eng.submitted[3:] == [first, f"{first}/n1", f"{first}/n2"]
    assert raw.headers[endpoint.HEADER_REQUEST_ID] == first and len(raw.parse().choices) == 3


def test_first_tries_with_the_same_body_stay_calls_of_their_own_and_a_refused_try_is_retried_afresh():
    eng = FakeEngine()
    with serving(make_app(eng, catalog=CAT)) as url, httpx.Client(base_url=url, timeout=10) as http:
        def call(count, content="Name a river.", tenant="acme"):
            got = http.post("/chat/completions", json={"model": "gpt-5-mini", "messages": [
                {"role": "user", "content": content}]}, headers={RETRY_COUNT: str(count), endpoint.HEADER_TENANT: tenant})
            return got.status_code, got.headers.get(endpoint.HEADER_REQUEST_ID)

        (_, a), (_, b) = call(0), call(0)
        assert a != b  # two clients' identical calls are two calls
        assert call(1) == (200, b)  # a retry takes the latest try of that content
        assert call(1, tenant="globex")[1] not in (a, b)  # of its own tenant only
        assert call(1, content="Another river.")[1] not in (a, b)  # and of the same content only
    assert len(set(eng.submitted)) == 4


class StopsTheFirst(FakeEngine):
    """The first request ends cut by the engine's stop (a 503 the SDKs retry), as ``serve`` drains."""

    def _result(self, req):
        if len(self.submitted) == 1:
            return Result(id=req.id, tenant=req.tenant, status="failed", error=ENGINE_CANCELLED)
        return super()._result(req)


def test_a_retry_of_a_try_answered_with_an_error_is_a_new_request():
    eng = StopsTheFirst()
    with serving(make_app(eng, catalog=CAT)) as url, httpx.Client(base_url=url, timeout=10) as http:
        tries = [http.post("/chat/completions", json={"model": "gpt-5-mini", "messages": ASK},
                           headers={RETRY_COUNT: str(k)}) for k in (0, 1)]  # as the SDK retries the stop's 503
    assert [t.status_code for t in tries] == [503, 200]
    assert len(set(eng.submitted)) == 2  # the first ended unanswered: its retry is sent again


def test_a_tries_id_outlives_its_answer_for_a_while_then_a_retry_is_a_new_request():
    now = [0.0]
    retries, ids = SdkRetries(clock=lambda: now[0], max_kept=2), iter(f"req_{k}" for k in range(100))

    def take(key, count):
        return retries.request_id(key, {RETRY_COUNT: str(count)}, lambda: next(ids))

    rid = take("k", 0)
    retries.answered("k", rid)
    now[0] = ANSWERED_KEEP_S - 1
    assert take("k", 1) == rid  # its answer was lost on the way: the retry gets it
    retries.answered("k", rid)
    now[0] += ANSWERED_KEEP_S + 1
    assert take("k", 2) != rid
    assert retries.request_id("x", {}, lambda: "plain") == "plain"  # not an SDK's try: never kept
    take("a", 0), take("b", 0), take("c", 0)  # past max_kept, the least recent goes first
    assert "SdkRetries(kept=2, running=2)" == repr(retries)



class FullForASecondClient(AnswersOnceRetried):
    """The first call is held (a slow call); an identical call of another client of the tenant finds the engine
    full (a 429, refused before it is a request); the first call's retry releases the first."""

    def __init__(self):
        super().__init__(tries=2)
        self.first_in, self.refused = threading.Event(), 0

    async def asubmit(self, d):
        if self.submitted and d["id"] not in self.submitted and not self.refused:
            self.refused += 1
            raise Overloaded("max_pending=1 unfinished requests")
        if not self.submitted:
            self.first_in.set()
        return await super().asubmit(d)


def test_an_identical_call_refused_meanwhile_leaves_the_running_try_to_its_retry():
    """Before, one try per content was remembered, the latest: a second client's identical call refused with a
    429 took the running first try's id with it, and the first try's retry was generated and paid again."""
    eng = FullForASecondClient()
    body = {"model": "gpt-5-mini", "messages": ASK}
    with serving(make_app(eng, catalog=CAT)) as url, httpx.Client(base_url=url, timeout=10) as http, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(http.post, "/chat/completions", json=body, headers={RETRY_COUNT: "0"})
        assert eng.first_in.wait(10)
        assert http.post("/chat/completions", json=body, headers={RETRY_COUNT: "0"}).status_code == 429
        retry = http.post("/chat/completions", json=body, headers={RETRY_COUNT: "1"})
        rid = first.result(10).headers[endpoint.HEADER_REQUEST_ID]
    assert retry.status_code == 200 and retry.headers[endpoint.HEADER_REQUEST_ID] == rid
    assert eng.submitted == [rid, rid]  # one request, generated once


def test_a_refused_try_leaves_an_earlier_try_under_way_to_retries_but_not_an_earlier_answer():
    retries, ids = SdkRetries(clock=lambda: 0.0), iter(f"req_{k}" for k in range(100))

    def take(key, count):
        return retries.request_id(key, {RETRY_COUNT: str(count)}, lambda: next(ids))

    running, answered = take("k", 0), take("j", 0)
    retries.answered("j", answered)
    retries.refused("k", take("k", 0))
    retries.refused("j", take("j", 0))  # a call of its own after that answer, refused (the engine full)
    assert take("k", 1) == running and take("j", 1) not in (answered, "req_3")


def test_a_full_table_forgets_answered_tries_before_one_still_running():
    """Past ``max_kept``, the oldest answered try goes first: a slow call is the oldest try, and its retry (the
    client's timeout passed) found it forgotten behind the quick calls answered since, and paid it again."""
    retries, ids = SdkRetries(clock=lambda: 0.0, max_kept=2), iter(f"req_{k}" for k in range(100))

    def take(key, count):
        return retries.request_id(key, {RETRY_COUNT: str(count)}, lambda: next(ids))

    slow = take("slow", 0)
    for key in ("a", "b", "c"):
        retries.answered(key, take(key, 0))
    assert take("slow", 1) == slow and take("a", 1) != "req_1"
    assert "SdkRetries(kept=2, running=2)" == repr(retries)


def test_a_try_that_broke_with_a_500_is_kept_for_its_retry_for_a_while_not_as_under_way_for_good(monkeypatch):
    """An error no ``ApiError`` (a bug's 500, the handler cancelled) may leave the request running in the engine:
    its retry takes its id, as before, but the try is kept as answered, so it goes after ``ANSWERED_KEEP_S``. It
    stayed under way for good, and a full table of such tries pushed out the answered tries first."""
    made: list[SdkRetries] = []

    class Seen(SdkRetries):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    class Broken(FakeEngine):
        async def asubmit(self, d):
            self._request(d)
            raise RuntimeError("a bug after the request was taken")

    monkeypatch.setattr(endpoint, "SdkRetries", Seen)
    eng = Broken()
    with serving(make_app(eng, catalog=CAT)) as url:
        for k in (0, 1):
            with httpx.Client(base_url=url, timeout=10) as http, pytest.raises(httpx.HTTPStatusError):
                http.post("/chat/completions", json={"model": "gpt-5-mini", "messages": ASK},
                          headers={RETRY_COUNT: str(k)}).raise_for_status()  # a 500: the SDK sends it again
    assert len(eng.submitted) == 2 and len(set(eng.submitted)) == 1
    assert repr(made[0]) == "SdkRetries(kept=1, running=0)"


def test_a_409_says_not_to_retry_so_the_sdk_asks_once():
    """A cancel of an ended batch was asked three times, 1.4 s long: the SDKs retry a 409 unless told not to."""
    asked = []
    with serving(make_app(FakeEngine(), catalog=CAT)) as url, openai.OpenAI(
            base_url=url, api_key="x", http_client=httpx.Client(event_hooks={"request": [asked.append]})) as client:
        b = client.batches.create(input_file_id=upload(client, [batch_line("a", "one")]).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
        wait_done(client, b.id)
        asked.clear()
        with pytest.raises(openai.ConflictError) as exc:
            client.batches.cancel(b.id)
    assert exc.value.response.headers["x-should-retry"] == "false" and len(asked) == 1
    # A Message Batch's (Anthropic's shape) too, and a header the error names itself is kept.
    said = AnthropicError(409, "message_batch_id: ended", headers={"Retry-After": "1"}).response().headers
    assert (said["x-should-retry"], said["retry-after"]) == ("false", "1")


class FullAfterAPart(FakeEngine):
    """A full engine that lets an ``n=3`` call in by parts: the first choice gets a place, then the call waits in
    vain for the rest (the driver's ``Overloaded``, the part let in running on); from the next call on, room."""

    def __init__(self):
        super().__init__()
        self.parted = False

    async def asubmit_many(self, ds):
        if self.parted:
            return await super().asubmit_many(ds)
        self.parted = True
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_result(self._result(self._request(ds[0])))  # sent, answered and billed
        raise Overloaded("no room freed for submit_timeout_s=60 s: 1 of this call's 3 new requests were queued",
                         [fut])


def test_the_retry_of_a_call_whose_429_came_after_part_of_it_was_let_in_takes_that_part():
    """With more choices than the room, a call is let in by parts: one that then waits in vain is a 429 while the
    part let in runs on, billed. Counted as refused, that try's retry (the SDK's own, on a 429) was a new request
    under a fresh id, every choice of it generated and paid again; it now takes the try's id, and the engine gives
    back the part let in (the same id and content is never a second call)."""
    eng = FullAfterAPart()
    body = {"model": "gpt-5-mini", "messages": ASK, "n": 3}
    with serving(make_app(eng, catalog=CAT)) as url, httpx.Client(base_url=url, timeout=10) as http:
        assert http.post("/chat/completions", json=body, headers={RETRY_COUNT: "0"}).status_code == 429
        retry = http.post("/chat/completions", json=body, headers={RETRY_COUNT: "1"})
    assert retry.status_code == 200, retry.text
    first, *rest = eng.submitted
    assert rest[0] == first and len(set(eng.submitted)) == 3, eng.submitted  # the part's id, asked again
