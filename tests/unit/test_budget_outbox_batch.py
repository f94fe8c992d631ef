"""A Redis ledger's outbox journal written in groups (``actors._budget_outbox``): a burst of settlements and
charges while Redis is away costs the journal a write or two, each call is answered only once its items are
written, and a restart reads them back in the order they were queued. Without Ray or Redis: the ledger's Redis is
a closed port (refused at once), the journal a stand-in whose writes land when the test lets them."""

from __future__ import annotations

import asyncio
import pickle
import socket

from actors import BudgetController
from engine.core.budgets import BudgetSettings, BudgetSpec, Charge
from engine.core.clock import ManualClock


def _away() -> BudgetSettings:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed: connections are refused at once
    return BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),),
                          redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.5, redis_retry_s=3600.0)


class GatedStore:
    """Ray's store as ``KvJournal`` uses it, counting its writes; while ``held``, a write waits for ``gate``."""

    durable = True

    def __init__(self):
        self.records: dict[tuple[str, str], bytes] = {}
        self.writes = self.keys_written = 0
        self.held, self.gate, self.waiting = False, asyncio.Event(), asyncio.Event()

    async def put_many(self, space: str, values: dict) -> None:
        blobs = {k: pickle.dumps(v) for k, v in values.items()}
        self.writes += 1
        self.keys_written += len(blobs)  # KvJournal: one call to Ray's store per key
        if self.held:
            self.waiting.set()
            await self.gate.wait()
        self.records.update(((space, k), b) for k, b in blobs.items())

    async def delete(self, space: str, keys: list[str]) -> None:
        for k in keys:
            self.records.pop((space, k), None)

    async def items(self, space: str) -> dict:
        return {k: pickle.loads(v) for (s, k), v in self.records.items() if s == space}


async def _closed(*ctls: BudgetController) -> None:
    for ctl in ctls:
        for task in (ctl._reported,):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await ctl.close()


def test_a_burst_while_redis_is_away_is_journaled_in_a_write_or_two_each_call_answered_once_written():
    async def go():
        b, store = _away(), GatedStore()
        ctl = BudgetController(b, None, ManualClock(100.0), kv_journal=store)
        await ctl.settle_many([("warm", 0.0)])  # Redis found away: from here on each call goes to the outbox
        assert store.writes == 1
        store.held = True
        calls = [asyncio.create_task(ctl.settle_many([(f"c{k}", 0.01 * k)])) for k in range(100)]
        calls += [asyncio.create_task(ctl.charge_many([Charge(f"x{k}", "acme", "openai", "gpt-5-mini", 0.02)]))
                  for k in range(100)]
        await asyncio.wait_for(store.waiting.wait(), 10)
        assert not any(c.done() for c in calls)  # none answered before its item is written
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(*calls), 10)
        # Before: one write per call, 200 (and 200 calls to Ray's store); now the one held, then all the others.
        assert store.writes - 1 <= 2 and store.keys_written - 1 <= 2
        assert ctl.unjournaled() == 0 and len(ctl._outbox) == 101 and len(ctl._charges) == 100

        again = BudgetController(b, None, ManualClock(100.0), kv_journal=store)
        again.reconstructed()
        assert (await again.report())["ledger"]["unsettled"] == 201
        assert again._outbox == ctl._outbox and again._charges == ctl._charges  # in the order queued
        assert again.unjournaled() == 0
        await _closed(ctl, again)
    asyncio.run(go())


def test_where_a_stop_keeps_a_ledger_s_outbox_is_per_ledger_never_names_a_password_and_is_no_engine_run(
        tmp_path, monkeypatch):
    from actors._budget_kept import kept_dir
    from actors._file_journal import engine_dirs
    from engine.core.settings import JournalSettings, Settings

    def settings(url: str, prefix: str = "p", **journal) -> Settings:
        return Settings(budgets=BudgetSettings(redis_url=url, redis_prefix=prefix), journal=JournalSettings(**journal))

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    home = kept_dir(settings("redis://:pw@h:6379/0"))
    assert home.parent == tmp_path / "state" / "smartbatch" / "budget-outbox" and "pw" not in str(home)
    assert kept_dir(settings("redis://:other@h:6379/0")) == home  # the same ledger, whatever the password
    assert len({home, kept_dir(settings("redis://h:6379/1")), kept_dir(settings("redis://h:6379/0", "q"))}) == 3
    assert kept_dir(settings("redis://h/0", ledger_dir=tmp_path / "l")).parent == tmp_path / "l"
    jobs = tmp_path / "jobs"
    kept = kept_dir(settings("redis://h/0", dir=jobs))
    kept.mkdir(parents=True)
    (jobs / "sb-1").mkdir()
    # Beside the dispatchers' journal, not taken for an engine run: a job's clean end sweeps every run's.
    assert kept.is_relative_to(jobs) and engine_dirs(jobs) == [jobs / "sb-1"]


def test_a_clear_of_the_outbox_journal_never_removes_a_dead_incarnation_s_records_not_read_back_yet():
    """A restarted controller answers calls while its outbox is still being read back (nothing waits for it). One
    of them queued for want of Redis, written, then taken by Redis, left this run's outbox empty: the writer
    cleared the whole space, the dead incarnation's records with it, before the read-back got them (their spend
    lost). Now a restarted controller clears only once it has read back; until then it deletes its own records."""
    class SlowRead(GatedStore):
        def __init__(self):
            super().__init__()
            self.read_held, self.reading, self.read_gate = False, asyncio.Event(), asyncio.Event()

        async def clear(self, space: str) -> None:
            for k in [k for k in self.records if k[0] == space]:
                del self.records[k]

        async def items(self, space: str) -> dict:
            if self.read_held:  # (Ray's store busy: the first read retried)
                self.reading.set()
                await self.read_gate.wait()
            return await super().items(space)

    async def go():
        b, store = _away(), SlowRead()
        dead = BudgetController(b, None, ManualClock(100.0), kv_journal=store)
        await dead.settle_many([("old", 1.0)])  # Redis away: journaled, and its controller dies
        again = BudgetController(b, None, ManualClock(100.0), kv_journal=store)
        again.reconstructed()
        store.read_held = True
        first = asyncio.create_task(again.settle_many([("a", 0.5)]))  # reads the outbox back (slowly)
        await asyncio.wait_for(store.reading.wait(), 10)
        await again.settle_many([("b", 2.0)])  # beside it: Redis away, journaled
        again._outbox.remove(("b", 2.0))  # then Redis takes it, as ``_settle`` does
        await again._taken([("b", 2.0)])
        store.read_gate.set()
        await asyncio.wait_for(first, 10)
        assert ("old", 1.0) in again._outbox  # (before: cleared from the journal unread, its spend lost)
        await _closed(dead, again)
    asyncio.run(go())


def test_what_a_controller_took_back_from_a_kept_file_waits_until_redis_takes_it():
    """``kept_waiting``: the driver deletes a kept file it took back once none of its items wait for Redis."""
    from actors._budget_outbox import _charge_key, _settlement_key

    async def go():
        ctl = BudgetController(_away(), None, ManualClock(100.0), kv_journal=GatedStore())
        charge = Charge("x1", "acme", "openai", "gpt-5-mini", 0.5)
        records = {_settlement_key("a0", 1.5): ("a0", 1.5, None), _charge_key(charge): (charge, 100.0)}
        assert await ctl.take_kept(records) == 0  # journaled; Redis away
        assert sorted(await ctl.kept_waiting([*records, "c\x1fother"])) == sorted(records)
        ctl._settling += 1  # a call to Redis out: its items may come back
        ctl._outbox.clear()
        assert sorted(await ctl.kept_waiting(list(records))) == sorted(records)
        ctl._settling -= 1
        ctl._charges.clear()  # Redis took them
        assert await ctl.kept_waiting(list(records)) == []
        await _closed(ctl)
    asyncio.run(go())


def test_items_taken_back_twice_wait_once():
    """Two kept files may hold one item (a file given back at a start whose journal write failed, and the stop of
    that engine keeping its outbox anew): taken back twice, it waited twice, and the ledger said twice as many
    unsettled (and a stop's figures, their USD)."""
    from actors._budget_outbox import _charge_key, _settlement_key

    async def go():
        ctl = BudgetController(_away(), None, ManualClock(100.0), kv_journal=GatedStore())
        charge = Charge("x1", "acme", "openai", "gpt-5-mini", 0.5)
        records = {_settlement_key("a0", 1.5): ("a0", 1.5, None), _charge_key(charge): (charge, 100.0)}
        await ctl.take_kept(records)
        await ctl.take_kept(dict(records))
        assert (ctl._outbox, [c for c, _ in ctl._charges]) == ([("a0", 1.5)], [charge])
        assert (await ctl.report())["ledger"]["unsettled"] == 2
        await _closed(ctl)
    asyncio.run(go())
