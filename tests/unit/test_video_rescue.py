"""Videos an engine cut off had made (a kill, or a stop without drain), read back by the rescue of its journal
(``engine.app._video_rescue``): each is polled to its end and answers its request asked again, billed once.

Before, the rescue read only the journaled provider batches: the video's call was counted as a sync call cut off,
and the new engine asked the same request made (and paid for) a second video. The crash is the dispatcher's tasks
cancelled and its journal's lock dropped, as a killed process's is (``test_batch_rescue._crash``)."""

from __future__ import annotations

import asyncio

import pytest

from engine.app._batch_rescue import rescue
from engine.app._driver_resume import take_back
from engine.emulator import Emulator
from tests.unit.test_batch_rescue import _crash
from tests.unit.test_http_providers import CAT, SPEED, Rig
from tests.unit.test_video_durable import MADE, _creates, start

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
        assert not (tmp_path / "j").exists() or not any((tmp_path / "j").glob("*/"))  # its journal read and gone
