"""Videos under way, as the engine's other work: a dispatcher's restart polls the video its last process made
(never makes and pays for another), a drain waits for it, and its polls hold no concurrency slot of the provider.

Before: a restarted dispatcher made the call again and a second video was made and billed; a video held its call's
slot for its whole poll, so with ``max_concurrency`` 1 a text call waited minutes behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from actors._types import Job
from actors.dispatcher import Dispatcher
from engine.core.catalog import Catalog
from engine.core.cost import reserve_bound
from engine.core.request import Request
from engine.emulator import Emulator
from tests.unit.test_http_providers import CAT, SPEED, Rig
from tests.unit.test_veo_http import veo
from tests.unit.test_video_http import video

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")

MADE = {"openai": video, "google": veo}


def _one_concurrent_call(provider: str) -> Catalog:
    raw = CAT.model_dump()
    raw["providers"][provider]["rate_limits"]["max_concurrency"] = 1
    return Catalog.model_validate(raw)


def on_first_poll(rig: Rig, hold: bool | asyncio.Event) -> asyncio.Event:
    """An event set at the first poll of the video the rig's provider makes (its create answered). ``hold``: every
    poll waits until that event is set (True: for good, as in a process that dies while it polls)."""
    p = rig.d.provider
    owner, name = (p.client.videos, "retrieve") if rig.name == "openai" else (p._videos.client, "get")
    inner: Callable[..., Any] = getattr(owner, name)
    polled = asyncio.Event()

    async def spy(*a: Any, **kw: Any) -> Any:
        polled.set()
        if hold is True:
            await asyncio.Event().wait()
        elif hold:
            await hold.wait()
        return await inner(*a, **kw)

    setattr(owner, name, spy)
    return polled


async def start(rig: Rig, r, hold: bool | asyncio.Event = False) -> tuple[Job, asyncio.Event]:
    job = Job(0, r, f"fp-{r.id}", claim="c0")
    await rig.reserve([job])
    polled = on_first_poll(rig, hold)
    await rig.run("sync", [job])
    await asyncio.wait_for(polled.wait(), 10.0)
    return job, polled


async def restarted(rig: Rig, provider: str, journal_written: bool = False) -> Dispatcher:
    """The rig's dispatcher dies, its calls and timers with it (``journal_written``: once the journal write it
    had under way is done), and a new one is built on the same hub journal, as Ray restarts it."""
    for t in list(rig.d._tasks):
        t.cancel()
    for h in list(rig.d._timers):
        h.cancel()
    if journal_written:
        await asyncio.gather(*[t for t in (rig.d._jobs_journal._task,) if t], return_exceptions=True)
    return Dispatcher(provider, rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None, rig.budget,
                      key=rig.d._key)


def answer_never_comes(owner: Any, name: str) -> asyncio.Event:
    """Make ``owner.name`` (a create) send its call, which the provider makes and bills, and never return: its
    answer is lost with the dispatcher or engine that dies first. The event is set once the call was made."""
    inner, sent = getattr(owner, name), asyncio.Event()

    async def dropped(*a: Any, **kw: Any) -> Any:
        await inner(*a, **kw)
        sent.set()
        await asyncio.Event().wait()

    setattr(owner, name, dropped)
    return sent


def _creates(emu: Emulator, provider: str) -> int:
    return [c.route for c in emu.calls].count("videos" if provider == "openai" else "veo")


@pytest.mark.parametrize("provider", ["openai", "google"])
def test_a_restarted_dispatcher_polls_the_video_under_way_and_it_is_billed_once(provider):
    """The dispatcher dies while it polls a video (Ray restarts it): the new one reads its journal and polls that
    video, and the request is answered with it. Before, the call was made again: two videos made, two billed."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, provider)
            r = MADE[provider]()
            try:
                await start(rig, r, hold=True)
                again = await restarted(rig, provider)  # the dispatcher dies; Ray makes a new one
                try:
                    await again.recover()
                    res = await rig.until(lambda: rig.results.get(r.id), "the video")
                    await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                    emu._core.clock.offset += 100_000  # any other video made has completed, and is billed
                    (item,) = emu.bill().items
                    assert _creates(emu, provider) == 1
                    assert res.status == "ok" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
                    assert sum(rig.budget.book.spend.values()) == pytest.approx(item.cost_usd, abs=1e-12)
                    assert again.in_flight == 0 and again.possibly_billed == 0
                    for _ in range(3):  # its records cleared once its result is with the hub
                        await again.flush()
                    await asyncio.gather(*[t for t in (again._jobs_journal._task, again._sync_journal._task) if t])
                    # (but the list of ended calls' jobs, which a later restart's look-ups never take)
                    assert set(await rig.hub.journal_items(again._jobs_journal.space)) <= {again._ended_key}
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


@pytest.mark.parametrize("provider", ["openai", "google"])
def test_a_text_call_is_not_held_behind_a_video_s_polls(provider):
    """One call at a time: a text call sent while a video is polled is answered while the video is still polled
    (its polls are held until then). Before, the video held the one slot until it completed, and the text call
    waited for it: here, for good."""
    with Emulator(_one_concurrent_call(provider), latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, provider)
            r = MADE[provider]()
            try:
                polls = asyncio.Event()
                await start(rig, r, hold=polls)
                text = Job(1, Request.model_validate({
                    "id": "text", "arrival_s": 0.0, "provider": provider, "input_tokens": 300, "output_tokens": 20,
                    "model": "gpt-5-mini" if provider == "openai" else "gemini-2.5-flash", "prompt": "a text"}),
                    "fp-text")
                await rig.run("sync", [text], bid="t")
                got = await rig.until(lambda: rig.results.get(text.req.id), "the text call's result")
                assert got.status == "ok" and r.id not in rig.results
                polls.set()
                res = await rig.until(lambda: rig.results.get(r.id), "the video")
                assert res.status == "ok" and got.done_s < res.done_s
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_drain_waits_for_a_video_under_way_and_a_stop_leaves_it_journaled():
    """After the engine's cancel, a video being polled counts as work under way (``settled``, which the drain
    waits on) until its result is answered, billed once. A stop without a drain (``stop_spending``) says the video
    under way, and its record stays in the journal."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, "openai")
            r = video()
            try:
                await start(rig, r)
                await rig.d.cancel()
                assert await rig.d.settled(0.0) == 1  # the video under way
                res = await rig.until(lambda: rig.results.get(r.id), "the video")
                (item,) = emu.bill().items
                assert res.status == "ok" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
                assert await rig.d.settled(0.0) == 0
            finally:
                await rig.close()

            stopped = Rig(emu, "openai")
            r2 = video("v2")
            try:
                await start(stopped, r2, hold=True)
                assert await stopped.d.stop_spending() == (0, 0, 1)
                (rec,) = (await stopped.hub.journal_items(stopped.d._jobs_journal.space)).values()
                assert rec is not None
            finally:
                for t in list(stopped.d._tasks):
                    t.cancel()
                await stopped.close()
        asyncio.run(go())


def test_a_restart_that_cuts_a_create_before_its_answer_takes_the_video_it_made_billed_once():
    """The dispatcher dies after a create is sent and before its answer comes (the create made the video at the
    provider): the new one, from the create's intent journaled before it was sent (its listing's newest videos),
    finds that video in the listing and polls it. Before, no id was journaled and the restart made a second video,
    billed, each counted as possibly billed."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, "openai")
            r = video()
            sent = answer_never_comes(rig.d.provider._videos, "_raw_create")  # the dispatcher dies first
            try:
                job = Job(0, r, f"fp-{r.id}", claim="c0")
                await rig.reserve([job])
                await rig.run("sync", [job])
                await asyncio.wait_for(sent.wait(), 10.0)
                again = await restarted(rig, "openai")  # the dispatcher dies; Ray makes a new one
                try:
                    await again.recover()
                    res = await rig.until(lambda: rig.results.get(r.id), "the video")
                    await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                    emu._core.clock.offset += 100_000  # any other video made has completed, and is billed
                    assert _creates(emu, "openai") == 1
                    (item,) = emu.bill().items
                    assert res.status == "ok" and res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
                    assert sum(rig.budget.book.spend.values()) == pytest.approx(item.cost_usd, abs=1e-12)
                    assert again.possibly_billed == 0
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_restart_after_a_refused_create_makes_its_own_video_not_another_request_s():
    """A create refused (a 429: no video made) leaves its request waiting for its retry; meanwhile another request
    of the same body makes its video and is answered; then the dispatcher dies. The new one makes the first
    request's own video. Before, the refused create's intent stayed journaled: the restart looked for the video
    it made, found the other request's (listed newer than its snapshot, no longer held by anyone) and answered
    the first request with it, its price counted a second time."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        emu.faults.script("openai", "videos", [{"status": 429, "retry_after_s": 60}])  # the first create's

        async def go():
            rig = Rig(emu, "openai")
            first, other = video("a", prompt="a red fox"), video("b", prompt="a red fox", tenant="t2")
            waiting = asyncio.Event()
            rig.d._retry_later = lambda *a, **kw: waiting.set()  # the dispatcher dies before the retry's time
            try:
                job = Job(0, first, f"fp-{first.id}", claim="c0")
                await rig.reserve([job])
                await rig.run("sync", [job])
                await asyncio.wait_for(waiting.wait(), 10.0)
                job_b = Job(1, other, f"fp-{other.id}", claim="c1")
                await rig.reserve([job_b])
                await rig.run("sync", [job_b], bid="b2")
                got_b = await rig.until(lambda: rig.results.get(other.id), "the other request's video")
                for _ in range(3):  # its records cleared once its result is with the hub
                    await rig.d.flush()
                again = await restarted(rig, "openai")  # the dispatcher dies; Ray makes a new one
                try:
                    await again.recover()
                    res = await rig.until(lambda: rig.results.get(first.id), "the first request's video")
                    assert res.status == "ok" and got_b.status == "ok"
                    assert res.provider_request_id != got_b.provider_request_id
                    await rig.until(lambda: not rig.budget.book.claims, "the claims settled")
                    emu._core.clock.offset += 100_000
                    items = emu.bill().items
                    assert len(items) == 2  # one video each, the refused create billed nothing
                    billed = sum(i.cost_usd for i in items)
                    assert again.possibly_billed == 0  # its one create before the restart was refused
                    assert sum(rig.budget.book.spend.values()) == pytest.approx(billed, abs=1e-12)
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_call_made_again_after_a_restart_holds_its_slot_at_the_rate_gate():
    """One call at a time: a text call under way when the dispatcher dies is made again by the new one, and holds
    the gate's one slot while it runs, as any call does; its end frees that slot, not another call's. Before, it
    took no slot (it was not started by the gate), so a call started after the restart ran beside it, and its end
    freed that call's slot: the gate's count drifted (a video's made-hook frees its slot the same way)."""
    import math

    with Emulator(_one_concurrent_call("openai"), latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, "openai")
            text = Job(0, Request.model_validate({
                "id": "text", "arrival_s": 0.0, "provider": "openai", "input_tokens": 300, "output_tokens": 20,
                "model": "gpt-5-mini", "prompt": "a text"}), "fp-text", claim="c0")
            sent = asyncio.Event()

            async def held(job: Any) -> Any:
                sent.set()
                await asyncio.Event().wait()  # under way when the dispatcher dies, and after its restart

            try:
                rig.d.provider.call = held
                await rig.reserve([text])
                await rig.run("sync", [text])
                await asyncio.wait_for(sent.wait(), 10.0)
                again = await restarted(rig, "openai")  # the dispatcher dies; Ray makes a new one
                sent.clear()
                again.provider.call = held
                try:
                    await again.recover()
                    await asyncio.wait_for(sent.wait(), 10.0)  # made again, and under way
                    gate = again.sim.gates[again.sim._gate_of["gpt-5-mini"]]
                    assert gate.earliest(again.clock.now(), 320) == math.inf  # its slot held until it ends
                finally:
                    for t in list(again._tasks):
                        t.cancel()
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_restart_that_cuts_a_create_never_sent_does_not_take_a_video_another_request_made_and_ended():
    """A create cut by a restart before it reached OpenAI (no video made); meanwhile another request of the same
    body made its video, was answered, and its records were cleared. The new dispatcher looks for the cut
    create's video and must not take that one: it makes the request's own. Before, the new process knew nothing
    of the ended request's video (held only in the last process's memory): it took it, alone, as 'recovered', so
    both requests were answered with one video, its price counted twice."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, "openai")
            first, other = video("a", prompt="a red fox"), video("b", prompt="a red fox", tenant="t2")
            vc = rig.d.provider._videos
            inner, cut = vc._raw_create, asyncio.Event()

            async def never_sent(*a: Any, **kw: Any) -> Any:
                if not cut.is_set():
                    cut.set()
                    await asyncio.Event().wait()  # the restart cuts it before it goes out
                return await inner(*a, **kw)

            vc._raw_create = never_sent
            try:
                job = Job(0, first, f"fp-{first.id}", claim="c0")
                await rig.reserve([job])
                await rig.run("sync", [job])
                await asyncio.wait_for(cut.wait(), 10.0)
                job_b = Job(1, other, f"fp-{other.id}", claim="c1")
                await rig.reserve([job_b])
                await rig.run("sync", [job_b], bid="b2")
                got_b = await rig.until(lambda: rig.results.get(other.id), "the other request's video")
                for _ in range(3):  # its records cleared once its result is with the hub
                    await rig.d.flush()
                again = await restarted(rig, "openai", journal_written=True)  # the dispatcher dies; Ray makes a new one
                try:
                    await again.recover()
                    res = await rig.until(lambda: rig.results.get(first.id), "the first request's video")
                    assert res.status == "ok" and got_b.status == "ok"
                    assert res.provider_request_id != got_b.provider_request_id
                    await rig.until(lambda: not rig.budget.book.claims, "the claims settled")
                    emu._core.clock.offset += 100_000
                    assert len(emu.bill().items) == 2  # one video each
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


@pytest.mark.parametrize("remake", [False, True])
def test_a_restart_that_cuts_a_veo_create_before_its_answer_fails_it_rather_than_make_a_second(remake):
    """The dispatcher dies after a Veo create reached Google (its video made, to be billed) and before its answer.
    Google has no listing to find the video in, so the new one, from the create's intent journaled before it was
    sent, fails the request saying the video may be billed and naming the setting that makes it again; its budget
    keeps the call's upper bound (possibly billed). One video made. Before, nothing was journaled for the create,
    and the restart made (and Google billed) a second video. With ``remake_lost_veo_creates``, as before."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        async def go():
            rig = Rig(emu, "google", endpoint={"remake_lost_veo_creates": remake})
            r = veo()
            sent = answer_never_comes(rig.d.provider._videos.client, "post")  # the dispatcher dies first
            try:
                job = Job(0, r, f"fp-{r.id}", claim="c0")
                await rig.reserve([job])
                await rig.run("sync", [job])
                await asyncio.wait_for(sent.wait(), 10.0)
                again = await restarted(rig, "google")  # the dispatcher dies; Ray makes a new one
                try:
                    await again.recover()
                    res = await rig.until(lambda: rig.results.get(r.id), "the request's end")
                    await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                    emu._core.clock.offset += 100_000  # every video made has completed, and is billed
                    items = emu.bill().items
                    assert _creates(emu, "google") == len(items) == 1 + remake and again.possibly_billed == 1
                    bound = reserve_bound(r, rig.catalog, "sync", None)
                    if remake:
                        assert res.status == "ok" and res.cost_usd == pytest.approx(items[1].cost_usd, abs=1e-12)
                    else:
                        assert res.status == "failed" and "restarted" in res.error and "not made again" in res.error
                        assert "remake_lost_veo_creates" in res.error
                    assert sum(rig.budget.book.spend.values()) == pytest.approx(bound + res.cost_usd, abs=1e-12)
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_restart_after_google_refused_a_veo_create_makes_its_video():
    """Google refused the create (a 429: no operation made) and the dispatcher dies before the retry: the refusal
    replaced the create's intent in the journal, so the new one makes the video, billed once, nothing counted as
    possibly billed (the intent alone would fail the request as a create whose answer was lost)."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        emu.faults.script("google", "veo", [{"status": 429, "retry_after_s": 60}])

        async def go():
            rig = Rig(emu, "google")
            r = veo()
            waiting = asyncio.Event()
            rig.d._retry_later = lambda *a, **kw: waiting.set()  # the dispatcher dies before the retry's time
            try:
                job = Job(0, r, f"fp-{r.id}", claim="c0")
                await rig.reserve([job])
                await rig.run("sync", [job])
                await asyncio.wait_for(waiting.wait(), 10.0)
                again = await restarted(rig, "google", journal_written=True)
                try:
                    await again.recover()
                    res = await rig.until(lambda: rig.results.get(r.id), "the video")
                    await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                    (item,) = emu.bill().items
                    assert res.status == "ok" and again.possibly_billed == 0
                    assert sum(rig.budget.book.spend.values()) == pytest.approx(item.cost_usd, abs=1e-12)
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())


def test_a_restart_after_a_lost_veo_create_and_a_refused_one_keeps_one_bound_not_two():
    """With ``remake_lost_veo_creates``: the first create's answer is lost (its video may be billed), the retry's
    create is refused (a 429: none made), and the dispatcher dies during the wait for the next try. The lost create
    is counted once: in the journaled tally (its request's unanswered calls) and in the refused record's ``lost``,
    one and the same. Before, the restart added the record's on top of the tally's: two bounds kept on the budget
    and counted possibly billed, for one video that may be billed."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        emu.faults.script("google", "veo", [{"cut_connection": True}, {"status": 429, "retry_after_s": 60}])

        async def go():
            rig = Rig(emu, "google", endpoint={"remake_lost_veo_creates": True})
            r = veo()
            waiting, later = asyncio.Event(), rig.d._retry_later

            def retry_later(*a: Any, **kw: Any) -> None:  # the first retry goes; the dispatcher dies in the second
                if _creates(emu, "google") < 2:
                    return later(*a, **kw)
                waiting.set()

            rig.d._retry_later = retry_later
            try:
                job = Job(0, r, f"fp-{r.id}", claim="c0")
                await rig.reserve([job])
                await rig.run("sync", [job])
                await asyncio.wait_for(waiting.wait(), 10.0)
                await rig.d.flush()  # its tally journaled, as the flushes do while the request waits
                await asyncio.gather(*[t for t in (getattr(rig.d, "_tally_task", None),) if t],
                                     return_exceptions=True)
                again = await restarted(rig, "google", journal_written=True)
                try:
                    await again.recover()
                    res = await rig.until(lambda: rig.results.get(r.id), "the video")
                    await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
                    emu._core.clock.offset += 100_000  # the lost create's video completes too, and is billed
                    assert _creates(emu, "google") == 3 and len(emu.bill().items) == 2
                    bound = reserve_bound(r, rig.catalog, "sync", None)
                    assert res.status == "ok" and again.possibly_billed == 1
                    assert sum(rig.budget.book.spend.values()) == pytest.approx(bound + res.cost_usd, abs=1e-12)
                finally:
                    await again.provider.close()
            finally:
                await rig.close()
        asyncio.run(go())
