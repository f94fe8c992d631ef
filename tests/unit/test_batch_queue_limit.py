"""OpenAI's batch queue limit (per model, input tokens in batches not yet ended: 90,000 for gpt-4o at tier 1)
against the engine, through a ``Dispatcher`` and the emulator's ``batch_queue_limits``. A batch that would pass
it is created and then fails whole at validation, ``token_limit_exceeded``. Its members went back to the policy,
which batched them again at once, into the same full queue, until the progress guard sent them sync at twice
the price; the limit in the catalog (an assumption for the top tier) never learnt the account's own."""

from __future__ import annotations

import asyncio

import pytest

from engine.emulator import Emulator
from tests.unit.test_http_providers import (  # noqa: F401  (emu: a fixture)
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    emu,
    jobs_of,
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
