"""Answers the provider sent (and billed) that cannot be read: a batch result line cut short, a sync body cut
short. Such a call ran, so it may be on the bill: it is never sent again as if it had not, and its budget keeps
its upper bound (docs/reliability.md). Driven through a ``Dispatcher`` against the loopback emulator, whose
``garble_members`` and ``cut_body`` faults write those answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from actors.providers._http import jsonl_records
from engine.core.cost import reserve_bound
from engine.emulator import Emulator
from tests.unit.test_http_providers import (
    CAT,
    EMU_CANCEL_S,
    PROVIDERS,
    ROUTE,
    SPEED,
    VALIDATING_S,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    jobs_of,
)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


@pytest.fixture
def emu() -> Iterator[Emulator]:  # as test_http_providers' own
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


@PROVIDERS
def test_a_batch_member_whose_result_line_is_cut_short_fails_at_its_bound_and_the_others_are_not_sent_again(
        emu, provider):
    """One line cut short failed the whole results file: after five reads, every member went back to be sent
    again, the three finished ones paid twice, and the watch that should count them failed for a day (a hunt)."""
    jobs = jobs_of(provider, claims=True)
    garbled = jobs[1]
    emu.faults.garble_members = {batch_key(garbled)}

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []  # nothing sent again
            billed = billed_by_custom_id(emu)  # every member ran and was billed once
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                if j is not garbled:
                    assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            r = rig.results[garbled.req.id]
            bound = reserve_bound(garbled.req, CAT, "batch_api", None)
            assert r.status == "failed" and "not JSON" in r.error and f"${bound:.6f}" in r.error
            assert bound >= billed[batch_key(garbled)].cost_usd  # an upper bound of what it was billed
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            spend = sum(rig.budget.book.spend.values())
            assert spend == pytest.approx(sum(rig.results[j.req.id].cost_usd for j in jobs) + bound, abs=1e-12)
            assert spend >= emu.bill().total_usd  # the ledger never under the bill
            stats = await rig.d.stats()
            assert stats["possibly_billed"] == 1 and stats["possibly_billed_usd"] == pytest.approx(bound, abs=1e-6)
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
@pytest.mark.parametrize("keys", [True, False], ids=["keys-honoured", "keys-not-honoured"])
def test_a_sync_answer_cut_short_is_retried_and_its_budget_never_counts_less_than_the_bill(emu, provider, keys):
    """A 200 whose body was cut short failed as an engine error, settled at $0 though the provider billed it (a
    hunt). It is now an unanswered call: retried under its key. A provider that honours the key answers the
    retry from the first call (billed once); one that does not bills both, and the budget keeps the first
    call's upper bound."""
    emu.honour_keys = keys
    emu.faults.script(provider, ROUTE[provider], [{"cut_body": True}])

    async def go():
        rig = Rig(emu, provider)
        try:
            (j,) = jobs_of(provider, 1, claims=True)
            await rig.reserve([j])
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok", r
            (_, _, first), (_, _, second) = rig.calls
            assert not first.ok and first.maybe_billed and "could not be read" in first.error and second.ok
            bill = emu.bill()
            assert len(bill.items) == (1 if keys else 2)  # the cut answer ran: billed
            assert r.cost_usd == pytest.approx(bill.items[-1].cost_usd, abs=1e-12)
            await rig.until(lambda: not rig.budget.book.claims, "the claim settled")
            spend = sum(rig.budget.book.spend.values())
            bound = 0.0 if keys else reserve_bound(j.req, CAT, "sync", None)
            assert spend == pytest.approx(r.cost_usd + bound, abs=1e-12)
            assert spend >= bill.total_usd - 1e-12  # the ledger never under the bill
        finally:
            await rig.close()
    asyncio.run(go())


def test_results_lines_are_read_one_by_one_and_an_unreadable_one_names_its_member():
    text = ('{"custom_id": "a", "response": {"status_code": 200}}\n'
            '{"id": "batch_req_1", "custom_id": "b", "response": {"status_co\n'
            '\n'
            'garbage with no id\n'
            '{"custom_id": "c", "note": "a line separator \u2028 inside"}\n')
    records, unread = jsonl_records(text)
    assert [r["custom_id"] for r in records] == ["a", "c"]
    assert unread == ["b", None]
