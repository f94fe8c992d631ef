"""The hub's index of a dispatcher's video jobs (``jobs:<provider>`` records, ``actors._sync_index``): a restart whose
Redis journal lost a video call's body and job records (a Redis restarted empty within the watch's second) takes the
call up by its job (the operation or video it made), polled and billed once, never made again; a create cut before
its answer is looked for (OpenAI) or failed as a lost create (Veo), as with the records kept.

Before, only the body records were indexed: the restart made the call again as one with no job journaled, at an
endpoint that does not honour keys (Google's Veo, OpenAI's Videos API) a second video, the first billed when it
completes and counted by no ledger. The journal here is the hub's memory; a journal that loses records is stood in
for by giving it a seal (``tests/unit/test_batch_index.py``) and by wiping the records' spaces and the tally's."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from actors._dispatch_jobs import JOB
from actors._ingest_adopt import hand_over
from actors._peer import as_peer
from actors._sync_index import SYNC
from actors._types import Job
from actors.dispatcher import Dispatcher
from engine.core.cost import reserve_bound
from engine.emulator import Emulator
from tests.unit.test_batch_index import _done, _has, _until_async, index_of, lost, sealed
from tests.unit.test_http_providers import CAT, SPEED, Rig
from tests.unit.test_video_durable import MADE, _creates, answer_never_comes, on_first_poll

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")


def _lost_and_restarted(rig: Rig, provider: str, body_too: bool = True) -> Dispatcher:
    """The rig's dispatcher dies, its journal's job record lost (``body_too``: and its call's body record) with
    its tally (a Redis restarted empty loses every space: kept, the tally counted what the index does not hold), the
    hub's index kept, and a new one is built on the same hub, told of the loss, as Ray restarts it."""
    for t in list(rig.d._tasks):
        t.cancel()
    for h in list(rig.d._timers):
        h.cancel()
    spaces = rig.hub.__dict__["_journal_spaces"]
    for space in (rig.d._sync_journal.space, rig.d._jobs_journal.space, rig.d._tally_space)[not body_too:]:
        spaces.pop(space, None)
    return lost(sealed(Dispatcher(provider, rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                                  rig.budget, key=rig.d._key)))


@pytest.mark.parametrize("lost", ["body and job", "job alone"])
@pytest.mark.parametrize("provider", ["openai", "google"])
def test_a_video_whose_records_were_lost_is_polled_by_its_job_not_made_again(provider, lost):
    """The dispatcher dies while it polls a video, its records lost: the restart holds the call, and once ingest
    hands its request over polls the video its last process made: one create, one video billed, the ledger at the
    bill (fails on the code before: a second create, two videos billed, the second's price and the cut call's bound
    counted). ``job alone``: the body record kept (written again after the loss, before the job's), the call made
    again from it at the restart polls its job too."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, provider)
            sealed(rig.d)
            r = MADE[provider]()
            job = Job(0, r, f"fp-{r.id}", claim="c0")
            await rig.reserve([job])
            polled = on_first_poll(rig, True)  # the process dies while it polls
            await rig.run("sync", [job])
            await asyncio.wait_for(polled.wait(), 10.0)
            await asyncio.gather(*[t for t in (rig.d._jobs_journal._task,) if t])  # (its job's record written)
            again = _lost_and_restarted(rig, provider, body_too=lost == "body and job")
            try:
                assert await again.recall([r.uid]) == [r.uid]  # held: the re-admission does not send it again
                await asyncio.gather(*[t for t in (again._jobs_journal._task,) if t])
                again_kept = await rig.hub.journal_items(again._jobs_journal.space)  # (asserted below)
                await hand_over([as_peer(again)], [r])
                res = await rig.until(lambda: rig.results.get(r.id), "the video")
                await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                emu._core.clock.offset += 100_000  # any other video made has completed, and is billed
                items = emu.bill().items
                assert _creates(emu, provider) == 1 and len(items) == 1, (_creates(emu, provider), items)
                assert res.status == "ok" and res.cost_usd == pytest.approx(items[0].cost_usd, abs=1e-12)
                assert sum(rig.budget.book.spend.values()) == pytest.approx(items[0].cost_usd, abs=1e-12)
                assert again.possibly_billed == 0 and again.resumed_calls == 1 and again.journal_lost == 1
                assert len(again_kept) == 1  # its job's record journaled again at the take, for a later restart
                await _done(again)
                await _until_async(lambda: _has(rig.hub, again, []))  # its entries dropped with its records
            finally:
                await again.provider.close()
                await rig.close()
        asyncio.run(go())


@pytest.mark.parametrize("provider", ["openai", "google"])
def test_a_video_create_cut_whose_records_were_lost_is_looked_for_or_failed_not_made_again(provider):
    """The dispatcher dies after a create reached the provider (its video made, to be billed) and before its answer,
    its records lost: from the create's indexed intent, OpenAI's call looks for the video that create made and polls
    it (one video, billed once), Veo's fails saying the video may be billed (no listing to find it in), its bound
    kept; as with the records kept (``test_video_durable.py``). Fails on the code before: a second create."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, provider)
            sealed(rig.d)
            r = MADE[provider]()
            owner, name = (rig.d.provider._videos.client, "post") if provider == "google" else (
                rig.d.provider._videos, "_raw_create")
            sent = answer_never_comes(owner, name)
            job = Job(0, r, f"fp-{r.id}", claim="c0")
            await rig.reserve([job])
            await rig.run("sync", [job])
            await asyncio.wait_for(sent.wait(), 10.0)
            again = _lost_and_restarted(rig, provider)
            try:
                assert await again.recall([r.uid]) == [r.uid]
                await hand_over([as_peer(again)], [r])
                res = await rig.until(lambda: rig.results.get(r.id), "the request's end")
                await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                emu._core.clock.offset += 100_000
                items = emu.bill().items
                assert _creates(emu, provider) == len(items) == 1, (_creates(emu, provider), items)
                spend = sum(rig.budget.book.spend.values())
                if provider == "google":
                    assert res.status == "failed" and "not made again" in res.error and again.possibly_billed == 1
                    assert spend == pytest.approx(reserve_bound(r, rig.catalog, "sync", None), abs=1e-12)
                else:
                    assert res.status == "ok" and spend == pytest.approx(items[0].cost_usd, abs=1e-12)
                await _done(again)
            finally:
                await again.provider.close()
                await rig.close()
        asyncio.run(go())


def test_a_video_found_by_its_job_after_the_loss_keeps_the_bound_of_its_call_s_lost_create():
    """A review's: OpenAI's first create is cut after it made its video (billed), the retry's listing fails so that
    video is not found, and the retry makes a second (its record: ``lost`` 1, not ``covers``); the dispatcher dies
    while it polls, and the journal's Redis lost every space, the tally that counted the cut create too. The call
    taken from the hub's index polls its video, and the cut create stays counted possibly billed, its bound in the
    ledger (fails on the code before: $1.60 billed, $0.80 in the ledger, nothing possibly billed)."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        emu.faults.configure({"script": [{"provider": "openai", "route": "videos", "specs": [{"cut_body": True}]}]})

        async def go():
            rig = Rig(emu, "openai")
            sealed(rig.d)
            videos, lists = rig.d.provider.client.videos, []
            real_list = videos.list

            def listing(*a, **kw):  # the first create's snapshot read; the retry's look-up fails
                lists.append(1)
                if len(lists) > 1:
                    raise openai.APIConnectionError(request=httpx2.Request("GET", "http://127.0.0.1/v1/videos"))
                return real_list(*a, **kw)
            videos.list = listing
            r = MADE["openai"]()
            job = Job(0, r, f"fp-{r.id}", claim="c0")
            await rig.reserve([job])
            polled = on_first_poll(rig, True)
            await rig.run("sync", [job])
            await asyncio.wait_for(polled.wait(), 10.0)
            await asyncio.gather(*[t for t in (rig.d._jobs_journal._task,) if t])
            (made,) = rig.d._jobs.values()
            assert made["lost"] == 1 and not made["covers"] and rig.d._unanswered[r.uid] == 1
            again = _lost_and_restarted(rig, "openai")
            try:
                assert await again.recall([r.uid]) == [r.uid]
                await hand_over([as_peer(again)], [r])
                res = await rig.until(lambda: rig.results.get(r.id), "the video")
                await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                emu._core.clock.offset += 100_000
                items = emu.bill().items
                assert _creates(emu, "openai") == len(items) == 2 and res.status == "ok", items
                bound = reserve_bound(r, rig.catalog, "sync", None)
                spend = sum(rig.budget.book.spend.values())
                assert spend == pytest.approx(res.cost_usd + bound, abs=1e-12), (spend, [i.cost_usd for i in items])
                assert spend >= sum(i.cost_usd for i in items) - 1e-12
                assert again.possibly_billed == 1 and again.possibly_billed_usd == pytest.approx(bound, abs=1e-12)
                await _done(again)
            finally:
                await again.provider.close()
                await rig.close()
        asyncio.run(go())


def test_a_video_s_job_record_is_indexed_with_its_call_written_again_after_the_hub_s_restart_and_dropped_at_its_end():
    """The ordinary path on a journal that can lose records: once a video's create is answered, the hub's index holds
    its call's entry and its job's (the record itself: no request, no body); the rewire's ``rejournal`` after the
    hub lost its memory writes both again (fails without it: a restart then found the call and not its job); both
    go with the call's records at its end, the list of ended jobs never indexed."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, "google")
            sealed(rig.d)
            r, go_on = MADE["google"](), asyncio.Event()
            job = Job(0, r, f"fp-{r.id}", claim="c0")
            await rig.reserve([job])
            polled = on_first_poll(rig, go_on)
            try:
                await rig.run("sync", [job])
                await asyncio.wait_for(polled.wait(), 10.0)
                await asyncio.gather(*[t for t in (rig.d._jobs_journal._task,) if t])
                (key,) = rig.d._jobs
                await _until_async(lambda: _has(rig.hub, rig.d, [SYNC + key, JOB + key]))
                made = (await index_of(rig.hub, rig.d))[JOB + key]
                assert made == rig.d._jobs[key] and made["job"] and r.prompt not in str(made)
                rig.hub.__dict__.pop("_journal_spaces")  # the hub restarted: its memory gone
                await rig.d.rejournal()
                await _until_async(lambda: _has(rig.hub, rig.d, [SYNC + key, JOB + key]))
                go_on.set()
                res = await rig.until(lambda: rig.results.get(r.id), "the video")
                assert res.status == "ok"
                await _done(rig.d)
                await _until_async(lambda: _has(rig.hub, rig.d, []))
                assert rig.d._ended  # (its job among the ended, journaled, not indexed)
            finally:
                await rig.close()
        asyncio.run(go())
