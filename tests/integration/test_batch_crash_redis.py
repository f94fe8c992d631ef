"""`smartbatch batch` with its budgets in Redis, killed with SIGKILL while its provider batch runs, then run
again with --resume: what that batch finished is billed, read back by the resume, and counted once in the Redis
ledger (its members' journaled claims settled at what they cost), never left to expire unspent."""

import json
import subprocess
from pathlib import Path

import pytest

from engine.app._batch_rescue import journal_dir
from engine.emulator import Emulator
from tests.integration._catalogs import openai_only_file
from tests.integration.test_batch_crash import (
    BIN,
    SPEEDUP,
    TURNAROUND_S,
    _env,
    _journaled_batches,
    _kill_when,
    _to_the_batches_end,
    _until,
)
from tests.unit.test_http_providers import fixed_turnaround_catalog

N = 6


def _spend(client, prefix: str) -> tuple[float, float, float]:
    """(the ledger's spend per tenant, provider and model, summed; its windows' spent; their reserved)."""
    spend = sum(float(v) for v in client.hgetall(f"{prefix}:spend").values())
    windows = [client.hgetall(k) for k in client.keys(f"{prefix}:w:*")]
    return (spend, sum(float(w.get(b"spent", 0)) for w in windows),
            sum(float(w.get(b"reserved", 0)) for w in windows))


def test_a_resume_counts_in_the_redis_ledger_what_the_killed_runs_batch_finished(tmp_path: Path, redis_server):
    lines = [{"custom_id": f"r{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-5-mini", "max_completion_tokens": 1000,
                       "messages": [{"role": "user", "content": f"Summarise report number {k}. " * 150}]}}
             for k in range(N)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    prefix = f"sbtest-resume-{tmp_path.name}"
    env = {**_env(), "SMARTBATCH_BUDGETS__SPECS": '[{"max_budget": 50}]',
           "SMARTBATCH_BUDGETS__REDIS_URL": redis_server.url, "SMARTBATCH_BUDGETS__REDIS_PREFIX": prefix}
    client = redis_server.client()
    with Emulator(fixed_turnaround_catalog(TURNAROUND_S), speedup=SPEEDUP, seed=0, cancel_s=600.0) as emu:
        args = [str(BIN), "batch", str(src), "--out", str(out), "--providers", "http", "--policy", "batch-all",
                "--catalog", str(openai_only_file(tmp_path)),
                "--base-url", f"openai={emu.base_url('openai')}", "--speedup", str(SPEEDUP)]
        _kill_when(args, env, lambda: _journaled_batches(journal_dir(out)) >= 1, "its provider batch to be journaled")
        _to_the_batches_end(emu, TURNAROUND_S)
        _until(lambda: len(emu.bill().items) == N, "the killed run's batch to finish at the provider")
        held = _spend(client, prefix)
        assert held[0] == 0 and held[2] > 0, held  # its claims reserved, nothing settled: the run was killed
        resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        bill = emu.bill()
        spend, spent, reserved = _spend(client, prefix)
        # Before, the resume counted nothing under Redis (so as not to count twice) and the killed run's claims
        # were left to expire unspent after reservation_ttl_s: the ledger $0 against the bill.
        assert spend == pytest.approx(bill.total_usd, abs=1e-9) and spent == pytest.approx(bill.total_usd, abs=1e-9)
        assert reserved == pytest.approx(0.0, abs=1e-9)  # the claims settled, their room given back
        # (Settled once whoever asks again: ``test_the_rescue_settles_each_claim_once_whoever_granted_it``, below,
        # without a third run of the CLI and its Ray.)
    assert len(emu.bill().items) == N
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [f"r{k}" for k in range(N)]


def test_the_rescue_settles_each_claim_once_whoever_granted_it(redis_server):
    """``settle_claims`` comes from a process that did not grant the claims: each counts through its record in
    Redis (open, or swept at its expiry), once; one the killed run settled already counts nothing again."""
    import asyncio
    from types import SimpleNamespace

    import redis.asyncio as aioredis

    from actors.budget_redis import RedisBudgetBook
    from engine.app._rescue_settle import settle_claims
    from engine.core.budgets import BudgetSettings, BudgetSpec, Claim

    spec = BudgetSpec(max_budget=10.0)
    budgets = BudgetSettings(specs=(spec,), redis_url=redis_server.url, redis_prefix="sbtest-rescue-settle")
    settings = SimpleNamespace(budgets=budgets)

    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            killed = RedisBudgetBook(client, [spec], prefix=budgets.redis_prefix, reservation_ttl_s=600)
            claims = [Claim(c, "default", "openai", "gpt-5-mini", "normal", 1.0) for c in ("open", "done")]
            assert all(v.ok for v in await killed.reserve_many(claims, 0.0))
            await killed.settle_many([("done", 0.25)])  # settled before the kill
            await settle_claims(settings, {"open": 0.5, "done": 0.25})
            await settle_claims(settings, {"open": 0.5, "done": 0.25})  # a rescue run again
            return await killed.window(spec, 0.0)
        finally:
            await client.aclose()
    assert asyncio.run(go()) == (pytest.approx(0.75), pytest.approx(0.0))  # (spent, reserved)


def test_a_claim_the_rescue_settled_is_not_counted_again_by_the_stopped_runs_kept_settlement(redis_server):
    """``batch`` interrupted while Redis was away: its stop settled the cut batch's members at their bound, kept
    in a file with each claim's copy (whose spend, which windows: docs/budgets.md), and kept its journal. Redis
    back, ``--resume`` rescues the batch and settles each claim at what it cost; then its engine's start takes the
    file back and sends those settlements. Each claim must count once. Before, the rescue's settlement (no copy:
    it granted none) removed the record and left no marker, and the file's, finding neither, counted its bound
    again as a record Redis lost: $0.5 + $1.0 on the ledger for a claim billed $0.5 (a review)."""
    import asyncio
    from types import SimpleNamespace

    import redis.asyncio as aioredis

    from actors.budget_redis import RedisBudgetBook
    from engine.app._rescue_settle import settle_claims
    from engine.core.budgets import BudgetSettings, BudgetSpec, Claim

    spec = BudgetSpec(max_budget=10.0)
    budgets = BudgetSettings(specs=(spec,), redis_url=redis_server.url, redis_prefix="sbtest-rescue-then-kept")
    settings = SimpleNamespace(budgets=budgets)

    async def go():
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            stopped = RedisBudgetBook(client, [spec], prefix=budgets.redis_prefix, reservation_ttl_s=600)
            claim = Claim("cut", "default", "openai", "gpt-5-mini", "normal", 1.0)
            assert all(v.ok for v in await stopped.reserve_many([claim], 0.0))
            await settle_claims(settings, {"cut": 0.5})  # the resume's rescue: what the batch finished
            await stopped.settle_many([("cut", 1.0)])  # the stop's kept settlement, at the bound, taken back
            return await stopped.window(spec, 0.0), float(await client.hget(f"{budgets.redis_prefix}:spend",
                                                                             next(iter(await client.hkeys(
                                                                                 f"{budgets.redis_prefix}:spend")))))
        finally:
            await client.aclose()
    (spent, reserved), spend = asyncio.run(go())
    assert (spent, reserved, spend) == (pytest.approx(0.5), pytest.approx(0.0), pytest.approx(0.5))
