"""A batch cancelled at its hedge whose results hold a response without its key (the emulator's
``keyless_members``; Google's inline response without its ``metadata``, googleapis python-genai #2008): every
member no response names fails possibly billed (``_batch_members._unnamed``), those that never ran among them (a
cancelled Gemini batch leaves its unfinished out). The groupers learn from it only that it ran past its hedge
(censored), as from any batch cut short. Before (a review, revkeys), every member had an outcome, so the batch
read as one that finished all its members by the read: an exact turnaround of hedge and cancel, too short, that
the policies then planned with."""

from __future__ import annotations

import asyncio

from tests.unit.test_batch_faults import _journal_quiet, _settled
from tests.unit.test_gemini_batch import jobs_of, quarter  # noqa: F401  (quarter: the fixture)
from tests.unit.test_http_providers import EMU_CANCEL_S, SPEED, VALIDATING_S, Rig, T, batch_key


def test_a_hedged_batch_with_a_response_without_its_key_is_learned_censored_at_its_hedge(quarter):  # noqa: F811
    e, jobs = quarter, jobs_of()
    e.faults.keyless_members = {batch_key(jobs[0])}  # it finishes first, before the hedge

    async def go():
        rig = Rig(e, "google", cancel_s=10 * EMU_CANCEL_S, speed=SPEED / 4)
        rig.d._learners = True  # the groupers learn turnarounds from its batches
        try:
            await rig.reserve(jobs)
            start = rig.clock.now()
            hedge_at = start + VALIDATING_S["openai"] + 0.6 * T  # members 2 and 3 finish after it: never run
            await rig.run("batch_api", jobs, hedge_at=hedge_at)
            await rig.resolved(jobs, timeout_s=20.0)
            await _settled(rig, 30.0)
            await _journal_quiet(rig)  # what it told the groupers has been sent
            assert e.count("gemini.batches.cancel") == 1
            told = [t for name, args in rig.grouper.calls if name == "observe_turnarounds" for t in args[0]]
            ended = [t for t in told if t.end is not None]
            assert len(ended) == 1, told
            assert ended[0].censored and ended[0].end == hedge_at, ended  # ran past its hedge, no more is known
        finally:
            await rig.close()
    asyncio.run(go())
