"""A batch whose members went again for their deadlines (its cancel outlasted the engine's allowance) is followed
to its end, and what it finished is counted paid twice and charged (``actors._batch_watch``). Its results hold a
response without its key (the emulator's ``keyless_members``; Google's inline response without its ``metadata``,
googleapis python-genai #2008): every member no response names is failed possibly billed at its bound
(``_batch_members._unnamed``), but only as many of them ran as the responses without a key. Before (a review,
revkeys), the watch counted every one of them paid twice, at its bound: a cancelled Gemini batch's unfinished
members, which never ran (Google leaves them out), read as billed twice, and the budgets were charged for them."""

from __future__ import annotations

import asyncio

import pytest

from actors._batch_watch import known_ran
from engine.core.cost import reserve_bound
from engine.core.provider_api import CallOutcome
from engine.emulator import Emulator
from tests.unit.test_batch_faults import _journal_quiet, _settled
from tests.unit.test_gemini_batch import CAT, billed, jobs_of
from tests.unit.test_http_providers import SPEED, VALIDATING_S, Rig, T, batch_key

EMU_CANCEL_S = 100.0  # engine seconds the emulator's cancel takes: far past the engine's allowance below
ALLOWANCE_S = 1.0  # engine seconds the engine gives a cancel before its members go again (its cancel_s)


def test_a_watched_batch_counts_paid_twice_only_as_many_unnamed_members_as_responses_without_their_key():
    jobs = jobs_of()
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED / 4, cancel_s=EMU_CANCEL_S,
                  validating_s=VALIDATING_S["openai"], finalizing_s=1.0) as e:
        e.faults.keyless_members = {batch_key(jobs[0])}  # it finishes first, before the hedge

        async def go():
            rig = Rig(e, "google", cancel_s=ALLOWANCE_S, speed=SPEED / 4)
            try:
                await rig.reserve(jobs)
                # Members 0 and 1 finish before the hedge; 2 and 3 after the cancel has landed: they never run.
                await rig.run("batch_api", jobs, hedge_at=rig.clock.now() + VALIDATING_S["openai"] + 0.6 * T)
                await rig.resolved(jobs, timeout_s=20.0)
                assert {j.req.id for j in rig.grouper.readmitted()} == {j.req.id for j in jobs}  # all went again
                await _settled(rig, 30.0)  # the watch: the batch ended, its results read and counted
                got = billed(e)
                assert set(got) == {batch_key(j) for j in jobs[:2]}, got  # two ran in the batch, two never did
                assert rig.d.paid_twice == 2, rig.d.paid_twice
                keyed = got[batch_key(jobs[1])].cost_usd
                bound = max(reserve_bound(j.req, rig.catalog, "batch_api", None) for j in jobs)
                assert rig.d.paid_twice_usd == pytest.approx(keyed + bound, abs=1e-12)
                await _journal_quiet(rig)  # the watch's charges have reached the budget
                charged = sum(rig.budget.book.spend.values())  # (the claims went back with the members)
                # Charged what the batch billed, never under it, and no bound of a member that never ran.
                assert got[batch_key(jobs[0])].cost_usd + keyed - 1e-12 <= charged <= keyed + bound + 1e-12
            finally:
                await rig.close()
        asyncio.run(go())


def test_of_the_unnamed_members_as_many_as_ran_count_at_the_dearest_bounds_and_in_each_tenant_for_its_budget():
    """One response without its key among four unnamed members of two tenants: one counts (the dearest bound),
    and for the budgets one in each tenant (the one billed may be either's: neither budget is left under it)."""
    def unnamed(usd: float) -> CallOutcome:
        return CallOutcome(False, 0.0, usd, retryable=False, real=True, maybe_billed=True, unnamed_ran=1)
    pairs = [(("x", "a"), unnamed(3.0)), (("x", "b"), unnamed(1.0)), (("y", "c"), unnamed(2.0)),
             (("y", "d"), unnamed(5.0)), (("y", "e"), CallOutcome(True, 0.0, 0.5))]
    assert [m for m, _ in known_ran(pairs)] == [("y", "e"), ("y", "d")]
    assert [m for m, _ in known_ran(pairs, lambda m: m[0])] == [("y", "e"), ("y", "d"), ("x", "a")]
