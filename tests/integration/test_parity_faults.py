"""The live engine over HTTP against the simulator when providers fail: a text trace through the loopback
emulator, with 429s and 5xx on a fifth of the sync calls and batches twice as slow as the catalog says (most
of them hedged and cancelled), beside the simulator's run of the same trace with the catalog and settings the
engine plans with (``engine.app.live.planned``, what ``smartbatch run --dry-run`` prints).

The emulator draws its faults and sync latencies from draws of its own, so the two runs are compared where
those do not reach: every request gets the simulator's mode, and the requests end when the simulator says,
up to the engine's own lag (a median over the trace). What the provider billed is what the results say, once
per request, and every future resolves.

Which side of its hedge a batch ends on is compared exactly, so no batch of the trace ends near its hedge (the
premise, checked in the simulator): the simulator decides alike with every batch ending the live engine's lag
later or sooner, that lag bounded by ``LAG_S`` of real time at ``SPEEDUP``. The emulator and the simulator draw
one turnaround per provider for the whole run (``SLOT_S``): with minute slots, a batch sent a second before a
slot's end was created live in the next slot, whose draw ended it minutes apart from the simulator's, once the
engine lagged 60 ms of real time (stop 79: 5 requests took the other side of a hedge with two busy loops beside
the test, 11 with every batch 2 engine seconds late in the simulator). With the draw of ``DRAW_SEED``, OpenAI's
batches end nearly 5 minutes before their hedges' cancels are through, Anthropic's 13 minutes after.

Found by this test: the simulator cancelled a hedged batch at once, whatever the catalog's ``cancel_s``, where
a provider called over HTTP takes that long to cancel (the emulator exactly that long, real ones up to 10
minutes), finishing members meanwhile: every hedged member was back, and sent sync, ``cancel_s`` earlier in the
simulation than in the live run (the median request sent sync ended 57 engine seconds later live, with a
60-s cancel), so the simulation met deadlines a live run under faults misses; and a batch that ended during
its cancel was billed sync in the simulation, at the batch price live (up to 6 % of the HTTP providers' cost
of a 2,000-request dry run; tests/unit/test_sim_cancel.py holds the rule).
"""

from __future__ import annotations

import collections
import statistics

import pytest

from engine import Engine
from engine.app.live import as_emulated, follow_engine, planned, point_at_emulator
from engine.core.cost import MODES
from engine.core.provider_api import call_key
from engine.core.settings import Settings, SimSettings
from engine.emulator import Emulator
from engine.sim.simulator import simulate
from policies import load_policy
from tests.integration._catalogs import only
from tests.integration._parity import (
    PARITY_POLICY,
    LateDraws,
    closest_call,
    parity_catalog,
    sim_differences,
    wave_trace,
)

SPEEDUP = 20.0
CANCEL_S = 60.0  # engine seconds the emulator takes to cancel a batch
FAULTS = {"rate_429": 0.1, "rate_5xx": 0.1, "retry_after_s": 5.0}
WORLD = 2.0  # batches twice as slow as the catalog says: most are hedged
SLOT_S = 3600.0  # one batch turnaround drawn per provider for the run, the emulator's as the simulator's
DRAW_SEED = 1  # that draw: OpenAI's batches end well before their hedges, Anthropic's well after
LAG_S = 3.0  # real seconds a live batch's create or cancel may come after the simulator's (2.2 s seen, loaded)


def trace():
    """The parity wave trace's text requests (all at Anthropic), every other one moved to OpenAI."""
    reqs = [r for r in wave_trace(n=400, seed=52) if r.kind == "text"]
    return [r.model_copy(update={"provider": "openai", "model": "gpt-4o-mini"}) if k % 2 else r
            for k, r in enumerate(reqs)]


def catalog():
    """The parity catalog as the emulator plays it, with the trace's two providers alone: each dispatcher is a
    process to start, and the others are never called (the simulator decides alike with the whole catalog)."""
    return as_emulated(only("openai", "anthropic", catalog=parity_catalog()))


@pytest.mark.solo  # completion times in real time: no other test beside it
def test_under_sync_faults_and_hedged_batches_the_engine_ends_requests_when_the_simulator_says_billed_once(
        ray_session):
    reqs, cat = trace(), catalog()
    base = Settings(sim=SimSettings(turnaround_scale=WORLD, day_origin_s=0.0, batch_slot_s=SLOT_S))
    with Emulator(cat, speedup=SPEEDUP, seed=3, cancel_s=CANCEL_S, honour_keys=False) as emu:
        settings = point_at_emulator(base, emu)
        # The emulator fails no batch member, and its sync faults are not the simulator's draws: the simulator
        # fails nothing (``as_emulated``), so only timing separates the runs' retries.
        sim, plan = planned(reqs, policy="smart", params=PARITY_POLICY, catalog=cat, settings=settings,
                            seed=DRAW_SEED, speedup=SPEEDUP)
        assert sum(b.outcome == "hedged" for b in sim.batches) >= 5  # the premise: hedges, and batches kept
        assert any(b.mode == "batch_api" and b.outcome == "sent" for b in sim.batches)
        # ... and none of them near its hedge. Live, a batch ends up to the lag later (its create's), its hedge's
        # cancel is through up to the lag later, and the emulator cancels in the hedge's allowance less than the
        # simulator plans (``with_hedge_lag``): against its hedge, a live batch ends from lag - allowance sooner
        # to allowance + lag later than the simulator's. Every decision must stand at both ends.
        lag, allowance = LAG_S * SPEEDUP, settings.hedge_lag_s * SPEEDUP
        for shift in (allowance + lag, allowance - lag):
            late = LateDraws(len(reqs), settings.sim.max_attempts, DRAW_SEED, SLOT_S, shift)
            moved = simulate(reqs, load_policy("smart", plan, PARITY_POLICY), catalog=plan, settings=settings,
                             draws=late)
            assert sim_differences(sim, moved) == [], shift
        with Engine.start(settings, catalog=cat, policy_params=PARITY_POLICY, speedup=SPEEDUP,
                          metrics_port=None) as eng:
            follow_engine(emu, settings, DRAW_SEED)(eng)
            emu.faults.configure(FAULTS)
            live = {r.id: r for r in (f.result(timeout=300) for f in eng.replay(reqs))}
            rep = eng.report()
        bill = emu.bill()
        faulted = sum(c.status in (429, 500, 529) for c in emu.calls)

    assert faulted > 10  # the premise: faults
    assert sum(rep["providers"][p]["batches_cancelled"] for p in ("openai", "anthropic")) >= 5
    # A sync call fails 4 times in a row once in 625 here: that request fails, saying so, billed nothing.
    bad = {r.id for r in live.values() if r.status not in ("ok", "reused")}
    assert all("after 4 attempt(s)" in live[i].error and "injected fault" in live[i].error for i in bad), bad
    # Billed once per request, and what the results say is the bill.
    keys = collections.Counter((i.custom_id or i.idempotency_key).rsplit("-", 1)[0] for i in bill.items)
    assert not [k for k, n in keys.items() if n > 1]
    assert set(keys) == {call_key(r.tenant, r.id, r.model).rsplit("-", 1)[0] for r in live.values()
                         if r.status == "ok"}
    assert sum(r.cost_usd for r in live.values()) == pytest.approx(bill.total_usd, abs=1e-9)
    # The simulator's modes, and, for the requests sent sync (most of them the fallbacks of hedged batches),
    # its completion times up to the engine's lag and the emulator's own latency draws: the median 1 engine
    # second late (57 s when the simulator cancelled at once). A batch member's answer comes up to a poll late
    # (10 to 60 engine s apart) and, at OpenAI, once a cancel is through: 20 s both before and after.
    assert [(r.id, live[r.id].mode) for r in sim.requests if r.id not in bad] == [
        (r.id, MODES[m]) for r, m in zip(sim.requests, sim.mode) if r.id not in bad]
    late = statistics.median(live[r.id].done_s - float(sim.done_at[i]) for i, r in enumerate(sim.requests)
                             if MODES[sim.mode[i]] == "sync" and r.id not in bad)
    assert abs(late) < CANCEL_S / 4, late
    assert int(sim.met.sum()) == len(reqs) and all(r.deadline_met for r in live.values() if r.id not in bad)


def test_a_batch_create_refused_with_429s_is_made_again_after_retry_after_not_sent_sync(ray_session):
    """Deadlines of up to 50 minutes, so every request rides a batch, and Anthropic answers the first four
    creates of a batch with 429 and a Retry-After of 30 s (a provider's limit on creates or enqueued tokens).
    Nothing was made, so the batch is created again after the wait, while its hedge allows: every request still
    rides a batch, at the simulator's cost. Found by this test: each refusal sent the members back to the
    policy as a hedge does, the policy batched them again at once, and after four the runtime's progress guard
    sent all 65 sync, at twice the batch price, 50 minutes before their deadlines ($0.885 for $0.318).

    Not solo, unlike the test above: it bounds no real time. What it checks (the modes, the deadlines, the
    bill) has hundreds of engine seconds of room, a second or more of real time at this speed (the premise
    below), where a test beside it delays an actor by milliseconds."""
    speedup = 200.0
    reqs, cat = [r.model_copy(update={"deadline_s": r.deadline_s * 7.5}) for r in trace()], catalog()
    base = Settings(sim=SimSettings(turnaround_scale=0.7, day_origin_s=0.0))
    with Emulator(cat, speedup=speedup, seed=3, cancel_s=CANCEL_S, honour_keys=False) as emu:
        settings = point_at_emulator(base, emu)
        sim, _ = planned(reqs, policy="smart", params=PARITY_POLICY, catalog=cat, settings=settings, seed=0,
                         speedup=speedup)
        with Engine.start(settings, catalog=cat, policy_params=PARITY_POLICY, speedup=speedup,
                          metrics_port=None) as eng:
            follow_engine(emu, settings, 0)(eng)
            emu.faults.script("anthropic", "messages.batches.create", [{"status": 429, "retry_after_s": 30.0}] * 4)
            live = {r.id: r for r in (f.result(timeout=300) for f in eng.replay(reqs))}
        bill = emu.bill()
        refused = emu.count("messages.batches.create", "anthropic", 429)

    assert refused == 4 and {MODES[m] for m in sim.mode} == {"batch_api", "reuse"}  # the premise
    # ... with room: no arrival within a real second of a batch it could join or a copy it could follow, and every
    # request answered ten real seconds before its deadline (the four refusals cost 2 minutes of engine time).
    assert closest_call(sim) >= 1.0 * speedup and float((sim.deadline_at - sim.done_at).min()) >= 10.0 * speedup
    assert [(r.id, live[r.id].mode) for r in sim.requests] == [(r.id, MODES[m]) for r, m in zip(sim.requests, sim.mode)]
    assert all(r.deadline_met for r in live.values())
    assert sum(r.cost_usd for r in live.values()) == pytest.approx(bill.total_usd, abs=1e-9)
    assert bill.total_usd == pytest.approx(sim.total_cost, rel=0.01)
