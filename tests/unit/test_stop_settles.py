"""What the engine's stop cuts short at a dispatcher (``CancelDispatches.stop_spending``): a provider batch under
way, cancelled (any member it finished before the cancel took effect is billed, and nobody reads it), and a sync
call under way (billed when it ends). Each claim is settled at its bound, counted ``possibly_billed``, and the
budget controller has it before the stop goes on; the stop then keeps the controller alive until the ledger is
kept (``actors._engine_stop.kill_engine``). Before, the controller was killed before the dispatchers cancelled,
and their claims were never settled: their room held until ``reservation_ttl_s``, then released, spend uncounted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import actors._engine_stop as engine_stop
from engine.core.clock import ManualClock
from engine.core.cost import reserve_bound
from engine.emulator import Emulator

from .test_batch_rescue import FAR
from .test_http_providers import CAT, SPEED, VALIDATING_S, Rig, jobs_of


@pytest.fixture(autouse=True)
def no_ray_reads(monkeypatch):
    """``kill_engine`` reads the engine's clock and the hub journal's copy from Ray before it kills anything: with
    stand-in handles, those reads started a local Ray in a unit test (3 s, 650 MB, and a session's Ray fixture
    later in the same process refused to start)."""
    monkeypatch.setattr(engine_stop, "resolve_clock", lambda ref: (None,))
    monkeypatch.setattr(engine_stop, "_journal_copy", lambda engine: None)


@pytest.fixture
def slow_cancel_emu():
    """An emulator whose batches take a day to cancel: the batch is still ``cancelling`` when the actor goes."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=86_400.0, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


@pytest.fixture
def still() -> Iterator[tuple[Emulator, ManualClock]]:
    """``slow_cancel_emu`` on a clock that stands still, the rig's too: the batch is in progress however long the
    machine takes between its create and the stop's cancel. At ``SPEED`` its turnaround was 1 s of real time,
    which a loaded machine passed: the cancel found it completed (a flake hunt, stop 82: 1 of 4 runs beside two
    busy loops; a scratch 1.5 s after the create failed each test moved onto it, ``(0, 0, 0) == (1, 0, 0)``)."""
    clock = ManualClock(1000.0)
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=86_400.0, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        e.follow(clock)
        yield e, clock


def _stop_tasks(rig: Rig) -> None:  # the actor is killed: its follow-ups and calls die with it
    for t in rig.d._tasks:
        t.cancel()


def test_a_provider_batch_under_way_at_the_stop_is_settled_at_its_members_bounds(still):
    emu, clock = still

    async def go():
        rig = Rig(emu, "openai", clock=clock)
        try:
            jobs = jobs_of("openai", claims=True)
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=FAR)
            await rig.until(lambda: [r for r in rig.d._open.values() if r[4] is not None], "the batch created")
            assert await rig.d.stop_spending() == (1, 0, 0)  # cancelled; nothing read yet
            assert not rig.budget.book.claims  # each settled, none left to hold its room until it expires
            bounds = [reserve_bound(j.req, rig.catalog, "batch_api") for j in jobs]
            assert sum(rig.budget.book.spend.values()) == pytest.approx(sum(bounds), abs=1e-12)
            stats = await rig.d.stats()
            assert (stats["possibly_billed"], stats["possibly_billed_usd"]) == (
                len(jobs), pytest.approx(sum(bounds), abs=1e-6))
        finally:
            _stop_tasks(rig)
            await rig.close()
    asyncio.run(go())


def test_a_sync_call_under_way_at_the_stop_is_settled_at_its_bound_and_only_once(slow_cancel_emu):
    async def go():
        rig = Rig(slow_cancel_emu, "openai")
        started, answer = asyncio.Event(), asyncio.Event()
        inner = rig.d.provider.call

        async def held(job):  # the call is at the provider when the stop comes
            started.set()
            await answer.wait()
            return await inner(job)

        rig.d.provider.call = held
        try:
            (j,) = jobs_of("openai", 1, claims=True)
            await rig.reserve([j])
            await rig.run("sync", [j])
            await asyncio.wait_for(started.wait(), 10)
            await rig.d.stop_spending()
            bound = reserve_bound(j.req, rig.catalog, "sync")
            assert not rig.budget.book.claims and sum(rig.budget.book.spend.values()) == pytest.approx(bound)
            # Its answer coming before the actor goes settles nothing again (the ledger keeps the first anyway).
            answer.set()
            await rig.until(lambda: rig.results.get(j.req.id), "the call's result")
            assert rig.d._settle == [] and (await rig.d.stats())["possibly_billed"] == 1
        finally:
            _stop_tasks(rig)
            await rig.close()
    asyncio.run(go())


def test_the_stop_kills_the_budget_controller_after_the_dispatchers_settled_and_the_ledger_was_kept(monkeypatch):
    """The order ``kill_engine`` keeps: the others first (no driver takes what the dispatchers publish, no grouper
    sends again what comes back), then the dispatchers cancel and settle, then ``at_ledger`` (the driver keeps
    what Redis has not taken), then the controller and the dispatchers go."""
    done: list[tuple] = []
    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: None)
    monkeypatch.setattr(engine_stop, "unpublish_layout", lambda engine: None)
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: done.append(("kill", *hs)) or len(hs))
    monkeypatch.setattr(engine_stop, "_cancel_batches", lambda engine, ds, *more: done.append(("cancel", *ds.values())))
    monkeypatch.setattr(engine_stop.ray, "wait", lambda *a, **k: ([], []))

    class Handle(str):
        ping = type("Ping", (), {"remote": staticmethod(lambda: None)})

    ingest, grouper, hub, budget, d1 = (Handle(x) for x in ("ingest", "grouper", "hub", "budget", "d1"))
    n = engine_stop.kill_engine("e", [ingest, grouper, d1, budget, hub], [d1], budget,
                                lambda: done.append(("keep ledger",)))
    assert n == 5
    assert done == [("kill", "ingest", "grouper", "hub"), ("cancel", "d1"), ("keep ledger",),
                    ("kill", "budget", "d1")]


@pytest.mark.parametrize("unanswered", [0, 1], ids=["first try", "an earlier try unanswered"])
def test_a_sync_call_the_stop_cut_before_it_was_sent_is_released_not_settled_at_its_bound(slow_cancel_emu,
                                                                                          unanswered):
    """A sync call whose body is being journaled when the stop comes is never sent (``_not_sent``, once the
    write answers): billed nothing. Its record is in ``_sync_calls`` from before the write, and the stop took it
    for a call under way: settled at its bound, counted ``possibly_billed`` (a review: a ledger charged for a call
    no provider saw). Now it is released at 0 at the stop, or kept at the bound of an earlier try that got no
    answer (as a call resumed after a restart has), counted once: its end after the stop counts nothing again."""
    async def go():
        rig = Rig(slow_cancel_emu, "openai")
        writing, written = asyncio.Event(), asyncio.Event()
        journal = rig.d._sync_journal
        inner = journal.put

        async def slow_put(key, rec):  # the journal write is under way when the stop comes
            writing.set()
            await written.wait()
            return await inner(key, rec)

        journal.put = slow_put
        try:
            (j,) = jobs_of("openai", 1, claims=True)
            await rig.reserve([j])
            rig.d._unanswered[j.req.uid] = unanswered
            await rig.run("sync", [j])
            await asyncio.wait_for(writing.wait(), 10)
            await rig.d.stop_spending()
            assert not rig.budget.book.claims, "its claim still holds its room"
            kept = unanswered * reserve_bound(j.req, rig.catalog, "sync")  # this try never sent: billed nothing
            assert sum(rig.budget.book.spend.values()) == pytest.approx(kept, abs=1e-12)
            assert (await rig.d.stats())["possibly_billed"] == unanswered
            written.set()  # the write answers before the actor goes: the call is not sent, nothing settles again
            await rig.until(lambda: rig.results.get(j.req.id), "the call's result")
            assert rig.results[j.req.id].status == "failed" and rig.calls == []
            assert rig.d._settle == [] and (await rig.d.stats())["possibly_billed"] == unanswered
            assert slow_cancel_emu.count("chat.completions", "openai", 200) == 0
        finally:
            _stop_tasks(rig)
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("at", ["cancel", "keep ledger"])
def test_a_ctrl_c_in_the_stop_still_kills_every_actor_and_cleans_ray_s_store_after_them(monkeypatch, at):
    """A Ctrl-C while the dispatchers cancel, or while the ledger is kept: the controller and the dispatchers are
    killed (``finally``), and what the engine published is removed again once they are dead, as on a stop that
    ends normally. Before, the Ctrl-C left before that second clean: the budget controller's copy of its ledger
    (a Redis ledger's outbox), written after the first, outlived the engine in Ray's store."""
    done: list[tuple] = []
    monkeypatch.setattr(engine_stop, "unpublish_layout", lambda engine: done.append(("unpublish layout",)))
    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: done.append(("unpublish",)))
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: done.append(("kill", *hs)) or len(hs))

    def interrupted(*a):
        done.append((at,))
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_stop, "_cancel_batches", interrupted if at == "cancel" else lambda engine, ds, *more: None)
    monkeypatch.setattr(engine_stop.ray, "wait", lambda *a, **k: done.append(("wait dead",)) or ([], []))

    class Handle(str):
        ping = type("Ping", (), {"remote": staticmethod(lambda: None)})

    grouper, budget, d1 = (Handle(x) for x in ("grouper", "budget", "d1"))
    with pytest.raises(KeyboardInterrupt):
        engine_stop.kill_engine("e", [grouper, d1, budget], [d1], budget, interrupted)
    # (the journals in Ray's store go with the second clean alone: a controller that dies in the stop reads them)
    assert done == [("unpublish layout",), ("kill", "grouper"), (at,), ("kill", "budget", "d1"),
                    ("wait dead",), ("unpublish",)]


def test_a_batch_the_stop_kept_from_being_created_releases_its_members_claims(slow_cancel_emu):
    """A provider batch whose record is being journaled when the stop comes is never created (``late``): its
    members go back to their grouper, which the stop killed first, with their claims. Nobody released them:
    each held its room until ``reservation_ttl_s`` (two days on a shared Redis ledger). Now the dispatcher, once
    the stop began, releases at 0 the claims of what it hands back (billed nothing: never sent)."""
    async def go():
        rig = Rig(slow_cancel_emu, "openai")
        writing, written = asyncio.Event(), asyncio.Event()
        inner = rig.d.journal.put

        async def slow_put(space, key, rec):  # the batch's record is being written when the stop comes
            if space == rig.d._space:
                writing.set()
                await written.wait()
            return await inner(space, key, rec)

        rig.d.journal.put = slow_put
        try:
            jobs = jobs_of("openai", claims=True)
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=FAR)
            await asyncio.wait_for(writing.wait(), 10)
            stop = asyncio.ensure_future(rig.d.stop_spending())
            await rig.until(lambda: rig.d._cancelled, "the stop's cancel")
            written.set()  # the write answers: the batch is never created, its members go back
            assert await asyncio.wait_for(stop, 30) == (1, 0, 0)
            await rig.d.spend_told()
            assert slow_cancel_emu.count("batches.create", "openai") == 0
            assert {j.req.id for j in rig.grouper.readmitted()} == {j.req.id for j in jobs}
            assert not rig.budget.book.claims, f"{len(rig.budget.book.claims)} claim(s) hold their room"
            assert sum(rig.budget.book.spend.values()) == 0.0 and (await rig.d.stats())["possibly_billed"] == 0
        finally:
            _stop_tasks(rig)
            await rig.close()
    asyncio.run(go())


def test_a_cancel_that_fails_at_the_stop_still_keeps_the_ledger_before_the_controller_goes(monkeypatch):
    """The dispatchers' cancel failing (Ray's wait raising, say) skipped the keeping of the ledger: a Redis
    ledger's settlements waiting for Redis went with the controller, kept in no file, and the files taken back at
    the start were never finished. The ledger is kept all the same, then the actors go."""
    done: list[tuple] = []
    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: None)
    monkeypatch.setattr(engine_stop, "unpublish_layout", lambda engine: None)
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: done.append(("kill", *hs)) or len(hs))

    def failing(engine, ds, *more):
        raise RuntimeError("Ray's wait failed")

    monkeypatch.setattr(engine_stop, "_cancel_batches", failing)
    monkeypatch.setattr(engine_stop.ray, "wait", lambda *a, **k: ([], []))

    class Handle(str):
        ping = type("Ping", (), {"remote": staticmethod(lambda: None)})

    budget, d1 = Handle("budget"), Handle("d1")
    assert engine_stop.kill_engine("e", [d1, budget], [d1], budget, lambda: done.append(("keep ledger",))) == 2
    assert done == [("kill",), ("keep ledger",), ("kill", "budget", "d1")]


class _Gcs:
    """Ray's kill and its GCS's word on each actor, faked: a kill lands ``lands_after`` reads of the actor's state
    after ``ray.kill`` returned (Ray sends it to the GCS, which kills the process later), and a kill of one in
    ``refused`` raises, as a kill Ray refused (the stop took it for an actor already gone)."""

    def __init__(self, lands_after: dict[str, int], refused: frozenset[str] = frozenset()) -> None:
        self.lands_after, self.refused, self.asked, self.killed, self.reads = lands_after, set(refused), [], [], {}

    def kill(self, h, no_restart: bool = True) -> None:
        self.asked.append(str(h))
        if str(h) in self.refused:
            self.refused.discard(str(h))  # (once: asked again, it is killed)
            raise RuntimeError("the kill did not reach the GCS")
        self.killed.append(str(h))

    def actors(self, actor_id: str) -> dict:
        if actor_id not in self.killed:
            return {"State": "ALIVE"}
        self.reads[actor_id] = n = self.reads.get(actor_id, 0) + 1
        return {"State": "DEAD" if n > self.lands_after.get(actor_id, 0) else "ALIVE"}

    def dead(self, actor_id: str) -> bool:  # (the test's own read, counted as none)
        return actor_id in self.killed and self.reads.get(actor_id, 0) > self.lands_after.get(actor_id, 0)


class _Actor(str):
    """A stand-in handle the faked GCS knows by its id; its ping is answered (the kill not landed yet)."""

    @property
    def _actor_id(self):
        return type("Id", (), {"hex": lambda _: str(self)})()

    ping = type("Ping", (), {"remote": staticmethod(lambda: None)})


class _VirtualTime:
    """``time`` as the death wait reads it, virtual: a poll's sleep moves it on at once, the test's thread none."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _faked_gcs(monkeypatch, gcs: _Gcs) -> None:
    from ray._private import state

    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: None)
    monkeypatch.setattr(engine_stop, "unpublish_layout", lambda engine: None)
    monkeypatch.setattr(engine_stop, "_cancel_batches", lambda engine, ds, *more: None)
    monkeypatch.setattr(engine_stop.ray, "wait", lambda *a, **k: ([], []))  # every ping answered at once
    monkeypatch.setattr(engine_stop.ray, "kill", gcs.kill)
    monkeypatch.setattr(engine_stop.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(state, "actors", lambda actor_id: gcs.actors(actor_id))


def test_a_second_ctrl_c_among_the_stop_s_last_kills_still_kills_every_actor(monkeypatch):
    """A Ctrl-C while the dispatchers cancel, and another as the budget controller is killed (the stop's
    ``finally``): the kills after it were skipped, the dispatchers left running with their batches under way,
    billed and never read. Every kill is asked now, and the Ctrl-C raised after them."""
    gcs = _Gcs({})
    _faked_gcs(monkeypatch, gcs)
    kill = gcs.kill

    def ctrl_c_in_the_controller_s_kill(h, no_restart: bool = True) -> None:
        kill(h, no_restart)
        if h == "budget":
            raise KeyboardInterrupt

    def ctrl_c(*a) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_stop.ray, "kill", ctrl_c_in_the_controller_s_kill)
    monkeypatch.setattr(engine_stop, "_cancel_batches", ctrl_c)
    grouper, budget, d1, d2 = (_Actor(x) for x in ("grouper", "budget", "d1", "d2"))
    with pytest.raises(KeyboardInterrupt):
        engine_stop.kill_engine("e", [grouper, d1, d2, budget], [d1, d2], budget, claim={})
    assert gcs.asked == ["grouper", "budget", "budget", "d1", "d2"]  # (the cut one asked again: it may not have been)


def test_the_stop_returns_once_ray_says_every_actor_it_killed_is_dead(monkeypatch, caplog):
    """``ray.kill`` returns before the kill lands, and a ping sent then can be answered (a clean-clone rehearsal:
    "1 of 5 actors still running after the stop", Ray's race seen 1 ping of 75 on a quiet machine). The stop
    took an answered ping for a death, and did not wait for the dispatchers at all: it returned with them alive.
    Now it reads Ray's GCS until each is dead, the dispatchers too, within ``DEATH_WAIT_S``; a kill that did not
    reach Ray (taken for an actor already gone) is asked again at that bound and named in a WARNING."""
    import logging

    gcs = _Gcs({"budget": 2, "d1": 3}, refused=frozenset({"d2"}))
    _faked_gcs(monkeypatch, gcs)
    # The death wait's clock, virtual: in real seconds, a reader that a loaded machine stalled past the 0.3 s
    # bound found the budget controller and d1 alive (each GCS read made 0.1 s late: a flake hunt, stop 80), or
    # was left by its join after GCS_ANSWER_S. Now its polls fit the bound 15 times whatever the machine's speed,
    # and the join waits for the reader (30 s: a safety net).
    monkeypatch.setattr(engine_stop, "time", _VirtualTime())
    monkeypatch.setattr(engine_stop, "DEATH_WAIT_S", 0.3)
    monkeypatch.setattr(engine_stop, "GCS_ANSWER_S", 30.0)
    grouper, budget, d1, d2 = (_Actor(x) for x in ("grouper", "budget", "d1", "d2"))
    with caplog.at_level(logging.WARNING, logger="smartbatch.engine"):
        engine_stop.kill_engine("e", [grouper, d1, d2, budget], [d1, d2], budget, claim={})
    assert [a for a in ("grouper", "budget", "d1") if not gcs.dead(a)] == []
    assert gcs.asked.count("d2") == 2 and "d2" in gcs.killed, gcs.asked  # asked again once the bound passed
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "1 actor(s) still alive" in said and "d2" in said and "d1" not in said, said


def test_a_gcs_that_does_not_answer_holds_the_stop_no_longer_than_its_death_wait(monkeypatch, caplog):
    """Ray's GCS stalled (loaded, or its head restarting): ``ray.kill`` still returns at once (0.2 ms, it queues
    the kill), but a read of the actor table (``ray._private.state.actors``) waits for the GCS with no bound of
    its own (Ray 2.60, the GCS stopped by SIGSTOP: the read returned 75 s later, as the GCS went on). The stop,
    bounded at ``DEATH_WAIT_S`` when it waited on pings, hung in its first read as long as the GCS did, deaf to a
    Ctrl-C. Now the reads run beside it and the stop goes on at the bound, saying the deaths are unconfirmed."""
    import logging
    import threading

    from ray._private import state

    gcs = _Gcs({})
    _faked_gcs(monkeypatch, gcs)
    stalled = threading.Event()

    def stalled_read(actor_id: str) -> dict:
        stalled.wait(60.0)  # (released as the test ends: a safety net)
        return gcs.actors(actor_id)

    monkeypatch.setattr(state, "actors", stalled_read)
    monkeypatch.setattr(engine_stop, "DEATH_WAIT_S", 0.2)
    grouper, budget, d1 = (_Actor(x) for x in ("grouper", "budget", "d1"))
    done = threading.Event()
    stopper = threading.Thread(target=lambda: (engine_stop.kill_engine("e", [grouper, d1, budget], [d1], budget,
                                                                       claim={}), done.set()), daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="smartbatch.engine"):
            stopper.start()
            returned = done.wait(10.0)  # the bound 0.2 s; 10 s for a loaded machine
    finally:
        stalled.set()
        stopper.join(10.0)
    assert returned, "the stop waited for a GCS that did not answer, past its death wait"
    assert gcs.asked == ["grouper", "budget", "d1"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "did not answer" in said, said


def test_a_ctrl_c_before_a_kill_reached_ray_still_kills_that_actor(monkeypatch):
    """``ray.kill`` runs Python before Ray's own call (its connection's check, the handle's type): a Ctrl-C there
    raises with that actor's kill never asked. The stop went on to the others and left that one to the death
    wait's second kill, at its 2 s bound; a Ctrl-C more in that wait (the user pressing again) and the budget
    controller ran on for good. Now the kill it cut is asked again at once."""
    gcs = _Gcs({})
    _faked_gcs(monkeypatch, gcs)
    kill, cut = gcs.kill, []

    def ctrl_c_before_the_controller_s_kill(h, no_restart: bool = True) -> None:
        if h == "budget" and not cut:
            cut.append(h)
            raise KeyboardInterrupt  # (before Ray's call: not asked)
        kill(h, no_restart)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_stop.ray, "kill", ctrl_c_before_the_controller_s_kill)
    monkeypatch.setattr(engine_stop.ray, "wait", ctrl_c)  # and one more in the death wait
    grouper, budget, d1 = (_Actor(x) for x in ("grouper", "budget", "d1"))
    with pytest.raises(KeyboardInterrupt):
        engine_stop.kill_engine("e", [grouper, d1, budget], [d1], budget, claim={})
    assert sorted(gcs.killed) == ["budget", "d1", "grouper"], gcs.asked
