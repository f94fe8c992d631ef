"""The memory ledger's copy in Ray's key-value store (``actors._budget_journal``): the hub's journal is its memory,
so the hub and the budget controller dying together restarted every budget from zero. Driven without Ray: a
stand-in for the store whose writes land when the test lets them, so the writes in flight can be counted."""

from __future__ import annotations

import asyncio
import pickle

from actors import BudgetController, ResultHub
from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim
from engine.core.clock import ManualClock
from tests.unit.helpers import HeldHub

SETTINGS = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),))


class HeldStore:
    """Ray's store as ``KvJournal`` uses it; while ``held``, a write waits for ``gate`` before it lands."""

    durable = True

    def __init__(self):
        self.records: dict[tuple[str, str], bytes] = {}
        self.puts = self.out = self.most_out = 0
        self.held, self.gate = False, asyncio.Event()

    async def put(self, space: str, key: str, value) -> None:
        blob = pickle.dumps(value)  # the state as sent, as KvJournal pickles it before it leaves
        self.puts, self.out = self.puts + 1, self.out + 1
        self.most_out = max(self.most_out, self.out)
        try:
            if self.held:
                await self.gate.wait()
        finally:
            self.out -= 1
        self.records[space, key] = blob

    async def items(self, space: str) -> dict:
        return {k: pickle.loads(v) for (s, k), v in self.records.items() if s == space}

    async def delete(self, space: str, keys: list[str]) -> None:
        for k in keys:
            self.records.pop((space, k), None)


class OneByOneStore(HeldStore):
    """Each write started while ``held`` waits for a gate of its own (``gates``, in the order they started), so a
    test lands them in the order it chooses: a dead incarnation's write after its successor's."""

    def __init__(self):
        super().__init__()
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()

    async def put(self, space: str, key: str, value) -> None:
        blob = pickle.dumps(value)
        gate = None
        if self.held:
            gate = asyncio.Event()
            self.gates.append(gate)
            self.started.set()
        if gate is not None:
            await gate.wait()
        self.records[space, key] = blob


def _claims(*ids: str, usd: float) -> list[Claim]:
    return [Claim(i, "acme", "openai", "gpt-5-mini", "urgent", usd) for i in ids]


def _state(rep: dict) -> tuple:
    return rep["spent_usd"], rep["reserved_usd"], rep["charged_usd"], rep["windows"]


async def _stop(*ctls: BudgetController) -> None:
    for ctl in ctls:
        for task in (ctl._reported, ctl.__dict__.get("_kv_task")):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _written(ctl: BudgetController) -> None:
    """Once the copy holds every change made so far (its writer goes on while changes come)."""
    if "_kv_task" in ctl.__dict__:
        await asyncio.wait_for(ctl._kv_task, timeout=10)


def test_the_hub_and_the_controller_dying_together_keep_the_spend_and_reservations_and_count_nothing_twice():
    async def go():
        store, clock = HeldStore(), ManualClock(100.0)
        ctl = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        await ctl.check_ledger()
        store.held = True  # answered meanwhile from the hub's journal alone: Ray's store is off the hot path
        ids = [f"a{k}" for k in range(50)]
        for rid in ids:
            assert (await ctl.reserve_many(_claims(rid, usd=0.1)))[0].ok
        await ctl.settle_many([(rid, 0.05) for rid in ids[:40]])
        await ctl.charge_many([Charge("late:m1", "acme", "openai", "gpt-5-mini", 0.5)])
        assert store.puts == 1 and store.most_out == 1  # one write out, none per request
        store.gate.set()
        await _written(ctl)
        assert store.puts == 2  # the next carried every change made while the first was out
        before = await ctl.report()

        # Both restarted by Ray: a new hub, its journal empty, and a new controller. Before: spend 0, nothing held.
        again = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        again.reconstructed()
        # The hub's rewire may reach the new controller before its own: its empty ledger wrote over the copy.
        await again.rejournal()
        await again.report_again()
        await _written(again)  # whatever they had copied
        assert _state(await again.report()) == _state(before)
        # Every claim settled again (the 40 a second time): those settled before the death count nothing more.
        await again.settle_many([(rid, 0.05) for rid in ids])
        after = await again.report()
        assert after["reserved_usd"] == 0 and after["spent_usd"] == before["spent_usd"] + 10 * 0.05
        await _stop(ctl, again)
    asyncio.run(go())


def test_a_controller_restarted_alone_takes_the_hub_s_newer_snapshot_and_its_copies_number_after_it():
    async def go():
        store, clock, hub = HeldStore(), ManualClock(100.0), ResultHub()
        ctl = BudgetController(SETTINGS, hub, clock, kv_journal=store)
        await ctl.check_ledger()
        assert (await ctl.reserve_many(_claims("a0", usd=1.0)))[0].ok
        await _written(ctl)
        store.held = True  # the copy lags: the write of a1 and a2 is out when the controller dies
        assert all(v.ok for v in await ctl.reserve_many(_claims("a1", "a2", usd=1.0)))
        ctl.__dict__.get("_kv_task", asyncio.Future()).cancel()
        again = BudgetController(SETTINGS, hub, clock, kv_journal=store)
        again.reconstructed()
        assert (await again.report())["reserved_usd"] == 3.0  # the hub's, not the copy's 1.0
        store.held = False
        store.gate.set()
        await again.settle_many([("a0", 0.5)])
        await _written(again)
        # Then the hub and the controller die together: the copy written after the restart is the newer.
        third = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        third.reconstructed()
        rep = await third.report()
        assert (rep["spent_usd"], rep["reserved_usd"]) == (0.5, 2.0)
        await _stop(ctl, again, third)
    asyncio.run(go())


def test_a_dead_incarnation_s_copy_landing_after_its_successor_s_does_not_replace_the_newer_ledger():
    """The hub and the controller die together with a copy in flight; the successor goes on from the last copy
    that landed and copies its own state; then the dead one's write lands. Before, both wrote one key and the late
    write replaced the successor's newer state (and by change number alone it even ranked above it): a third
    incarnation took back a settled claim as open and its spend as never made."""
    async def go():
        store, clock = OneByOneStore(), ManualClock(100.0)
        ctl = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        await ctl.check_ledger()
        assert (await ctl.reserve_many(_claims("a0", usd=1.0)))[0].ok
        await _written(ctl)  # the copy: a0 held
        store.held = True
        for rid in ("a1", "a2", "a3"):  # answered from the hub's journal; one copy in flight, the next waits for it
            assert (await ctl.reserve_many(_claims(rid, usd=1.0)))[0].ok
        await asyncio.wait_for(store.started.wait(), 10)
        # ctl dies here with its write in flight (its task lives on, as Ray's call in the network would).
        store.held = False
        again = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        again.reconstructed()
        assert (await again.report())["reserved_usd"] == 1.0  # the last copy that landed
        await again.settle_many([("a0", 0.5)])
        await _written(again)
        newer = _state(await again.report())
        for gate in store.gates:  # the dead incarnation's write lands now, after its successor's
            gate.set()
        await _written(ctl)
        third = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        third.reconstructed()
        assert _state(await third.report()) == newer  # before: reserved 4.0 (a0 to a3), spent 0
        await _stop(ctl, again, third)
    asyncio.run(go())


def test_a_dead_incarnation_s_journal_write_landing_in_the_hub_after_its_successor_s_does_not_replace_the_newer_ledger():
    """The controller dies alone (the hub lives) with a journal write on its way to the hub; its successor takes the
    ledger back from the hub, answers changes (each in the hub's journal before its answer) and dies too before its
    copies to Ray's store landed. Before, both wrote one key of the hub's journal: the late write replaced the
    successor's snapshot, and a third incarnation took back the dead one's ledger, ranked above the successor's
    copies that had landed (none here): the settlement and the claim it answered were gone."""
    async def go():
        store, clock, hub = HeldStore(), ManualClock(100.0), HeldHub()
        ctl = BudgetController(SETTINGS, hub, clock, kv_journal=store)
        await ctl.check_ledger()
        assert (await ctl.reserve_many(_claims("a0", usd=1.0)))[0].ok
        await _written(ctl)
        store.held = hub.held = True
        # Never answered: ctl dies with its journal write on its way to the hub (its task lives on, as Ray's call
        # in the network would).
        cut = asyncio.ensure_future(ctl.reserve_many(_claims("a1", usd=1.0)))
        await asyncio.wait_for(hub.started.wait(), 10)
        hub.held = False
        again = BudgetController(SETTINGS, hub, clock, kv_journal=store)
        again.reconstructed()
        assert (await again.report())["reserved_usd"] == 1.0  # the hub's last snapshot that landed: a0
        await again.settle_many([("a0", 0.5)])
        assert (await again.reserve_many(_claims("b1", usd=2.0)))[0].ok
        newer = _state(await again.report())
        keys = {"ledger@" + again.spec_incarnation}
        assert set(await hub.journal_items("budget")) == keys  # the older one's went once its own landed
        for gate in hub.gates:  # the dead incarnation's write lands in the hub now, after its successor's
            gate.set()
        assert (await asyncio.wait_for(cut, 10))[0].ok
        assert set(await hub.journal_items("budget")) == keys | {"ledger@" + ctl.spec_incarnation}
        # Then the successor dies alone too, its copies to Ray's store still out.
        third = BudgetController(SETTINGS, hub, clock, kv_journal=store)
        third.reconstructed()
        assert _state(await third.report()) == newer  # before: a0 and a1 held, a0's spend and b1 gone
        await asyncio.wait_for(third._journaling, 10)
        assert set(await hub.journal_items("budget")) == {"ledger@" + third.spec_incarnation}
        store.gate.set()
        await _stop(ctl, again, third)
    asyncio.run(go())


def test_two_incarnations_of_one_epoch_rank_by_when_they_began_not_by_their_change_numbers():
    """b and c both took the ledger back from a's copy, neither having read the other's: one epoch. b died with its
    hub and its first copy in flight, holding the claims that came while it read the ledger back (answered from its
    hub); c settled a0 and its copy landed; then b's landed. Ranked by (epoch, change), b's came first (it held
    more changes): a fourth incarnation took back a0 as open and c's settlement of it as never made."""
    async def go():
        store, clock = OneByOneStore(), ManualClock(100.0)
        a = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        await a.check_ledger()
        assert (await a.reserve_many(_claims("a0", usd=1.0)))[0].ok
        await _written(a)
        store.held = True  # a and its hub died; b's copies are on their way when b and its hub die too
        b = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        b.reconstructed()
        verdicts = await asyncio.gather(*(b.reserve_many(_claims(f"b{k}", usd=0.5)) for k in range(4)))
        assert all(v[0].ok for v in verdicts)
        await asyncio.wait_for(store.started.wait(), 10)
        store.held = False
        c = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        c.reconstructed()
        assert (await c.report())["reserved_usd"] == 1.0  # a's copy: b's had not landed
        await c.settle_many([("a0", 0.5)])
        await _written(c)
        newer = _state(await c.report())
        assert c._epoch == b._epoch
        for gate in store.gates:  # b's copy lands now, after c's
            gate.set()
        await _written(b)
        d = BudgetController(SETTINGS, ResultHub(), clock, kv_journal=store)
        d.reconstructed()
        assert _state(await d.report()) == newer  # before: a0 and b0-b3 held, spent 0
        await _stop(a, b, c, d)
    asyncio.run(go())
