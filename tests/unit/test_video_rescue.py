"""Videos an engine cut off had made (a kill, or a stop without drain), read back by the rescue of its journal
(``engine.app._video_rescue``): each is polled to its end and answers its request asked again, billed once.

Before, the rescue read only the journaled provider batches: the video's call was counted as a sync call cut off,
and the new engine asked the same request made (and paid for) a second video. The crash is the dispatcher's tasks
cancelled and its journal's lock dropped, as a killed process's is (``test_batch_rescue._crash``)."""

from __future__ import annotations

import asyncio

import pytest

from actors._types import Job
from engine.app._batch_rescue import rescue
from engine.app._driver_resume import take_back
from engine.emulator import Emulator
from tests.unit.test_batch_rescue import _crash
from tests.unit.test_http_providers import CAT, SPEED, Rig
from tests.unit.test_video_durable import MADE, _creates, answer_never_comes, start

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")


def _killed_while_polling(emu: Emulator, provider: str, root, r) -> Rig:
    """An engine journaling under ``root`` makes ``r``'s video (its create answered, journaled) and is killed
    while it polls it."""
    async def go() -> Rig:
        rig = Rig(emu, provider, journal={"dir": str(root)})
        try:
            await start(rig, r, hold=True)
            _crash(rig)
        finally:
            await rig.close()
        return rig
    return asyncio.run(go())


@pytest.mark.parametrize("provider", ["openai", "google"])
def test_a_video_a_killed_engine_made_answers_its_request_asked_again_billed_once(provider, tmp_path):
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        r = MADE[provider]()
        rig = _killed_while_polling(emu, provider, tmp_path / "j", r)
        kept = take_back(rig.settings, rig.catalog, {provider: rig.d._key}, speedup=SPEED)
        emu._core.clock.offset += 100_000  # any other video made has completed, and is billed
        (item,) = emu.bill().items
        assert _creates(emu, provider) == 1
        assert kept is not None
        got = kept.take(r.model_copy(update={"arrival_s": 99.0}))  # the driver run again submits it
        assert got is not None and got.status == "ok" and got.output and got.mode == "sync"
        assert got.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
        assert [c.usd for c in kept.charges()] == pytest.approx([item.cost_usd], abs=1e-12)  # counted once
        assert kept.take(r.model_copy(update={"prompt": "another fox"})) is None  # other content: made anew


def test_a_batch_run_resumed_takes_the_video_it_made_not_a_cut_call(tmp_path):
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        r = MADE["openai"]()
        rig = _killed_while_polling(emu, "openai", tmp_path / "j", r)
        got = rescue(tmp_path / "j", rig.settings, rig.catalog, {"openai": rig.d._key}, speedup=SPEED,
                     wanted={r.id}, say=lambda m: None)
        emu._core.clock.offset += 100_000
        (item,) = emu.bill().items
        assert _creates(emu, "openai") == 1
        assert set(got.results) == {r.id} and got.cut_calls == 0 and got.videos == 1
        res = got.results[r.id]
        assert res.status == "ok" and "video an earlier run made" in res.reason
        assert res.cost_usd == pytest.approx(item.cost_usd, abs=1e-12)
        # Its claim settled at that cost in a Redis ledger (``_rescue_settle``), as a batch member's: before, it
        # expired unspent after reservation_ttl_s, the video billed and counted by no ledger.
        assert got.claims == {"c0": pytest.approx(item.cost_usd, abs=1e-12)}
        assert not (tmp_path / "j").exists() or not any((tmp_path / "j").glob("*/"))  # its journal read and gone


def _killed_during_a_veo_create(emu: Emulator, root, r, remake: bool) -> Rig:
    """An engine journaling under ``root`` sends ``r``'s Veo create, which Google makes (to bill it), and is killed
    before its answer comes."""
    async def go() -> Rig:
        rig = Rig(emu, "google", journal={"dir": str(root)}, endpoint={"remake_lost_veo_creates": remake})
        sent = answer_never_comes(rig.d.provider._videos.client, "post")  # the engine is killed first
        try:
            job = Job(0, r, f"fp-{r.id}", claim="c0")
            await rig.reserve([job])
            await rig.run("sync", [job])
            await asyncio.wait_for(sent.wait(), 10.0)
            _crash(rig)
        finally:
            await rig.close()
        return rig
    return asyncio.run(go())


@pytest.mark.parametrize("remake", [False, True])
def test_a_veo_create_a_killed_engine_cut_fails_its_request_rather_than_make_a_second(remake, tmp_path):
    """The engine was killed after a Veo create reached Google and before its answer: the create's intent is in the
    journal, and Google has no listing to find the video by. The rescue fails the request, its error saying the
    video may be billed and naming the setting that makes it again; it is not counted as a call to send again.
    Before, no intent was journaled: the call was counted cut off, and the request asked again made (and Google
    billed) a second video. With ``remake_lost_veo_creates``, as before."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        r = MADE["google"]()
        rig = _killed_during_a_veo_create(emu, tmp_path / "j", r, remake)
        said: list[str] = []
        got = rescue(tmp_path / "j", rig.settings, rig.catalog, {"google": rig.d._key}, speedup=SPEED,
                     wanted={r.id}, say=said.append)
        assert _creates(emu, "google") == 1
        if remake:
            assert r.id not in got.results and got.cut_calls == 1
            return
        res = got.results[r.id]
        assert got.cut_calls == 0 and res.status == "failed" and res.cost_usd == 0.0
        assert "not made again" in res.error and "providers.endpoints.google.remake_lost_veo_creates" in res.error
        assert any("remake_lost_veo_creates" in m for m in said)


def test_a_driver_run_again_gets_its_cut_veo_create_failed_not_made_again(tmp_path):
    """The same through a driver's ``journal.dir``: the request its script submits again gets the failure, and
    nothing more is made at Google."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        r = MADE["google"]()
        rig = _killed_during_a_veo_create(emu, tmp_path / "j", r, False)
        kept = take_back(rig.settings, rig.catalog, {"google": rig.d._key}, speedup=SPEED)
        assert kept is not None
        got = kept.take(r.model_copy(update={"arrival_s": 99.0}))
        assert got is not None and got.status == "failed" and "remake_lost_veo_creates" in got.error
        assert _creates(emu, "google") == 1
        # Counted at its bound, as the killed run's budget kept it (its ledger died with it); before, $0.
        assert [c.usd for c in kept.charges()] == pytest.approx([got.possibly_billed_usd]) and got.possibly_billed_usd > 0


def test_a_cut_veo_create_failed_by_the_rescue_is_marked_possibly_billed_so_no_later_resume_makes_it_again(
        tmp_path):
    """The rescue fails a Veo create cut by a kill (the video may be billed) and removes the journal: the line's
    error must carry ``BILLED_KEY`` (the call's bound, as the live engine keeps for a create whose answer is lost),
    or the next ``--resume`` reads a plain failure and makes (and Google bills) a second video. Its bound is a
    charge of the run's in-process budgets and the claim's settlement in a Redis ledger (``Rescued.claims``), as
    a batch member failed possibly billed is. Before, none of the three: the error line unmarked, $0 counted."""
    from engine.app._batch_rescue import charges
    from engine.core.batchfile import BILLED_KEY, BatchFile, BatchLine, result_rows
    from engine.core.cost import reserve_bound

    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, honour_keys=False) as emu:
        r = MADE["google"]()
        rig = _killed_during_a_veo_create(emu, tmp_path / "j", r, False)
        got = rescue(tmp_path / "j", rig.settings, rig.catalog, {"google": rig.d._key}, speedup=SPEED,
                     wanted={r.id}, say=lambda m: None)
        bound = reserve_bound(r, rig.catalog, "sync", None)
        res = got.results[r.id]
        assert res.status == "failed" and res.possibly_billed_usd == pytest.approx(bound, abs=1e-12)
        (row,) = result_rows(BatchFile("in.jsonl", [BatchLine(1, "v1", "/v1/videos", r)]), [res])
        assert row["error"] is not None and row[BILLED_KEY] == pytest.approx(bound, abs=1e-12)
        assert [c.usd for c in charges(got.results, tmp_path / "o.jsonl")] == pytest.approx([bound], abs=1e-12)
        assert got.claims == {"c0": pytest.approx(bound, abs=1e-12)}
