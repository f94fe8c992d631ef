"""A video whose polls give up: the provider keeps its job (Veo's operation, OpenAI's video) and the request's next
try polls that same job, billed once when it ends. Its budget is charged that one video: its price if a try polls it
to its end, its upper bound once, counted possibly billed once, if the request fails with the job still running.

Before, each try that gave up added a bound of its own to the request's unanswered calls, as a create whose answer
was lost does (that one may have made a second video): a Veo video whose first try gave up and whose retry polled
it to its end was billed $0.96 by the provider and charged $1.92 on its budget, counted possibly billed."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import openai
import pytest

from actors._types import Job
from engine.core.cost import reserve_bound
from engine.core.provider_api import CallJob
from engine.emulator import Emulator
from tests.unit.test_http_providers import CAT, SPEED, Rig
from tests.unit.test_video_durable import MADE, _creates, restarted
from tests.unit.test_video_http import _FakeVideos, _video_calls, run_one, video

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")

POLL_ROUTE = {"openai": "videos.retrieve", "google": "veo.operations"}
POLL_ERRORS = 3  # (``_openai_video.POLL_ERRORS``) failed polls in a row that give a try up
PROVIDERS = pytest.mark.parametrize("provider", ["openai", "google"])


@pytest.fixture
def emu():
    """The providers as documented: no Idempotency-Key honoured."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as e:
        yield e


def fail_polls(emu: Emulator, provider: str, n: int) -> None:
    emu.faults.script(provider, POLL_ROUTE[provider], [{"status": 500}] * n)


@PROVIDERS
def test_a_video_whose_poll_gave_up_and_whose_retry_polled_it_to_its_end_is_charged_once(emu, provider):
    fail_polls(emu, provider, POLL_ERRORS)  # the first try's polls fail: it gives up, the job kept

    async def go():
        rig = Rig(emu, provider)
        try:
            res = await run_one(rig, MADE[provider]())
            await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
            emu._core.clock.offset += 100_000  # any other video made has completed, and is billed
            (item,) = emu.bill().items
            assert _creates(emu, provider) == 1 and res.status == "ok"
            assert res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
            assert rig.d.possibly_billed == 0 and rig.d.possibly_billed_usd == 0.0
            await rig.settled_to(item.cost_usd)
            outs = [o for _, _, o in rig.calls]
            assert [o.ok for o in outs] == [False, True] and outs[0].maybe_billed and outs[0].job_kept
            assert not rig.d._kept
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_video_whose_every_try_gave_up_is_charged_its_bound_once_and_counted_once(emu, provider):
    """Every try gave up polling the one job, still running when the request failed: the provider bills it when it
    ends, so its budget keeps one upper bound and the report counts one call possibly billed (before: one per try,
    four videos' bounds for one video)."""
    r = MADE[provider]()

    async def go():
        rig = Rig(emu, provider)
        fail_polls(emu, provider, POLL_ERRORS * rig.d.max_att)
        try:
            res = await run_one(rig, r)
            assert res.status == "failed" and "possibly_billed" in res.error
            await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
            emu._core.clock.offset += 100_000  # the video completes, and is billed
            (item,) = emu.bill().items
            bound = reserve_bound(r, rig.catalog, "sync", None)
            assert _creates(emu, provider) == 1 and rig.d.possibly_billed == 1
            assert rig.d.possibly_billed_usd == pytest.approx(bound, abs=1e-12)
            assert item.cost_usd <= bound == pytest.approx(sum(rig.budget.book.spend.values()), abs=1e-12)
            outs = [o for _, _, o in rig.calls]
            assert len(outs) == rig.d.max_att > 1 and all(o.job_kept and not o.ok for o in outs)
        finally:
            await rig.close()
    asyncio.run(go())


def _lost_create_then_gave_up() -> tuple[Any, _FakeVideos, list[str]]:
    """OpenAI's videos: ``lost`` then ``cut`` (the second create made its video, its answer lost), and the first
    ``POLL_ERRORS`` polls of that video fail (``fails``: those not made yet)."""
    videos = _FakeVideos(["lost", "cut"])
    inner, fails = videos.retrieve, ["500"] * POLL_ERRORS

    async def retrieve(vid: str):
        if fails:
            fails.pop()
            raise openai.InternalServerError("Error code: 500", response=httpx2.Response(
                500, request=httpx2.Request("GET", f"http://127.0.0.1/v1/videos/{vid}")), body=None)
        return await inner(vid)

    videos.retrieve = retrieve
    return _video_calls(videos), videos, fails


def test_a_retry_that_polls_again_a_video_found_after_two_lost_creates_is_not_answered_as_recovered():
    """Two creates got no answer and the video of one is found (the other's may be listed late): the answer is
    not ``recovered``, so the dispatcher keeps both lost creates' bounds. Its poll gave up, and the retry that
    polled it to its end answered ``recovered``: both bounds dropped, a video the provider may bill uncharged."""
    calls, videos, fails = _lost_create_then_gave_up()
    r = video("a")

    async def go():
        return [await calls.call(CallJob("ka", r, 0.0, n, 0)) for n in range(4)]

    outs = asyncio.run(go())
    assert [o.ok for o in outs] == [False, False, False, True] and not fails
    assert outs[3].provider_request_id == videos.made[0].id and len(videos.made) == 1
    assert not outs[3].recovered
    assert outs[2].job_kept and not any(o.job_kept for o in outs[:2])  # lost creates: bounds of their own


@PROVIDERS
def test_a_give_up_before_a_restart_is_settled_by_the_poll_of_the_restarted_dispatcher(emu, provider):
    """The first try gave up, and the dispatcher died while its retry polled the job: the restarted one polls it to
    its end, billed once and charged once. Before, the give-up's bound was in the journaled tally, and charged on
    top of the video's price."""
    fail_polls(emu, provider, POLL_ERRORS)

    async def go():
        rig = Rig(emu, provider)
        r = MADE[provider]()
        p = rig.d.provider
        owner, name = (p.client.videos, "retrieve") if provider == "openai" else (p._videos.client, "get")
        inner, reads, held = getattr(owner, name), [], asyncio.Event()

        async def read(*a: Any, **kw: Any) -> Any:
            reads.append(a)
            if len(reads) > POLL_ERRORS:  # the retry's poll: the process dies while it waits
                held.set()
                await asyncio.Event().wait()
            return await inner(*a, **kw)

        setattr(owner, name, read)
        try:
            job = Job(0, r, f"fp-{r.id}", claim="c0")
            await rig.reserve([job])
            await rig.run("sync", [job])
            await asyncio.wait_for(held.wait(), 10.0)
            await rig.d.flush()  # the tally, with the give-up, journaled
            again = await restarted(rig, provider, journal_written=True)
            try:
                await again.recover()
                res = await rig.until(lambda: rig.results.get(r.id), "the video")
                await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                emu._core.clock.offset += 100_000
                (item,) = emu.bill().items
                assert _creates(emu, provider) == 1 and res.status == "ok"
                assert again.possibly_billed == 0
                assert sum(rig.budget.book.spend.values()) == pytest.approx(item.cost_usd, abs=1e-12)
            finally:
                await again.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())



@PROVIDERS
def test_a_video_withdrawn_after_its_poll_gave_up_keeps_its_one_bound(emu, provider):
    """The request is withdrawn while its retry waits: no try polls the job again, and the provider bills it when
    it ends, so its budget keeps one bound, counted possibly billed once (a guard: the give-up's bound is held apart
    from the unanswered calls now, and must not be lost with them)."""
    fail_polls(emu, provider, POLL_ERRORS)
    r = MADE[provider]()

    async def go():
        rig = Rig(emu, provider)
        spy = rig.d.provider.call

        async def withdrawn_after(job: CallJob):
            out = await spy(job)
            await rig.d.withdraw([r.uid])  # before the dispatcher reads the give-up: its retry is never sent
            return out

        rig.d.provider.call = withdrawn_after
        try:
            res = await run_one(rig, r)
            assert res.status == "failed" and "withdrawn" in res.error and "possibly_billed" in res.error
            await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
            emu._core.clock.offset += 100_000  # the video completes, and is billed
            (item,) = emu.bill().items
            bound = reserve_bound(r, rig.catalog, "sync", None)
            assert [o.job_kept for _, _, o in rig.calls] == [True] and rig.d.possibly_billed == 1
            assert item.cost_usd <= bound == pytest.approx(sum(rig.budget.book.spend.values()), abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())
