"""An ended batch whose results hold a response that names no member (the emulator's ``keyless_members``: a
Gemini inline response without its ``metadata``, as googleapis python-genai #2008 and js-genai #1191 report; an
OpenAI or Anthropic results line without its ``custom_id``). Its member ran and is billed, and which member it is
cannot be told (Google's may come out of order, #1909: never by position). Before, the member no response named
was sent again as one that never ran: paid twice. Now every member left without a response fails possibly
billed at its bound, never sent again; a keyless refusal (billed nothing) changes nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from actors._file_journal import ARCHIVE
from engine.app._batch_rescue import rescue
from engine.core.cost import reserve_bound
from engine.core.provider_api import Secret
from tests.unit.test_batch_rescue import _crashed_after, _records
from tests.unit.test_gemini_batch import CAT as GCAT
from tests.unit.test_gemini_batch import assert_native_member, billed, emulator
from tests.unit.test_gemini_batch import jobs_of as images
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    CAT,
    KEY,
    SPEED,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
)

ALL = pytest.mark.parametrize("provider", ["openai", "anthropic", "google"])
CREATE = {"openai": "batches.create", "anthropic": "messages.batches.create", "google": "gemini.batches.create"}


@pytest.fixture
def gemu():
    with emulator() as e:
        yield e


def _jobs(provider: str) -> list:
    return images() if provider == "google" else jobs_of(provider, claims=True)


def _emu(provider: str, emu, gemu):  # noqa: F811
    return gemu if provider == "google" else emu


@ALL
def test_a_response_without_its_key_fails_the_member_it_may_be_possibly_billed_never_sent_again(
        emu, gemu, provider, caplog):  # noqa: F811
    """One member's response comes back without its key: every other member is answered from the batch, and
    the member no response names fails, possibly billed at its bound, with an error naming the batch and the
    cause, and one error line in the log. Before, it went back to be sent again (readmitted): paid twice."""
    e, jobs = _emu(provider, emu, gemu), _jobs(provider)
    lost = jobs[1]
    e.faults.keyless_members = {batch_key(lost)}

    async def go():
        rig = Rig(e, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20.0)
            assert rig.grouper.readmitted() == [] and rig.calls == []  # nothing sent again, nothing sync
            assert e.count(CREATE[provider]) == 1
            got = billed(e) if provider == "google" else billed_by_custom_id(e)
            assert set(got) == {batch_key(j) for j in jobs}  # every member ran, billed once
            for j in jobs:
                if j is not lost:
                    if provider == "google":
                        assert_native_member(rig.results[j.req.id], j, got[batch_key(j)])
                    else:
                        assert_batch_member(rig.results[j.req.id], j, got[batch_key(j)], provider)
            r = rig.results[lost.req.id]
            assert r.status == "failed" and "name no member" in r.error, r
            field = "metadata.key" if provider == "google" else "custom_id"
            assert field in r.error and "not sent again" in r.error, r.error
            bound = reserve_bound(lost.req, GCAT if provider == "google" else CAT, "batch_api", None)
            assert bound >= got[batch_key(lost)].cost_usd
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            assert sum(rig.budget.book.spend.values()) >= e.bill().total_usd - 1e-12  # never under the bill
            stats = await rig.d.stats()
            assert stats["possibly_billed"] == 1
        finally:
            await rig.close()
    with caplog.at_level(logging.ERROR, logger="smartbatch.providers"):
        asyncio.run(go())
    said = [rec for rec in caplog.records if "without their key" in rec.getMessage()]
    assert len(said) == 1 and "1 response(s)" in said[0].getMessage(), said


@ALL
def test_a_refusal_without_its_key_billed_nothing_and_its_member_goes_again_as_before(emu, gemu, provider):  # noqa: F811
    """A member refused inside the batch (billed nothing) whose refusal comes back without its key: nothing ran
    unnamed, so no member is failed possibly billed; the refused one goes again, as a refused member does."""
    e, jobs = _emu(provider, emu, gemu), _jobs(provider)
    refused = jobs[2]
    e.faults.keyless_members = e.faults.fail_members = {batch_key(refused)}

    async def go():
        rig = Rig(e, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs, timeout_s=20.0)
            assert [j.req.id for j in rig.grouper.readmitted()] == [refused.req.id]
            assert all(rig.results[j.req.id].status == "ok" for j in jobs if j is not refused), rig.results
            assert batch_key(refused) not in (billed(e) if provider == "google" else billed_by_custom_id(e))
            assert (await rig.d.stats())["possibly_billed"] == 0
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_resume_keeps_the_member_no_response_names_failed_at_its_bound_never_sent_again(emu, tmp_path):  # noqa: F811
    """A ``batch`` run killed after its batch ended, before its answers reached the output file: the resume reads
    the batch again, and the member no response names is kept failed, charged its bound, not among the lines
    sent again. Before, the rescue kept answered members alone, and the resume sent that one again: paid twice
    (as it did a member whose line could not be read)."""
    root = tmp_path / "j"
    jobs = jobs_of("openai", claims=True)
    lost = jobs[1]
    emu.faults.keyless_members = {batch_key(lost)}
    ids = {j.req.id for j in jobs}
    rig = _crashed_after(emu, root, jobs, lambda rig: ids <= set(rig.results) and _records(root).get(
        ARCHIVE + "batches:openai"), "every member resolved, and the batch's record archived")
    wanted = {jobs[0].req.id, lost.req.id}  # (the others reached the output file)
    got = rescue(root, rig.settings, rig.catalog, {"openai": Secret(KEY)}, speedup=SPEED, wanted=wanted,
                 say=lambda m: None)
    assert set(got.results) == wanted  # so neither is sent again by the resume
    assert got.results[jobs[0].req.id].status == "ok"
    r = got.results[lost.req.id]
    bound = reserve_bound(lost.req, CAT, "batch_api", None)
    assert r.status == "failed" and "name no member" in r.error and r.cost_usd == pytest.approx(bound), r
    assert r.cost_usd >= billed_by_custom_id(emu)[batch_key(lost)].cost_usd  # charged never under the bill
