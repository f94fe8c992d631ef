"""One stop of an engine at a time, and a stop whose process died taken over (``actors._stop_claim``), without Ray:
its key-value store and its jobs table are stand-ins patched where Ray's own functions are read.

Two ``smartbatch stop --name`` at once both stopped the engine: one killed the budget controller under the other's
wait for Redis and said at ERROR that what it held was dropped, or said that no engine of that name ran. A stopper
killed outright (``kill -9``) left its mark until Ray restarted: every later start of the name was refused, and the
budget controller ran on with what waited for Redis."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading
from types import SimpleNamespace

import pytest
import ray
from ray._private import state
from ray.experimental import internal_kv

from actors import _engine_stop as engine_stop
from actors import _stop_claim as claim_mod

KEY = "e:stopping"


class Ray:
    """Ray's store (``internal_kv``: a put without overwrite is atomic, and says whether the key was there) and
    its jobs table; ``job``: the job of the process asking now (per thread)."""

    def __init__(self, monkeypatch) -> None:
        self.kv: dict[bytes, bytes] = {}
        self.dead: set[str] = set()
        self.lock, self.local = threading.Lock(), threading.local()
        self.local.job = "j-main"
        monkeypatch.setattr(internal_kv, "_internal_kv_put", self.put)
        monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda k, namespace=None: self.kv.get(self._b(k)))
        monkeypatch.setattr(internal_kv, "_internal_kv_exists", lambda k, namespace=None: self._b(k) in self.kv)
        monkeypatch.setattr(internal_kv, "_internal_kv_del", self.delete)
        monkeypatch.setattr(internal_kv, "_internal_kv_list",
                            lambda p, namespace=None: [k for k in self.kv if k.startswith(self._b(p))])
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "get_runtime_context",
                            lambda: SimpleNamespace(get_job_id=lambda: getattr(self.local, "job", "j-main")))
        monkeypatch.setattr(state, "jobs", lambda: [{"JobID": j, "IsDead": j in self.dead} for j in self.jobs()])

    @staticmethod
    def _b(k) -> bytes:
        return k.encode() if isinstance(k, str) else k

    def put(self, k, v, overwrite=True, namespace=None) -> bool:
        with self.lock:
            there = self._b(k) in self.kv
            if overwrite or not there:
                self.kv[self._b(k)] = self._b(v)
            return there

    def delete(self, k, del_by_prefix=False, namespace=None) -> int:
        return int(self.kv.pop(self._b(k), None) is not None)

    def jobs(self) -> set[str]:
        seen = {"j-main", *self.dead}
        for raw in self.kv.values():
            try:
                seen.add(pickle.loads(raw).get("job"))
            except Exception:
                pass
        return seen

    def mark(self, job: str, layout: dict | None = None, **more) -> dict:
        rec = {"token": f"t-{job}", "job": job, "pid": 1, "host": "h", "at": 0.0, "layout": layout, "kept": None,
               **more}
        self.kv[KEY.encode()] = pickle.dumps(rec)
        return rec


def test_a_second_stop_waits_for_the_first_and_is_told_so_rather_than_stop_beside_it(monkeypatch):
    fake = Ray(monkeypatch)
    first = claim_mod.take_stop("e", {"kinds": ["budget"]})
    assert first["job"] == "j-main" and claim_mod.read_stop("e")["token"] == first["token"]
    told, out = threading.Event(), {}

    def second() -> None:
        fake.local.job = "j-second"
        out["claim"] = claim_mod.take_stop("e", {"kinds": ["budget"]}, 30.0,
                                           lambda rec: (out.setdefault("told", rec), told.set()))

    t = threading.Thread(target=second)
    t.start()
    assert told.wait(10)  # told while the first runs, and waiting
    assert out["told"]["token"] == first["token"] and "claim" not in out
    fake.delete(KEY)  # the first stop's last clean
    t.join(10)
    assert not t.is_alive() and out["claim"] is None  # it has ended: the engine is stopped, nothing to do here


def test_the_engine_stop_beside_a_live_stop_kills_nothing_and_keeps_no_ledger(monkeypatch):
    """``kill_engine`` (a ``stop --name``, a ``serve``'s Ctrl-C) while another process's stop of the engine runs:
    before, it killed the actors and asked the budget controller beside that stop, one of the two killing the
    controller under the other's wait for Redis."""
    fake = Ray(monkeypatch)
    fake.mark("j-other", {"kinds": ["budget"]})
    done: list[tuple] = []
    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: None)
    monkeypatch.setattr(engine_stop, "unpublish_layout", lambda engine: None)
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: done.append(("kill", *hs)) or len(hs))
    monkeypatch.setattr(engine_stop, "_cancel_batches", lambda engine, ds, *more: done.append(("cancel",)))
    monkeypatch.setattr(engine_stop, "_journal_copy", lambda engine: None)
    monkeypatch.setattr(engine_stop.ray, "wait", lambda *a, **k: ([], []))
    assert engine_stop.kill_engine("e", ["grouper", "d1", "budget"], ["d1"], "budget",
                                   lambda: done.append(("keep ledger",))) == 0
    assert done == [] and pickle.loads(fake.kv[KEY.encode()])["job"] == "j-other"


def test_a_stop_whose_process_died_is_taken_over_once_and_a_live_or_unknown_one_never(monkeypatch):
    fake = Ray(monkeypatch)
    layout = {"kinds": ["budget", "dispatcher-openai"], "ledger_dir": "/l"}
    fake.mark("j-live", layout)
    assert claim_mod.take_stop("e", None) is None  # alive: left to it
    fake.kv[KEY.encode()] = pickle.dumps({"token": "t", "job": "j-gone-from-the-table", "layout": layout})
    monkeypatch.setattr(fake, "jobs", lambda: {"j-main"})
    assert claim_mod.take_stop("e", None) is None  # a job the GCS does not know: never taken for dead
    monkeypatch.undo()
    fake = Ray(monkeypatch)
    dead = fake.mark("j-dead", layout, kept="/l/x.outbox")
    fake.dead.add("j-dead")
    taker = claim_mod.take_stop("e", None)
    assert taker["layout"] == layout and taker["taken_over"]["token"] == dead["token"]
    assert taker["kept"] == "/l/x.outbox" and claim_mod.read_stop("e")["token"] == taker["token"]
    fake.local.job = "j-late"
    assert claim_mod.take_stop("e", None) is None  # one taker: the others see it, alive, and leave it the stop
    claim_mod.drop_marks("e")
    fake.delete(KEY)
    assert fake.kv == {}  # nothing left to block the name


@pytest.mark.parametrize("kept_before", [False, True], ids=["died before keeping", "died after keeping"])
def test_a_taken_over_stop_finishes_the_dead_one_s_work_and_keeps_its_ledger_once(monkeypatch, tmp_path,
                                                                                   kept_before):
    """Its actors found by the dead stopper's layout (the engine's own is gone), killed, the dispatchers asked to
    cancel, and the ledger kept unless the dead one's file was written whole (``os.replace``: there or not)."""
    fake = Ray(monkeypatch)
    kept = tmp_path / "1-x.outbox"
    if kept_before:
        kept.write_bytes(b"kept")
    fake.mark("j-dead", {"kinds": ["ingest", "budget", "dispatcher-openai"]}, kept=str(kept))
    fake.dead.add("j-dead")
    done: list[tuple] = []
    monkeypatch.setattr(engine_stop, "unpublish_clock", lambda engine: done.append(("clean",)))
    monkeypatch.setattr(engine_stop, "unpublish_layout", lambda engine: None)
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: done.append(("kill", *hs)) or len(hs))
    monkeypatch.setattr(engine_stop, "_cancel_batches", lambda engine, ds, *more: done.append(("cancel", *ds)))
    monkeypatch.setattr(engine_stop, "_journal_copy", lambda engine: None)
    monkeypatch.setattr(engine_stop.ray, "wait", lambda *a, **k: ([], []))
    alive = {"e.ingest": "ingest", "e.budget": "budget", "e.dispatcher-openai": "d1"}

    def get_actor(name, namespace=None):
        if name not in alive:
            raise ValueError(name)
        return alive[name]

    monkeypatch.setattr(engine_stop.ray, "get_actor", get_actor)
    import engine.app._ledger_stop as ledger_stop

    monkeypatch.setattr(ledger_stop, "keep_named", lambda ray_, engine, layout: done.append(("keep ledger",)))
    assert ledger_stop.take_over_dead(ray, "e") is True
    keep = [] if kept_before else [("keep ledger",)]
    assert done == [("kill", "ingest"), ("cancel", "dispatcher-openai"), *keep, ("kill", "budget", "d1"),
                    ("clean",)]


def test_a_start_of_the_name_finishes_the_stop_of_a_dead_stopper_rather_than_refuse(monkeypatch):
    """Before, the start said the engine was being stopped, until Ray restarted: nothing would ever end it."""
    fake = Ray(monkeypatch)
    fake.mark("j-dead", {"kinds": ["budget"]})
    fake.dead.add("j-dead")
    alive = {"e.budget"}
    import engine.app._ledger_stop as ledger_stop
    from engine.app import _driver_shared as shared

    def get_actor(name, namespace=None):
        if name not in alive:
            raise ValueError(name)
        return name

    def finish(ray_, engine, claim):
        alive.clear()  # its leftover actors killed, its ledger kept
        fake.delete(KEY)
        return 1

    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(ledger_stop, "stop_claimed", finish)
    shared.check_not_stopping("e")  # no ConfigError: the name is free again
    assert alive == set() and fake.kv == {b"e:stopping#t-j-dead": b"1"}  # (its token's mark goes at the clean)


def test_leave_waits_for_items_out_in_a_call_rather_than_answer_nothing_left():
    """A ledger call still out when ``leave`` looks (another ``leave``'s: a stop taken over from one whose process
    died; or the flusher's) holds the settlement and the charge in neither list: ``leave`` answered {} once it had
    waited a timeout and a second, and the stop killed the controller with them ($2 kept in no file)."""
    import redis

    from actors import BudgetController
    from engine.core.budgets import BudgetSettings, BudgetSpec, Charge
    from engine.core.clock import ManualClock

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),), redis_timeout_s=0.05,
                              redis_url=f"redis://127.0.0.1:{port}/0", redis_retry_s=0.01)

    async def go():
        ctl = BudgetController(settings, None, ManualClock(100.0))
        try:
            await ctl.settle_many([("a0", 1.5)])  # Redis away: kept in the outbox
            await ctl.charge_many([Charge("m1", "acme", "openai", "gpt-5-mini", 0.5)])
            gate = asyncio.Event()

            async def out_long(*a, **k):  # a call to a Redis that takes its time to fail (a paused one)
                await gate.wait()
                raise redis.exceptions.TimeoutError("Timeout reading")

            ctl.book.settle_many, ctl.book.charge_many = out_long, out_long
            ctl._down_until = 0.0
            calls = [asyncio.ensure_future(ctl._settle([])), asyncio.ensure_future(ctl._charge())]
            await asyncio.sleep(0)  # (each has taken its items out: the lists are empty)
            assert not ctl._outbox and not ctl._charges and ctl._settling == 2
            asyncio.get_running_loop().call_later(1.3, gate.set)  # past the old wait (0.05 s and a second)
            left = await asyncio.wait_for(ctl.leave(2.0), 10)
            await asyncio.gather(*calls)
            return left
        finally:
            await ctl.close()
    left = asyncio.run(go())
    assert (left.get("settlements"), left.get("charges"), left.get("unsettled_usd")) == (1, 1, 2.0), left


def test_a_stopper_in_a_detached_actor_whose_creating_job_ended_is_alive_not_taken_over(monkeypatch):
    """A stop run inside a Ray actor names the job of the driver that created the actor: a detached one outlives
    that driver, whose job the GCS marks dead (seen on Ray 2.60: the actor ALIVE, its job ``IsDead``, its pid not
    the job's ``DriverPid``). Read by its job alone, the live stop was taken over: two stops at once, each killing
    and keeping. An actor stopper is judged by its actor: dead, or restarted (another pid), is gone."""
    fake = Ray(monkeypatch)
    table = {"State": "ALIVE", "Pid": os.getpid()}
    monkeypatch.setattr(state, "actors", lambda actor_id=None, **k: dict(table) if actor_id == "a-1" else {})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(
        get_job_id=lambda: getattr(fake.local, "job", "j-main"),
        get_actor_id=lambda: getattr(fake.local, "actor", None)))
    fake.local.job, fake.local.actor = "j-creator", "a-1"
    live = claim_mod.take_stop("e", {"kinds": ["budget"]})
    fake.dead.add("j-creator")  # its creating driver exits; the actor, mid-stop, runs on
    fake.local.job, fake.local.actor = "j-second", None
    assert claim_mod.take_stop("e", None) is None  # left to the live stop
    assert claim_mod.read_stop("e")["token"] == live["token"]
    table["Pid"] = os.getpid() + 1  # Ray restarted it: the process running the stop died
    taker = claim_mod.take_stop("e", None)
    assert taker["taken_over"]["token"] == live["token"] and taker["layout"] == {"kinds": ["budget"]}


def test_a_second_stop_whose_first_gave_up_before_any_kill_stops_the_engine_rather_than_say_it_is_stopped(
        monkeypatch):
    """``Engine.stop_named`` gives its mark up when it fails before its first kill (its drain raised, a Ctrl-C
    there): the engine runs on, its layout published. A stop waiting for it took the mark's going for the end of
    the stop: ``smartbatch stop`` printed "engine 'e' stopped, by the stop that was under way" and exited 0, and an
    owner's ``stop()`` killed nothing, the engine running on."""
    fake = Ray(monkeypatch)
    layout = {"kinds": ["budget"], "ledger_dir": "/l"}
    fake.kv[b"e:layout"] = pickle.dumps(layout)
    first = claim_mod.take_stop("e", layout)
    told, out = threading.Event(), {}

    def second() -> None:
        fake.local.job = "j-second"
        out["claim"] = claim_mod.take_stop("e", layout, 30.0, lambda rec: told.set())

    t = threading.Thread(target=second)
    t.start()
    assert told.wait(10)
    claim_mod.release_stop("e", first)  # it stopped nothing: the engine and its layout are there
    t.join(10)
    assert not t.is_alive() and out["claim"] is not None and out["claim"]["layout"] == layout
    assert claim_mod.read_stop("e")["token"] == out["claim"]["token"]  # this one runs the stop now


def test_a_dead_stop_finished_by_another_while_this_one_read_the_jobs_table_is_not_taken_over_again(monkeypatch):
    """Two processes find the stopper dead; the first takes its stop over and finishes it (its marks removed, the
    name free, maybe started again) while the second still reads the GCS's jobs table. The second then marked the
    dead one's token (gone with the first's clean), wrote its own mark over the free name and ran the dead stop
    again by its layout: the actors of that name killed, a new engine's too."""
    fake = Ray(monkeypatch)
    layout = {"kinds": ["budget"]}
    fake.mark("j-dead", layout)
    fake.dead.add("j-dead")
    gone, once = claim_mod.stopper_gone, []

    def slow_read(rec):  # the other process's whole take-over ends meanwhile
        answer = gone(rec)
        if once:
            return answer
        once.append(1)
        fake.local.job = "j-first"
        first = claim_mod.take_stop("e", None)
        assert first["taken_over"]["job"] == "j-dead"
        claim_mod.drop_marks("e")
        fake.delete(KEY)
        fake.local.job = "j-main"
        return answer

    monkeypatch.setattr(claim_mod, "stopper_gone", slow_read)
    assert claim_mod.take_stop("e", None, 5.0) is None  # ended: nothing to stop here
    assert fake.kv == {}  # no mark left to block the name


def test_a_stop_by_name_that_fails_before_any_kill_gives_its_mark_up(monkeypatch):
    """``kill_engine`` by name finds the engine's actors by their names first: a failure there (the GCS not
    answering) left its mark, so while this process lived every start of the name was refused as being stopped,
    and its own next stop waited for itself, then failed."""
    fake = Ray(monkeypatch)
    fake.kv[b"e:layout"] = pickle.dumps({"kinds": ["budget"]})

    def get_actor(name, namespace=None):
        raise ray.exceptions.RaySystemError("the GCS did not answer")

    monkeypatch.setattr(engine_stop.ray, "get_actor", get_actor)
    with pytest.raises(ray.exceptions.RaySystemError):
        engine_stop.kill_engine("e")
    assert claim_mod.read_stop("e") is None and claim_mod.take_stop("e", None) is not None
