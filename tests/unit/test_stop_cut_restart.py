"""A dispatcher Ray restarts during the engine's stop (``actors/_stop_cut_dispatch.py``), after a batch the stop
took left its journal record (the process dead once the write was done, before the delete): it never creates that
batch, however its restart and the stop's publishing are ordered, and the claims of the members the stop named
settle once, at 0. A dispatcher over HTTP at the emulator (``Rig``), Ray's store and the stop's calls faked; no
Ray."""

from __future__ import annotations

import asyncio
import pickle

from engine.core.provider_api import Secret
from tests.unit.test_http_providers import KEY, Rig, emu, jobs_of  # noqa: F401  (``emu``: a fixture)
from tests.unit.test_withdraw import _held_once

UPLOAD, CREATE = "files.create", "batches.create"


def _fake_store(monkeypatch) -> dict:
    from ray.experimental import internal_kv

    store: dict = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get(key))
    monkeypatch.setattr(internal_kv, "_internal_kv_put",
                        lambda key, value, overwrite=True, namespace=None: store.__setitem__(key, value))
    return store


async def _taken_and_dead(rig: Rig, jobs) -> tuple[asyncio.Event, asyncio.Event]:
    """Run a batch of ``jobs`` at ``rig``'s dispatcher until its record is written; its process then hangs, as dead
    (the write's answer never heard). Returns (written, dead): set ``dead`` at the end to let the hang go."""
    inner, written, dead = rig.d.journal.put, asyncio.Event(), asyncio.Event()

    async def put(*a, **kw):
        await inner(*a, **kw)
        written.set()
        await dead.wait()
    rig.d.journal.put = put
    await rig.reserve(jobs)
    await rig.run("batch_api", jobs)
    await asyncio.wait_for(written.wait(), 10.0)
    return written, dead


def _killed(rig: Rig) -> None:
    """The process dies: what it had not sent (its settlements at 0 of the members it named) dies with it."""
    rig.d._settle.clear()
    for t in list(rig.d._tasks):
        t.cancel()


def _restarted(rig: Rig):
    from actors.dispatcher import Dispatcher

    d2 = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None, rig.budget,
                    key=Secret(KEY))
    d2.reconstructed()
    return d2


def test_a_restart_that_reads_its_journal_before_the_stop_publishes_never_creates_the_taken_batch(emu, monkeypatch):  # noqa: F811
    """The stop (``cut_unsent``, run as the driver does, off the event loop) asks the dispatcher, which takes the
    batch and names its members; its process dies, and Ray's restart, woken by a grouper's late dispatch, reads its
    journal while the stop still waits for its answers, before it publishes them. The cut create is looked for,
    never made: the stop's mark, written before it asked anyone. Fails on the code before (guarded by the published
    list alone): ``assert 1 == 0``, ``count('files.create')``: uploaded and created, members told never sent."""
    import ray

    from actors import _stop_cut

    store = _fake_store(monkeypatch)
    jobs = jobs_of("openai", claims=True)

    async def go():
        rig, d2, dead = Rig(emu, "openai"), [], None
        loop = asyncio.get_running_loop()
        try:
            _, dead = await _taken_and_dead(rig, jobs)

            async def restart() -> None:  # within the stop's wait for its answers
                _killed(rig)
                d2.append(_restarted(rig))
                await d2[0].recover()  # (a grouper's ``run_many`` waits for this: ``_ready``)
                await rig.until(lambda: emu.count(UPLOAD) or not d2[0]._open, "its cut create's end")

            def wait(refs, num_returns, timeout):
                for r in refs:
                    r.result(10.0)
                asyncio.run_coroutine_threadsafe(restart(), loop).result(30.0)
                assert _stop_cut.read_cut("engine") == frozenset()  # (not published yet)
                return refs, []

            monkeypatch.setattr(ray, "wait", wait)
            monkeypatch.setattr(ray, "get", lambda ref: ref.result(10.0))
            handle = type("H", (), {})()
            handle.cut_at_stop = type("M", (), {"remote": staticmethod(
                lambda: asyncio.run_coroutine_threadsafe(rig.d.cut_at_stop(), loop))})()
            named = await asyncio.to_thread(_stop_cut.cut_unsent, "engine", [], dispatchers=[handle])
            assert named == {j.req.uid for j in jobs} == _stop_cut.read_cut("engine")
            assert emu.count(UPLOAD) == 0 and emu.count(CREATE) == 0 and emu.bill().items == ()
        finally:
            if dead is not None:
                dead.set()
            for d in d2:
                await d.provider.close()
            await rig.close()
    asyncio.run(go())
    assert store  # (the mark and the list, in the faked store)


def test_a_restart_in_the_stop_settles_the_named_members_claims_once_at_0(emu, monkeypatch):  # noqa: F811
    """The restarted process is the one the stop's cancel wakes (``stop_spending``), after the stop published its
    members never sent; the process that named them died before its settlements at 0 left. Its cut create's
    lookup is slower than the cancel's wait: the members' claims settle at 0, once, none counted possibly billed,
    no batch under way. Fails on the code before: ``(1, 1, 0) == (0, 0, 0)``, the members resumed in a batch under
    way and settled at their bound, possibly billed: the ledger's spend $0.5+ for 4 requests never sent."""
    from actors import _cancel, _stop_cut

    monkeypatch.setattr(_cancel, "CANCEL_CALL_S", 0.2)  # (the cancel's wait, shorter than the lookup's hold)
    store = _fake_store(monkeypatch)
    jobs = jobs_of("openai", claims=True)

    async def go():
        rig, d2, dead = Rig(emu, "openai"), None, None
        release = asyncio.Event()
        try:
            _, dead = await _taken_and_dead(rig, jobs)
            store[_stop_cut._key("engine")] = pickle.dumps(frozenset(await rig.d.cut_at_stop()))
            _killed(rig)
            d2 = _restarted(rig)
            _, release = _held_once(d2.provider, "find_batch")
            assert await d2.stop_spending(rig.clock, None) == (0, 0, 0)
            assert d2.possibly_billed == 0 and d2.possibly_billed_usd == 0.0
            assert await d2.budget.delivered(5.0)
            assert not rig.budget.book.claims and sum(rig.budget.book.spend.values()) == 0.0
            assert emu.count(UPLOAD) == 0 and emu.count(CREATE) == 0
        finally:
            release.set()
            if dead is not None:
                dead.set()
            if d2 is not None:
                await d2.provider.close()
            await rig.close()
    asyncio.run(go())
