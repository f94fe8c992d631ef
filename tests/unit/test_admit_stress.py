"""A property of the driver's admission (``engine.app._driver_admit``) under concurrent calls of overlapping ids,
let in by parts or not: every future handed out resolves, or ends failed by the stop; no request reaches ingest
twice (one refused for its id, free again, aside); at most ``max_pending`` are unfinished; their count returns to 0;
one future per id. The real driver over fake handles (``test_admit_parts``): its own flush thread, a fake ingest,
results set as the pull loop sets them, in random order, some refusing the id; Ctrl-Cs in waits for room; a stop
midway. Seeded: a failure names its seed (the interleaving of the threads is not, so it may take a few runs to come
back). ``SMARTBATCH_STRESS_SEEDS=N`` runs more (the review of stop 78 ran about 4,000)."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest

from engine.core.errors import EngineStopped, Overloaded, RequestError
from engine.core.result import ID_TAKEN, Result

from .test_admit_parts import _Ingest, _with_flusher

SEEDS = int(os.environ.get("SMARTBATCH_STRESS_SEEDS", "8"))


def _dict(k: int, other: bool = False) -> dict:
    return {"id": f"q{k}", "model": "gpt-5.4-mini", "prompt": f"other {k}" if other else f"hi {k}"}


def _sent(e) -> list:
    with _Ingest.called:
        return [r for name, args, _ in e.log if name == "submit" for r in args[0]]


def _run(monkeypatch, seed: int) -> None:
    from tests.unit.test_driver_tour import _bulk_engine

    rnd = random.Random(seed)
    e = _bulk_engine(monkeypatch)
    e._cut_short, e._last_report = False, None  # as Engine.__init__ sets them
    e._max_pending = max_pending = rnd.choice([1, 2, 3, 5, 8])
    e._micro_batch = rnd.choice([1, 2, 1000])
    e._submit_timeout_s = 10.0  # results keep coming: a wait never lasts this long
    ctrl_c = threading.local()  # a submitter's wait for room that a Ctrl-C ends (the lock taken back)

    class _Room(threading.Condition):
        def wait(self, timeout=None):
            got = super().wait(timeout)
            if getattr(ctrl_c, "plan", None) is not None and ctrl_c.plan.random() < 0.05:
                raise KeyboardInterrupt
            return got

    e._room = _Room(e._lock)
    stop_flusher = _with_flusher(e)
    ids = rnd.randint(10, 60)
    id_taken: dict = {}  # uid -> how many of its futures were refused for their id (free again: sent again)
    got: list = []  # futures handed out, by every path
    outcome: list = []
    failures: list = []
    peak, lock, done = [0], threading.Lock(), threading.Event()

    def keep(futs) -> None:
        with lock:
            got.extend(futs)

    def submitter(plan: random.Random) -> None:
        ctrl_c.plan = plan
        for _ in range(plan.randint(2, 6)):
            dicts = [_dict(plan.randrange(ids), other=plan.random() < 0.02)
                     for _ in range(plan.randint(1, 3 * max_pending + 2))]
            how = plan.choice(["many", "many", "one", "replay", "async", "async-cancel"])
            into: list = []
            try:
                if how == "many":
                    keep(e.submit_many(dicts))
                elif how == "one":
                    keep([e.submit(dicts[0])])
                elif how == "replay":
                    e.replay([{**d, "arrival_s": 0.0} for d in dicts], into=into)
                else:
                    async def go(cancel: bool = how == "async-cancel") -> None:
                        task = asyncio.ensure_future(e.asubmit_futures(dicts))
                        if cancel:
                            await asyncio.sleep(0)
                            task.cancel()
                        keep(await task)

                    asyncio.run(go())
                outcome.append("ok")
            except Overloaded as exc:
                keep(exc.futures)
                outcome.append("Overloaded")
            except (KeyboardInterrupt, RequestError, EngineStopped, asyncio.CancelledError) as exc:
                outcome.append(type(exc).__name__)
            asked = {d["id"]: d["prompt"] for d in dicts}
            if wrong := [f.request_id for f in into if f._req.prompt != asked.get(f.request_id)]:
                failures.append(f"a replay was handed futures of other requests: {wrong}")
            keep(into)
            if outcome[-1] == "EngineStopped":
                return

    def resolver(plan: random.Random) -> None:
        """As the pull loop: results of requests sent, a random few at a time, to the future each id has now."""
        while not done.is_set():
            with _Ingest.called:
                _Ingest.called.wait(0.005)  # (a pace, not a wait for an event: it answers what it finds each time)
            sent = _sent(e)
            with e._lock:
                peak[0] = max(peak[0], e._pending)
                due = list({id(f): f for r in sent if (f := e._futs.get(r.uid)) is not None and not f.done()}.values())
            plan.shuffle(due)
            for f in due[:plan.randint(0, len(due))]:
                if plan.random() < 0.03:  # ingest refused its id (another driver's): free again here
                    id_taken[f._req.uid] = id_taken.get(f._req.uid, 0) + 1
                    e._resolve(f, Result(id=f.request_id, tenant=f.tenant, status="rejected", reason=ID_TAKEN))
                else:
                    e._resolve(f, Result(id=f.request_id, tenant=f.tenant, status="ok"))

    threads = [threading.Thread(target=submitter, args=(random.Random(rnd.random()),)) for _ in range(4)]
    answering = threading.Thread(target=resolver, args=(random.Random(rnd.random()),))
    answering.start()
    for t in threads:
        t.start()
    stopping = rnd.random() < 0.3
    if stopping:  # once one submitter is through: the others meet it anywhere
        threads[0].join(30)
        e.stop()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), f"seed {seed}: a submit hung"
    done.set()
    answering.join(10)
    stop_flusher()
    if not stopping:  # what is still open: sent now (the flush thread's turn, as a stop does), and answered
        e._flush()
        e._lanes_turn(force=True)
        with e._lock:
            due = [f for r in _sent(e) if (f := e._futs.get(r.uid)) is not None and not f.done()]
        for f in due:
            e._resolve(f, Result(id=f.request_id, tenant=f.tenant, status="ok"))
    assert not failures, f"seed {seed}: {failures}"
    sent = [r.uid for r in _sent(e)]
    twice = sorted({u for u in sent if sent.count(u) > 1 + id_taken.get(u, 0)})
    assert not twice, f"seed {seed}: sent to ingest twice: {twice} ({outcome})"
    hung = [f.request_id for f in got if not f.done()]
    assert not hung, f"seed {seed}: {len(hung)} futures handed out never resolved: {hung[:5]} ({outcome})"
    held = [f.request_id for f in e._futs.values() if not f.done()]
    assert not held, f"seed {seed}: {len(held)} futures held open by the driver: {held[:5]} ({outcome})"
    assert e._pending == 0, f"seed {seed}: {e._pending} counted unfinished with none open ({outcome})"
    assert peak[0] <= max_pending, f"seed {seed}: {peak[0]} unfinished under max_pending={max_pending}"
    one: dict = {}
    for f in got:  # every holder of an id got its one future (unless the id was freed meanwhile)
        if one.setdefault(f._req.uid, f) is not f and f._req == one[f._req.uid]._req:
            assert f._req.uid in id_taken, f"seed {seed}: two futures for {f.request_id} ({outcome})"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_concurrent_calls_by_parts_resolve_every_future_send_each_request_once_and_keep_max_pending(
        monkeypatch, seed):
    _run(monkeypatch, seed)
