"""A resume (``smartbatch batch --resume``) reads the batches its killed run journaled (``engine.app._batch_rescue``),
each try of a results read bounded as the dispatcher bounds its own: its calls' ``timeout_s`` and its results' size
at ``batch_results_min_kib_s`` (``actors._batch_parts.read_bound_s``). Before, a server trickling a byte inside the
SDK's timeout held the resume for as long as it went on (Gemini's native read, streamed, has no length to pace it
by). Past the bound of every try, the rescue refuses as for any batch it cannot read: its journal kept, the batch
named, nothing sent again."""

from __future__ import annotations

import asyncio
import threading

from actors._file_journal import ARCHIVE, engine_dirs, read_spaces
from actors.providers.gemini_http import GeminiProvider
from engine.app._batch_rescue import rescue
from engine.core.errors import ConfigError
from engine.core.provider_api import Secret
from tests.unit.test_batch_rescue import _crash
from tests.unit.test_gemini_batch import emulator, jobs_of
from tests.unit.test_http_providers import KEY, SPEED, Rig

TIMEOUT_S = 0.2  # real seconds between chunks before a read times out
TRICKLE_S = 0.05  # a byte this often: inside the timeout, so no read times out by it
FAST = 1e6  # KiB/s: the floor rate, so a try is bounded by little more than its calls' timeouts
WAIT_S = 30.0  # real seconds the rescue is given; its five bounded tries take about 3 s


def _records(root) -> dict[str, dict]:
    return {s: r for d in engine_dirs(root) for s, r in read_spaces(d).items()}


def test_a_resume_whose_batch_results_trickle_is_refused_within_its_tries_bounds_naming_the_batch(tmp_path,
                                                                                                  monkeypatch):
    root = tmp_path / "j"
    jobs = jobs_of()
    with emulator() as emu:
        async def run() -> Rig:
            rig = Rig(emu, "google", journal={"dir": str(root)}, timeout_s=TIMEOUT_S, batch_results_min_kib_s=FAST)
            try:
                await rig.reserve(jobs)
                await rig.run("batch_api", jobs)
                await rig.until(lambda: len(rig.results) == len(jobs) and _records(root).get(
                    ARCHIVE + "batches:google"), "every member answered, and the batch's record archived", 20.0)
                _crash(rig)  # killed before its answers reached the output file: the archive names the batch
            finally:
                await rig.close()
            return rig
        rig = asyncio.run(run())
        before = {s: sorted(r) for s, r in _records(root).items()}
        (bid,) = {rec[1][4].id for rec in _records(root)[ARCHIVE + "batches:google"].values()}  # (when, record)

        polled = GeminiProvider.poll

        async def poll(self, handle):  # the poll answers; every read of its results after it trickles
            st = await polled(self, handle)
            emu.faults.script("google", "gemini.batches.get", [{"trickle_s": TRICKLE_S}] * 20)
            return st
        monkeypatch.setattr(GeminiProvider, "poll", poll)

        out: dict = {}

        def resume() -> None:
            try:
                out["got"] = rescue(root, rig.settings, rig.catalog, {"google": Secret(KEY)}, speedup=SPEED,
                                    say=lambda m: None)
            except Exception as exc:
                out["error"] = exc
        t = threading.Thread(target=resume, daemon=True)
        t.start()
        t.join(WAIT_S)
        assert not t.is_alive(), f"the resume did not return in {WAIT_S} s: a trickled read held it"
        err = out.get("error")
        assert isinstance(err, ConfigError), out
        assert "could not be read" in str(err) and bid in str(err) and "outlasted its bound" in str(err), err
        assert "nothing of its journal" in str(err)
        assert {s: sorted(r) for s, r in _records(root).items()} == before  # kept: a later resume reads it
        assert emu.count("gemini.batches.create") == 1  # nothing sent again
