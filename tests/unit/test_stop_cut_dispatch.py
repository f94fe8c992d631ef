"""A stop names what waited at a DISPATCHER's gate, never sent (``actors/_stop_cut_dispatch.py``), as it names what
the groupers held (``tests/unit/test_stop_cut.py``): work queued on its first arrival for the rate gate, the
concurrency or the batch queue's room, whose job says no call of it was made anywhere. It is ended (its claim let go
at 0) and never sent after; what comes later is queued nowhere. Before (stop 82's task), only the groupers named
theirs, and such work got the endpoint's final 502 "may have been billed". Plain ``Dispatcher`` on a simulated
provider and a ``ManualClock``; no Ray."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from actors import Dispatcher, ResultHub
from actors._types import OWN_ROWS, BatchJob, Job
from engine.core.budgets import Claim
from engine.core.clock import ManualClock
from engine.core.settings import Settings
from tests.unit.helpers import Recorder
from tests.unit.test_actors import CAT, ledger, ran_out, req

BUSY = 256  # the simulated provider's sync calls under way at once for gpt-5-mini (its gate's concurrency)


def _sync(b: str, j: Job, mode: str = "sync") -> BatchJob:
    return BatchJob(b, mode, None, False, "process_individually", "now", [j])


async def _busy_dispatcher(claims: list[str]):
    """A dispatcher whose gate's concurrency is taken by ``BUSY`` calls under way (no claim): what comes next
    waits at its gate."""
    hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
    clock = ManualClock(0.0)
    d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, budget)
    await budget.reserve_many([Claim(c, "t", "openai", "gpt-5-mini", "urgent", 1.0) for c in claims])
    await d.run_many([_sync(f"busy{i}", Job(i, req(i), f"fp{i}")) for i in range(BUSY)])
    assert d.sim.waiting == 0
    return d, clock, hub, budget, grouper


def test_a_dispatcher_names_what_waits_at_its_gate_never_sent_and_sends_none_of_it_after():
    """Fresh work queued at the gate is named and ends at once, cancelled, its claim let go at 0; work whose job
    says a call of it was made (a retry, a hedged member, a reroute, a 429 waited out, a flex call refused) or
    queued again ends with no result and is not named. Nothing of it, nor what comes after the stop's word, is ever
    started (fails on the code before: the dispatcher had no ``cut_at_stop``)."""
    async def go():
        n = BUSY
        fresh = [Job(n + k, req(n + k), f"f{k}", claim=f"c{k}") for k in range(3)]
        flex = Job(n + 3, req(n + 3), "fx", claim="c3")
        made = [Job(n + 4, req(n + 4), "a", attempts=1, claim="c4"), Job(n + 5, req(n + 5), "h", hedges=1),
                Job(n + 6, req(n + 6), "r", asked=("openai", "gpt-5")), Job(n + 7, req(n + 7), "t", throttled=1),
                Job(n + 8, req(n + 8), "s", called=True, claim="c8")]
        d, clock, hub, budget, grouper = await _busy_dispatcher(["c0", "c1", "c2", "c3", "c4", "c8"])
        await d.run_many([_sync(f"x{k}", j) for k, j in enumerate(fresh + made)] + [_sync("fl", flex, "flex")])
        # A fresh-looking job queued again (a flex call refused with no claim goes standard so): not its first
        # arrival, not named.
        again = Job(n + 10, req(n + 10), "again")
        d._known.add(again.req.uid)
        d.in_flight += 1
        d._enqueue("sync", _sync("again", again), [again])
        made.append(again)
        assert d.sim.waiting == len(fresh) + len(made) + 1, d.sim
        named = await d.cut_at_stop()
        assert sorted(named) == sorted(j.req.uid for j in [*fresh, flex])
        assert d.sim.waiting == 0 and not d._first  # (nothing kept of what left the gate)
        await d.run_many([_sync("late", Job(n + 9, req(n + 9), "late"))])  # after the stop's word: queued nowhere
        assert d.sim.waiting == 0
        await ran_out(d, clock)
        got = {r.id: r for r in await hub.pull(0.01)}
        named_ids = [j.req.id for j in [*fresh, flex]]
        assert all(got[i].status == "failed" and got[i].cost_usd == 0.0 for i in named_ids), got
        # What it does not name gets no result from it (a "cancelled" was the retryable 503 of a request that may
        # have been billed): its driver fails it as the engine goes. Those under way ran on (a retry of one that
        # failed, past the stop's word, ends unsent, with no result either).
        assert set(got) - {req(i).id for i in range(BUSY)} == set(named_ids)
        assert await d.budget.delivered(5.0)
        book = budget.book
        assert not set(book.claims) & {"c0", "c1", "c2", "c3", "c4", "c8"} and sum(book.spend.values()) == 0.0
        assert not any(name == "add" for name, _ in grouper.calls)  # nothing handed back to be sent again
    asyncio.run(go())


@pytest.mark.parametrize("how", ["a re-admitted copy", "a request it knew already", "restarted by Ray"])
def test_a_dispatcher_that_may_hold_a_copy_of_a_request_sent_before_names_nothing(how):
    """A copy's original may have been sent and billed, and so may a request a restarted dispatcher's journal
    made before: what it holds stays "may have been billed" (fails on the code before: no ``cut_at_stop``)."""
    async def go():
        d, clock, _, _, _ = await _busy_dispatcher([])
        n = BUSY
        await d.run_many([_sync("a", Job(n, req(n), "a"))])
        if how == "a re-admitted copy":
            await d.run_many([_sync("b", Job(OWN_ROWS + 1, req(n + 1), "b"))])
        elif how == "a request it knew already":
            await d.run_many([_sync("a2", Job(n, req(n), "a"))])
        else:
            d.reconstructed()
        assert d.sim.waiting >= 1
        assert await d.cut_at_stop() == []
        d._must_recover = False  # (no journal to read here)
        await ran_out(d, clock)
    asyncio.run(go())


def test_a_flex_call_refused_and_sent_back_for_the_standard_price_is_marked_called():
    """A reserved flex call the tier refused goes back to its grouper, which clears ``standard`` and sends it sync
    with a new claim: at the dispatcher it looked never sent. It carries ``called`` from then on (fails on the code
    before: no such mark, and a stop would have named it)."""
    from actors._stop_cut import never_called, never_sent

    async def go():
        d, clock, _, _, _ = await _busy_dispatcher(["c0"])
        j = Job(BUSY, req(BUSY), "fx", claim="c0")
        d.in_flight += 1
        assert d._back_standard(_sync("fl", j, "flex"), j, SimpleNamespace(maybe_billed=False))
        (back,) = d._readmit
        taken = back._replace(standard=None, claim="new")  # as its grouper takes it and reserves the standard price
        assert back.called and not never_called(taken) and not never_sent(taken._replace(claim=None))
        d._readmit.clear()
        await ran_out(d, clock)
    asyncio.run(go())


def test_the_stop_asks_the_dispatchers_after_the_groupers_and_publishes_both_lists(monkeypatch):
    """``cut_unsent`` asks the groupers first (they send nothing more), then the dispatchers, and publishes every id
    named (fails on the code before: it asked the groupers alone)."""
    import ray
    from ray.experimental import internal_kv

    from actors import _stop_cut

    asked: list[str] = []

    class Handle:
        def __init__(self, name: str, ids: list[str]) -> None:
            self.cut_at_stop = SimpleNamespace(remote=lambda: asked.append(name) or ids)

    store: dict = {}
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (refs, []))
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get(key))
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda key, value, overwrite=True, namespace=None: store.__setitem__(key, value))
    got = _stop_cut.cut_unsent("e", [Handle("g0", ["a"])], dispatchers=[Handle("d0", ["b"]), Handle("d1", [])])
    assert asked == ["g0", "d0", "d1"] and got == {"a", "b"} and _stop_cut.read_cut("e") == {"a", "b"}
    # One that Ray will not call (a stand-in without the method, a handle Ray refuses) loses no other's list.
    got = _stop_cut.cut_unsent("f", [Handle("g0", ["a"])], dispatchers=[object(), Handle("d0", ["b"])])
    assert got == {"a", "b"} and _stop_cut.read_cut("f") == {"a", "b"}


def test_a_next_try_that_comes_after_the_stops_word_ends_at_once_with_no_result():
    """A call under way as the stop came fails with tries left: its next try is sent nowhere. It ends at once, with
    no result from here (a try of it was sent, maybe billed: its driver fails it "may have been billed"), its claim
    settled at what its unanswered call may have billed. Before (a review, ``rvcutq82``), it waited in
    ``_retrying`` for its time (a Retry-After's hour), and the stop's cancel then ended it ``cancelled``, the
    retryable answer of a request never sent, which the drain's cancel gives."""
    from engine.core.cost import reserve_bound

    async def go():
        d, clock, hub, budget, _ = await _busy_dispatcher(["c0"])
        assert await d.cut_at_stop() == []
        n = BUSY
        j = Job(n, req(n), "x", attempts=1, claim="c0")  # as ``_run_sync`` hands it on after its first try failed
        d._known.add(j.req.uid)
        d.in_flight += 1
        d._unanswered[j.req.uid] += 1  # that try timed out: it may have been billed
        d._retry_later(clock.now() + 3600.0, _sync("y", j), j)
        assert not d._retrying and d.in_flight == BUSY and j.req.uid not in d._known
        await d.cancel()  # the stop's, after the word: nothing of it left to end "cancelled"
        await ran_out(d, clock)
        got = {r.id for r in await hub.pull(0.01)}
        assert j.req.id not in got
        assert await d.budget.delivered(5.0)
        assert "c0" not in budget.book.claims
        assert sum(budget.book.spend.values()) == pytest.approx(reserve_bound(j.req, CAT, "sync", None))
    asyncio.run(go())


def _batch(b: str, jobs: list[Job]) -> BatchJob:
    return BatchJob(b, "batch_api", None, False, "process_as_batch", "cheap", jobs)


def test_a_batch_let_start_whose_create_has_not_begun_is_named_and_never_created():
    """A batch the gate let start and whose create has not begun (waiting for its create's slot, or its task not
    yet run) is taken by the stop: its fresh members are named, the others (a retry; one withdrawn, which ends as
    withdrawn) are not, and the batch is never created. One whose create began runs on, unnamed. Fails on the code
    before (``cutq82`` left it): ``assert [] == ['7:default/r0', '7:default/r1']``."""
    import contextlib

    async def go():
        hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
        clock = ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, budget)
        await budget.reserve_many([Claim(c, "t", "openai", "gpt-5-mini", "urgent", 1.0) for c in ("c0", "c1")])
        made: list[list[str]] = []
        entered, go_on, slot, waiting = asyncio.Event(), asyncio.Event(), asyncio.Lock(), asyncio.Event()
        submit = d.provider.submit_batch

        async def counted(cjobs, *a, **kw):  # the create begins: its first HTTP call, at a real provider
            made.append(sorted(cj.req.id for cj in cjobs))
            if len(cjobs) == 3:
                entered.set()
                await go_on.wait()
            return await submit(cjobs, *a, **kw)

        @contextlib.asynccontextmanager
        async def create_slot(n: int):  # (Anthropic's: one create of a size at a time) held by the test for 2
            if n == 2:
                waiting.set()
                async with slot:
                    yield
            else:
                yield

        d.provider.submit_batch, d.provider.create_slot = counted, create_slot
        await slot.acquire()
        j0, jw = Job(0, req(0), "f0", claim="c0"), Job(5, req(5), "w")
        await d.run_many([_batch("slot", [j0, jw])])
        await waiting.wait()
        begun = [Job(k, req(k), f"b{k}") for k in (6, 7, 8)]
        await d.run_many([_batch("begun", begun)])
        await entered.wait()
        await d.withdraw([jw.req.uid])
        j1, again = Job(1, req(1), "f1", claim="c1"), Job(2, req(2), "a", attempts=1)
        await d.run_many([_batch("spawned", [j1, again])])
        named = await d.cut_at_stop()  # (no await between: the spawned batch's task has not run)
        assert sorted(named) == [j0.req.uid, j1.req.uid]
        slot.release()
        go_on.set()
        await ran_out(d, clock)
        assert made == [["r6", "r7", "r8"]]  # the two taken were never created
        got: dict[str, list] = {}
        for r in await hub.pull(0.01):
            got.setdefault(r.id, []).append(r)
        assert all(len(rs) == 1 for rs in got.values()), got
        assert {"r0", "r1", "r5"} <= set(got) and "r2" not in got  # the retry: no result from here (the 502)
        assert all(got[i][0].status == "failed" and got[i][0].cost_usd == 0.0 for i in ("r0", "r1", "r5"))
        assert "withdrawn by a driver" in got["r5"][0].error and "engine was cancelled" in got["r0"][0].error
        assert d.in_flight == 0 and not d._creating and not d._taken and not d._open
        assert await d.budget.delivered(5.0)
        assert not set(budget.book.claims) & {"c0", "c1"}
    asyncio.run(go())


def test_a_silent_grouper_leaves_the_dispatchers_their_share_of_the_stops_wait(monkeypatch):
    """One grouper not answering (its Ray restarting) takes at most its kind's share of the stop's wait: the
    dispatchers are asked then and have the rest, a grouper's late answer still counted, the whole within
    ``CUT_WAIT_S``. Virtual time: a call answers at its ask plus its latency. Fails on the code before: the silent
    grouper took the whole 2 s, the dispatchers were asked with none left, ``'b'`` not published."""
    import time

    import ray
    from ray.experimental import internal_kv

    from actors import _stop_cut

    now = [0.0]
    asked: dict[str, float] = {}

    class Ref:
        def __init__(self, ids: list[str], at: float) -> None:
            self.ids, self.at = ids, at

    class Handle:
        def __init__(self, name: str, ids: list[str], latency: float) -> None:
            self.cut_at_stop = SimpleNamespace(
                remote=lambda: asked.setdefault(name, now[0]) and None or Ref(ids, now[0] + latency))

    def wait(refs, num_returns, timeout):
        until = now[0] + timeout
        ready = [r for r in refs if r.at <= until]
        now[0] = max(r.at for r in ready) if len(ready) == len(refs) else until
        return ready, [r for r in refs if r not in ready]

    store: dict = {}
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", lambda ref: ref.ids)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get(key))
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda key, value, overwrite=True, namespace=None: store.__setitem__(key, value))
    groupers = [Handle("g0", ["a"], 0.01), Handle("g1", ["x"], float("inf")), Handle("g2", ["c"], 1.5)]
    got = _stop_cut.cut_unsent("e", groupers, dispatchers=[Handle("d0", ["b"], 0.01)])
    assert got == {"a", "b", "c"} and _stop_cut.read_cut("e") == {"a", "b", "c"}
    assert asked["d0"] <= _stop_cut.CUT_WAIT_S / 2 and now[0] <= _stop_cut.CUT_WAIT_S


@pytest.mark.parametrize("real", [False, True], ids=["simulated", "http"])
def test_a_call_waiting_for_its_next_try_is_named_only_when_every_try_of_it_billed_nothing(real):
    """At the stop, a sync call waiting for its next try whose every try billed nothing as the dispatcher classes
    outcomes (a 429 waited out, a 503, a connection never made) is named, never sent again, its claim let go at 0;
    one whose try may have been billed (a 504, a timeout after the request went, ``maybe_billed``) and one whose
    job says an earlier call was made elsewhere (hedged, rerouted) are not: the 502, their claims at what those
    tries may have billed. Over HTTP, one that came with a try counted (a batch member its failed batch gave back)
    is not named either: that attempt was no sync try here (the simulator bills no failed call). Fails on the code
    before: nothing waiting for a next try was named (``[] == [...]``)."""
    from engine.core.cost import reserve_bound
    from engine.core.provider_api import CallOutcome

    async def go():
        hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
        clock = ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, budget)
        fail = {  # each one's first try: what the provider answered
            "refused429": CallOutcome(False, 0.0, 0.0, 3600.0, error="HTTP 429", rate_limited=True),
            "unavailable503": CallOutcome(False, 0.0, 0.0, error="HTTP 503", real=True),
            "never_connected": CallOutcome(False, 0.0, 0.0, error="ConnectError", real=True),
            "gateway504": CallOutcome(False, 0.0, 0.0, error="HTTP 504", real=True, maybe_billed=True),
            "timed_out": CallOutcome(False, 0.0, 0.0, error="timed out", real=True, maybe_billed=True),
            "hedged503": CallOutcome(False, 0.0, 0.0, error="HTTP 503", real=True),
            "rerouted503": CallOutcome(False, 0.0, 0.0, error="HTTP 503", real=True),
            "batch_member503": CallOutcome(False, 0.0, 0.0, error="HTTP 503", real=True),
        }
        jobs = {name: Job(i, req(i, deadline_s=86_400.0, id=name), f"fp{i}", claim=f"c{i}")
                for i, name in enumerate(fail)}
        jobs["hedged503"] = jobs["hedged503"]._replace(hedges=1)
        jobs["rerouted503"] = jobs["rerouted503"]._replace(asked=("openai", "gpt-5"))
        jobs["batch_member503"] = jobs["batch_member503"]._replace(attempts=1)  # (``_attempt``'s readmission)
        d.provider.real = real  # (journaled call records, as over HTTP: the simulated provider's body is None)
        await budget.reserve_many([Claim(j.claim, "t", "openai", "gpt-5-mini", "urgent", 1.0) for j in jobs.values()])

        async def call(cj):
            return fail[cj.req.id]._replace(at=clock.now())
        d.provider.call = call
        # Timers are held until the stop (a ManualClock's fire at once): each next try waits for it.
        held: list = []
        d._at = lambda at, fn: held.append(fn)
        await d.run_many([_sync(name, j) for name, j in jobs.items()])
        for _ in range(1000):  # (each try's task ends within a few turns of the loop: no engine time passes)
            if len(d._retrying or {}) == len(jobs):
                break
            await asyncio.sleep(0)
        assert len(d._retrying) == len(jobs), d._retrying
        named = await d.cut_at_stop()
        del d._at  # (the timers held fire now: the next tries' send nothing after the stop)
        for fire in held:
            fire()
        d._kick()
        unbilled = ["refused429", "unavailable503", "never_connected", *([] if real else ["batch_member503"])]
        assert sorted(named) == sorted(jobs[n].req.uid for n in unbilled)
        assert not d._retrying
        await ran_out(d, clock)
        got = {r.id: r for r in await hub.pull(0.01)}
        assert set(got) == set(unbilled), got  # the rest: no result from here (their drivers' 502)
        assert all(r.status == "failed" and r.cost_usd == 0.0 for r in got.values())
        assert await d.budget.delivered(5.0)
        assert not set(budget.book.claims) & {j.claim for j in jobs.values()}
        bound = sum(reserve_bound(jobs[n].req, CAT, "sync", None) for n in ("gateway504", "timed_out"))
        assert sum(budget.book.spend.values()) == pytest.approx(bound)  # the maybe-billed tries' bounds alone
        assert not any(name == "add" for name, _ in grouper.calls)  # nothing handed back to be sent again
    asyncio.run(go())


def test_a_first_try_whose_body_is_journaled_when_the_stop_comes_is_never_sent():
    """Over HTTP a sync call's body is journaled before its first try, after the gate let it start: the stop that
    comes during that write does not find it (not at the gate, not waiting for a next try) and names it not. Once
    written, it was sent all the same, after the stop's word: a call billed whose answer nobody reads (its driver's
    502), the stop's cancel seconds later. Now it ends unsent there, unnamed (the list is out), its claim let go at
    0. Fails on the code before: the provider called once (``['r0'] == []``)."""
    from engine.core.provider_api import CallOutcome

    async def go():
        hub, budget, grouper = ResultHub(), ledger(100.0), Recorder()
        clock = ManualClock(0.0)
        d = Dispatcher("openai", CAT, Settings(), 0, clock, [grouper], hub, None, budget)
        d.provider.real = True  # (its body journaled before its first try, as over HTTP)
        j = Job(0, req(0), "fp0", claim="c0")
        await budget.reserve_many([Claim("c0", "t", "openai", "gpt-5-mini", "urgent", 1.0)])
        called: list[str] = []

        async def call(cj):
            called.append(cj.req.id)
            return CallOutcome(True, clock.now(), 0.01)
        d.provider.call = call
        writing, release = asyncio.Event(), asyncio.Event()
        put = d._sync_journal.put

        async def held_put(key, value):
            writing.set()
            await release.wait()
            return await put(key, value)
        d._sync_journal.put = held_put
        await d.run_many([_sync("b", j)])
        await asyncio.wait_for(writing.wait(), 5.0)
        assert await d.cut_at_stop() == []  # (being journaled: not the stop's to name)
        release.set()
        for _ in range(1000):  # (its task ends within a few turns of the loop)
            if not d.in_flight:
                break
            await asyncio.sleep(0)
        assert called == [] and d.in_flight == 0 and not d._sync_calls
        await ran_out(d, clock)
        assert not await hub.pull(0.01)  # no result from here: its driver's 502
        assert await d.budget.delivered(5.0)
        assert "c0" not in budget.book.claims and sum(budget.book.spend.values()) == 0.0
    asyncio.run(go())
