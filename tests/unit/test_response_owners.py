"""Provider response ids belong to the tenant whose request made them (``engine.core.response_owners``), as OpenAI
scopes them to a project. Every tenant shares the engine's one OpenAI project: for a model called through the
Responses API (``api: responses``), a ``previous_response_id`` went to OpenAI as it was, and a tenant holding
another tenant's id continued that tenant's conversation and read its context (a helper's hunt). Now an id no
answer of the caller's tenant carried is refused per request, in OpenAI's words: at the endpoint (a 404 naming the
field; in a batch, that line alone), from a driver (``Engine.submit``), and after an endpoint restart on its state
directory as before it."""

from __future__ import annotations

import itertools
import json

import openai
import pytest

from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.core.answer_body import response_body
from engine.core.catalog import default_catalog
from engine.core.errors import ConfigError, RequestError
from engine.core.request import validation_context
from engine.core.response_owners import ResponseOwners, answer_refs, refs_of
from engine.core.result import Result
from tests.unit.test_endpoint import FakeEngine, serving, upload, wait_done


def _overlay():
    """The default catalog with gpt-5-mini called through OpenAI's Responses API (a catalog overlay's ``api``)."""
    cat = default_catalog()
    spec = cat.providers["openai"].models["gpt-5-mini"]
    models = {**cat.providers["openai"].models, "gpt-5-mini": spec.model_copy(update={"api": "responses"})}
    return cat.model_copy(update={"providers": {**cat.providers, "openai": cat.providers["openai"].model_copy(
        update={"models": models})}})


CAT = _overlay()
ACME, GLOBEX = {endpoint.HEADER_TENANT: "acme"}, {endpoint.HEADER_TENANT: "globex"}


def _answer(rid: str, conv: str | None = None) -> dict:
    return {"object": "response", "id": rid, **({"conversation": {"id": conv}} if conv else {})}


# -- the record --------------------------------------------------------------------------------------------------

def test_an_id_is_the_tenants_whose_answer_carried_it_and_no_one_elses():
    owners = ResponseOwners()
    assert owners.learn("acme", _answer("resp_a", conv="conv_a")) == [("response", "resp_a"),
                                                                      ("conversation", "conv_a")]
    assert owners.refusal("acme", {"previous_response_id": "resp_a", "conversation": {"id": "conv_a"}}) is None
    assert owners.refusal("acme", {"input": "hi"}) is None  # names nothing stored
    no = owners.refusal("globex", {"previous_response_id": "resp_a"})
    assert no is not None and no.field == "body.previous_response_id" and no.code == "previous_response_not_found"
    assert no.message.startswith("Previous response with id 'resp_a' not found.")
    # The same words for an id nobody has: a refusal tells nothing of other tenants.
    unknown = owners.refusal("globex", {"previous_response_id": "resp_zzz"})
    assert unknown is not None and unknown.message == no.message.replace("resp_a", "resp_zzz")
    conv = owners.refusal("globex", {"conversation": "conv_a"})
    assert conv is not None and conv.field == "body.conversation" and conv.code == "conversation_not_found"
    # An id never changes hands: another tenant's answer naming it (a shared copy) does not make it theirs.
    assert owners.learn("globex", _answer("resp_a")) == []
    assert owners.refusal("globex", {"previous_response_id": "resp_a"}) is not None
    # A value that is no id names nothing the caller owns.
    assert owners.refusal("acme", {"previous_response_id": 5}) is not None
    assert refs_of({"previous_response_id": None, "conversation": None}) == []
    assert answer_refs({"object": "chat.completion", "id": "chatcmpl-1"}) == []  # a chat answer makes none


def test_the_record_keeps_the_ids_used_most_lately_and_forgets_the_rest():
    owners = ResponseOwners(kept=3)
    for k in range(3):
        owners.learn("acme", _answer(f"resp_{k}"))
    assert owners.refusal("acme", {"previous_response_id": "resp_0"}) is None  # used: now the most lately
    owners.learn("acme", _answer("resp_3"))
    assert len(owners) == 3
    assert owners.refusal("acme", {"previous_response_id": "resp_1"}) is not None  # the least lately used, gone
    assert {i for _, i, _ in owners.rows()} == {"resp_0", "resp_2", "resp_3"}
    again = ResponseOwners(kept=2)
    again.load(owners.rows())  # oldest first: the latest two stay
    assert [i for _, i, _ in again.rows()] == ["resp_0", "resp_3"]
    with pytest.raises(ConfigError, match="kept must be an integer >= 1"):
        ResponseOwners(kept=0)


# -- the endpoint ------------------------------------------------------------------------------------------------

class ResponsesEngine(FakeEngine):
    """``FakeEngine`` over the overlay catalog, its Responses answers carrying a provider's raw body and id, which
    it learns as a driver does (``Engine.responses``: the endpoint's record is its driver's, in memory)."""

    def __init__(self):
        super().__init__()
        self.catalog, self._ctx = CAT, validation_context(CAT, self.settings)
        self._ids = itertools.count()
        self.responses = ResponseOwners()

    def _result(self, req):
        res = super()._result(req)
        if res.status != "ok" or "input" not in (req.body or {}):
            return res
        raw = {**response_body("/v1/responses", req, res), "id": f"resp_prov{next(self._ids)}"}
        self.responses.learn(req.tenant, raw)  # before the endpoint sees it, as the driver's pull thread does
        return res.model_copy(update={"raw": raw, "real": True})


def _client(url: str, headers: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10, default_headers=headers)


def _not_found(client, **kw) -> dict:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="gpt-5-mini", input="What did I tell you?", **kw)
    return caught.value.body


def test_another_tenants_response_id_is_a_404_naming_the_field_and_never_reaches_the_engine(tmp_path):
    eng = ResponsesEngine()
    with serving(make_app(eng, catalog=CAT, state_dir=tmp_path)) as url, \
            _client(url, ACME) as acme, _client(url, GLOBEX) as globex:
        first = acme.responses.create(model="gpt-5-mini", input="My password is hunter2.")
        assert first.id.startswith("resp_prov")  # the provider's id, in the raw body acme got
        sent = len(eng.submitted)
        err = _not_found(globex, previous_response_id=first.id)
        assert err["param"] == "previous_response_id" and err["code"] == "previous_response_not_found"
        assert err["message"].startswith(f"Previous response with id '{first.id}' not found.")
        assert _not_found(globex, conversation={"id": "conv_1"})["param"] == "conversation"
        assert _not_found(acme, previous_response_id="resp_never_made")["code"] == "previous_response_not_found"
        assert len(eng.submitted) == sent  # none of them reached the engine
        # Its own tenant continues, and so on down the conversation; the neighbour's call is untouched.
        second = acme.responses.create(model="gpt-5-mini", input="And now?", previous_response_id=first.id)
        acme.responses.create(model="gpt-5-mini", input="Again?", previous_response_id=second.id)
        assert globex.responses.create(model="gpt-5-mini", input="Hello.").status == "completed"
        # A streamed call is refused alike, its status kept.
        with pytest.raises(openai.NotFoundError):
            globex.responses.create(model="gpt-5-mini", input="x", previous_response_id=second.id, stream=True)
    # A restart on the same state directory knows whose each id it gave out is.
    with serving(make_app(ResponsesEngine(), catalog=CAT, state_dir=tmp_path)) as url, \
            _client(url, ACME) as acme, _client(url, GLOBEX) as globex:
        assert acme.responses.create(model="gpt-5-mini", input="Still there?",
                                     previous_response_id=second.id).status == "completed"
        assert _not_found(globex, previous_response_id=second.id)["param"] == "previous_response_id"
    rows = [json.loads(t) for t in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert ["response", first.id, "acme"] in rows and all(r[2] != "globex" or r[1] != first.id for r in rows)


def _line(cid: str, text: str, **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/responses",
                       "body": {"model": "gpt-5-mini", "input": text, **body}})


def test_a_batch_line_naming_another_tenants_response_id_is_an_error_line_of_its_own():
    eng = ResponsesEngine()
    with serving(make_app(eng, catalog=CAT)) as url, _client(url, ACME) as acme, _client(url, GLOBEX) as globex:
        mine = acme.responses.create(model="gpt-5-mini", input="acme's secret").id
        theirs = globex.responses.create(model="gpt-5-mini", input="globex's secret").id
        f = upload(acme, [_line("own", "go on", previous_response_id=mine),
                          _line("foreign", "go on", previous_response_id=theirs), _line("plain", "hello")])
        done = wait_done(acme, acme.batches.create(input_file_id=f.id, endpoint="/v1/responses",
                                                   completion_window="24h").id)
        assert done.request_counts.completed == 2 and done.request_counts.failed == 1
        (err,) = map(json.loads, acme.files.content(done.error_file_id).text.splitlines())
        assert err["custom_id"] == "foreign" and "field 'body.previous_response_id'" in err["error"]["message"]
        assert f"Previous response with id '{theirs}' not found." in err["error"]["message"]
        assert not any(s.endswith("/foreign") for s in eng.submitted)
        # The answers of its lines are its own to continue from, and no one else's.
        out = {r["custom_id"]: r["response"]["body"]["id"] for r in
               map(json.loads, acme.files.content(done.output_file_id).text.splitlines())}
        acme.responses.create(model="gpt-5-mini", input="more", previous_response_id=out["plain"])
        assert _not_found(globex, previous_response_id=out["plain"])["param"] == "previous_response_id"


# -- the driver --------------------------------------------------------------------------------------------------

def test_a_driver_refuses_another_tenants_response_id_and_takes_its_own(monkeypatch):
    from tests.unit.test_driver_lanes import _engine

    e = _engine(monkeypatch)
    e.catalog, e._ctx = CAT, validation_context(CAT, e.settings, live=True)
    first = e.submit({"id": "t1", "tenant": "acme", "model": "gpt-5-mini", "body": {"input": "My secret."}})
    raw = {"object": "response", "id": "resp_p1", "status": "completed", "output": []}
    e._resolve(first, Result(id="t1", tenant="acme", status="ok", raw=raw, real=True, output="ok"))
    assert first.result(0).raw["id"] == "resp_p1"
    turn = {"model": "gpt-5-mini", "body": {"input": "What was it?", "previous_response_id": "resp_p1"}}
    with pytest.raises(RequestError, match="field 'body.previous_response_id': Previous response with id "
                                           "'resp_p1' not found") as caught:
        e.submit({**turn, "id": "t2", "tenant": "globex"})
    assert caught.value.code == "previous_response_not_found"
    # An id this driver never saw goes: a script continues what an earlier process of its own got.
    earlier = e.submit({**turn, "id": "t0", "tenant": "acme",
                        "body": {"input": "go on", "previous_response_id": "resp_from_an_earlier_run"}})
    assert not earlier.done()
    # One of many: refused alone, its neighbours queued.
    futs = e.submit_many([{**turn, "id": "t3", "tenant": "globex"}, {**turn, "id": "t4", "tenant": "acme"}],
                         on_invalid="reject")
    assert futs[0].result(0).status == "rejected" and "previous_response_id" in futs[0].result(0).reason
    assert not futs[1].done()
    # A copy from the cache carries its source's id: it makes no one an owner.
    copy = e.submit({"id": "t5", "tenant": "globex", "model": "gpt-5-mini", "body": {"input": "My secret."}})
    e._resolve(copy, Result(id="t5", tenant="globex", status="reused", raw=raw, real=True, output="ok"))
    with pytest.raises(RequestError, match="previous_response_id"):
        e.submit({**turn, "id": "t6", "tenant": "globex"})


def test_an_open_batch_taken_back_at_a_restart_judges_its_lines_as_at_its_create(tmp_path):
    """Its lines are parsed again from its input at the next start: the foreign line, refused at the create, was
    then a valid line, sent with the other tenant's id; the own one must still go."""
    with serving(make_app(ResponsesEngine(), catalog=CAT, state_dir=tmp_path)) as url, \
            _client(url, ACME) as acme, _client(url, GLOBEX) as globex:
        mine = acme.responses.create(model="gpt-5-mini", input="acme's secret").id
        theirs = globex.responses.create(model="gpt-5-mini", input="globex's secret").id
        f = upload(acme, [_line("own-slow", "go on", previous_response_id=mine),
                          _line("foreign-slow", "go on", previous_response_id=theirs)])
        held = acme.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")
        assert acme.batches.retrieve(held.id).status == "in_progress"  # its own line held by the engine
    eng = ResponsesEngine()
    with serving(make_app(eng, catalog=CAT, state_dir=tmp_path)) as url, _client(url, ACME) as acme:
        assert [s.rsplit("/", 1)[1] for s in eng.submitted] == ["own-slow"]  # asked again; the foreign one not
        eng.release()
        done = wait_done(acme, held.id)
        (err,) = map(json.loads, acme.files.content(done.error_file_id).text.splitlines())
        assert err["custom_id"] == "foreign-slow" and "previous_response_id" in err["error"]["message"]


def test_a_batch_file_line_the_driver_refuses_is_an_error_line_and_its_neighbours_are_answered(tmp_path, monkeypatch):
    """``smartbatch batch`` is one driver: a line the driver refuses (here a stub's strict rule) is an error line of
    its own. Submitted with the default ``on_invalid="raise"``, that one line failed the whole run."""
    import concurrent.futures

    from typer.testing import CliRunner

    import engine.app.driver as driver_mod
    from engine.app._driver_reject import validated, with_rejected
    from engine.app.cli import app
    from tests.unit.helpers import CtrlCEngine

    class Driver(CtrlCEngine):
        """``Engine.submit_many``'s handling of a request its ``_owned`` check refuses, every other one answered."""

        def submit_many(self, reqs, on_invalid="raise"):
            owners = ResponseOwners()

            def as_request(r, at, now):
                if (no := owners.refusal(r.tenant, r.body)) is not None:
                    raise RequestError(r.id, no.field, no.message, at, code=no.code)
                return r

            ok, at, refused = validated(as_request, reqs, 0.0, on_invalid)
            futs = []
            for r in ok:
                futs.append(f := concurrent.futures.Future())
                f.set_result(Result(id=r.id, status="ok", output="sim://y", mode="sync", provider=r.provider,
                                    model=r.model, usage={"input_tokens": 4, "output_tokens": 5}))
            return with_rejected(futs, at, refused)

    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: Driver(CAT)))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(_line("a", "hello") + "\n" + _line("b", "go on", previous_response_id="resp_someone_elses") + "\n")
    r = CliRunner().invoke(app, ["batch", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [json.loads(t)["custom_id"] for t in out.read_text().splitlines()] == ["a"]
    (err,) = map(json.loads, out.with_name("out.errors.jsonl").read_text().splitlines())
    assert err["custom_id"] == "b" and "previous_response_id" in json.dumps(err)


def test_the_log_on_the_state_directory_is_rewritten_past_twice_what_is_kept_and_read_back_whole(tmp_path):
    from engine.app._endpoint_responses import OwnedResponses

    log = OwnedResponses(ResponseOwners(kept=2), tmp_path)
    for k in range(5):
        log.learn("acme", [_answer(f"resp_{k}")])
    (tmp_path / ".tmp-cut").write_bytes(b"half a rewrite")  # a kill during a rewrite
    with open(tmp_path / "responses.jsonl", "a") as f:
        f.write('["response", "resp_cut"')  # and a line a crash cut
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    assert len(lines) <= 2 * 2 + 1
    again = OwnedResponses(ResponseOwners(kept=2), tmp_path)
    assert [i for _, i, _ in again.owners.rows()] == ["resp_3", "resp_4"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert len((tmp_path / "responses.jsonl").read_text().splitlines()) == 2  # rewritten without the cut line


def test_an_item_reference_to_another_tenants_answer_is_refused_as_an_unknown_item():
    """A review: an ``item_reference`` input item names one item of a stored response (an answer's message, by the
    ``msg_`` id beside the response id in the raw body), and OpenAI reads it back as it reads a previous
    response: it went as it was, and a tenant holding another's message id read that answer into its own call."""
    owners = ResponseOwners()
    answer = {"object": "response", "id": "resp_a", "output": [{"type": "message", "id": "msg_a"},
                                                               {"type": "function_call", "id": "fc_a"}]}
    assert ("item", "msg_a") in owners.learn("acme", answer)
    ref = {"input": ["hi", {"type": "item_reference", "id": "msg_a"}, {"type": "item_reference", "id": "fc_a"}]}
    assert owners.refusal("acme", ref) is None
    no = owners.refusal("globex", ref)
    assert no is not None and no.field == "body.input[1].id" and no.code == "item_not_found"
    assert no.message.startswith("Item with id 'msg_a' not found.")
    assert owners.refusal("globex", {"input": [{"type": "item_reference", "id": "msg_a"}]}, strict=False) is not None
    assert owners.refusal("globex", {"input": [{"type": "item_reference", "id": "msg_new"}]}, strict=False) is None
    class Engine(ResponsesEngine):
        def _result(self, req):  # the fake echoes a string input
            text = req.body["input"] if isinstance(req.body["input"], str) else "a list"
            return super()._result(req.model_copy(update={"body": {**req.body, "input": text}}))

    eng = Engine()
    with serving(make_app(eng, catalog=CAT)) as url, _client(url, ACME) as acme, _client(url, GLOBEX) as globex:
        first = acme.responses.create(model="gpt-5-mini", input="My password is hunter2.")
        said = [{"type": "item_reference", "id": first.output[0].id}, {"role": "user", "content": "Repeat it."}]
        sent = len(eng.submitted)
        with pytest.raises(openai.NotFoundError) as caught:
            globex.responses.create(model="gpt-5-mini", input=said)
        assert caught.value.body["param"] == "input[0].id" and len(eng.submitted) == sent
        assert acme.responses.create(model="gpt-5-mini", input=said).status == "completed"


def test_a_restart_forgets_first_what_the_running_endpoint_would_have_forgotten_first(tmp_path):
    """A review: the log held only the ids learnt, in the order learnt, and a restart read it back as the order of
    use. A conversation continued all day, learnt early, was then among the first forgotten (past ``kept`` ids),
    and the id the running endpoint had forgotten came back; an open batch's line continuing it, taken at the
    create, was refused once taken back."""
    from engine.app._endpoint_responses import OwnedResponses
    from engine.core.batchfile import parse_batch_file

    log = OwnedResponses(ResponseOwners(kept=2), tmp_path)
    log.learn("acme", [_answer("resp_0")])
    log.learn("acme", [_answer("resp_1")])
    log.check("acme", {"previous_response_id": "resp_0"})  # continued: now the most lately used
    log.learn("acme", [_answer("resp_2")])  # resp_1, the least lately used, is forgotten
    assert [i for _, i, _ in log.owners.rows()] == ["resp_0", "resp_2"]
    again = OwnedResponses(ResponseOwners(kept=2), tmp_path)
    assert again.owners.rows() == log.owners.rows()
    again.check("acme", {"previous_response_id": "resp_0"})  # a 404 before
    # A batch line taken at the create counts as a use too.
    bf = parse_batch_file((_line("on", "go on", previous_response_id="resp_2") + "\n").encode(), source="f",
                          window_s=86400, tenant="acme", catalog=CAT, settings=ResponsesEngine().settings, live=True)
    assert again.lines(bf, "acme").invalid == []
    again.learn("acme", [_answer("resp_3")])  # resp_0 forgotten, resp_2 kept: the batch used it
    taken_back = OwnedResponses(ResponseOwners(kept=2), tmp_path)
    assert taken_back.lines(bf, "acme").invalid == []
