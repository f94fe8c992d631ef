"""A batch larger than the provider takes (OpenAI's 200 MB input file, Anthropic's 256 MB create) is sent as
several batches, each billed at the batch price, against the HTTP emulator, which refuses an oversized one as
the providers do. Before, the whole batch was refused and every member went back to be sent sync."""

from __future__ import annotations

import asyncio
import math

import pytest

from actors._types import BatchJob, Job
from actors.dispatcher import Dispatcher
from engine.core.catalog import Catalog
from engine.core.draws import Draws
from engine.core.provider_api import BatchState, Secret
from engine.core.request import Request
from engine.core.settings import Settings
from engine.emulator import Emulator
from engine.runtime.providers import SimProvider, Work
from tests.unit.test_http_providers import (
    BATCH_ROUTE,
    CAT,
    EMU_CANCEL_S,
    KEY,
    PROVIDERS,
    ROUTE,
    SPEED,
    VALIDATING_S,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    jobs_of,
    req,
)

LIMIT_MB = 0.02  # about 21 kB: three requests of 4 kB each per batch
N_JOBS = 8


def small_batches(cat: Catalog) -> Catalog:
    providers = {}
    for name, p in cat.providers.items():
        if p.batch_api is not None and name in ("openai", "anthropic"):
            p = p.model_copy(update={"batch_api": p.batch_api.model_copy(update={"max_file_mb": LIMIT_MB})})
        providers[name] = p.model_dump()
    return Catalog.model_validate({"schema_version": cat.schema_version, "providers": providers})


@pytest.fixture
def emu_small():
    with Emulator(small_batches(CAT), latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S,
                  validating_s=VALIDATING_S["openai"], finalizing_s=1.0) as e:
        yield e


CREATE_ROUTE = {"openai": "batches.create", "anthropic": "messages.batches.create"}


@PROVIDERS
def test_a_batch_over_the_providers_size_limit_is_sent_as_several_each_at_the_batch_price(emu_small, provider):
    emu = emu_small
    jobs = jobs_of(provider, n=N_JOBS, claims=True, input_tokens=1000)  # replayed as 4,000 characters each

    async def go():
        rig = Rig(emu, provider)
        try:
            assert rig.catalog.provider(provider).batch_api.max_file_mb == LIMIT_MB
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == []  # none went back to be sent sync
            billed = billed_by_custom_id(emu)
            assert set(billed) == {batch_key(j) for j in jobs}
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            assert {i.route for i in emu.bill().items} == {BATCH_ROUTE[provider]}
            assert emu.count(ROUTE[provider]) == 0
            parts = math.ceil(N_JOBS / 3)
            assert emu.count(CREATE_ROUTE[provider]) == parts
            # The dispatch's enqueued tokens are held until its last part ends, then released once.
            await rig.until(lambda: not rig.d._parts_left, "every part to end")
            assert all(end != math.inf for end, _ in rig.d.sim.enqueued._open)
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_the_emulator_refuses_a_batch_over_the_size_limit_as_the_provider_does(emu_small, provider):
    """What the split avoids: sent as one, the batch is refused and every member goes back unbilled."""
    emu = emu_small
    jobs = jobs_of(provider, n=N_JOBS, claims=True, input_tokens=1000)

    async def go():
        rig = Rig(emu, provider)
        rig.d._file_parts = lambda js: [js]  # as before the split
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert {j.req.id for j in rig.grouper.readmitted()} == {j.req.id for j in jobs}
            assert not emu.bill().items and not rig.results
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_request_sent_at_its_recorded_size_weighs_its_prompts_multibyte_characters(emu_small, provider):
    """A request sent at its recorded size (``input_tokens * chars_per_token`` characters, its prompt among
    them) weighs more bytes than characters when its prompt is not ASCII: 2,000 tokens with a prompt of 2,666
    CJK characters (3 bytes each) are 8,000 characters but about 13,300 bytes. Weighed as 8,000, two went in a part
    of 27 kB, over the 21 kB limit: refused, and both members went sync at the full price."""
    emu = emu_small
    jobs = jobs_of(provider, n=4, claims=True, input_tokens=2000, prompt="漢字" * 1333)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == [], "a part over the size limit was refused"
            assert set(billed_by_custom_id(emu)) == {batch_key(j) for j in jobs}
            assert emu.count(ROUTE[provider]) == 0
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_split_dispatch_and_another_of_the_same_batch_id_each_release_their_enqueued_tokens(emu_small, provider):
    """A grouper's members parked for a budget go later under their batch's id (``_grouper_park``), as a
    restarted grouper's numbering does: two dispatches of one id, one split, run at once. Each releases its own
    enqueued tokens, once, when its own last part ends. Before, the unsplit one's end was counted as a part of
    the split one: its tokens were held for good (the provider's batch queue shrank by them for the engine's
    life) and the split one's were released while a part still ran."""
    emu = emu_small
    split = jobs_of(provider, n=N_JOBS, claims=True, input_tokens=1000)  # three parts
    (late,) = [Job(99, req(99, provider, input_tokens=1000), "fp-late", claim="c99")]

    async def go():
        rig = Rig(emu, provider)
        inner = rig.d.provider.poll

        async def poll(handle):  # the split dispatch's parts run until the other one has ended
            if late.req.id not in rig.results and any(k != batch_key(late) for k in handle.jobs):
                return BatchState("running", 10.0)
            return await inner(handle)

        rig.d.provider.poll = poll
        try:
            await rig.reserve([late, *split])
            await rig.run("batch_api", [late])
            await rig.run("batch_api", split)
            await rig.resolved([late, *split])
            assert rig.grouper.readmitted() == []
            await rig.until(lambda: not rig.d._parts_left and not rig.d._tasks, "every part to end")
            held = [w for end, w in rig.d.sim.enqueued._open if end == math.inf]
            assert held == [], f"enqueued tokens held after every batch ended: {held}"
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_split_dispatch_cut_by_the_dispatchers_restart_is_followed_part_by_part_and_released_once(
        emu_small, provider):
    """The dispatcher dies while the parts of a split dispatch run. Restarted, it re-attaches to each part (none
    created again, every member billed once at the batch price) and releases the dispatch's enqueued tokens
    once, when its last part ends (before, once per part: each release closes an open dispatch of that weight)."""
    emu = emu_small
    jobs = jobs_of(provider, n=N_JOBS, claims=True, input_tokens=1000)
    parts = math.ceil(N_JOBS / 3)

    async def go():
        rig = Rig(emu, provider)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.until(lambda: sum(rec[4] is not None for rec in rig.d._open.values()) == parts,
                            "every part created")
            for t in list(rig.d._tasks):  # the process died here
                t.cancel()
            d2 = Dispatcher(provider, rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            released = []
            d2.sim.finish_batch = lambda tokens, end, model=None: released.append(tokens)
            assert await d2.recover() == parts
            await rig.resolved(jobs)
            assert rig.grouper.readmitted() == [] and emu.count(ROUTE[provider]) == 0
            assert set(billed_by_custom_id(emu)) == {batch_key(j) for j in jobs}  # each once
            assert emu.count(CREATE_ROUTE[provider], status=200) == parts
            await rig.until(lambda: not d2._open and not d2._tasks, "every part to end")
            assert len(released) == 1, f"the dispatch's tokens were released {len(released)} times"
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())


def _room_for_one_batch(cat: Catalog) -> Catalog:
    """OpenAI's enqueued-token limit at about one test batch's tokens: a second waits for the first to end."""
    p = cat.providers["openai"]
    p = p.model_copy(update={"batch_api": p.batch_api.model_copy(update={"max_enqueued_tokens": 2_000})})
    return Catalog.model_validate({"schema_version": cat.schema_version,
                                   "providers": {**{k: v.model_dump() for k, v in cat.providers.items()},
                                                 "openai": p.model_dump()}})


def test_a_batch_that_waited_for_enqueued_room_past_its_hedge_is_never_created():
    """The second batch waits for the first to leave the provider's enqueued-token room, and its hedge passes
    meanwhile: its members go back to the policy, as at a hedge, and nothing is created, as in the simulator.
    Created, it was cancelled at once: a create and a cancel for nothing, members back only once the cancel
    ended, and any it finished meanwhile billed at the batch price where the simulator billed nothing."""
    first = jobs_of("openai", claims=True)
    second = [j._replace(req=j.req.model_copy(update={"id": f"late-{k}"}), claim=f"l{k}") for k, j in enumerate(first)]
    with Emulator(_room_for_one_batch(CAT), latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S,
                  validating_s=VALIDATING_S["openai"], finalizing_s=1.0) as emu:
        async def go():
            rig = Rig(emu, "openai")
            try:
                await rig.reserve(first + second)
                hedge_at = rig.clock.now() + 100.0  # a tenth of the first batch's turnaround
                await rig.d.run_many([BatchJob("b1", "batch_api", None, False, "t", "t", first),
                                      BatchJob("b2", "batch_api", hedge_at, False, "t", "t", second)])
                await rig.resolved(first + second, timeout_s=20)
                back = {j.req.id: j for j in rig.grouper.readmitted()}
                assert set(back) == {j.req.id for j in second} and all(j.hedges == 1 for j in back.values())
                assert emu.count(CREATE_ROUTE["openai"], status=200) == 1
                assert set(billed_by_custom_id(emu)) == {batch_key(j) for j in first}
            finally:
                await rig.close()
        asyncio.run(go())


def test_the_live_kernel_gives_a_batch_waiting_for_enqueued_room_back_at_its_hedge():
    """The dispatcher's queue (``SimProvider`` without draws): a batch waiting for the enqueued-token room is
    handed back when its hedge comes, as a batch never created, not when the room frees (its members went back
    to the policy past their deadlines, a hunt). The pump asks to be woken at that hedge."""
    cat = _room_for_one_batch(CAT)
    sim = SimProvider(cat.provider("openai"), cat, Settings(), Draws(0, 4, 0, 60.0), draw=False)

    def work(tag: str, hedge_at: float | None) -> Work:
        reqs = [Request.model_validate({"id": f"{tag}{k}", "arrival_s": 0.0, "model": "gpt-5-mini",
                                        "input_tokens": 600, "output_tokens": 100}) for k in range(2)]
        return Work("batch_api", tag, reqs, [0, 1], [0, 0], hedge_at=hedge_at)

    sim.enqueue(work("a", None))
    sim.enqueue(work("b", 50.0))
    events, wake = sim.pump(0.0)
    assert [(e.work.item, e.start) for e in events] == [("a", 0.0)] and wake == 50.0
    assert sim.pump(49.0)[0] == []
    events, wake = sim.pump(50.0)
    assert [(e.kind, e.work.item, e.start, e.outcome) for e in events] == [("batch_api", "b", 50.0, 0)]
    assert wake is None and sim.waiting == 0 and sim.take_queued() == []


def test_a_batch_given_back_at_its_hedge_charges_its_tenant_no_share():
    """A batch handed back unsent (its hedge came while it waited for enqueued room) was charged to its tenant's
    fair share when the queue skipped it, so that tenant's next batch waited behind the others' (a review)."""
    from engine.core.scheduling import Scheduling, Unit
    from engine.runtime.batch_queue import BatchQueue

    def unit(name, tenant, tokens, arrival):
        return Unit(name, tenant, "normal", 1e6, arrival, tokens, 0.01, 0, 0.0)

    q = BatchQueue(Scheduling(), 4)
    q.push(unit("A-big", "A", 2_000_000, 0.0), 10.0)
    for name, tenant, at in (("B-1", "B", 1.0), ("A-2", "A", 2.0), ("B-2", "B", 3.0)):
        q.push(unit(name, tenant, 1000, at), None)
    assert [u.item for u in q.late(11.0)] == ["A-big"] and len(q) == 3
    order = []
    while (picked := q.peek(12.0)) is not None:
        order.append(q.take(picked).item)
    assert order == ["B-1", "A-2", "B-2"]
