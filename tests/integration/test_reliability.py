"""Identity, idempotency, stopping, backpressure and retention of the live engine (issue 11, first part)."""

import asyncio
import time

import pytest

from engine import Engine
from engine.core.errors import EngineStopped, Overloaded, RequestError
from tests.integration._catalogs import OPENAI_ONLY


def text(i, tenant="default", **kw):
    return {"id": f"q{i}", "tenant": tenant, "model": "gpt-4o-mini", "prompt": f"question {i}", "deadline_s": 20, **kw}


@pytest.fixture(scope="module")
def engine(ray_session):
    """One engine for the tests that only submit (an engine start costs seconds); their tenants keep apart."""
    with Engine.start(catalog=OPENAI_ONLY, speedup=100) as eng:
        yield eng


def test_two_tenants_with_the_same_ids_and_prompts_never_see_each_others_results(engine):
    eng = engine
    before = eng.report()["requests"]
    a = [eng.submit(text(i, "tenant-a")) for i in range(5)]
    b = [eng.submit(text(i, "tenant-b")) for i in range(5)]
    assert all(fa is not fb for fa, fb in zip(a, b))
    ra, rb = [f.result(timeout=60) for f in a], [f.result(timeout=60) for f in b]
    rep = eng.report()
    assert [r.tenant for r in ra] == ["tenant-a"] * 5 and [r.tenant for r in rb] == ["tenant-b"] * 5
    assert [r.id for r in ra] == [r.id for r in rb] == [f"q{i}" for i in range(5)]
    # Both tenants' requests ran: the cache keeps tenants apart (share_across_tenants is off by default).
    assert all(r.status == "ok" for r in ra + rb) and rep["requests"] - before == 10


def test_a_repeated_id_returns_the_same_future_and_other_content_is_refused(engine):
    eng = engine
    f = eng.submit(text(1))
    assert eng.submit(text(1)) is f and eng.submit_many([text(1)])[0] is f
    with pytest.raises(RequestError, match="already submitted id 'q1' with other content"):
        eng.submit(text(1, prompt="something else"))
    with pytest.raises(RequestError, match="field 'prompt'.*not valid Unicode"):
        eng.submit_many([text(2), text(3, prompt="bad \ud800")])
    # Nothing of the refused batch was queued: its ids are still free.
    g = eng.submit_many([text(2), text(3)])
    assert f.result(timeout=60).status == "ok" and all(x.result(timeout=60).status == "ok" for x in g)


def test_an_engine_forgets_finished_requests_bounds_unfinished_ones_and_once_stopped_refuses_work(engine):
    """Three checks, one after the other, on one engine of its own at speed-up 1 (each started one before stop
    76: 12 actor processes more): finished requests are forgotten after the retention window; backpressure
    bounds the unfinished requests; once it stops, it takes no more work, while the second engine, the
    module's, runs on on the same Ray (a tenant of its own keeps its ids apart from the other tests')."""
    with Engine.start(catalog=OPENAI_ONLY, speedup=1, retention_s=0.0, max_pending=3, overload="raise") as first:
        # Retention: one request at a time, well under max_pending.
        f = first.submit(text(1))
        assert f.result(timeout=60).status == "ok"
        # The pull loop forgets it on its next turn (at most its 0.2 s long-poll): wait on that, bounded.
        with first._room:
            first._room.wait_for(lambda: not first._futs, timeout=10)
            assert not first._futs
        g = first.submit(text(1))  # the id is free again: a new request (answered from the result cache)
        assert g is not f and g.result(timeout=60).status in ("ok", "reused")
        assert first.report()["requests"] == 2

        # Backpressure. A 10-minute deadline at speed-up 1: the requests wait for a batch, so they stay unfinished.
        slow = {"deadline_s": 600, "priority": "background"}
        first.submit_many([text(i, **slow) for i in range(10, 13)])
        with pytest.raises(Overloaded, match="max_pending=3"):
            first.submit(text(19, **slow))
        # The same engine with overload="block" and submit_timeout_s=0.2 (saves a start-up): still full, so a
        # submit waits 0.2 s for room, in vain.
        first._overload, first._submit_timeout_s = "block", 0.2
        t0 = time.monotonic()
        with pytest.raises(Overloaded):
            first.submit(text(19, **slow))
        assert time.monotonic() - t0 >= 0.2  # it waited for room before giving up
    # Stopped. Ids it never saw, as a fresh engine's would be (q1 may still be known to it: not the case tested).
    with pytest.raises(EngineStopped):
        first.submit(text(20))
    with pytest.raises(EngineStopped):  # the asyncio API alike (it was checked on an engine of its own)
        asyncio.run(first.asubmit(text(21)))
    with pytest.raises(EngineStopped):
        asyncio.run(first.asubmit_many([text(22)]))
    second = engine.submit(text(1, "after-a-stop"))  # new to it: a call made after the first engine stopped
    assert second.result(timeout=60).status == "ok"  # Ray is still up under it
