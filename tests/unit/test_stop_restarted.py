"""A dispatcher Ray restarts in the engine's stop, or just before it (its process died), and a simulated provider's
call under way at the stop (``CancelDispatches.stop_spending``, ``Recovery._recover_at_stop``).

Before, a restarted dispatcher answered the stop's ``stop_spending`` from an empty memory (``(0, 0, 0)``: no batch
under way), and the stop took the death of one that died in it for a kill by another stop: its provider batches
ran on, billed, their spend counted by no ledger, their claims held until ``reservation_ttl_s``. The stop had
killed the hub, whose memory held its journal, and unpublished the clock it reads after a restart. Asked again
now (``actors._stop_dispatchers._stop_restarted``), within a bound: one that never comes back is named in an ERROR."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest

import actors._engine_stop as engine_stop
import actors._stop_dispatchers as stop_dispatchers
from actors import BudgetController, Dispatcher, ResultHub
from actors._types import BatchJob, Job
from engine.core.budgets import BudgetSettings, Claim
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.cost import reserve_bound
from engine.core.provider_api import Secret
from engine.core.settings import Settings
from tests.unit.helpers import Recorder

from . import test_stop_settles
from .test_batch_rescue import FAR
from .test_http_providers import KEY, Rig, jobs_of, req

still = test_stop_settles.still  # (a fixture: the batch in progress whatever the machine's speed)


class _Gone:
    """The hub, killed by the stop before the dispatchers are asked: every call to it fails."""

    def __getattr__(self, name: str):
        raise ConnectionError(f"the hub is gone ({name})")


async def _close(rig, again) -> None:
    """The rig and the restarted dispatcher (if the test got that far): its tasks stopped, its provider closed."""
    for t in again._tasks if again is not None else ():
        t.cancel()
    await rig.close()
    if again is not None:
        await again.provider.close()


def test_a_dispatcher_restarted_at_the_stop_reads_the_hub_journal_copy_and_cancels_its_batch(still):
    slow_cancel_emu, clock = still

    async def go():
        rig = Rig(slow_cancel_emu, "openai", clock=clock)
        again = None
        try:
            jobs = jobs_of("openai", claims=True)
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=FAR)
            await rig.until(lambda: [r for r in rig.d._open.values() if r[4] is not None], "the batch created")
            copy = await rig.hub.journal_copy()  # taken by the stop before it kills the hub
            test_stop_settles._stop_tasks(rig)  # its process dies: its follow-ups with it
            # Ray builds it again from its constructor's arguments: a clock the stop has unpublished, the hub gone.
            again = Dispatcher("openai", rig.catalog, rig.settings, 0, None, [rig.grouper], _Gone(), None,
                               rig.budget, key=Secret(KEY))
            again.reconstructed()
            assert await asyncio.wait_for(again.stop_spending(rig.clock, [copy]), 30) == (1, 0, 0)
            assert slow_cancel_emu.count("batches.cancel", "openai", 200) == 1
            assert slow_cancel_emu.count("batches.create", "openai") == 1  # followed again, never made again
            assert not rig.budget.book.claims, "its members' claims still hold their room"
            bounds = [reserve_bound(j.req, rig.catalog, "batch_api") for j in jobs]
            assert sum(rig.budget.book.spend.values()) == pytest.approx(sum(bounds), abs=1e-12)
            assert (await again.stats())["possibly_billed"] == len(jobs)
        finally:
            await _close(rig, again)
    asyncio.run(go())


def test_a_simulated_providers_sync_call_under_way_at_the_stop_is_settled_at_its_bound():
    """A simulated provider's call has no record in ``_sync_calls`` (journaled nowhere: a restart makes it anew),
    and the stop settled only those: its claim held its room until ``reservation_ttl_s``."""
    async def go():
        catalog = default_catalog()
        budget = BudgetController(BudgetSettings(), None, ManualClock(0.0))
        d = Dispatcher("openai", catalog, Settings(), 0, ManualClock(0.0), [Recorder()], ResultHub(), None, budget)
        started, answer = asyncio.Event(), asyncio.Event()
        inner = d.provider.call

        async def held(job):  # the call is under way when the stop comes
            started.set()
            await answer.wait()
            return await inner(job)

        d.provider.call = held
        j = Job(0, req(0), "fp-0", claim="c0")
        try:
            assert not d.provider.real
            assert all(v.ok for v in await budget.reserve_many([Claim("c0", j.req.tenant, "openai", j.req.model,
                                                                       j.req.priority, 1.0)]))
            await d.run_many([BatchJob("b", "sync", None, False, "test", "test", [j])])
            await asyncio.wait_for(started.wait(), 10)
            await d.stop_spending()
            bound = reserve_bound(j.req, catalog, "sync")
            assert not budget.book.claims, "its claim still holds its room"
            assert sum(budget.book.spend.values()) == pytest.approx(bound, abs=1e-12)
            assert (await d.stats())["possibly_billed"] == 1
        finally:
            answer.set()
            for t in d._tasks:
                t.cancel()
    asyncio.run(go())


def test_a_simulated_gpu_batch_under_way_at_the_stop_is_settled_at_its_bound():
    """A GPU batch (simulated: its members end at the times its outcome drew) has no call and no record: the stop
    settled none of its members, each claim held its room until ``reservation_ttl_s``, its GPU seconds uncounted."""
    from engine.core.clock import ScaledClock
    from engine.core.request import Request

    async def go():
        catalog, clock = default_catalog(), ScaledClock(time.time(), 1.0)  # real time: its 8 s warm-up is under way
        budget = BudgetController(BudgetSettings(), None, clock)
        d = Dispatcher("modal-h100", catalog, Settings(), 0, clock, [Recorder()], ResultHub(), None, budget)
        r = Request.model_validate({"id": "g0", "arrival_s": clock.now(), "model": "flux-1-dev", "prompt": "a cat",
                                    "provider": "modal-h100", "kind": "image"})
        j = Job(0, r, "fp-0", claim="c0")
        try:
            assert all(v.ok for v in await budget.reserve_many([Claim("c0", r.tenant, r.provider, r.model,
                                                                       r.priority, 1.0)]))
            await d.run_many([BatchJob("b", "gpu_batch", None, False, "test", "test", [j])])
            assert d.in_flight == 1 and d._timers, "the GPU batch is not under way"
            await d.stop_spending()
            assert not budget.book.claims, "its claim still holds its room"
            bound = reserve_bound(r, catalog, "gpu_batch")
            assert sum(budget.book.spend.values()) == pytest.approx(bound, abs=1e-12) and bound > 0
            assert (await d.stats())["possibly_billed"] == 1
            for t in list(d._timers):  # its end, come after the stop: nothing settles again
                t._run()
            assert d._settle == [] and sum(budget.book.spend.values()) == pytest.approx(bound, abs=1e-12)
        finally:
            for t in [*d._timers, *d._tasks]:
                t.cancel()
    asyncio.run(go())


class _Fails:
    """A dispatcher's handle whose every call ends in ``err`` (Ray's error for it)."""

    def __init__(self, err: Exception):
        self.stop_spending = self.ping = SimpleNamespace(remote=lambda *a: err)


@pytest.fixture
def fake_ray(monkeypatch):
    """Ray's wait and get over ``_Fails`` handles: each call is ready at once, and raises its error."""
    import ray

    monkeypatch.setattr(engine_stop.ray, "wait", lambda refs, num_returns=1, timeout=None: (
        list(refs)[:num_returns], list(refs)[num_returns:]))

    def get(ref, timeout=None):
        raise ref

    monkeypatch.setattr(engine_stop.ray, "get", get)
    return ray


def test_a_dispatcher_that_never_comes_back_leaves_the_stop_within_its_bound_named_in_an_error(fake_ray, monkeypatch,
                                                                                               caplog):
    """Ray keeps restarting it (or cannot place it): asked again until the bound, then said, never waited on."""
    monkeypatch.setattr(stop_dispatchers, "RESTART_AT_STOP_S", 0.5)
    monkeypatch.setattr(stop_dispatchers, "STOP_CALL_S", 0.0)
    restarting = fake_ray.exceptions.ActorUnavailableError("restarting", None)
    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="smartbatch.engine"):
        assert stop_dispatchers._stop_restarted("prod", {"dispatcher-openai": _Fails(restarting)}, (None, None)) == []
    assert time.monotonic() - began < 5.0
    (said,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "prod" in said and "dispatcher-openai" in said and "may run on" in said, said


def test_a_dispatcher_another_stop_killed_is_left_alone_and_not_said(fake_ray, caplog):
    """Dead for good (its ping says so too): nothing left for this stop to cancel, nothing to say."""
    dead = fake_ray.exceptions.ActorDiedError()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="smartbatch.engine"):
        assert stop_dispatchers._stop_restarted("prod", {"dispatcher-openai": _Fails(dead)}, (None, None)) == []
    assert time.monotonic() - began < 5.0 and not caplog.records


def test_a_ctrl_c_while_the_stop_copies_the_hub_journal_still_kills_every_actor(monkeypatch):
    """The journal's copy waits up to ``JOURNAL_COPY_S`` for the hub, before any actor is killed: a Ctrl-C there
    left every actor running (a batch under way billed, never read), and what the engine published in Ray's store."""
    done: list[tuple] = []
    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: done.append(("unpublish",)))
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: done.append(("kill", *hs)) or len(hs))
    monkeypatch.setattr(engine_stop.ray, "wait", lambda *a, **k: done.append(("wait dead",)) or ([], []))

    def interrupted(engine):  # the Ctrl-C lands in Ray's wait for the copy
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_stop, "_journal_copy", interrupted)

    class Handle(str):
        ping = SimpleNamespace(remote=lambda: None)

    grouper, budget, d1 = (Handle(x) for x in ("grouper", "budget", "d1"))
    with pytest.raises(KeyboardInterrupt):
        engine_stop.kill_engine("e", [grouper, d1, budget], {"openai": d1}, budget)
    killed = {h for step in done if step[0] == "kill" for h in step[1:]}
    assert killed == {"grouper", "budget", "d1"}, done
    assert done[-1] == ("unpublish",), done


@pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")
def test_a_video_under_way_when_a_dispatcher_dies_in_the_stop_is_settled_at_its_bound_not_at_0():
    """The restarted dispatcher is cancelled before it reads its journal, so the call it resumes for a video under
    way (its job journaled: billed when it completes) ends unsent, polled no more. It was settled at 0 (no call
    of it unanswered), the video billed and counted by no ledger; the first process's stop settled it at its bound."""
    from engine.emulator import Emulator
    from tests.unit.test_http_providers import SPEED
    from tests.unit.test_video_durable import CAT, start, video

    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, "openai")
            again = None
            try:
                job, _ = await start(rig, video(), hold=True)  # its polls never answer: the process dies in them
                await asyncio.gather(*[t for t in (rig.d._jobs_journal._task,) if t])  # the video's id journaled
                copy = await rig.hub.journal_copy()
                test_stop_settles._stop_tasks(rig)
                again = Dispatcher("openai", rig.catalog, rig.settings, 0, None, [rig.grouper], _Gone(), None,
                                   rig.budget, key=rig.d._key)
                again.reconstructed()
                await asyncio.wait_for(again.stop_spending(rig.clock, [copy]), 30)
                bound = reserve_bound(job.req, rig.catalog, "sync")
                assert not rig.budget.book.claims, "its claim still holds its room"
                assert sum(rig.budget.book.spend.values()) == pytest.approx(bound, abs=1e-12)
                emu._core.clock.offset += 100_000  # the video has completed at the provider: billed
                (item,) = emu.bill().items
                assert 0 < item.cost_usd <= bound + 1e-12
                assert (await again.stats())["possibly_billed"] == 1
            finally:
                await _close(rig, again)
        asyncio.run(go())


@pytest.mark.parametrize(("keyed", "watched"), [(True, False), (False, False), (True, True)],
                         ids=["its key here", "no key here", "its members sent again"])
def test_a_dispatcher_not_back_in_time_has_its_batch_cancelled_by_the_stop_itself(keyed, watched, still,
                                                                                 monkeypatch, caplog):
    """Ray did not bring it back within the stop's bound (a restart is a new process importing the package and
    the SDK: 37 s and more at load 12 on 2 cores, stop 81). The stop named the dispatcher at ERROR and left its
    batch to run on, billed, its claims held until ``reservation_ttl_s``. Now the stopping process reads the batch
    from the journal's copy, cancels it by its id with its own key, and settles its members at their bounds; with
    no key in its environment (a stop by name from another shell) it names the batch it could not cancel. A batch
    whose members went again (a hedge: ``batches:<p>:watch``) still runs, billed: cancelled too, its members'
    claims left to their sync calls."""
    import pickle

    import ray

    monkeypatch.setattr(stop_dispatchers, "RESTART_AT_STOP_S", 0.3)
    monkeypatch.setattr(stop_dispatchers, "STOP_CALL_S", 0.0)
    monkeypatch.setattr(engine_stop.ray, "wait", lambda refs, num_returns=1, timeout=None: (
        list(refs)[:num_returns], list(refs)[num_returns:]))

    def get(ref, timeout=None):
        if isinstance(ref, BaseException):
            raise ref
        return ref

    monkeypatch.setattr(engine_stop.ray, "get", get)
    for name in ("unpublish_layout", "_clean_once_dead"):
        monkeypatch.setattr(engine_stop, name, lambda *a: None)
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: len(hs))
    settled: list = []

    class Budget:  # the controller, kept alive by the stop until the dispatchers are done
        settle_many = SimpleNamespace(remote=lambda items: settled.extend(items) or True)
        ping = SimpleNamespace(remote=lambda: None)

    slow_cancel_emu, clock = still

    async def go():
        rig = Rig(slow_cancel_emu, "openai", clock=clock)
        try:
            jobs = jobs_of("openai", claims=True)
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs, hedge_at=FAR)
            await rig.until(lambda: [r for r in rig.d._open.values() if r[4] is not None], "the batch created")
            copy = await rig.hub.journal_copy()
            test_stop_settles._stop_tasks(rig)  # its process dies, and Ray does not bring it back in time
            if watched:  # as ``BatchWatch._watch`` journals it (the batch's own record kept beside it)
                copy["batches:openai:watch"] = {k: pickle.dumps((r[0]._replace(jobs=[]), r[4], r[1], r[2], False))
                                                for k, r in rig.d._open.items()}
            monkeypatch.setattr(engine_stop, "_journal_copy", lambda engine: copy)
            env = rig.settings.providers.endpoints["openai"].api_key_env
            monkeypatch.setenv(env, KEY) if keyed else monkeypatch.delenv(env, raising=False)
            (bid,) = [r[4].id for r in rig.d._open.values()]
            d = _Fails(ray.exceptions.ActorUnavailableError("restarting", None))
            told: list = []
            layout = {"settings": rig.settings, "catalog": rig.catalog, "kinds": []}
            with caplog.at_level(logging.WARNING, logger="smartbatch.engine"):
                await asyncio.to_thread(engine_stop.kill_engine, "prod", [d, Budget], {"openai": d}, Budget,
                                        claim={"layout": layout}, on_left=lambda n, left: told.append((n, left)))
            return jobs, bid, told
        finally:
            await rig.close()

    jobs, bid, told = asyncio.run(go())
    assert slow_cancel_emu.count("batches.cancel", "openai", 200) == int(keyed), slow_cancel_emu.counters()
    bounds = {} if watched else {j.claim: reserve_bound(j.req, default_catalog(), "batch_api") for j in jobs}
    assert dict(settled) == pytest.approx(bounds, abs=1e-12)
    ((name, left),) = told
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    said = " ".join(r.getMessage() for r in caplog.records)
    if keyed:
        assert (name, left.cancelled, left.not_cancelled) == ("dispatcher-openai", [bid], [])
        assert bid in said and "cancelled its provider batch(es) itself" in said and not errors, said
    else:  # said precisely: which batch runs on, and why
        assert (left.cancelled, [b for b, _ in left.not_cancelled]) == ([], [bid])
        assert bid in errors and "NOT cancelled" in errors and "no key" in errors, errors


def test_the_kept_report_reads_the_budget_again_when_a_dispatcher_is_not_back_and_says_what_the_stop_did(
        monkeypatch):
    """The report kept at the stop reads the budget and the dispatchers' stats again once the stop has settled
    what it cut short. Read as one, a dispatcher not back from its restart (its stats not answered) left the budget
    as it was before the stop's settlements: the claims the stop had settled still shown reserved."""
    import ray

    from actors._stop_left import Left
    from engine.app import _ledger_stop
    from engine.app._driver_report import Reporting

    monkeypatch.setattr(_ledger_stop, "keep_ledger", lambda *a: None)
    after = {"budgets": [{"spent_usd": 0.02, "reserved_usd": 0.0}]}

    class Ray:
        exceptions = ray.exceptions

        @staticmethod
        def get(refs, timeout=None):
            if err := [r for r in refs if isinstance(r, BaseException)]:
                raise err[0]
            return refs

    class Eng:
        _ray, name, settings, _ledger_dir = Ray, "prod", None, None
        _h = {"budget": SimpleNamespace(report=SimpleNamespace(remote=lambda: after)),
              "dispatchers": {"openai": _Fails(ray.exceptions.GetTimeoutError("not back"))}}
        _last_report = {"budget": {"budgets": [{"spent_usd": 0.0, "reserved_usd": 0.02}], "rejected": {}},
                        "providers": {"openai": {"possibly_billed": 0, "possibly_billed_usd": 0.0}}}

    eng = Eng()
    eng._left_at_stop = {}  # (declared by ``Engine.__init__``)
    Reporting._note_left(eng, "dispatcher-openai", Left(cancelled=["batch_1"], settled=[("c0", 0.01), ("c1", 0.01)]))
    Reporting._keep_ledger(eng)
    rep = eng._last_report
    assert rep["budget"]["budgets"] == after["budgets"], rep["budget"]
    said = rep["providers"]["openai"]
    assert (said["possibly_billed"], said["possibly_billed_usd"]) == (2, pytest.approx(0.02)), said
    assert said["left_at_stop"] == {"cancelled": ["batch_1"], "not_cancelled": [], "unread": None}, said
