"""A budget change whose reply Redis lost, on a ledger that engines share (budget actors on one real redis-server,
no Ray). Such a change was refused ("not made") and undone at the refusing engine's next answered call; should
another engine take it at its check and make a change on it first, every engine ended up enforcing the change
its caller was told was not made. Now it is never said refused unless it can be in force nowhere."""

from __future__ import annotations

import asyncio

import pytest

from engine.core.budgets import BudgetSpec
from engine.core.errors import ConfigError
from tests.integration.test_budget_redis import _engines_on_one_ledger

BETA = BudgetSpec(tenant="beta", max_budget=2.0)


def _losing(ctl, kept: bool = True, answer_from: int | None = None):
    """Make ``ctl``'s writes of its budgets go wrong as with a Redis whose replies are lost: the first is run by
    Redis when ``kept`` (else lost before Redis reads it), its reply lost either way; those after it are lost
    before Redis reads them, up to the ``answer_from``-th (counted from 1), answered from then on. Returns the
    client's own eval and the args of every write sent (to send one again, as a late delivery)."""
    plain, sent = ctl.book.client.eval, []

    async def eval_(*args):
        sent.append(args)
        if answer_from is not None and len(sent) >= answer_from:
            return await plain(*args)
        if len(sent) == 1 and kept:
            await plain(*args)
        raise asyncio.TimeoutError

    ctl.book.client.eval = eval_
    return plain, sent


def test_a_change_whose_reply_was_lost_and_that_another_engine_built_on_is_not_said_refused(redis_server, caplog):
    spec, _, (a, b) = _engines_on_one_ledger(redis_server)
    raised = spec.model_copy(update={"max_budget": 50.0})

    async def go():
        try:
            for ctl in (a, b):
                await ctl.check_ledger()
            plain, _ = _losing(a)  # kept, reply lost; a's link to Redis then down for its asking again
            with pytest.raises(ConfigError) as said:
                await a.change_budgets([raised])
            a.book.client.eval = plain
            await b.follow_ledger()  # b's once-a-second check takes the change Redis kept
            await b.change_budgets([BETA])  # and b makes one on it before a's next call that Redis answers
            a._down_until = 0.0  # a's retry time has come
            with caplog.at_level("WARNING", logger="smartbatch.budget"):
                on_a = await a.budget_specs()
            return str(said.value), on_a, await b.budget_specs()
        finally:
            await a.close()
            await b.close()

    said, on_a, on_b = asyncio.run(go())
    assert on_a == on_b and set(on_a[1]) == {raised, BETA}  # every engine agrees: the change is in force
    # Its caller was told the truth: not "refused", but not known yet, settled at a's next answered call.
    assert "not made" not in said and "not known" in said, said
    assert any("change 1" in r.getMessage() and "was made" in r.getMessage() for r in caplog.records)


def test_a_change_whose_write_never_reached_redis_is_said_not_made_and_a_late_delivery_cannot_make_it(
        redis_server, caplog):
    spec, _, (a, b) = _engines_on_one_ledger(redis_server)
    raised = spec.model_copy(update={"max_budget": 50.0})

    async def go():
        try:
            for ctl in (a, b):
                await ctl.check_ledger()
            plain, sent = _losing(a, kept=False)
            with pytest.raises(ConfigError):
                await a.change_budgets([raised])
            a.book.client.eval = plain
            a._down_until = 0.0
            with caplog.at_level("WARNING", logger="smartbatch.budget"):
                await a.budget_specs()  # a's next answered call settles it: not made
            late = await plain(*sent[0])  # the first write, delivered late (Redis read it after a pause)
            await b.follow_ledger()
            return late, await a.budget_specs(), await b.budget_specs()
        finally:
            await a.close()
            await b.close()

    late, on_a, on_b = asyncio.run(go())
    assert late is not None  # refused by the ledger: its change's number was taken meanwhile
    assert on_a == on_b and raised not in on_a[1]
    assert any("change 1" in r.getMessage() and "was not made" in r.getMessage() for r in caplog.records)


def test_a_change_whose_reply_was_lost_is_asked_again_at_once_and_answered_made(redis_server):
    spec, _, (a, b) = _engines_on_one_ledger(redis_server)
    raised = spec.model_copy(update={"max_budget": 50.0})

    async def go():
        try:
            for ctl in (a, b):
                await ctl.check_ledger()
            _losing(a, answer_from=2)  # kept, its reply lost; asked again, Redis answers
            state = await a.change_budgets([raised])
            await b.follow_ledger()
            return state, await a.budget_specs(), await b.budget_specs()
        finally:
            await a.close()
            await b.close()

    state, on_a, on_b = asyncio.run(go())
    assert state is not None and state.version == 1 and state.specs == (raised,)
    assert on_a == on_b == (1, (raised,))


def test_the_ledger_keeps_the_tokens_of_its_last_changes_and_no_more(redis_server):
    import redis.asyncio as aioredis

    from actors._budget_specs import CHAIN_KEPT, SpecStore

    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        store = SpecStore(client, f"sbtest-chain{id(client)}")
        try:
            tokens = [f"{n:08x}" for n in range(CHAIN_KEPT + 5)]
            for n, token in enumerate(tokens):
                assert await store.write(n, n + 1, (BETA,), token) is None
            return tokens, await store.read()
        finally:
            await client.aclose()

    tokens, kept = asyncio.run(go())
    assert kept.chain == tuple(tokens[-CHAIN_KEPT:]) and kept.by == tokens[-1]
    assert kept.built_on(tokens[-CHAIN_KEPT]) and not kept.built_on(tokens[0])
    # What it tells: whether the change of each number was the one of a token, back to the first it keeps.
    assert kept.tells(len(tokens) - CHAIN_KEPT + 1) and not kept.tells(len(tokens) - CHAIN_KEPT)
