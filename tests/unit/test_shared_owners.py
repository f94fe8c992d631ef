"""Whose a response id is, across the drivers of one engine (``actors._hub_owners``, ``engine.app._driver_owners``),
and the input items given back by id (``engine.core.response_owners``).

Each driver kept its own record: driver B (another script, or another endpoint replica on the same engine) knew
nothing of what driver A had answered, so B took tenant Y's request continuing X's conversation (a driver lets an
id it never saw go), and a strict endpoint replica refused X's own continuation of an answer the other replica
gave. Now the result hub shards learn the ids of the answers they push, and a driver asks them about the ids it
does not know, once per submission. And an input item given back with its id (a reasoning item, read back by it;
a message or a call of another tenant's answer) was not looked at: it went as it was.

No Ray: the real ``ResultHub`` and driver code, over handles that run the hub's methods at once."""

from __future__ import annotations

import asyncio
import itertools
import json

import openai
import pytest

from engine.app._driver_owners import SharedOwners
from engine.app.endpoint import make_app
from engine.core.errors import RequestError
from engine.core.response_owners import ResponseOwners
from engine.core.result import Result
from tests.unit.test_endpoint import serving, upload, wait_done
from tests.unit.test_response_owners import ACME, CAT, GLOBEX, ResponsesEngine, _client, _line


def _at_once(coro):
    """Run a hub coroutine that awaits nothing (its record's methods), from any thread or loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the hub method awaited something")


class _Ref:
    """A Ray ObjectRef already resolved (or failed): ``ray.get`` of it, or awaited."""

    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error = value, error

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value

    def __await__(self):
        async def get():
            return self.get()
        return get().__await__()


class _Handle:
    """An actor handle over a plain ``ResultHub``: ``handle.owners_of.remote(...)`` runs the method at once;
    ``down``: every call fails, as a shard Ray is restarting."""

    def __init__(self, hub):
        self.hub, self.down, self.calls = hub, False, []

    def __getattr__(self, name):
        method = getattr(self.hub, name)

        class _Method:
            @staticmethod
            def remote(*args):
                self.calls.append(name)
                if self.down:
                    return _Ref(error=TimeoutError("restarting"))
                return _Ref(_at_once(method(*args)))
        return _Method


class _Ray:
    @staticmethod
    def get(refs, timeout=None):
        return [r.get() for r in refs] if isinstance(refs, list) else refs.get()


def _hub():
    from actors.hub import ResultHub

    return ResultHub()


def _answer(tenant: str, rid: str, n: int = 0) -> Result:
    """A called Responses answer, as a dispatcher pushes it: the provider's raw body, its output items' ids."""
    raw = {"object": "response", "id": rid, "status": "completed",
           "output": [{"type": "reasoning", "id": f"rs_{rid}", "summary": []},
                      {"type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": "ok", "annotations": []}]}]}
    return Result(id=f"q{n}", tenant=tenant, status="ok", raw=raw, real=True, output="ok")


# -- the hub -------------------------------------------------------------------------------------------------------

def test_a_hub_shard_learns_the_ids_of_the_answers_it_pushes_and_tells_any_driver():
    hub = _hub()
    copy = _answer("globex", "resp_copy", 2).model_copy(update={"status": "reused"})  # a cache copy: its source's
    asyncio.run(hub.push([_answer("acme", "resp_a", 1), copy]))
    asked = [("response", "resp_a"), ("item", "rs_resp_a"), ("item", "msg_resp_a"), ("response", "resp_copy"),
             ("response", "resp_nobody")]
    assert sorted(asyncio.run(hub.owners_of(asked))[0]) == sorted(
        [("response", "resp_a", "acme"), ("item", "rs_resp_a", "acme"), ("item", "msg_resp_a", "acme")])
    # A shard Ray restarted knows nothing until a driver gives its record back; an owner never changes hands.
    again = _hub()
    again.reconstructed()
    assert asyncio.run(again.teach_owners([("response", "resp_a", "acme"), ("response", "resp_a", "globex")])) == 1
    assert asyncio.run(again.owners_of([("response", "resp_a")])) == ([("response", "resp_a", "acme")], False)


# -- two drivers of one engine -------------------------------------------------------------------------------------

def _driver(monkeypatch, handle):
    from engine.core.request import validation_context
    from tests.unit.test_driver_lanes import _engine

    e = _engine(monkeypatch, owner=False)
    e.catalog, e._ctx = CAT, validation_context(CAT, e.settings, live=True)
    e._ray, e._h["hubs"] = _Ray(), [handle]
    return e


ASK = {"role": "user", "content": "Go on."}


def _turn(rid: str, tenant: str, **body) -> dict:
    return {"id": rid, "tenant": tenant, "model": "gpt-5-mini", "body": {"input": "go on", **body}}


def test_a_second_driver_refuses_an_id_the_first_one_answered_to_another_tenant(monkeypatch):
    hub = _Handle(_hub())
    a, b = _driver(monkeypatch, hub), _driver(monkeypatch, hub)
    answer = _answer("acme", "resp_a")
    asyncio.run(hub.hub.push([answer]))  # the hub learns it as it hands it to driver A
    fut = a.submit(_turn("q0", "acme"))
    a._resolve(fut, answer)
    # Driver B never saw it: it asks the hub, once, and refuses it for globex as driver A does.
    with pytest.raises(RequestError, match="field 'body.previous_response_id': Previous response with id "
                                           "'resp_a' not found") as caught:
        b.submit(_turn("g1", "globex", previous_response_id="resp_a"))
    assert caught.value.code == "previous_response_not_found" and b.owner_asks == 1
    # Its output items are acme's too: a reasoning item or a message given back by id, or an item_reference.
    futs = b.submit_many([
        _turn("g2", "globex", input=[{"type": "reasoning", "id": "rs_resp_a", "summary": []}, ASK]),
        _turn("g3", "globex", input=[{"type": "message", "id": "msg_resp_a", "role": "assistant",
                                      "content": [{"type": "output_text", "text": "ok"}]}, ASK]),
        _turn("a1", "acme", previous_response_id="resp_a"),
        _turn("a2", "acme", previous_response_id="resp_of_an_earlier_run")], on_invalid="reject")
    assert [f.result(0).status for f in futs[:2]] == ["rejected", "rejected"]
    assert "input[0].id" in futs[0].result(0).reason and "Item with id 'rs_resp_a' not found" in futs[0].result(0).reason
    assert not futs[2].done() and not futs[3].done()  # acme's own, and an id nobody knows (a driver lets it go)
    assert b.owner_asks == 2  # one ask for the whole submission (the ids not known yet)
    # An id no shard knew is not asked about again; nor one known here.
    b.submit(_turn("a3", "acme", previous_response_id="resp_of_an_earlier_run"))
    b.submit(_turn("a4", "acme", previous_response_id="resp_a"))
    assert b.owner_asks == 2 and hub.calls.count("owners_of") == 2


def test_a_hub_that_does_not_answer_leaves_the_driver_on_its_own_record_and_a_restarted_one_is_taught(monkeypatch):
    hub = _Handle(_hub())
    a = _driver(monkeypatch, hub)
    a._resolve(a.submit(_turn("q0", "acme")), _answer("acme", "resp_a"))  # learnt by driver A alone
    hub.down = True
    assert not a._ask_owners([_turn("g0", "globex", previous_response_id="resp_b")])
    fut = a.submit(_turn("g1", "globex", previous_response_id="resp_b"))  # unknown, unanswered: a driver lets it go
    assert not fut.done()
    with pytest.raises(RequestError):  # what it knows itself still holds
        a.submit(_turn("g2", "globex", previous_response_id="resp_a"))
    hub.down = False  # back, restarted: it knows nothing; unanswered before, the id is asked about again
    assert a._ask_owners([_turn("g3", "globex", previous_response_id="resp_b")]) and a.owner_asks == 3
    assert asyncio.run(hub.hub.owners_of([("response", "resp_a")]))[0] == []
    assert a.share_owners([hub])  # the rewire gives it back this driver's record
    assert asyncio.run(hub.hub.owners_of([("response", "resp_a")]))[0] == [("response", "resp_a", "acme")]


# -- two endpoint replicas of one engine ------------------------------------------------------------------------

class ReplicaEngine(SharedOwners, ResponsesEngine):
    """``ResponsesEngine`` (one driver, its own record) on a hub shared with the other replicas: its answers
    reach the hub as a dispatcher pushes them, and its ``know_owners`` is the driver's."""

    def __init__(self, hub: _Handle, prefix: str):
        super().__init__()
        self._ray, self._h, self._prefix = _Ray(), {"hubs": [hub]}, prefix
        self._n = itertools.count()

    def _result(self, req):
        text = req.body.get("input") if isinstance(req.body.get("input"), str) else "a list"
        res = super()._result(req.model_copy(update={"body": {**req.body, "input": text}}))
        if res.raw is None:
            return res
        rid = f"resp_{self._prefix}{next(self._n)}"
        raw = {**res.raw, "id": rid, "output": [{"type": "reasoning", "id": f"rs_{rid}", "summary": []},
                                                *res.raw["output"]]}
        res = res.model_copy(update={"raw": raw, "tenant": req.tenant})
        self.responses.learn(req.tenant, raw)
        _at_once(self._h["hubs"][0].hub.push([res]))
        return res


def test_an_endpoint_replica_takes_its_tenants_ids_the_other_replica_gave_and_refuses_the_rest(tmp_path):
    hub = _Handle(_hub())
    one, two = ReplicaEngine(hub, "one"), ReplicaEngine(hub, "two")
    with serving(make_app(one, catalog=CAT)) as url1, serving(make_app(two, catalog=CAT)) as url2, \
            _client(url1, ACME) as acme1, _client(url2, ACME) as acme2, _client(url2, GLOBEX) as globex2:
        first = acme1.responses.create(model="gpt-5-mini", input="My password is hunter2.")
        # Its own tenant continues it at the other replica (a 404 before: that replica's record did not know it).
        assert acme2.responses.create(model="gpt-5-mini", input="And now?",
                                      previous_response_id=first.id).status == "completed"
        sent = len(two.submitted)
        for kw, param in ((dict(previous_response_id=first.id), "previous_response_id"),
                          (dict(input=[{"type": "reasoning", "id": first.output[0].id, "summary": []},
                                       ASK]), "input[0].id")):
            with pytest.raises(openai.NotFoundError) as caught:
                globex2.responses.create(model="gpt-5-mini", **{"input": "What did acme say?", **kw})
            assert caught.value.body["param"] == param and caught.value.body["code"] in (
                "previous_response_not_found", "item_not_found")
        assert len(two.submitted) == sent  # neither reached the engine
        # A message given back with an id of the client's own goes (it brings its content); a reasoning item
        # nobody answered does not (OpenAI reads it back by its id).
        own = {"type": "message", "id": "msg_mine", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "Hi.", "annotations": []}]}
        assert globex2.responses.create(model="gpt-5-mini", input=[own, ASK]
                                        ).status == "completed"
        with pytest.raises(openai.NotFoundError):
            globex2.responses.create(model="gpt-5-mini", input=[{"type": "reasoning", "id": "rs_made_up",
                                                                 "summary": []}, ASK])
        # In a batch, the other tenant's line alone is an error line; its own, from the other replica, goes.
        f = upload(acme2, [_line("own", "go on", previous_response_id=first.id), _line("plain", "hello")])
        g = upload(globex2, [_line("foreign", "go on", previous_response_id=first.id), _line("fine", "hello")])
        mine = wait_done(acme2, acme2.batches.create(input_file_id=f.id, endpoint="/v1/responses",
                                                     completion_window="24h").id)
        theirs = wait_done(globex2, globex2.batches.create(input_file_id=g.id, endpoint="/v1/responses",
                                                           completion_window="24h").id)
        assert (mine.request_counts.completed, mine.request_counts.failed) == (2, 0)
        assert (theirs.request_counts.completed, theirs.request_counts.failed) == (1, 1)
        (err,) = map(json.loads, globex2.files.content(theirs.error_file_id).text.splitlines())
        assert err["custom_id"] == "foreign" and "previous_response_id" in err["error"]["message"]


def test_a_replica_whose_hub_does_not_answer_says_send_it_again_rather_than_not_found():
    hub = _Handle(_hub())
    one, two = ReplicaEngine(hub, "one"), ReplicaEngine(hub, "two")
    with serving(make_app(one, catalog=CAT)) as url1, serving(make_app(two, catalog=CAT)) as url2, \
            _client(url1, ACME) as acme1, _client(url2, ACME) as acme2:
        first = acme1.responses.create(model="gpt-5-mini", input="Hello.")
        with _client(url2, GLOBEX) as globex2:
            theirs = globex2.responses.create(model="gpt-5-mini", input="Hello.")
        hub.down = True
        with pytest.raises(openai.InternalServerError) as caught:
            acme2.responses.create(model="gpt-5-mini", input="And now?", previous_response_id=first.id)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "engine_unavailable"
        assert caught.value.response.headers.get("retry-after")
        with pytest.raises(openai.NotFoundError):  # known to be another tenant's: no answer would change that
            acme2.responses.create(model="gpt-5-mini", input="And now?", previous_response_id=theirs.id)
        # What the replica knows itself is judged as before.
        assert acme1.responses.create(model="gpt-5-mini", input="And now?",
                                      previous_response_id=first.id).status == "completed"
        hub.down = False
        assert acme2.responses.create(model="gpt-5-mini", input="And now?",
                                      previous_response_id=first.id).status == "completed"


def test_an_input_items_own_id_is_refused_only_when_another_tenant_owns_it(tmp_path):
    from engine.app._endpoint_responses import OwnedResponses

    owners = ResponseOwners()
    owners.learn("acme", _answer("acme", "resp_a").raw)
    call = {"input": [{"type": "function_call", "id": "fc_engine_made", "call_id": "c1", "name": "f",
                       "arguments": "{}"}]}
    assert owners.refusal("globex", call) is None  # an id nobody stored (a copy from the cache made it)
    msg = {"input": ["hi", {"type": "message", "id": "msg_resp_a", "role": "assistant", "content": []}]}
    no = owners.refusal("globex", msg)
    assert no is not None and no.field == "body.input[1].id" and no.code == "item_not_found"
    assert owners.refusal("acme", msg) is None
    reasoning = {"input": [{"type": "reasoning", "id": "rs_unknown", "summary": []}]}
    assert owners.refusal("acme", reasoning) is not None  # read back by its id: strict, as an item_reference
    assert owners.refusal("acme", reasoning, strict=False) is None  # a driver lets an unknown one go
    # Taken, a client's own id is nobody's: the state directory's log, read back at a restart, does not make it
    # the caller's (it logs each id a request continues).
    kept = OwnedResponses(owners, tmp_path)
    kept.check("acme", {"input": [*call["input"], *msg["input"]]})
    assert [json.loads(t)[1] for t in (tmp_path / "responses.jsonl").read_text().splitlines()] == ["msg_resp_a"]


def test_an_endpoint_restarted_on_its_state_directory_gives_the_engine_the_ids_its_log_held(tmp_path):
    """The ids a restarted endpoint reads back are known to the engine's other drivers too: a new engine's hub knew
    none of them, and a script on it let globex continue acme's conversation."""
    with serving(make_app(ReplicaEngine(_Handle(_hub()), "one"), catalog=CAT, state_dir=tmp_path)) as url, \
            _client(url, ACME) as acme:
        first = acme.responses.create(model="gpt-5-mini", input="Hello.")
    hub = _Handle(_hub())  # the engine restarted too: its hub knows nothing
    with serving(make_app(ReplicaEngine(hub, "two"), catalog=CAT, state_dir=tmp_path)):
        assert asyncio.run(hub.hub.owners_of([("response", first.id)]))[0] == [("response", first.id, "acme")]


def test_an_id_a_restarted_hub_shard_did_not_know_yet_is_asked_again_once_a_rewire_taught_it(monkeypatch):
    """Ray restarted the hub shard: it knows nothing until each driver's rewire gives its record back. Driver B asked
    it about acme's id before driver A's rewire had: 'nobody's', an answer a restarted shard cannot give for good.
    B must ask again, and refuse globex once the shard knows. Before, B kept that answer (not asked again): globex
    continued acme's conversation at B for as long as B's record kept it."""
    hub = _Handle(_hub())
    a, b = _driver(monkeypatch, hub), _driver(monkeypatch, hub)
    answer = _answer("acme", "resp_a")
    asyncio.run(hub.hub.push([answer]))
    a._resolve(a.submit(_turn("q0", "acme")), answer)
    hub.hub = _hub()  # Ray restarted the shard
    hub.hub.reconstructed()
    b.submit(_turn("g1", "globex", previous_response_id="resp_a"))  # the restart's window: a driver lets it go
    assert a.share_owners([hub])  # driver A's rewire gives the shard its record back
    with pytest.raises(RequestError, match="body.previous_response_id"):
        b.submit(_turn("g2", "globex", previous_response_id="resp_a"))
    assert b.owner_asks == 2


def test_an_input_item_whose_type_is_not_a_string_fails_no_neighbour_and_no_check(monkeypatch):
    """An input item with an id and a ``type`` that is no string (a list, an object: a client's bug) is judged as
    an item that brings its content (not read back by its id). Before, the check hashed its type: a TypeError out
    of ``submit_many`` that failed the whole submission, its neighbours with it, and the endpoint's 500."""
    odd = {"input": [{"type": ["message"], "id": "msg_x", "role": "user", "content": "hi"}]}
    assert ResponseOwners().refusal("acme", odd) is None
    b = _driver(monkeypatch, _Handle(_hub()))
    futs = b.submit_many([_turn("g1", "globex", **odd), _turn("g2", "globex")], on_invalid="reject")
    assert not futs[1].done()  # the neighbour is queued


def test_a_driver_started_on_a_killed_runs_answers_gives_their_ids_to_the_engine(monkeypatch):
    """A script on ``journal.dir`` takes back the answers a killed run of it paid for (``take_back``): the driver
    learns their response ids, and gives them to the engine's (new) hub, so a second driver of the engine refuses
    globex's request continuing acme's kept conversation. Before, they stayed in that driver's record alone (a
    kept answer reaches its future from the driver, never through the hub): the second driver let globex go."""
    import sys
    import types

    from engine.app.driver import Engine
    from engine.core.clock import ManualClock
    from engine.core.settings import Settings
    from engine.runtime.collector import driver_gc

    hub = _Handle(_hub())
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=_Ray.get))
    monkeypatch.setattr(Engine, "_init_supervision", lambda self, attached=False: None)
    for loop in ("_flush_loop", "_pull_loop", "_check_loop"):
        monkeypatch.setattr(Engine, loop, lambda self: None)
    kept = types.SimpleNamespace(results=lambda: [_answer("acme", "resp_kept")])
    first = Engine(handles={"hubs": [hub], "ingests": [], "named": {}}, clock=ManualClock(0.0), settings=Settings(),
                   catalog=CAT, started_ray=False, micro_batch=1000, flush_ms=2.0, kept=kept)
    try:
        assert first.responses.refusal("globex", {"previous_response_id": "resp_kept"}) is not None
        second = _driver(monkeypatch, hub)
        with pytest.raises(RequestError, match="body.previous_response_id"):
            second.submit(_turn("g1", "globex", previous_response_id="resp_kept"))
    finally:
        Engine._running_engines.discard(first)
        driver_gc.engine_stopped()


def test_nobodys_answer_goes_stale_once_a_shard_is_taught_the_id_so_a_driver_asks_again(monkeypatch):
    """Driver B asked about resp_a before anyone had taught the shard (an endpoint started on its state directory
    teaches it what its log held): 'nobody's'. Before, B kept that answer for as long as its record kept the id and
    never asked again: globex continued acme's conversation. Now the answer is kept ``nobody_for_s`` only."""
    hub = _Handle(_hub())
    b = _driver(monkeypatch, hub)
    now = [0.0]
    b.responses = ResponseOwners(nobody_for_s=10.0, now=lambda: now[0])
    b.submit(_turn("g1", "globex", previous_response_id="resp_a"))  # nobody's yet: a driver lets it go
    asyncio.run(hub.hub.teach_owners([("response", "resp_a", "acme")]))  # the endpoint on its state directory
    now[0] = 9.0
    b.submit(_turn("g2", "globex", previous_response_id="resp_a"))  # within the age: the answer still holds
    assert b.owner_asks == 1
    now[0] = 10.0
    with pytest.raises(RequestError, match="body.previous_response_id"):
        b.submit(_turn("g3", "globex", previous_response_id="resp_a"))
    assert b.owner_asks == 2


class _SlowShard(_Handle):
    """A hub shard that answers its health checks but, while ``slow``, does not take a driver's owner record."""

    slow = False

    def __getattr__(self, name):
        if name != "teach_owners" or not self.slow:
            return super().__getattr__(name)
        calls = self.calls

        class _Refused:
            @staticmethod
            def remote(*args):
                calls.append(name)
                return _Ref(error=TimeoutError("busy"))
        return _Refused


class _CheckedRay(_Ray):
    """``_Ray`` for the driver's health checks: every ping answered at once."""

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        return list(refs), []


def _check(driver) -> None:
    """One health check of ``driver``, and the recovery or retry it started, to their end."""
    import threading

    driver._health()
    for t in threading.enumerate():
        if t.name in ("smartbatch-recover", "smartbatch-share"):
            t.join(10)


def test_a_restarted_hub_that_does_not_take_the_owner_record_is_given_it_again_alone_until_it_does(monkeypatch):
    """Ray restarted the hub shard and the rewire's ``share_owners`` failed (the shard busy). Before, the next check
    took the shard for restarted again and made the whole rewire again (journal reads, re-admission of every open
    request) at every check until the record was taken: a slow shard got more work each time. Now the rewire is
    kept as made and the record alone is given again at each check, until the shard takes it; till then the
    shard is not counted as recovered and its 'nobody's' is not kept by any driver."""
    import actors.remote

    hub = _SlowShard(_hub())
    a, b = _driver(monkeypatch, hub), _driver(monkeypatch, hub)
    a._resolve(a.submit(_turn("q0", "acme")), _answer("acme", "resp_a"))  # learnt by driver A alone
    rewired, readmits = [], []
    monkeypatch.setattr(actors.remote, "rewire", lambda h, kind, *args, **kw: rewired.append(kind))
    a._ray, a._h["named"] = _CheckedRay(), {"hub": hub}
    a._init_supervision()
    a._metrics_addr, a._readmit_open = (lambda kind: None), (lambda *args, **kw: readmits.append(args))
    a._engine_stopped, a._relay_logs = (lambda: False), (lambda: None)
    hub.hub = _hub()  # Ray restarted the shard: it knows nothing, and answers its check with a new token
    hub.hub.reconstructed()
    hub.slow = True
    for _ in range(3):
        _check(a)
    assert (len(rewired), len(readmits), hub.calls.count("teach_owners")) == (1, 1, 3)
    assert not a.restarts and not a.wait_recovered("hub", timeout=0)  # not recovered while the record is not taken
    b.submit(_turn("g1", "globex", previous_response_id="resp_a"))  # the restart's window: a driver lets it go
    hub.slow = False
    _check(a)
    assert a.restarts == {"hub": 1} and a.wait_recovered("hub", timeout=0)
    _check(a)  # taken: nothing more is given
    assert (len(rewired), len(readmits), hub.calls.count("teach_owners")) == (1, 1, 4)
    assert asyncio.run(hub.hub.owners_of([("response", "resp_a")]))[0] == [("response", "resp_a", "acme")]
    with pytest.raises(RequestError, match="body.previous_response_id"):  # B asks again, and refuses globex
        b.submit(_turn("g2", "globex", previous_response_id="resp_a"))


def test_a_retry_of_the_owner_record_gives_nothing_more_once_the_engine_stopped(monkeypatch):
    """The retry thread gives the record to each owed shard in turn, each call up to ``OWNERS_WAIT_S``: an engine
    stopped meanwhile (its actors gone, or Ray shut down) had it call every other owed shard on, and count them
    recovered, after the stop returned. Now it stops at the shard it is on."""
    import threading

    hub = _Handle(_hub())
    a = _driver(monkeypatch, hub)
    a._resolve(a.submit(_turn("q0", "acme")), _answer("acme", "resp_a"))
    entered, gate, calls = threading.Event(), threading.Event(), []

    class _Gated(_Ray):
        @staticmethod
        def get(refs, timeout=None):
            calls.append(refs)
            entered.set()
            assert gate.wait(10)
            return _Ray.get(refs, timeout)
    a._h["named"] = {"hub-0": hub, "hub-1": hub}
    a._init_supervision()
    a._ray = _Gated()
    a._owed.update({"hub-0", "hub-1"})
    a._retry_owed()
    assert entered.wait(10)  # giving it to hub-0
    a._running = False  # the engine stops
    gate.set()
    for t in threading.enumerate():
        if t.name == "smartbatch-share":
            t.join(10)
    # hub-1 not called (before: called after the stop, and counted recovered); hub-0 took it before the stop
    assert len(calls) == 1 and a.restarts == {"hub-0": 1} and a._owed == {"hub-1"}


def test_a_retry_thread_that_could_not_start_lets_go_of_the_owner_record_s_lock(monkeypatch):
    """Held for the thread it starts: a thread that could not start (the process out of threads) kept the lock for
    good, and every later recovery waited on it, holding the recoveries' lock with it."""
    import threading

    hub = _Handle(_hub())
    a = _driver(monkeypatch, hub)
    a._resolve(a.submit(_turn("q0", "acme")), _answer("acme", "resp_a"))
    a._h["named"] = {"hub": hub}
    a._init_supervision()
    a._owed.add("hub")

    def refused(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", refused)
    with pytest.raises(RuntimeError):
        a._retry_owed()
    monkeypatch.undo()
    assert a._sharing.acquire(timeout=0)  # (before: held for good)
    a._sharing.release()


def test_a_hub_restarted_again_while_a_retry_gives_it_the_record_is_given_it_once_more(monkeypatch):
    """The retry thread gives hub its record; the hub restarts again meanwhile, and the recovery of that restart
    marks it owed. Marked before the retry ended, the retry's own success took the mark away: the new incarnation
    was never given the record (its 'nobody's' let another tenant continue this driver's ids). Now the mark is set
    under the lock the retry holds."""
    import threading

    import actors.remote

    hub = _Handle(_hub())
    a = _driver(monkeypatch, hub)
    a._resolve(a.submit(_turn("q0", "acme")), _answer("acme", "resp_a"))
    monkeypatch.setattr(actors.remote, "rewire", lambda *args, **kw: None)
    a._h["named"] = {"hub": hub}
    a._init_supervision()
    a._metrics_addr, a._readmit_open = (lambda kind: None), (lambda *args, **kw: None)
    entered, gate, waits = threading.Event(), threading.Event(), threading.Event()

    class _Gated(_Ray):
        @staticmethod
        def get(refs, timeout=None):
            if not gate.is_set():
                entered.set()
                assert gate.wait(10)
            return _Ray.get(refs, timeout)

    class _Watched:
        """``_sharing``, saying when a caller waits for it."""

        def __init__(self, lock):
            self.lock = lock

        def acquire(self, blocking=True, timeout=-1):
            if blocking:
                waits.set()
            return self.lock.acquire(blocking, timeout)

        def release(self):
            self.lock.release()
    a._ray, a._sharing = _Gated(), _Watched(a._sharing)
    a._owed.add("hub")
    a._retry_owed()
    assert entered.wait(10)  # the retry is giving it to the first incarnation
    again = threading.Thread(target=a._recover_now, args=(["hub"],))  # the hub restarted again: its recovery
    again.start()
    assert waits.wait(10)  # which waits for the retry
    gate.set()
    again.join(10)
    for t in threading.enumerate():
        if t.name == "smartbatch-share":
            t.join(10)
    # Given twice, the second incarnation too (before: once; its mark taken away by the first's success)
    assert hub.calls.count("teach_owners") == 2 and not a._owed
