"""OpenAI's batch queue limit (per model, input tokens in batches not yet ended: 90,000 for gpt-4o at tier 1)
against the engine, through a ``Dispatcher`` and the emulator's ``batch_queue_limits``. A batch that would pass
it is created and then fails whole at validation, ``token_limit_exceeded``. Its members went back to the policy,
which batched them again at once, into the same full queue, until the progress guard sent them sync at twice
the price; the limit in the catalog (an assumption for the top tier) never learnt the account's own."""

from __future__ import annotations

import asyncio

import pytest

from actors import Dispatcher
from actors._types import BatchJob
from engine.core.provider_api import Secret
from engine.emulator import Emulator
from tests.unit.test_http_providers import (  # noqa: F401  (emu, quarter: fixtures)
    KEY,
    SPEED,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
    quarter,
)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
MODEL = "gpt-5-mini"


def failed_batches(e: Emulator) -> list[str]:
    """The codes of the batches the emulator failed whole, in creation order."""
    core = e._core
    with core.lock:
        return [e["code"] for b in core.batches.values() for e in b.errors]


def test_a_batch_refused_for_a_full_queue_waits_for_room_and_is_billed_at_the_batch_price(emu):  # noqa: F811
    first, second = jobs_of("openai", 8, claims=True)[:4], jobs_of("openai", 8, claims=True)[4:]
    # One batch of four (about 1,300 input tokens) fits, not two.
    emu.faults.batch_queue_limits = {MODEL: 2_000}

    async def go():
        rig = Rig(emu, "openai")
        try:
            await rig.reserve(first + second)
            await rig.run("batch_api", first, bid="b1")
            await rig.run("batch_api", second, bid="b2")
            await rig.until(lambda: len(rig.results) == 8 or rig.grouper.readmitted(), "every result", 20.0)
            assert rig.grouper.readmitted() == []  # none sent back to be batched again, nor sent sync
            assert failed_batches(emu) == ["token_limit_exceeded"]  # once: then it waited for the first to end
            billed = billed_by_custom_id(emu)
            for j in first + second:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "openai")
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            assert rig.d.in_flight == 0 and not rig.d._open
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_batch_past_the_queue_limit_alone_is_sent_in_parts_that_fit(emu):  # noqa: F811
    jobs = jobs_of("openai", 4, claims=True)
    emu.faults.batch_queue_limits = {MODEL: 700}  # two members fit at a time, not four

    async def go():
        rig = Rig(emu, "openai")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.until(lambda: len(rig.results) == 4 or rig.grouper.readmitted(), "every result", 20.0)
            assert rig.grouper.readmitted() == []
            assert failed_batches(emu) == ["token_limit_exceeded"]
            billed = billed_by_custom_id(emu)
            for j in jobs:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "openai")
        finally:
            await rig.close()
    asyncio.run(go())


def test_the_emulators_batch_queue_limits_are_opt_in_and_checked():
    from engine.core.errors import ConfigError

    with Emulator(latency_scale=0.0) as e:
        assert e.faults.batch_queue_limits == {}  # no limit unless asked
        e.faults.configure({"batch_queue_limits": {MODEL: 90_000}})
        assert e.faults.queue_limit(MODEL) == 90_000 and e.faults.queue_limit("gpt-5") is None
        with pytest.raises(ConfigError, match="batch_queue_limits"):
            e.faults.configure({"batch_queue_limits": {MODEL: 0}})
        e.faults.clear()
        assert e.faults.batch_queue_limits == {}


@pytest.mark.parametrize(("message", "limit"), [
    ("Enqueued token limit reached for gpt-4o-mini in organization org-x. Limit: 2,000,000 enqueued tokens. "
     "Please try again once some in_progress batches have been completed.", 2_000_000),
    # Azure OpenAI's words: unread, the limit was taken for what was under way then, for good (one small batch
    # under way serialised every later batch of the model in parts of its size).
    ("The number of enqueued tokens has surpassed the configured limit of 30K for the deployment "
     "'gpt-4.1-batch'. Please either increase the limit or try again once the current jobs have finished.", 30_000),
    ("... the configured limit of 1.5M for the deployment 'd' ...", 1_500_000),
    ("Enqueued token limit reached, no figure", 0),
])
def test_the_queue_limit_a_refusal_names_is_read_in_openais_words_and_azures(emu, message, limit):  # noqa: F811
    from types import SimpleNamespace as NS

    from tests.unit.test_http_providers import direct

    p = direct(emu, "openai")
    err = NS(code="token_limit_exceeded", message=message)
    handle = NS(batch=NS(status="failed", errors=NS(data=[err])))
    try:
        assert p.queue_refusal(handle) == limit
    finally:
        asyncio.run(p.close())


def polls_held(d: Dispatcher, jobs: list) -> asyncio.Event:
    """Dispatcher ``d``'s polls of the batch that carries ``jobs`` wait for the event returned: until it is set,
    that batch is under way however slow the machine (its 4 s turnaround was the margin the reverted test leant
    on)."""
    release, inner, ids = asyncio.Event(), d.provider.poll, {j.req.uid for j in jobs}

    async def poll(handle):
        if any(rec[4] is handle and {j.req.uid for j in rec[1]} == ids for rec in d._open.values()):
            await release.wait()
        return await inner(handle)

    d.provider.poll = poll  # an instance attribute shadows the method: the dispatcher calls this
    return release


async def one_refused_at_the_gate(rig: Rig, first: list, second: list) -> asyncio.Event:
    """``first`` made a batch (created before ``second``'s is asked for, so ``second``'s is the one refused: two
    creates under way at once reached the emulator in either order, and the reverted test withdrew the batch
    under way in 2 runs of 3), and ``second``'s batch refused for the full queue and waiting at the gate for
    ``first``'s end, which waits for the event returned."""
    release = polls_held(rig.d, first)
    await rig.reserve(first + second)
    await rig.run("batch_api", first, bid="b1")
    await rig.until(lambda: any(rec[4] is not None for rec in rig.d._open.values()), "the first batch's create", 20.0)
    await rig.run("batch_api", second, bid="b2")
    await rig.until(lambda: len(rig.d.sim.batch_queue) == 1, "the refused batch waiting for room", 20.0)
    (u,) = rig.d.sim.batch_queue._waiting.values()
    assert [j.req.uid for j in u.item.item[1]] == [j.req.uid for j in second]
    return release


async def settled(rig: Rig, kept: list) -> None:
    """Every claim settled, the budget's spend the kept members' bills, nothing left under way."""
    await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
    assert sum(rig.budget.book.spend.values()) == pytest.approx(
        sum(rig.results[j.req.id].cost_usd for j in kept), abs=1e-12)
    assert rig.d.in_flight == 0 and not rig.d._open


def test_a_batch_waiting_for_queue_room_whose_members_are_all_withdrawn_ends_them_at_once(quarter):  # noqa: F811
    """A batch refused for a full queue waits at the dispatcher's gate for room (the end of another batch of its
    model, hours away at a provider) until its hedge. Its members all withdrawn (``Engine.cancel_requests``, an
    endpoint batch's cancel), they end now, billed nothing, their claims settled at 0: before, they ended only
    when the gate let the batch start, and the endpoint's cancel stayed ``cancelling`` all that time. The batch
    under way runs on, and nothing more is created."""
    first, second = jobs_of("openai", 8, claims=True)[:4], jobs_of("openai", 8, claims=True)[4:]
    quarter.faults.batch_queue_limits = {MODEL: 2_000}

    async def go():
        rig = Rig(quarter, "openai", speed=SPEED / 4)
        try:
            release = await one_refused_at_the_gate(rig, first, second)
            await rig.d.withdraw([j.req.uid for j in second])
            await rig.until(lambda: all(j.req.id in rig.results for j in second), "the withdrawn members' end", 5.0)
            assert all(rig.results[j.req.id].error.startswith("cancelled: withdrawn") for j in second)
            assert len(rig.d.sim.batch_queue) == 0 and rig.grouper.readmitted() == []
            await rig.until(lambda: set(rig.budget.book.claims) == {j.claim for j in first}, "claims settled at 0")
            assert not any(j.req.id in rig.results for j in first)  # ended before the batch under way
            release.set()
            await rig.until(lambda: len(rig.results) == 8, "the first batch's answers", 20.0)
            assert [rig.results[j.req.id].status for j in first] == ["ok"] * 4
            assert set(billed_by_custom_id(quarter)) == {batch_key(j) for j in first}  # the withdrawn: never billed
            assert failed_batches(quarter) == ["token_limit_exceeded"] and len(quarter._core.batches) == 2
            await settled(rig, first)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_batch_waiting_for_queue_room_leaves_its_withdrawn_members_at_once_and_sends_the_rest(quarter):  # noqa: F811
    """Some members of a batch waiting at the gate withdrawn: they end now, billed nothing, and the batch waits on
    without them (before, they ended only when the gate let it start). Smaller, it may fit now: the gate is
    asked again at once, and here the second withdrawal lets it in while the first batch still runs."""
    first, second = jobs_of("openai", 8, claims=True)[:4], jobs_of("openai", 8, claims=True)[4:]
    quarter.faults.batch_queue_limits = {MODEL: 2_000}  # first: 1,260 input tokens; second's last two: 730

    async def go():
        rig = Rig(quarter, "openai", speed=SPEED / 4)
        try:
            release = await one_refused_at_the_gate(rig, first, second)
            await rig.d.withdraw([second[0].req.uid])
            await rig.until(lambda: second[0].req.id in rig.results, "the withdrawn member's end", 5.0)
            (u,) = rig.d.sim.batch_queue._waiting.values()  # the other three still wait for room
            assert [j.req.uid for j in u.item.item[1]] == [j.req.uid for j in second[1:]]
            await rig.d.withdraw([second[1].req.uid])
            await rig.until(lambda: len(quarter._core.batches) == 3, "the last two members' batch", 20.0)
            assert len(rig.d.sim.batch_queue) == 0 and not any(j.req.id in rig.results for j in first)
            release.set()
            await rig.until(lambda: len(rig.results) == 8, "every answer", 20.0)
            assert all(rig.results[j.req.id].error.startswith("cancelled: withdrawn") for j in second[:2])
            assert rig.grouper.readmitted() == []
            billed = billed_by_custom_id(quarter)
            kept = first + second[2:]
            assert set(billed) == {batch_key(j) for j in kept}  # the withdrawn: never sent, never billed
            for j in kept:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "openai")
            await settled(rig, kept)
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_restarted_dispatcher_counts_the_batches_it_re_attaches_to_on_its_queue_gate(emu):  # noqa: F811
    """The provider's queue holds 2,000 tokens (the catalog's ``max_enqueued_tokens``): one batch of four at a
    time. The dispatcher dies with one batch under way; restarted (as Ray does), it re-attaches to it from its
    journal, and a new batch waits at its gate for that one's end. Before, the gate did not count it: the new batch
    was created at once, past the provider's limit (refused whole there, or counted wrong by the engine)."""
    first, second = jobs_of("openai", 8, claims=True)[:4], jobs_of("openai", 8, claims=True)[4:]

    async def go():
        rig = Rig(emu, "openai")
        rig.d.sim.enqueued.limit = 2_000
        inner, journaled = rig.d._journal_put, asyncio.Event()

        async def journal_put(key: str) -> None:
            await inner(key)
            if (rec := rig.d._open.get(key)) is not None and rec[4] is not None:
                journaled.set()  # the batch's handle is in the journal

        rig.d._journal_put = journal_put
        try:
            await rig.reserve(first + second)
            await rig.run("batch_api", first, bid="b1")
            await asyncio.wait_for(journaled.wait(), 20.0)
            for t in list(rig.d._tasks):  # the process dies
                t.cancel()
            d2 = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                            rig.budget, key=Secret(KEY))
            d2.sim.enqueued.limit = 2_000
            release = polls_held(d2, first)
            assert await d2.recover() == 1
            await d2.run_many([BatchJob("b2", "batch_api", None, False, "test", "test", second)])
            assert len(d2.sim.batch_queue) == 1  # it waits for the re-attached batch's room
            release.set()
            await rig.until(lambda: len(rig.results) == 8, "every answer", 30.0)
            assert rig.grouper.readmitted() == [] and emu.count("batches.create", status=200) == 2
            billed = billed_by_custom_id(emu)
            for j in first + second:
                assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], "openai")
            await rig.until(lambda: not d2._open, "both batches ended")
            now = rig.clock.now()
            assert d2.sim.enqueued.earliest(now, 2_000) == now and d2.in_flight == 0  # the gate let go of both
            await d2.provider.close()
        finally:
            await rig.close()
    asyncio.run(go())
