"""A batch's results read cut short: the provider answers 200 with fewer result lines than the batch answered (a
stream that ended early, a proxy's cut), against the HTTP emulator (its ``cut_body`` fault on the results route:
the first half of the lines whole, the rest missing). A member whose line is missing ran and was billed; taken
for one that never ran, it was sent again and paid twice, uncounted (a fault hunt). The read is made again."""

from __future__ import annotations

import asyncio

import pytest

from actors import Dispatcher
from engine.core.provider_api import Secret
from tests.unit.test_http_providers import (  # noqa: F401  (emu: the fixture)
    KEY,
    PROVIDERS,
    RESULTS_ROUTE,
    ROUTE,
    Rig,
    _create_then_die,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
)

CUT = [{"cut_body": True}]


@PROVIDERS
@pytest.mark.parametrize("expired", [False, True], ids=["ended", "expired"])
def test_a_results_read_cut_short_is_read_again_and_no_finished_member_is_sent_again(emu, provider,  # noqa: F811
                                                                                       expired):
    jobs = jobs_of(provider, n=6, claims=True)
    if expired:  # members 0-3 finish (at 1/6 T ... 4/6 T), then the batch expires with the other two
        emu.faults.expire_batches(1, finished_fraction=0.7)
    emu.faults.script(provider, RESULTS_ROUTE[provider], CUT)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            billed = billed_by_custom_id(emu)  # each billed once
            finished = [j for j in jobs if batch_key(j) in billed]
            assert len(finished) == (4 if expired else 6)
            # Only the members the batch never ran go back; every one it finished is answered from its results.
            assert sorted(j.req.id for j in rig.grouper.readmitted()) == sorted(
                j.req.id for j in jobs if j not in finished)
            for j in finished:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            # The cut read, then a whole one (and OpenAI's error file, of the expired members)
            assert emu.count(RESULTS_ROUTE[provider], status=200) == 2 + (expired and provider == "openai")
            assert rig.d.paid_twice == 0 and emu.count(ROUTE[provider]) == 0
            assert sum(r.cost_usd for r in rig.results.values()) == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_cut_anthropic_create_is_told_by_its_results_though_the_first_read_of_them_is_cut_short(emu):  # noqa: F811
    """A restart after the cut create's batch ended: the lookup reads the ended look-alike's results to tell it
    is this create's. Read cut short, its custom_ids were not all the members': taken for another's batch, the
    create was made again and every member billed in both."""
    emu.honour_keys = False
    jobs = jobs_of("anthropic", n=6, claims=True)
    create = "messages.batches.create"

    async def go():
        rig = Rig(emu, "anthropic")
        client = rig.d.provider.client
        try:
            await _create_then_die(rig, emu, jobs, create)
            async for b in client.messages.batches.list():  # ended once its turnaround passed (bounded, below)
                async with asyncio.timeout(20):
                    while (await client.messages.batches.retrieve(b.id)).processing_status != "ended":
                        await asyncio.sleep(0.05)
            emu.faults.script("anthropic", RESULTS_ROUTE["anthropic"], CUT)
            d2 = Dispatcher("anthropic", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            assert await d2.recover() == 1
            assert await d2.recall([j.req.uid for j in jobs]) == [j.req.uid for j in jobs]
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(emu)  # no member billed twice
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "anthropic")
            assert emu.count(create, status=200) == 1 and emu.count(ROUTE["anthropic"]) == 0
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())
