"""The charge ids a memory budget ledger keeps (``KeptCharges``) in its journal snapshots: written once (the
controller's copy was the book's again) and pickled once per change of them, not per snapshot; a restart still counts
every charge once. Driven without Ray: a ``ResultHub`` is the hub, as in the other budget tests."""

from __future__ import annotations

import asyncio
import pickle

from actors import BudgetController, ResultHub
from actors._budget_journal import JOURNAL_KEY
from actors.journal import HubJournal
from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim
from engine.core.clock import ManualClock
from engine.core.ledger import KeptCharges

SETTINGS = BudgetSettings(specs=(BudgetSpec(max_budget=100.0, budget_duration="1d"),))


def _charges(lo: int, hi: int, usd: float = 0.01) -> list[Charge]:
    return [Charge(f"late:{k:05d}", "acme", "openai", "gpt-5-mini", usd) for k in range(lo, hi)]


async def _stop(*ctls: BudgetController) -> None:
    for ctl in ctls:
        for task in (ctl._reported, ctl._journaling):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def _restarted(hub: ResultHub, clock: ManualClock) -> BudgetController:
    ctl = BudgetController(SETTINGS, hub, clock)
    ctl.reconstructed()  # restarted by Ray: the ledger back from the hub's journal before any call is answered
    return ctl


def test_a_memory_ledger_s_snapshot_carries_each_charge_id_once_pickled_once_per_change_of_the_ids():
    """Before stop 82 the book's ids and the controller's (the same ids) went into every snapshot, each built and
    pickled again for every group of reservations: 16,384 + 16,384 ids cut reserve + settle pairs ~8,400/s to ~33/s
    (``benchmarks/bench_budget_ids.py``)."""
    async def go():
        ctl = BudgetController(SETTINGS, ResultHub(), ManualClock(100.0))
        await ctl.check_ledger()
        empty = len(pickle.dumps(ctl._snapshot()))
        await ctl.charge_many(_charges(0, 1_000))
        first = ctl._snapshot()
        one_copy = len(pickle.dumps(KeptCharges.restore(ctl.book.charged.state()).state()))
        assert len(pickle.dumps(first)) - empty <= 1.1 * one_copy  # before: ~1.7 copies (the strings shared)
        assert (await ctl.reserve_many([Claim("a", "acme", "openai", "gpt-5-mini", "urgent", 0.5)]))[0].ok
        await ctl.settle_many([("a", 0.25)])
        second = ctl._snapshot()
        # before: a new state, built again
        assert second[8] is first[8], "the ids pickled again for a snapshot that changed none"
        await ctl.charge_many(_charges(1_000, 1_001))
        assert KeptCharges.restore(ctl._snapshot()[8]).state()[1] == ctl.book.charged.usd
        assert "late:01000" in KeptCharges.restore(ctl._snapshot()[8])  # a new id: pickled again
        await _stop(ctl)
    asyncio.run(go())


def test_restarts_between_charges_count_every_charge_once_when_all_are_sent_again():
    """A fault test: charges, a restart, more charges, a second restart, then every charge sent again (a resumed
    file, a batch read again): nothing counts twice, in the spend as in ``charged_usd``, and a new one counts."""
    async def go():
        hub, clock = ResultHub(), ManualClock(100.0)
        ctl = BudgetController(SETTINGS, hub, clock)
        await ctl.check_ledger()
        await ctl.charge_many(_charges(0, 300))
        assert (await ctl.reserve_many([Claim("a", "acme", "openai", "gpt-5-mini", "urgent", 1.0)]))[0].ok
        again = _restarted(hub, clock)
        clock.advance(60.0)
        await again.charge_many(_charges(300, 500))  # ids changed after the restore: the next snapshot has them
        await again.settle_many([("a", 0.5)])
        third = _restarted(hub, clock)
        before = await third.report()
        assert abs(before["charged_usd"] - 5.0) < 1e-9 and abs(before["spent_usd"] - 5.5) < 1e-9
        await third.charge_many(_charges(0, 500))
        after = await third.report()
        assert (after["charged_usd"], after["spent_usd"]) == (before["charged_usd"], before["spent_usd"])
        await third.charge_many(_charges(500, 501, usd=0.25))
        assert abs((await third.report())["charged_usd"] - 5.25) < 1e-9
        await _stop(ctl, again, third)
    asyncio.run(go())


def test_a_snapshot_of_before_stop_82_with_the_controller_s_ids_apart_is_taken_back_and_counts_each_once():
    """Until stop 82 a snapshot held the book's ids (a set before stop 81, USD 0) and the controller's (id -> USD)."""
    async def go():
        hub, clock = ResultHub(), ManualClock(100.0)
        ctl = BudgetController(SETTINGS, hub, clock)
        await ctl.check_ledger()
        await ctl.charge_many(_charges(0, 40))
        snap = list(ctl._snapshot())
        ids = {f"late:{k:05d}": 0.01 for k in range(40)}
        snap[8], snap[12] = set(ids), dict(ids)
        await HubJournal(hub).put(JOURNAL_KEY[0], ctl._own_key(), tuple(snap))
        old = _restarted(hub, clock)
        assert abs((await old.report())["charged_usd"] - 0.4) < 1e-9
        await old.charge_many(_charges(0, 41))
        rep = await old.report()
        assert abs(rep["charged_usd"] - 0.41) < 1e-9 and abs(rep["spent_usd"] - 0.41) < 1e-9
        await _stop(ctl, old)
    asyncio.run(go())


def test_the_copy_in_ray_s_store_starts_at_most_once_per_interval_also_after_a_lull(monkeypatch):
    """Each copy is the whole snapshot, ids and all. Timed within one writing task alone, a change that came after
    the last copy had landed started a copy of its own at once: a change every 10 ms, one copy each."""
    from actors import _budget_journal
    from tests.unit.test_budget_kv_copy import HeldStore

    monkeypatch.setattr(_budget_journal, "KV_EVERY_S", 3_600.0)  # the interval longer than the test, so it shows

    async def go():
        store = HeldStore()
        ctl = BudgetController(SETTINGS, ResultHub(), ManualClock(100.0), kv_journal=store)
        await ctl.check_ledger()
        await ctl.charge_many(_charges(0, 10))
        await asyncio.wait_for(ctl._kv_task, timeout=10)  # the first copy landed, its task ended: a lull
        assert store.puts == 1
        await ctl.charge_many(_charges(10, 20))
        for _ in range(5):  # the copy's task given its turns
            await asyncio.sleep(0)
        assert store.puts == 1 and not ctl._kv_task.done()  # before: 2, a copy at once
        ctl._kv_task.cancel()
        await asyncio.gather(ctl._kv_task, return_exceptions=True)
        await _stop(ctl)
    asyncio.run(go())


class SizedHub(ResultHub):
    """The hub, noting the bytes of each journal write of the budget ledger's space."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def journal_put(self, space: str, key: str, blob: bytes) -> None:
        self.sizes += [len(blob)] if space == JOURNAL_KEY[0] else []
        await super().journal_put(space, key, blob)

    async def journal_put_checked(self, space: str, blobs: dict[str, bytes], *rest) -> str:
        self.sizes += [sum(map(len, blobs.values()))] if space == JOURNAL_KEY[0] else []
        return await super().journal_put_checked(space, blobs, *rest)


def test_the_charge_ids_go_to_the_hub_only_when_they_change():
    """Before, every snapshot carried them: 633 KB at 16,384 ids copied into the hub's record at each group of
    reservations (36 KB here for 1,000)."""
    async def go():
        hub, clock = SizedHub(), ManualClock(100.0)
        ctl = BudgetController(SETTINGS, hub, clock)
        await ctl.check_ledger()
        await ctl.charge_many(_charges(0, 1_000))
        assert hub.sizes[-1] > 30_000  # the ids, with the change that made them
        del hub.sizes[:]
        for k in range(5):
            assert (await ctl.reserve_many([Claim(f"a{k}", "acme", "openai", "gpt-5-mini", "urgent", 0.5)]))[0].ok
            await ctl.settle_many([(f"a{k}", 0.25)])
        assert len(hub.sizes) == 10 and max(hub.sizes) < 2_000, hub.sizes  # before: 10 writes of ~36,000 bytes
        await _stop(ctl)
    asyncio.run(go())


def test_a_hub_restarted_between_writes_gets_the_ids_again_before_the_next_change_is_answered():
    """The hub's journal is its memory: restarted (its records gone), a snapshot written without the ids it was
    given before is refused there (the hub's store has a new name) and written whole, so a restart of the controller
    after it still counts each charge once; and a restart's successor leaves no older ids' record behind."""
    async def go():
        hub, clock = ResultHub(), ManualClock(100.0)
        ctl = BudgetController(SETTINGS, hub, clock)
        await ctl.check_ledger()
        await ctl.charge_many(_charges(0, 200))
        for name in ("_journal_spaces", "_journal_store", "_journal_seqs"):  # the hub restarted by Ray, before the rewire
            hub.__dict__.pop(name)
        assert (await ctl.reserve_many([Claim("a", "acme", "openai", "gpt-5-mini", "urgent", 0.5)]))[0].ok
        again = _restarted(hub, clock)
        await again.charge_many(_charges(0, 200))
        rep = await again.report()
        assert abs(rep["charged_usd"] - 2.0) < 1e-9 and abs(rep["spent_usd"] - 2.0) < 1e-9, rep
        await asyncio.wait_for(again._journaling, 10)
        await again.charge_many(_charges(200, 201))  # the ids changed: the successor writes its own record
        assert set(await hub.journal_items(JOURNAL_KEY[0])) == {f"ledger@{again.spec_incarnation}",
                                                              f"charges@{again.spec_incarnation}"}
        await _stop(ctl, again)
    asyncio.run(go())


class LateHub(ResultHub):
    """A hub that runs a checked write its caller gave up on later: Ray does not cancel a call whose caller stopped
    waiting (``PUT_TIMEOUT_S``), so it lands when the hub gets to it, after the caller's next write."""

    def __init__(self) -> None:
        super().__init__()
        self.give_up = False
        self.late: list[tuple] = []

    async def journal_put_checked(self, space: str, blobs: dict[str, bytes], *rest) -> str:
        if self.give_up:
            self.give_up = False
            self.late.append((space, blobs, *rest))
            raise TimeoutError("the caller stopped waiting")
        return await super().journal_put_checked(space, blobs, *rest)

    async def land(self) -> None:
        for args in self.late:
            await super().journal_put_checked(*args)


def test_a_write_given_up_on_that_lands_after_a_newer_one_does_not_pair_later_snapshots_with_its_older_ids():
    """A fault test: the ids' record of a write the controller gave up on (a hub slow past ``PUT_TIMEOUT_S``) landed
    over the newer one's, and the snapshots after it, written without ids, were read back with those older ids: the
    charges between them, sent again after a restart, counted twice ($3.25 spent for $2.25)."""
    async def go():
        hub, clock = LateHub(), ManualClock(100.0)
        ctl = BudgetController(SETTINGS, hub, clock)
        await ctl.check_ledger()
        hub.give_up = True
        await ctl.charge_many(_charges(0, 100))  # its write given up on (logged), still on its way
        await ctl.charge_many(_charges(100, 200))  # written whole: the ids' state unknown since the last
        await hub.land()
        assert (await ctl.reserve_many([Claim("a", "acme", "openai", "gpt-5-mini", "urgent", 0.5)]))[0].ok
        await ctl.settle_many([("a", 0.25)])  # the ids unchanged: written without them
        again = _restarted(hub, clock)
        before = await again.report()
        assert abs(before["charged_usd"] - 2.0) < 1e-9 and abs(before["spent_usd"] - 2.25) < 1e-9, before
        await again.charge_many(_charges(0, 200))
        assert abs((await again.report())["spent_usd"] - 2.25) < 1e-9
        await _stop(ctl, again)
    asyncio.run(go())
