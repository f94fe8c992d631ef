"""A stop of the engine elsewhere (``smartbatch stop --name``, another driver's ``shutdown``, drain 0) tells its
drivers what it cut before it was sent (``actors/_stop_cut.py``): the groupers name what they held, never sent,
before the layout goes, and a driver that sees its engine gone fails those (and what it had not handed over yet)
saying so, which the endpoint answers with a retryable 503; the rest, possibly cut under way at a provider, stays
the final 502. Before (a task of stop 81), every such call was the 502 "may have been billed", the ones that only
waited in a group too. The grouper, the driver and the stop are plain code here; no Ray."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from actors import Grouper, ResultHub
from actors._types import OWN_ROWS, Job
from engine.app._endpoint_failure import failure
from engine.core.clock import ManualClock
from engine.core.result import Result
from policies import load_policy
from tests.unit.helpers import Recorder
from tests.unit.test_actors import ledger
from tests.unit.test_actors import req as plain_req
from tests.unit.test_driver_lanes import MAX_OUT, _engine, req
from tests.unit.test_http_providers import CAT


def _grouper() -> tuple[Grouper, Recorder, ResultHub]:
    disp, hub = Recorder(), ResultHub()
    g = Grouper(load_policy("fixed", CAT, {"max_batch_size": 10, "batch_wait_timeout_s": 1000}), CAT,
                ManualClock(0.0), {"openai": disp}, ledger(100.0), hub)
    return g, disp, hub


def test_a_grouper_names_what_it_held_never_sent_at_the_stop_and_not_what_came_back_from_a_batch():
    async def go():
        g, disp, hub = _grouper()
        fresh = [Job(0, plain_req(0), "a"), Job(1, plain_req(1), "b")]
        back = [Job(2, plain_req(2), "c", hedges=1), Job(3, plain_req(3), "d", attempts=1),  # back from a batch
                Job(4, plain_req(4), "e", billed_usd=0.01),  # a call of it on another model may be billed
                Job(5, plain_req(5), "f", claim="c5")]  # a flex call refused, back for the standard price
        await g.add(fresh + back)
        assert (await g.stats())["pending"] == 6  # gathering for a batch
        named = await g.cut_at_stop()
        assert sorted(named) == sorted(j.req.uid for j in fresh)
        got = {r.id: r for r in await hub.pull(1.0)}  # those end cancelled, billed nothing; the others get their
        assert sorted(got) == ["r0", "r1"] and all(r.status == "failed" for r in got.values())  # driver's word
        await g.add([Job(6, plain_req(6), "g")])  # after the stop's word: never sent either
        assert "run_many" not in {name for name, _ in disp.calls}, disp.calls
    asyncio.run(go())


@pytest.mark.parametrize("how", ["a re-admitted copy", "restarted by Ray"])
def test_a_grouper_that_may_hold_a_copy_of_a_request_sent_before_names_nothing(how):
    """A re-admitted copy's original may have been sent and billed; a grouper Ray restarted may hold a late
    original whose copy was: what it holds stays "may have been billed"."""
    async def go():
        g, _, _ = _grouper()
        if how == "restarted by Ray":
            g.reconstructed()
        await g.add([Job(0, plain_req(0), "a")])
        if how == "a re-admitted copy":
            await g.add([Job(OWN_ROWS + 1, plain_req(1), "b")])
        assert (await g.stats())["pending"] >= 1
        assert await g.cut_at_stop() == []
    asyncio.run(go())


def _stopped_elsewhere(monkeypatch, e, cut: set[str]) -> str:
    """The engine's layout gone and its stop's list ``cut`` in Ray's store, as ``kill_engine`` leaves them: the
    driver's health check ends it. Returns its ``gone``."""
    from ray.experimental import internal_kv

    import actors._peer
    from engine.app import _supervise

    monkeypatch.setattr(actors._peer, "read_layout", lambda engine: None)
    store = {"fake:cut": pickle.dumps(frozenset(cut))}
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get(key))
    e._layout_seen, e._layout_missing = True, 0
    for _ in range(_supervise.DEAD_AFTER):
        e._engine_stopped()
    assert e.gone == "engine 'fake' was stopped"
    return e.gone


def test_a_driver_of_an_engine_stopped_elsewhere_tells_what_the_stop_cut_unsent_and_the_endpoint_answers_503(monkeypatch):
    e = _engine(monkeypatch, owner=False)
    out = []
    for k in range(MAX_OUT):  # handed to the engine
        out.append(e.submit(req(k)))
        e._flush()
    waiting = e.submit(req(10))
    e._flush()  # waiting in a lane: never handed over
    buffered = e.submit(req(20))  # in the buffer: never handed over
    gone = _stopped_elsewhere(monkeypatch, e, {req(0).uid, "7:default/someone-elses"})
    unsent, rest = [out[0], waiting, buffered], out[1:]
    for f in unsent:
        res = f.result(0)
        assert res.status == "failed" and "before this request was sent" in res.error, res.error
        err = failure(res, gone)
        assert err.status == 503 and err.code == "engine_stopped" and int(err.headers["Retry-After"]) > 0
        assert "x-should-retry" not in err.headers
    for f in rest:  # handed over and not named: may have been cut under way at a provider, billed
        res = f.result(0)
        assert res.error == gone
        err = failure(res, gone)
        assert err.status == 502 and err.headers["x-should-retry"] == "false" and "may have been cut" in str(err)
    assert "r10" not in {r.id for name, args, _ in e.log if name == "submit" for r in args[0]}  # nor sent after


def test_a_possibly_billed_request_the_stop_names_stays_final():
    """Named unsent by a stop, yet an earlier call of it may be billed (its result says so): final, as at the
    drain's cancel."""
    from engine.app._driver_stop import unsent_at_stop

    gone = "engine 'fake' was stopped"
    res = Result(id="q", status="failed", error=unsent_at_stop(gone), possibly_billed_usd=0.001)
    assert failure(res, gone).status == 502


def test_the_stop_asks_the_groupers_before_it_takes_the_layout_away(monkeypatch):
    """A driver that sees the layout gone reads the stop's list at once: published after, it was not there."""
    from actors import _engine_stop as engine_stop

    done: list = []
    monkeypatch.setattr(engine_stop, "resolve_clock", lambda ref: (None, None))
    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: None)
    monkeypatch.setattr(engine_stop, "unpublish_layout", lambda engine: done.append("layout gone"))
    monkeypatch.setattr(engine_stop, "cut_unsent",
                        lambda engine, gs, dispatchers=(): done.append(("cut", engine, gs, dispatchers)))
    monkeypatch.setattr(engine_stop.ray, "get_actor", lambda name, namespace=None: f"<{name}>")
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: len(hs))
    monkeypatch.setattr(engine_stop, "_cancel_batches", lambda *a: done.append("cancel"))
    monkeypatch.setattr(engine_stop, "_wait_dead", lambda engine, killed: None)
    claim = {"layout": {"kinds": ["ingest", "grouper-0", "grouper-1", "dispatcher-openai", "budget"]}}
    engine_stop.kill_engine("e", ["ingest", "g0", "g1"], {}, None, claim=claim)
    # (and its dispatchers after them: what waits at their gates, ``actors._stop_cut_dispatch``)
    assert done == [("cut", "e", ["<e.grouper-0>", "<e.grouper-1>"], ["<e.dispatcher-openai>"]), "layout gone",
                    "cancel"]


def test_a_driver_that_stops_its_engine_tells_what_its_groupers_held_unsent_and_the_endpoint_answers_503(monkeypatch):
    """``shutdown()`` (or ``stop()`` of an engine this driver started), drain 0: the driver's own futures of what
    the groupers held said "engine stopped before the request finished", as if it might have run (a 502)."""
    import actors._stop_cut
    from engine.app._driver_stop import NEVER_SENT

    e = _engine(monkeypatch, owner=True)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    e._h["groupers"], e._h["dispatchers"] = ["g0"], {"openai": "d0"}
    asked: list = []
    monkeypatch.setattr(actors._stop_cut, "cut_unsent", lambda engine, groupers, dispatchers=(): asked.append(
        (engine, groupers, dispatchers)) or frozenset({req(1).uid}))
    out = []
    for k in range(MAX_OUT):  # handed to the engine: r1 waits in a group, the others may be under way
        out.append(e.submit(req(k)))
        e._flush()
    e.stop(timeout_s=0.5)
    held = out[1].result(0)
    assert held.error == NEVER_SENT and failure(held, e.gone).status == 503
    assert asked == [("fake", ["g0"], ["d0"])]  # (its dispatchers too: ``actors._stop_cut_dispatch``)
    for f in out[:1] + out[2:]:
        res = f.result(0)
        assert res.error == e._stop_error() and failure(res, e.gone).status == 502


@pytest.mark.parametrize("how", ["back from a batch", "a re-admitted copy", "restarted by Ray"])
def test_what_a_grouper_does_not_name_at_the_stop_gets_no_retryable_answer_from_it(how):
    """What the stop does not name unsent stays "may have been billed": its driver fails it as the engine goes (the
    final 502). The grouper ended it all the same, "cancelled", billed nothing, and a driver that pulled that first
    answered a retryable 503 (fails on the code before: a re-admitted copy, whose original may have been billed,
    and the grouper's list empty for it). So is what comes back to the grouper after the stop's word."""
    async def go():
        g, _, hub = _grouper()
        if how == "restarted by Ray":
            g.reconstructed()
        held = [Job(0, plain_req(0), "a")]
        held += {"back from a batch": [Job(2, plain_req(2), "c", hedges=1)],
                 "a re-admitted copy": [Job(OWN_ROWS + 1, plain_req(1), "b")]}.get(how, [])
        await g.add(held)
        assert (await g.stats())["pending"] == len(held)
        named = set(await g.cut_at_stop())
        await g.add([Job(3, plain_req(3), "d", attempts=1), Job(4, plain_req(4), "e")])  # back after the word
        while g._tasks:  # the results the grouper sends out at the stop
            await asyncio.gather(*list(g._tasks))
        gone = "engine 'fake' was stopped"
        told = {r.uid: failure(r, gone).status for r in await hub.pull(0.0) or []}
        retryable = {u for u, status in told.items() if status == 503}
        assert retryable <= named | {plain_req(4).uid}, (named, told)  # (r4: came fresh, never sent)
        assert named == ({plain_req(0).uid} if how == "back from a batch" else set())
    asyncio.run(go())


def test_a_copy_whose_reservation_is_out_at_the_stop_gets_no_retryable_answer_from_its_grouper():
    """A re-admitted copy (its original may have been billed) being reserved for when the stop comes is sent
    nowhere, and its grouper, which names nothing, sends it no result: the drain's "cancelled" reached its driver
    as a retryable 503 (a review; fails on the code before). The claim just made for it goes back at 0."""
    from engine.core.budgets import Verdict

    class SlowLedger:
        def __init__(self) -> None:
            self.answer, self.settled = asyncio.Event(), []

        async def reserve_many(self, claims, release):
            await self.answer.wait()
            return [Verdict(True)] * len(claims)

        async def settle_many(self, settled):
            self.settled += settled

    async def go():
        disp, hub, ledger_ = Recorder(), ResultHub(), SlowLedger()
        g = Grouper(load_policy("naive", CAT), CAT, ManualClock(0.0), {"openai": disp}, ledger_, hub)
        adding = asyncio.create_task(g.add([Job(OWN_ROWS + 1, plain_req(1), "b")]))
        while not g._reserving:  # the reservation call is out
            await asyncio.sleep(0)
        assert await g.cut_at_stop() == []
        ledger_.answer.set()
        await adding
        gone = "engine 'fake' was stopped"
        assert [failure(r, gone).status for r in await hub.pull(0.0) or []] == []
        assert await g.budget.delivered(5.0)
        assert "run_many" not in {name for name, _ in disp.calls} and len(ledger_.settled) == 1
    asyncio.run(go())


def test_a_stop_whose_mark_cannot_be_written_says_which_key_which_ray_and_the_fix(monkeypatch, caplog):
    """The stop's mark (``<engine>:cut-begun``) not written: the stop asks nobody and names nothing, and it says so,
    naming the key, its namespace, the Ray it asked (the GCS's address, or that none is connected), what follows
    for the requests it ends and the fix; the Ray error's type, never its words. Before (stop 82's "left"), the Ray
    error itself came out (``ConnectionError``), and a stop by name logged its type alone: "could not say what it
    cut unsent (ConnectionError)"."""
    from types import SimpleNamespace

    import ray
    from ray.experimental import internal_kv

    from actors import _engine_stop, _stop_cut
    from engine.core.errors import SmartbatchError

    asked: list[int] = []
    grouper = SimpleNamespace(cut_at_stop=SimpleNamespace(remote=lambda: asked.append(1) or []))

    def refused(key, value, overwrite=True, namespace=None):
        raise ConnectionError("GCS at 10.0.0.5:6379 unreachable, token sk-NEVERSHOWN")
    monkeypatch.setattr(internal_kv, "_internal_kv_put", refused)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(SmartbatchError) as got:
        _stop_cut.cut_unsent("prod", [grouper])
    said = str(got.value)
    for words in ("'prod:cut-begun'", "namespace 'smartbatch'", "not connected", "RAY_ADDRESS", "(ConnectionError)",
                  "names nothing as never sent", "502", "Fix: stop the engine from a process connected to its Ray"):
        assert words in said, (words, said)
    assert "NEVERSHOWN" not in said and not asked  # (nobody asked: what one named could not be told apart)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="10.0.0.5:6379"))
    with caplog.at_level("WARNING", logger="smartbatch.engine"):
        _engine_stop._cut_unsent("prod", {"kinds": []})  # a stop by name (``smartbatch stop --name``) logs it whole
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "'prod:cut-begun'" in line and "GCS is at 10.0.0.5:6379" in line and "Fix:" in line, line
    # An owner driver's stop (``Engine.stop``) says it too, and names nothing.
    from engine.app._driver_stop import Stopping

    caplog.clear()
    owner = SimpleNamespace(_h={"groupers": [grouper], "dispatchers": {}}, _owner=True, _gone=None, name="prod")
    with caplog.at_level("WARNING", logger="smartbatch"):
        assert Stopping._cut_in_groupers(owner) == set()
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "'prod:cut-begun'" in line and "Fix:" in line and "NEVERSHOWN" not in line and not asked, line
