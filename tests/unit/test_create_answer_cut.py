"""A batch create whose answer comes back cut short (the provider made the batch; its answer is not JSON): the
create is taken for one that got no answer, the batch looked for and followed, never for a refusal. Before (a
review of Gemini's native batches, gemrev), the SDK's parse error passed as a refusal: every member went back to be
sent sync while the batch the create had made ran unfollowed and billed each of them too, uncounted. OpenAI's and
Anthropic's creates alike (``HttpBase._refused``)."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_gemini_batch import jobs_of as nano_jobs
from tests.unit.test_http_providers import Rig, batch_key, billed_by_custom_id, emu, jobs_of  # noqa: F401 - a fixture

CREATE = {"openai": "batches.create", "anthropic": "messages.batches.create", "google": "gemini.batches.create"}


@pytest.mark.parametrize("provider", sorted(CREATE))
def test_a_create_whose_answer_is_cut_short_is_followed_not_taken_for_a_refusal(emu, provider):  # noqa: F811
    emu.faults.script(provider, CREATE[provider], [{"cut_body": True}])
    jobs = nano_jobs() if provider == "google" else jobs_of(provider, claims=True)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20.0)
            assert rig.grouper.readmitted() == [] and rig.calls == []  # none handed back, nothing sent sync
            billed = billed_by_custom_id(emu)  # none billed twice
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                r = rig.results[j.req.id]
                assert r.status == "ok" and r.mode == "batch_api" and r.real, r
                assert r.cost_usd == pytest.approx(billed[batch_key(j)].cost_usd, abs=1e-12)
            batches = {b for b in emu._core.batches.values() if getattr(b, "provider", None) == provider}
            assert len(batches) == 1  # found (or answered again under its key), never made twice
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())
