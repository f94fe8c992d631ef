"""A stop takes a batch over HTTP whose create has not begun (``actors/_stop_cut_dispatch.py``): journaled before
its first HTTP call (an OpenAI upload, an Anthropic create), the stop's word during that write names its fresh
members and the batch is never uploaded nor created. Before (stop 82's ``cutq82`` left it), the stop named none of
them, and the batch was uploaded and created after the stop's word, its members billed, the endpoint's answer the
final 502. A dispatcher over HTTP at the emulator (``Rig``), its journal write held."""

from __future__ import annotations

import asyncio

import pytest

from engine.core.provider_api import Secret
from engine.core.result import ENGINE_CANCELLED
from tests.unit.test_http_providers import KEY, Rig, emu, jobs_of  # noqa: F401  (``emu``: a fixture)
from tests.unit.test_withdraw import _held_once

UPLOAD = {"openai": "files.create", "anthropic": "messages.batches.create"}
CREATE = {"openai": "batches.create", "anthropic": "messages.batches.create"}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_batch_journaled_before_its_create_when_the_stop_comes_is_named_and_never_created(emu, provider):  # noqa: F811
    """Fails on the code before: ``assert [] == [...]`` (nothing named), and the batch was created."""
    jobs = jobs_of(provider, claims=True)

    async def go():
        rig = Rig(emu, provider)
        held, release = _held_once(rig.d.journal, "put")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await asyncio.wait_for(held.wait(), 10.0)
            named = await rig.d.cut_at_stop()
            assert sorted(named) == sorted(j.req.uid for j in jobs)
            release.set()
            await rig.until(lambda: len(rig.results) == len(jobs), "every answer")
            assert all(r.status == "failed" and r.error == ENGINE_CANCELLED and r.cost_usd == 0.0
                       for r in rig.results.values()), rig.results
            assert emu.count(UPLOAD[provider]) == 0 and emu.count(CREATE[provider]) == 0 and emu.bill().items == ()
            assert rig.grouper.readmitted() == []
            await rig.settled_to(0.0)  # (every claim let go at 0, nothing under way, its journal record gone)
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())


def test_a_batch_the_stop_took_while_its_record_was_written_is_no_batch_under_way_for_the_stops_cancel(emu, monkeypatch):  # noqa: F811
    """The stop's cancel (``stop_spending``) comes while the record of a batch the stop took is still being written:
    that batch is not one under way. Fails on the code before (a review, ``rvcut2_82``): ``(1, 1, 0)``, the batch
    counted under way and "no cancel reached" it, its 4 named members' claims settled again at their batch bound
    and counted possibly billed ($0.51), for a batch never created."""
    from actors import _cancel

    monkeypatch.setattr(_cancel, "CANCEL_CALL_S", 0.2)  # (before, the cancel waited this long for that record)
    jobs = jobs_of("openai", claims=True)

    async def go():
        rig = Rig(emu, "openai")
        held, release = _held_once(rig.d.journal, "put")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await asyncio.wait_for(held.wait(), 10.0)
            assert len(await rig.d.cut_at_stop()) == len(jobs)
            assert await rig.d.stop_spending() == (0, 0, 0)
            assert rig.d.possibly_billed == 0 and rig.d.possibly_billed_usd == 0.0
            release.set()
            await rig.until(lambda: len(rig.results) == len(jobs), "every answer")
            assert all(r.error == ENGINE_CANCELLED and not r.possibly_billed_usd for r in rig.results.values())
            assert emu.count(UPLOAD["openai"]) == 0 and emu.count(CREATE["openai"]) == 0
            await rig.settled_to(0.0)
            await rig.until(lambda: not rig.d._unjournal and not rig.d._tasks, "the record's delete")
            assert await rig.d.journal.items(rig.d._space) == {}  # (a later resume finds nothing of it)
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())


def test_a_record_left_by_a_batch_the_stop_named_is_never_created_by_the_restarted_process(emu, monkeypatch):  # noqa: F811
    """The stop names a batch's members while its record is written, and the process dies once the write is done,
    before it deletes it. Ray restarts it, and a call other than the stop's cancel (a grouper's late dispatch) has
    it read its journal: the cut create is looked for, never made, as the stop published its members never sent
    (``read_cut``; Ray's store faked). Fails on the code before (a review, ``rvcut2_82``): uploaded and created,
    its members told never sent (a retryable 503) billed in it, and again when retried."""
    import pickle

    from ray.experimental import internal_kv

    from actors import _stop_cut
    from actors.dispatcher import Dispatcher

    jobs = jobs_of("openai", claims=True)
    store: dict = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get(key))

    async def go():
        rig = Rig(emu, "openai")
        inner, written, dead = rig.d.journal.put, asyncio.Event(), asyncio.Event()

        async def put(*a, **kw):
            await inner(*a, **kw)
            written.set()
            await dead.wait()  # the process dies with the record written, before it hears so
        rig.d.journal.put = put
        d2 = None
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await asyncio.wait_for(written.wait(), 10.0)
            named = await rig.d.cut_at_stop()
            assert len(named) == len(jobs)
            store[_stop_cut._key("engine")] = pickle.dumps(frozenset(named))  # (``cut_unsent``'s publishing)
            for t in list(rig.d._tasks):
                t.cancel()
            d2 = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            d2.reconstructed()
            # (a grouper's ``run_many`` waits for this: ``_ready``.) Its members all named: none resumed since
            # stop 82's ``cut3_82``, the record deleted (``CutDispatches._named_out``)
            assert await d2.recover() == 0 and not d2._open
            await rig.until(lambda: not d2._unjournal and not d2._tasks, "the record's delete")
            assert await d2.journal.items(d2._space) == {}
            assert emu.count(UPLOAD["openai"]) == 0 and emu.count(CREATE["openai"]) == 0 and emu.bill().items == ()
        finally:
            dead.set()
            if d2 is not None:
                await d2.provider.close()
            await rig.close()
    asyncio.run(go())
